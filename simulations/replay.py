"""Interaction logs -> a device's raw UI events, and a device's stored records -> a training dataset.

Real datasets are interaction logs (user, item, action, time), not raw UI events. A virtual device gets
its interactions as the raw events a real device would record, replays them through the device's own
``TupleExtractor`` and keeps the result in its own encrypted ``TupleStore``.

**Activities.** Each interaction row becomes one ``action`` event that carries its activity name (the
dataset's, after its mapping): the device records any app's own actions, as many as the mapping has, and
the server split is the centralized split itself (same names, same order, same indices).

**Events.** Each interaction row is one ``action`` event on its item at its time, in the protocol's order
(time, then log order); like ``module_view``/``cart``/``order`` it adds to the open visit of its item. No
``page_enter`` is sent: an action on an item with no open page opens a visit of its own, and a different item closes the open one ("switch"), so
the extractor's visits are the protocol's visits (consecutive rows on one item), its repeat collapsing
is the protocol's, and a visit's dwell is the time to the next visit's first event, capped at 30 min: the
protocol's gap-derived dwell. Where the log gives ``dwell_seconds``, a ``page_leave`` closes the visit at
``first event + dwell``, when that lies between the visit's last event and the next visit.

**Where the device's tuples differ from the protocol's** (measured in ``tests/simulations``):
1. The last visit of a session: the protocol has no successor and gives it the *unknown* dwell; the
   device closes it at its last event (flush) or at the 30-min timeout, a lower bound. The last visit of
   a session is only ever a prediction target, never part of a prefix, so no training example changes.
2. Sessions given by the log (JData 2018, YOOCHOOSE) that go quiet for more than 30 min inside: the
   device's extractor (``DEVICE_EXTRACTOR_CONFIG``) closes the open visit at the gap (dwell = its own
   span instead of the capped 30 min) and a same-item event after the gap starts a new visit (one more
   tuple when its activity repeats). Sessions cut per user at 30 min (JData 2016, Taobao) never have
   such gaps, so their tuples are identical apart from (1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_client.extract import DEVICE_EXTRACTOR_CONFIG
from edge_client.schema import EventType, MicroBehavior, RawEvent
from model.data.dataset import SessionDataset, Vocabulary
from model.data.local import records_to_dataset

_GAP_MS = DEVICE_EXTRACTOR_CONFIG.session_gap_s * 1000


def rows_to_events(
    device_id: str,
    sessions: Sequence[str],
    timestamps_ms: np.ndarray,
    items: Sequence[str],
    activities: Sequence[str],
    dwell_seconds: np.ndarray | None = None,
) -> tuple[list[RawEvent], int]:
    """One device's interaction rows, already in replay order, as raw events (+ page_leave for given dwell).

    Returns the events and how many given dwells could not be replayed (they overlap the next visit, or
    end before the visit's last event), which the extractor then measures from the events instead.
    """
    n = len(timestamps_ms)
    action = EventType.ACTION
    events = [
        RawEvent(device_id, sessions[i], int(timestamps_ms[i]), action, items[i], action=activities[i])
        for i in range(n)
    ]
    if dwell_seconds is None or not np.isfinite(dwell_seconds).any():
        return events, 0
    leaves, unreplayable = _page_leaves(device_id, sessions, timestamps_ms, items, dwell_seconds)
    if not leaves:
        return events, unreplayable
    # A leave goes after every event up to its time (ties: after the visit's own events).
    keyed = [(int(timestamps_ms[i]), 0, i, events[i]) for i in range(n)] + [
        (ts, 1, pos, ev) for pos, (ts, ev) in enumerate(leaves)
    ]
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return [k[3] for k in keyed], unreplayable


def _page_leaves(
    device_id: str, sessions: Sequence[str], ts: np.ndarray, items: Sequence[str], dwell: np.ndarray
) -> tuple[list[tuple[int, RawEvent]], int]:
    """page_leave events closing each visit at first + max given dwell, where that fits before the next visit."""
    by_session: dict[str, list[int]] = {}
    for i, session in enumerate(sessions):
        by_session.setdefault(session, []).append(i)
    leaves: list[tuple[int, RawEvent]] = []
    unreplayable = 0
    for session, rows in by_session.items():
        visits: list[list[int]] = []
        for i in rows:
            if visits and items[visits[-1][-1]] == items[i]:
                visits[-1].append(i)
            else:
                visits.append([i])
        for number, visit in enumerate(visits):
            given = dwell[visit]
            if not np.isfinite(given).any():
                continue
            leave = int(ts[visit[0]]) + int(round(float(np.nanmax(given)) * 1000))
            next_first = int(ts[visits[number + 1][0]]) if number + 1 < len(visits) else None
            last = int(ts[visit[-1]])
            # The extractor would close the visit on its own first: at the next visit, or at the session gap.
            if leave < last or (next_first is not None and leave > next_first) or leave - last > _GAP_MS:
                unreplayable += 1
                continue
            leaves.append((leave, RawEvent(device_id, session, leave, EventType.PAGE_LEAVE, items[visit[0]])))
    return leaves, unreplayable


# --------------------------------------------------------------------------------------------------
# Stored records -> the protocol's tuples -> a SessionDataset in the shared vocabulary
# --------------------------------------------------------------------------------------------------


@dataclass
class DeviceTuples:
    """A device's records as the protocol sees them: grouped by session, visits marked, repeats collapsed."""

    session_ids: list[str]  # one per tuple
    timestamps_ms: np.ndarray
    items: list[str]
    activities: list[str]
    dwell_seconds: np.ndarray
    visit_starts: np.ndarray

    def session_ends(self) -> dict[str, int]:
        """Latest tuple time of each session (the protocol's train/test criterion)."""
        ends: dict[str, int] = {}
        for session, ts in zip(self.session_ids, self.timestamps_ms.tolist(), strict=True):
            if ts > ends.get(session, -1):
                ends[session] = ts
        return ends


def protocol_tuples(records: Iterable[MicroBehavior]) -> DeviceTuples:
    """Apply the protocol's steps 2-3 to stored records: sessions in session-id order (as the protocol
    sorts them), records in time order (stable: ties keep append order), visits = consecutive records on
    one item, consecutive repeated activities within a visit dropped, every tuple carrying its visit's
    (max) dwell."""
    by_session: dict[str, list[MicroBehavior]] = {}
    for rec in records:
        by_session.setdefault(rec.session_id, []).append(rec)
    sessions: list[str] = []
    ts: list[int] = []
    items: list[str] = []
    acts: list[str] = []
    dwell: list[float] = []
    starts: list[bool] = []
    visit_of: list[int] = []
    visit_dwell: list[float] = []
    for session in sorted(by_session):
        recs = by_session[session]
        recs.sort(
            key=lambda r: r.timestamp_ms
        )  # stable: ties keep append order, as the protocol keeps log order
        prev_item: str | None = None
        for rec in recs:
            new_visit = rec.item_id != prev_item
            if new_visit:
                visit_dwell.append(float("nan"))
            elif rec.activity == acts[-1]:
                # A repeat within the visit: dropped, but its dwell still counts for the visit (max).
                visit_dwell[-1] = _nanmax(visit_dwell[-1], rec.dwell_seconds)
                continue
            visit_dwell[-1] = _nanmax(visit_dwell[-1], rec.dwell_seconds)
            sessions.append(session)
            ts.append(rec.timestamp_ms)
            items.append(rec.item_id)
            acts.append(rec.activity)
            starts.append(new_visit)
            visit_of.append(len(visit_dwell) - 1)
            prev_item = rec.item_id
    dwell = [visit_dwell[v] for v in visit_of]
    return DeviceTuples(
        sessions,
        np.asarray(ts, np.int64),
        items,
        acts,
        np.asarray(dwell, np.float64),
        np.asarray(starts, bool),
    )


def _nanmax(a: float, b: float) -> float:
    if a != a:
        return float(b)
    if b != b:
        return a
    return max(a, float(b))


def device_dataset(
    records: Iterable[MicroBehavior],
    vocab: Vocabulary,
    name: str = "device",
    user_id: str | None = None,
    min_session_visits: int = 2,
    has_activity: bool = True,
    has_dwell: bool = True,
) -> SessionDataset:
    """A device's stored records as a SessionDataset in the shared vocabulary, filtered as the protocol
    filters training data — the device trainer's own encoding (``model.data.local.records_to_dataset``),
    tagged with the device's user id and the source's field flags."""
    from dataclasses import replace

    data = records_to_dataset(records, vocab, name=name, min_session_visits=min_session_visits)
    user_ids = None if user_id is None else np.full(data.n_sessions, user_id)
    return replace(data, user_ids=user_ids, has_activity=has_activity, has_dwell=has_dwell)
