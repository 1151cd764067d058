"""Raw UI events -> micro-behavior records, one event at a time (the device's extractor).

The batch path (``extract_population``) sorts events and feeds them through the very same streaming
``TupleExtractor``, so the tuples a model is trained on and the tuples a device builds agree exactly.

Rules (RIB Section 3.1 and Table 1):
- ``page_enter`` opens a product visit; its ``page_source`` gives the entry activity (Home2Product ...).
- ``module_view``, ``cart`` and ``order`` add an activity to the open visit of that item (an action on an
  item with no open page, e.g. carting from a list tile, opens a visit of its own).
- Consecutive identical activities within a visit are one micro behavior.
- A visit closes at ``page_leave``, at the next ``page_enter``, or when the session goes idle for
  ``session_gap_s``. Its dwell is close - enter, minus time the page was hidden, capped at ``max_dwell_s``.
  When the visit closes by idleness, the dwell ends at its last event (a lower bound; nothing better is known).
- Every activity of a visit carries the visit's dwell.
- Hover and scroll events keep a session alive; they do not make tuples.

Robustness a real device needs:
- Out-of-order delivery: with ``reorder_window_ms > 0`` events are held per session and released in
  timestamp order (ties keep arrival order) once the session's newest timestamp is ``reorder_window_ms``
  ahead of them. An event more than the window behind the session's newest is dropped and counted as
  ``too_late`` (``time_backwards`` when no window is configured). Nothing raises on bad ordering.
  Released order equals the stable sort the batch path uses, so in-order input yields the same tuples
  whatever the window; only their emission is delayed until the window has passed or ``flush``.
- Exact duplicates (the same event twice in a row after ordering) are counted and dropped.
- A missing ``page_leave`` is closed by the next enter or by the session timeout.

Micro-intent cues (optional, never part of the tuples): pass ``on_visit`` and every closed visit is also
reported as a ``VisitSummary`` (entry/exit, activities, max scroll depth, whether the item was visited
before in the session, items hovered around the visit but not entered in the session so far).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from edge_client.schema import (
    EVENT_TO_ACTIVITY,
    MODULE_TO_ACTIVITY,
    SOURCE_TO_ACTIVITY,
    EventType,
    MicroBehavior,
    RawEvent,
    SkipReport,
)

# Events held per session while waiting for stragglers; past this the oldest is released early.
MAX_PENDING_PER_SESSION = 4096
# Items remembered per session for the revisit / hover-only cues (bounded memory on long sessions).
MAX_CUE_ITEMS_PER_SESSION = 4096
MAX_HOVERED_PER_VISIT = 64
# The reorder window the device uses (the training batch path sorts, so it needs none).
DEVICE_REORDER_WINDOW_MS = 2000


@dataclass(frozen=True)
class ExtractorConfig:
    """Knobs of the extractor; the defaults follow the session-recommendation literature.

    ``reorder_window_ms`` defaults to 0 (events are applied as they arrive, output is immediate), which is
    what the sorted batch path wants; devices use ``DEVICE_EXTRACTOR_CONFIG`` (2 s window).
    """

    session_gap_s: float = 1800.0  # 30-min inactivity ends a session's open page
    max_dwell_s: float = 1800.0  # an idle page counts at most this long
    reorder_window_ms: int = 0  # hold events this long (event time) to put late arrivals back in order

    def __post_init__(self) -> None:
        if self.reorder_window_ms < 0:
            raise ValueError("reorder_window_ms must be >= 0")


DEVICE_EXTRACTOR_CONFIG = ExtractorConfig(reorder_window_ms=DEVICE_REORDER_WINDOW_MS)


@dataclass(frozen=True, slots=True)
class VisitSummary:
    """Micro-intent cues of one closed product visit (reported through ``on_visit``).

    - ``activities``: the visit's micro-behavior activities, in order (as in the tuples).
    - ``max_scroll``: deepest scroll on the page in [0, 1], None when it was never scrolled.
    - ``revisit``: the item was already visited earlier in the same session (back-and-forth).
    - ``hovered_only``: other items hovered while this visit was open or since the previous visit closed
      and not entered in the session up to this close (hover without click; provisional, a later visit
      of the item is reported with ``revisit`` False and does not retract it).
    - ``closed_by``: ``leave``, ``enter`` (next page_enter), ``switch`` (action on another item),
      ``timeout`` (session gap) or ``flush``.
    """

    session_id: str
    item_id: str
    enter_ms: int
    end_ms: int
    dwell_seconds: float
    activities: tuple[str, ...]
    max_scroll: float | None
    revisit: bool
    hovered_only: tuple[str, ...]
    closed_by: str


@dataclass(slots=True)
class _OpenVisit:
    item_id: str
    enter_ms: int
    last_ms: int
    activities: list[tuple[int, str]] = field(default_factory=list)
    hidden_since_ms: int | None = None
    hidden_total_ms: int = 0
    max_scroll: float | None = None
    revisit: bool = False


class _SessionState:
    __slots__ = ("last_ms", "last_event", "visit", "newest_ms", "pending", "visited", "hovered")

    def __init__(self, newest_ms: int):
        self.last_ms: int | None = None  # timestamp of the last applied event
        self.last_event: RawEvent | None = None
        self.visit: _OpenVisit | None = None
        self.newest_ms = newest_ms  # newest timestamp seen (applied or pending)
        self.pending: list[tuple[int, int, RawEvent]] = []  # heap of (timestamp, arrival, event)
        self.visited: set[str] = set()
        self.hovered: dict[str, None] = {}


class TupleExtractor:
    """Streaming extractor for one device: ``push`` events, get closed-visit micro behaviors back."""

    def __init__(
        self,
        config: ExtractorConfig | None = None,
        report: SkipReport | None = None,
        on_visit: Callable[[VisitSummary], None] | None = None,
    ):
        self.config = config or ExtractorConfig()
        self.report = report if report is not None else SkipReport()
        self.on_visit = on_visit
        self.too_late = 0  # events dropped for arriving behind the reorder window (this extractor only)
        self._sessions: dict[str, _SessionState] = {}
        self._window = int(self.config.reorder_window_ms)
        self._gap_ms = self.config.session_gap_s * 1000
        self._late_reason = "too_late" if self._window > 0 else "time_backwards"
        self._arrival = 0

    def push(self, event: RawEvent) -> list[MicroBehavior]:
        """Consume one event; returns the micro behaviors of any visit closed by the events it released."""
        self.report.read += 1
        ts = event.timestamp_ms
        state = self._sessions.get(event.session_id)
        if state is None:
            state = self._sessions[event.session_id] = _SessionState(ts)
        elif ts < state.newest_ms - self._window:
            self._drop_late(event, state.newest_ms)
            return []
        elif ts > state.newest_ms:
            state.newest_ms = ts
        if self._window == 0:
            closed = self._process(event, state)
            return closed if closed else []
        self._arrival += 1
        heapq.heappush(state.pending, (ts, self._arrival, event))
        return self._release(state, state.newest_ms - self._window)

    def flush(self, now_ms: int | None = None) -> list[MicroBehavior]:
        """Close open visits: all of them, or (with ``now_ms``) those of sessions idle past the gap.

        With ``now_ms``, held events older than the reorder window are released first, so a device that
        calls ``flush(now)`` periodically gets its tuples even when a session stops sending events.
        """
        out: list[MicroBehavior] = []
        for session_id in list(self._sessions):
            state = self._sessions[session_id]
            if now_ms is not None:
                if state.pending:
                    out += self._release(state, now_ms - self._window)
                if now_ms - state.newest_ms <= self._gap_ms:
                    continue
            if state.pending:
                out += self._release(state, None)
            if state.visit is not None:
                out += self._close(session_id, state, state.visit.last_ms, "flush")
            del self._sessions[session_id]
        return out

    @property
    def open_sessions(self) -> int:
        """Sessions with state held in memory."""
        return len(self._sessions)

    @property
    def pending_events(self) -> int:
        """Events held in reorder buffers."""
        return sum(len(state.pending) for state in self._sessions.values())

    # -- internals ---------------------------------------------------------------------------------

    def _drop_late(self, event: RawEvent, newest_ms: int) -> None:
        self.too_late += 1
        self.report.skip(
            self._late_reason, f"session {event.session_id}: {event.timestamp_ms} behind {newest_ms}"
        )

    def _release(self, state: _SessionState, limit_ms: int | None) -> list[MicroBehavior]:
        """Apply held events with timestamp <= limit_ms (all when None) in (timestamp, arrival) order."""
        pending = state.pending
        out: list[MicroBehavior] = []
        while pending and (limit_ms is None or pending[0][0] <= limit_ms or len(pending) > MAX_PENDING_PER_SESSION):
            closed = self._process(heapq.heappop(pending)[2], state)
            if closed:
                out += closed
        return out

    def _process(self, event: RawEvent, state: _SessionState) -> list[MicroBehavior] | tuple[()]:
        """Apply one event in session order; returns the records of visits it closed (maybe empty ())."""
        ts = event.timestamp_ms
        last_ms = state.last_ms
        closed: list[MicroBehavior] | None = None
        if last_ms is not None:
            if ts == last_ms and event == state.last_event:
                self.report.skip("duplicate", f"duplicate event at {ts}")
                return ()
            if ts < last_ms:  # only after a forced early release of an over-full reorder buffer
                self._drop_late(event, last_ms)
                return ()
            if ts - last_ms > self._gap_ms:
                if state.visit is not None:
                    closed = self._close(event.session_id, state, state.visit.last_ms, "timeout")
                if self.on_visit is not None:  # a new logical session: cues start afresh
                    state.visited.clear()
                    state.hovered.clear()
        state.last_ms = ts
        state.last_event = event
        self.report.kept += 1
        applied = self._apply(event, state)
        if closed:
            return closed + list(applied)
        return applied

    def _open(self, state: _SessionState, item_id: str, ts: int, activities: list[tuple[int, str]]) -> _OpenVisit:
        visit = state.visit = _OpenVisit(item_id, ts, ts, activities)
        if self.on_visit is not None:
            visited = state.visited
            visit.revisit = item_id in visited
            if len(visited) < MAX_CUE_ITEMS_PER_SESSION:
                visited.add(item_id)
        return visit

    def _apply(self, event: RawEvent, state: _SessionState) -> list[MicroBehavior] | tuple[()]:
        out: list[MicroBehavior] | tuple[()] = ()
        visit = state.visit
        kind = event.event_type
        ts = event.timestamp_ms
        if kind is EventType.PAGE_ENTER:
            if visit is not None:
                out = self._close(event.session_id, state, ts, "enter")
            self._open(state, event.item_id, ts, [(ts, SOURCE_TO_ACTIVITY[event.page_source])])
        elif kind is EventType.MODULE_VIEW or kind is EventType.CART or kind is EventType.ORDER:
            activity = MODULE_TO_ACTIVITY[event.module] if kind is EventType.MODULE_VIEW else EVENT_TO_ACTIVITY[kind.value]
            if visit is None or visit.item_id != event.item_id:
                if visit is not None:
                    out = self._close(event.session_id, state, ts, "switch")
                visit = self._open(state, event.item_id, ts, [])
            if not visit.activities or visit.activities[-1][1] != activity:
                visit.activities.append((ts, activity))
            visit.last_ms = ts
        elif kind is EventType.PAGE_LEAVE:
            if visit is not None and event.item_id in (None, visit.item_id):
                out = self._close(event.session_id, state, ts, "leave")
        elif kind is EventType.VISIBILITY_HIDDEN:
            if visit is not None and visit.hidden_since_ms is None:
                visit.hidden_since_ms = ts
        elif kind is EventType.VISIBILITY_VISIBLE:
            if visit is not None and visit.hidden_since_ms is not None:
                visit.hidden_total_ms += ts - visit.hidden_since_ms
                visit.hidden_since_ms = None
                visit.last_ms = ts
        elif visit is not None and event.item_id in (None, visit.item_id):  # hover / scroll on the open page
            visit.last_ms = ts
            if kind is EventType.SCROLL and event.value is not None:
                if visit.max_scroll is None or event.value > visit.max_scroll:
                    visit.max_scroll = event.value
        elif kind is EventType.HOVER and self.on_visit is not None:  # a tile of another item
            item = event.item_id
            if item not in state.visited and item not in state.hovered and len(state.hovered) < MAX_HOVERED_PER_VISIT:
                state.hovered[item] = None
        return out

    def _close(self, session_id: str, state: _SessionState, end_ms: int, closed_by: str) -> list[MicroBehavior]:
        visit = state.visit
        state.visit = None
        if visit is None:
            return []
        hidden = visit.hidden_total_ms
        if visit.hidden_since_ms is not None:
            hidden += max(0, end_ms - visit.hidden_since_ms)
        dwell_s = max(0.0, (end_ms - visit.enter_ms - hidden) / 1000.0)
        dwell_s = min(dwell_s, self.config.max_dwell_s)
        if self.on_visit is not None:
            hovered = tuple(item for item in state.hovered if item not in state.visited)
            state.hovered.clear()
            self.on_visit(
                VisitSummary(
                    session_id,
                    visit.item_id,
                    visit.enter_ms,
                    end_ms,
                    dwell_s,
                    tuple(activity for _, activity in visit.activities),
                    visit.max_scroll,
                    visit.revisit,
                    hovered,
                    closed_by,
                )
            )
        return [MicroBehavior(session_id, ts, visit.item_id, activity, dwell_s) for ts, activity in visit.activities]


def _event_order(event: RawEvent) -> tuple[str, str, int]:
    return (event.device_id, event.session_id, event.timestamp_ms)


def extract_population(
    events: Iterable[RawEvent], config: ExtractorConfig | None = None, report: SkipReport | None = None
) -> dict[str, list[MicroBehavior]]:
    """Batch path: sort events per device and session, stream them through ``TupleExtractor``."""
    by_device: dict[str, list[RawEvent]] = {}
    for event in events:
        by_device.setdefault(event.device_id, []).append(event)
    report = report if report is not None else SkipReport()
    out: dict[str, list[MicroBehavior]] = {}
    for device_id in sorted(by_device):
        extractor = TupleExtractor(config, report)
        records: list[MicroBehavior] = []
        for event in sorted(by_device[device_id], key=_event_order):  # stable: same-ms events keep log order
            records += extractor.push(event)
        records += extractor.flush()
        out[device_id] = records
    return out
