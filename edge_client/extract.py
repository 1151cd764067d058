"""Raw UI events -> micro-behavior records, one event at a time (the device's extractor).

The batch path (``extract_population``, what the training loaders call) sorts events by device, session and
time and feeds them through the very same ``TupleExtractor`` state machine (``_apply``): ``push`` hands it
one event per call, the batch path a whole session per call. There is no second implementation, so the
tuples a model is trained on and the tuples a device builds agree exactly (tested, skip counts included).
Speed targets (experiments/extract.py, one core): batch >= 1M events/s from parsed events, streaming
<= 20 us/event; hence ``_apply`` keeps the open visit in locals, records (named tuples) are built
with ``tuple.__new__``, and the batch path pauses the cyclic garbage collector.

Rules (RIB Section 3.1 and Table 1):
- ``page_enter`` opens a product visit; its ``page_source`` gives the entry activity (Home2Product ...).
- ``module_view``, ``cart``, ``order`` and an app's own ``action`` events (whose activity is the name they
  carry) add an activity to the open visit of that item (an action on an item with no open page, e.g.
  carting from a list tile, opens a visit of its own).
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

import gc
import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import groupby
from operator import attrgetter

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

_BEFORE_ANY = float("-inf")  # a session's last / newest timestamp before its first event
# Event types and activities as module constants (``_apply`` binds them to locals).
_PAGE_ENTER, _MODULE_VIEW = EventType.PAGE_ENTER, EventType.MODULE_VIEW
_CART, _ORDER, _ACTION = EventType.CART, EventType.ORDER, EventType.ACTION
_PAGE_LEAVE, _HOVER, _SCROLL = EventType.PAGE_LEAVE, EventType.HOVER, EventType.SCROLL
_HIDDEN, _VISIBLE = EventType.VISIBILITY_HIDDEN, EventType.VISIBILITY_VISIBLE
_CART_ACTIVITY, _ORDER_ACTIVITY = EVENT_TO_ACTIVITY[_CART.value], EVENT_TO_ACTIVITY[_ORDER.value]
_new_record = tuple.__new__  # builds a MicroBehavior (a named tuple) from its fields in one C call


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
    """A session's open product visit, as kept between ``_apply`` calls (inside one it lives in locals)."""

    item_id: str
    enter_ms: int
    last_ms: int
    activities: list[tuple[int, str]]
    hidden_since_ms: int | None
    hidden_total_ms: int
    max_scroll: float | None
    revisit: bool


