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
"""

from __future__ import annotations

from collections.abc import Iterable
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


@dataclass(frozen=True)
class ExtractorConfig:
    """Knobs of the extractor; the defaults follow the session-recommendation literature."""

    session_gap_s: float = 1800.0  # 30-min inactivity ends a session's open page
    max_dwell_s: float = 1800.0  # an idle page counts at most this long


@dataclass
class _OpenVisit:
    item_id: str
    enter_ms: int
    last_ms: int
    activities: list[tuple[int, str]] = field(default_factory=list)
    hidden_since_ms: int | None = None
    hidden_total_ms: int = 0


@dataclass
class _SessionState:
    last_ms: int
    last_event: RawEvent | None = None
    visit: _OpenVisit | None = None


class TupleExtractor:
    """Streaming extractor for one device: ``push`` events, get closed-visit micro behaviors back."""

    def __init__(self, config: ExtractorConfig | None = None, report: SkipReport | None = None):
        self.config = config or ExtractorConfig()
        self.report = report if report is not None else SkipReport()
        self._sessions: dict[str, _SessionState] = {}

    def push(self, event: RawEvent) -> list[MicroBehavior]:
        """Consume one event; returns the micro behaviors of any visit it closed."""
        self.report.read += 1
        state = self._sessions.get(event.session_id)
        out: list[MicroBehavior] = []
        if state is not None:
            if event == state.last_event:
                self.report.skip("duplicate", f"duplicate event at {event.timestamp_ms}")
                return out
            if event.timestamp_ms < state.last_ms:
                self.report.skip("time_backwards", f"session {event.session_id}: {event.timestamp_ms} < {state.last_ms}")
                return out
            if event.timestamp_ms - state.last_ms > self.config.session_gap_s * 1000 and state.visit is not None:
                out += self._close(event.session_id, state, state.visit.last_ms)
        else:
            state = self._sessions[event.session_id] = _SessionState(last_ms=event.timestamp_ms)
        state.last_ms = event.timestamp_ms
        state.last_event = event
        self.report.kept += 1
        out += self._apply(event, state)
        return out

    def flush(self, now_ms: int | None = None) -> list[MicroBehavior]:
        """Close open visits: all of them, or (with ``now_ms``) those of sessions idle past the gap."""
        out: list[MicroBehavior] = []
        for session_id in list(self._sessions):
            state = self._sessions[session_id]
            idle = now_ms is None or now_ms - state.last_ms > self.config.session_gap_s * 1000
            if idle:
                if state.visit is not None:
                    out += self._close(session_id, state, state.visit.last_ms)
                del self._sessions[session_id]
        return out

    @property
    def open_sessions(self) -> int:
        """Sessions with state held in memory."""
        return len(self._sessions)

    def _apply(self, event: RawEvent, state: _SessionState) -> list[MicroBehavior]:
        out: list[MicroBehavior] = []
        visit = state.visit
        kind = event.event_type
        ts = event.timestamp_ms
        if kind is EventType.PAGE_ENTER:
            if visit is not None:
                out += self._close(event.session_id, state, ts)
            state.visit = _OpenVisit(event.item_id, ts, ts, [(ts, SOURCE_TO_ACTIVITY[event.page_source])])
        elif kind in (EventType.MODULE_VIEW, EventType.CART, EventType.ORDER):
            activity = MODULE_TO_ACTIVITY[event.module] if kind is EventType.MODULE_VIEW else EVENT_TO_ACTIVITY[kind.value]
            if visit is None or visit.item_id != event.item_id:
                if visit is not None:
                    out += self._close(event.session_id, state, ts)
                visit = state.visit = _OpenVisit(event.item_id, ts, ts)
            if not visit.activities or visit.activities[-1][1] != activity:
                visit.activities.append((ts, activity))
            visit.last_ms = ts
        elif kind is EventType.PAGE_LEAVE:
            if visit is not None and event.item_id in (None, visit.item_id):
                out += self._close(event.session_id, state, ts)
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
        return out

    def _close(self, session_id: str, state: _SessionState, end_ms: int) -> list[MicroBehavior]:
        visit = state.visit
        state.visit = None
        if visit is None:
            return []
        hidden = visit.hidden_total_ms
        if visit.hidden_since_ms is not None:
            hidden += max(0, end_ms - visit.hidden_since_ms)
        dwell_s = max(0.0, (end_ms - visit.enter_ms - hidden) / 1000.0)
        dwell_s = min(dwell_s, self.config.max_dwell_s)
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