class _SessionState:
    __slots__ = ("last_ms", "last_event", "visit", "newest_ms", "pending", "visited", "hovered")

    def __init__(self, newest_ms: float):
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
        self._max_dwell_s = self.config.max_dwell_s
        self._late_reason = "too_late" if self._window > 0 else "time_backwards"
        self._arrival = 0

    def push(self, event: RawEvent) -> list[MicroBehavior]:
        """Consume one event; returns the micro behaviors of any visit closed by the events it released."""
        self.report.read += 1
        ts = event.timestamp_ms
        session_id = event.session_id
        state = self._sessions.get(session_id)
        if state is None:
            state = self._sessions[session_id] = _SessionState(ts)
        elif ts < state.newest_ms - self._window:
            self._drop_late(event, state.newest_ms)
            return []
        elif ts > state.newest_ms:
            state.newest_ms = ts
        if self._window == 0:
            return self._apply(session_id, state, (event,))
        self._arrival += 1
        heapq.heappush(state.pending, (ts, self._arrival, event))
        return self._release(session_id, state, state.newest_ms - self._window)

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
                    out += self._release(session_id, state, now_ms - self._window)
                if now_ms - state.newest_ms <= self._gap_ms:
                    continue
            if state.pending:
                out += self._release(session_id, state, None)
            if state.visit is not None:
                out += self._apply(session_id, state, (), close_open=True)
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

    def _push_session(self, session_id: str, events: Iterable[RawEvent]) -> list[MicroBehavior]:
        """The batch path's feed (no reorder window): all events of a session new to this extractor, in order.

        The same as ``push`` of each event in turn - the same records in the same order, the same counts,
        bar ``report.read``, which the caller counts - with one ``_apply`` call per session instead of one
        per event.
        """
        state = self._sessions[session_id] = _SessionState(_BEFORE_ANY)
        return self._apply(session_id, state, events)

    def _drop_late(self, event: RawEvent, newest_ms: int) -> None:
        self.too_late += 1
        self.report.skip(
            self._late_reason, f"session {event.session_id}: {event.timestamp_ms} behind {newest_ms}"
        )

    def _release(self, session_id: str, state: _SessionState, limit_ms: int | None) -> list[MicroBehavior]:
        """Apply held events with timestamp <= limit_ms (all when None) in (timestamp, arrival) order."""
        pending = state.pending
        released: list[RawEvent] = []
        while pending and (
            limit_ms is None or pending[0][0] <= limit_ms or len(pending) > MAX_PENDING_PER_SESSION
        ):
            released.append(heapq.heappop(pending)[2])
        return self._apply(session_id, state, released) if released else []

    def _apply(
        self, session_id: str, state: _SessionState, events: Iterable[RawEvent], close_open: bool = False
    ) -> list[MicroBehavior]:
        """The state machine: apply events of one session in order; returns the records of the visits closed.

        Every event goes through here, whether ``push`` passes it alone (streaming) or the batch path a
        whole sorted session, so training and device tuples come from one code path. ``close_open`` closes
        the visit still open after the events (``flush``). Written for speed: the open visit lives in
        locals, globals are bound to locals, and the loop allocates nothing per event beyond a visit's
        activities and records (the batch path is held to >= 1M events/s, experiments/extract.py).
        """
        report = self.report
        cues = self.on_visit is not None
        gap_ms = self._gap_ms
        visited = state.visited
        hovered = state.hovered
        module_activity = MODULE_TO_ACTIVITY
        source_activity = SOURCE_TO_ACTIVITY
        page_enter, module_view, cart, order, action = _PAGE_ENTER, _MODULE_VIEW, _CART, _ORDER, _ACTION
        page_leave, hidden_event, visible_event, scroll = _PAGE_LEAVE, _HIDDEN, _VISIBLE, _SCROLL
        close = self._close
        out: list[MicroBehavior] = []
        last_ms = state.last_ms
        if last_ms is None:
            last_ms = _BEFORE_ANY
        last_event = state.last_event
        visit = state.visit
        is_open = visit is not None
        if is_open:  # the open visit, in locals while events are applied
            item_id, enter_ms, seen_ms, activities = (
                visit.item_id,
                visit.enter_ms,
                visit.last_ms,
                visit.activities,
            )
            hidden_since, hidden_ms = visit.hidden_since_ms, visit.hidden_total_ms
            max_scroll, revisit = visit.max_scroll, visit.revisit

        kept = 0
        for event in events:
            ts = event.timestamp_ms
            if ts > last_ms:  # the common case first: one comparison, then the gap
                if ts - last_ms > gap_ms:
                    if is_open:
                        close(
                            out,
                            session_id,
                            state,
                            seen_ms,
                            "timeout",
                            item_id,
                            enter_ms,
                            activities,
                            hidden_ms,
                            hidden_since,
                            max_scroll,
                            revisit,
                        )
                        is_open = False
                    if cues:  # a new logical session: cues start afresh
                        visited.clear()
                        hovered.clear()
            elif ts == last_ms:
                if event == last_event:
                    report.skip("duplicate", f"duplicate event at {ts}")
                    continue
            else:  # only after a forced early release of an over-full reorder buffer
                self._drop_late(event, last_ms)
                continue
            last_ms = ts
            last_event = event
            kept += 1
            kind = event.event_type
            if kind is module_view or kind is cart or kind is order or kind is action:
                if kind is action:
                    activity = event.action
                elif kind is module_view:
                    activity = module_activity[event.module]
                else:
                    activity = _CART_ACTIVITY if kind is cart else _ORDER_ACTIVITY
                if is_open:
                    if event.item_id == item_id:
                        if not activities or activities[-1][1] != activity:
                            activities.append((ts, activity))
                        seen_ms = ts
                        continue
                    close(
                        out,
                        session_id,
                        state,
                        ts,
                        "switch",
                        item_id,
                        enter_ms,
                        activities,
                        hidden_ms,
                        hidden_since,
                        max_scroll,
                        revisit,
                    )
                entry = (ts, activity)
            elif kind is page_enter:
                if is_open:
                    close(
                        out,
                        session_id,
                        state,
                        ts,
                        "enter",
                        item_id,
                        enter_ms,
                        activities,
                        hidden_ms,
                        hidden_since,
                        max_scroll,
                        revisit,
                    )
                entry = (ts, source_activity[event.page_source])
            else:
                if not is_open:
                    if cues and kind is _HOVER:  # a tile hovered while no page is open
                        self._note_hover(state, event.item_id)
                elif kind is page_leave:
                    if event.item_id is None or event.item_id == item_id:
                        close(
                            out,
                            session_id,
                            state,
                            ts,
                            "leave",
                            item_id,
                            enter_ms,
                            activities,
                            hidden_ms,
                            hidden_since,
                            max_scroll,
                            revisit,
                        )
                        is_open = False
                elif kind is hidden_event:
                    if hidden_since is None:
                        hidden_since = ts
                elif kind is visible_event:
                    if hidden_since is not None:
                        hidden_ms += ts - hidden_since
                        hidden_since = None
                        seen_ms = ts
                elif event.item_id is None or event.item_id == item_id:  # hover / scroll on the open page
                    seen_ms = ts
                    if kind is scroll and event.value is not None:
                        if max_scroll is None or event.value > max_scroll:
                            max_scroll = event.value
                elif cues and kind is _HOVER:  # a tile of another item
                    self._note_hover(state, event.item_id)
                continue
            # Open a visit: a page_enter, or an action on an item whose page is not open.
            is_open = True
            item_id = event.item_id
            enter_ms = seen_ms = ts
            activities = [entry]
            hidden_since = max_scroll = None
            hidden_ms = 0
            revisit = False
            if cues:
                revisit = item_id in visited
                if len(visited) < MAX_CUE_ITEMS_PER_SESSION:
                    visited.add(item_id)
        if kept:
            report.kept += kept
            state.last_ms = last_ms
            state.last_event = last_event
            if last_ms > state.newest_ms:
                state.newest_ms = last_ms
        if is_open and close_open:
            close(
                out,
                session_id,
                state,
                seen_ms,
                "flush",
                item_id,
                enter_ms,
                activities,
                hidden_ms,
                hidden_since,
                max_scroll,
                revisit,
            )
            is_open = False
        if not is_open:
            state.visit = None
        elif visit is None:
            state.visit = _OpenVisit(
                item_id, enter_ms, seen_ms, activities, hidden_since, hidden_ms, max_scroll, revisit
            )
        else:  # refill the session's visit object (it may hold another visit by now)
            visit.item_id, visit.enter_ms, visit.last_ms, visit.activities = (
                item_id,
                enter_ms,
                seen_ms,
                activities,
            )
            visit.hidden_since_ms, visit.hidden_total_ms = hidden_since, hidden_ms
            visit.max_scroll, visit.revisit = max_scroll, revisit
        return out

    def _close(
        self,
        out: list[MicroBehavior],
        session_id: str,
        state: _SessionState,
        end_ms: int,
        closed_by: str,
        item_id: str,
        enter_ms: int,
        activities: list[tuple[int, str]],
        hidden_ms: int,
        hidden_since: int | None,
        max_scroll: float | None,
        revisit: bool,
    ) -> None:
        """Append to ``out`` the records of the visit (``_apply``'s locals after closed_by) closed at end_ms.

        One call per visit; the caller marks the visit closed. Plain arguments, not a closure over
        ``_apply``'s locals: a closure would cost every ``push`` its cells.
        """
        if hidden_since is not None and end_ms > hidden_since:  # closed while hidden: that time counts too
            hidden_ms += end_ms - hidden_since
        dwell_s = (end_ms - enter_ms - hidden_ms) / 1000.0
        if not dwell_s > 0.0:  # max(0.0, dwell_s), then min(dwell_s, max_dwell_s), ties as the builtins
            dwell_s = 0.0
        elif self._max_dwell_s < dwell_s:
            dwell_s = self._max_dwell_s
        if self.on_visit is not None:
            hovered, visited = state.hovered, state.visited
            hovered_only = tuple(item for item in hovered if item not in visited)
            hovered.clear()
            names = tuple(activity for _, activity in activities)
            self.on_visit(
                VisitSummary(
                    session_id,
                    item_id,
                    enter_ms,
                    end_ms,
                    dwell_s,
                    names,
                    max_scroll,
                    revisit,
                    hovered_only,
                    closed_by,
                )
            )
        for ts, activity in activities:  # tuple.__new__ is what MicroBehavior(...) runs, minus a Python call
            out.append(_new_record(MicroBehavior, (session_id, ts, item_id, activity, dwell_s)))

    @staticmethod
    def _note_hover(state: _SessionState, item_id: str) -> None:
        """Hover-only cue: remember a hovered item not visited in the session (bounded)."""
        hovered = state.hovered
        if item_id not in state.visited and item_id not in hovered and len(hovered) < MAX_HOVERED_PER_VISIT:
            hovered[item_id] = None


_SESSION = attrgetter("session_id")
_TIMESTAMP = attrgetter("timestamp_ms")


def extract_population(
    events: Iterable[RawEvent], config: ExtractorConfig | None = None, report: SkipReport | None = None
) -> dict[str, list[MicroBehavior]]:
    """Batch path: sort events per device and session (stable), then run them through ``TupleExtractor``.

    The result is exactly what ``push`` of the sorted events one at a time and a final ``flush`` give
    (tested): the same state machine, fed a whole session per call when there is no reorder window.
    The cyclic garbage collector is paused meanwhile and restored after: the extractor makes no reference
    cycles, and the collector's full passes over a large heap cost about as much as the extraction itself.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _extract_population(events, config, report if report is not None else SkipReport())
    finally:
        if gc_was_enabled:
            gc.enable()


def _extract_population(
    events: Iterable[RawEvent], config: ExtractorConfig | None, report: SkipReport
) -> dict[str, list[MicroBehavior]]:
    by_device: defaultdict[str, list[RawEvent]] = defaultdict(list)  # no throwaway list per event
    for event in events:
        by_device[event.device_id].append(event)
    out: dict[str, list[MicroBehavior]] = {}
    for device_id in sorted(by_device):
        device_events = by_device[device_id]
        # Two stable sorts = one stable sort by (session, timestamp): same-ms events keep log order.
        device_events.sort(key=_TIMESTAMP)
        device_events.sort(key=_SESSION)
        extractor = TupleExtractor(config, report)
        records: list[MicroBehavior] = []
        if extractor._window:  # held events: push them one at a time, as a device would
            for event in device_events:
                records += extractor.push(event)
        else:
            report.read += len(device_events)
            for session_id, session_events in groupby(device_events, _SESSION):
                records += extractor._push_session(session_id, session_events)
        records += extractor.flush()
        out[device_id] = records
    return out
