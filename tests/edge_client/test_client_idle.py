"""EdgeClient.close_idle and the idle timer: open pages reach the store without a next event.

The client's clock is injected (a fake monotonic clock), so no test sleeps for the session gap; the timer
tests poll for at most a few seconds with 10 ms sleeps.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edge_client.client import EdgeClient
from edge_client.extract import DEVICE_EXTRACTOR_CONFIG
from edge_client.store import TupleStore
from tests.edge_client.worlds import DEVICE

GAP_S = DEVICE_EXTRACTOR_CONFIG.session_gap_s
WINDOW_MS = DEVICE_EXTRACTOR_CONFIG.reorder_window_ms
NOW_MS = 1_700_000_000_000


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_client(world, store: Path, clock: FakeClock, **kwargs) -> EdgeClient:
    return EdgeClient(store, world["package"], world["public"], device_id=DEVICE, clock=clock, **kwargs)


def open_page(session: str, t0: int, item: str = "item-7") -> list[dict[str, object]]:
    """An entered product page with a module view and a scroll, never left (dwell so far: 9 s)."""
    return [
        {
            "session_id": session,
            "timestamp_ms": t0,
            "event_type": "page_enter",
            "item_id": item,
            "page_source": "home",
        },
        {
            "session_id": session,
            "timestamp_ms": t0 + 4000,
            "event_type": "module_view",
            "item_id": item,
            "module": "comments",
        },
        {
            "session_id": session,
            "timestamp_ms": t0 + 9000,
            "event_type": "scroll",
            "item_id": item,
            "value": 0.5,
        },
    ]


def stored(store: Path, session: str | None = None) -> list:
    return TupleStore(store).read(session_id=session)


@pytest.mark.parametrize(
    "page_t0",
    [NOW_MS, 86_400_000, NOW_MS + 10 * 365 * 86_400_000],
    ids=["page-clock-now", "page-clock-1970", "page-clock-10y-ahead"],
)
def test_close_idle_waits_for_the_gap_in_device_monotonic_time(world, tmp_path, page_t0):
    """Whatever the page's clock says, the page closes once the device saw nothing for the session gap."""
    clock = FakeClock()
    client = make_client(world, tmp_path / "store", clock)
    for event in open_page("s1", page_t0):
        assert client.record(event).ok
        clock.advance(0.001)
    assert client.event_time_now() == page_t0 + 9000
    clock.advance(GAP_S - 1)
    assert client.close_idle() == 0 and stored(tmp_path / "store") == []
    assert client.current_session()  # still open, in memory only
    clock.advance(2)
    assert client.close_idle() == 2
    records = stored(tmp_path / "store")
    assert [(r.session_id, r.item_id, r.activity) for r in records] == [
        ("s1", "item-7", "Home2Product"),
        ("s1", "item-7", "Detail_comments"),
    ]
    assert all(
        r.dwell_seconds == pytest.approx(9.0) for r in records
    )  # enter -> last event, as the event path
    assert client.close_idle() == 0  # nothing left open
    assert client.stats["idle_stored_records"] == 2
    client.close()
    assert len(stored(tmp_path / "store")) == 2  # close() found nothing more to store


def test_close_idle_stores_what_the_event_path_would(world, tmp_path):
    """An idle close equals the close a later event (of another session) triggers, tuple for tuple."""
    events = open_page("s1", NOW_MS)
    clock = FakeClock()
    idle = make_client(world, tmp_path / "idle", clock)
    for event in events:
        assert idle.record(event).ok
    clock.advance(GAP_S + 0.5)
    assert idle.close_idle() == 2

    by_event = make_client(world, tmp_path / "event", FakeClock())
    for event in events:
        assert by_event.record(event).ok
    later = {
        "session_id": "s2",
        "timestamp_ms": NOW_MS + 9000 + int(GAP_S * 1000) + 500,
        "event_type": "cart",
        "item_id": "x",
    }
    assert by_event.record(later).stored == 2
    assert stored(tmp_path / "idle") == stored(tmp_path / "event", "s1")
    idle.close()
    by_event.close()


def test_close_idle_only_closes_sessions_past_the_gap(world, tmp_path):
    clock = FakeClock()
    client = make_client(world, tmp_path / "store", clock)
    for event in open_page("old", NOW_MS):
        assert client.record(event).ok
    clock.advance(GAP_S / 2)
    for event in open_page("new", NOW_MS + 9000 + int(GAP_S * 500), item="item-8"):
        assert client.record(event).ok
    clock.advance(GAP_S / 2 + 1)  # "old" idle for the gap + 1 s, "new" for half the gap
    assert client.close_idle() == 2
    assert {r.session_id for r in stored(tmp_path / "store")} == {"old"}
    clock.advance(GAP_S / 2)
    assert client.close_idle() == 2
    assert {r.session_id for r in stored(tmp_path / "store")} == {"old", "new"}
    client.close()


def test_close_idle_releases_held_events_before_the_gap(world, tmp_path):
    """A page_leave held in the reorder window is applied once the window has passed, not at the next event."""
    clock = FakeClock()
    client = make_client(world, tmp_path / "store", clock)
    assert client.record(open_page("s1", NOW_MS)[0]).ok
    assert client.record(
        {"session_id": "s1", "timestamp_ms": NOW_MS + 3000, "event_type": "page_leave", "item_id": "item-7"}
    ).ok
    assert stored(tmp_path / "store") == []  # the leave waits for stragglers
    clock.advance(WINDOW_MS / 1000 / 2)
    assert client.close_idle() == 0
    clock.advance(WINDOW_MS / 1000)
    assert client.close_idle() == 1
    [record] = stored(tmp_path / "store")
    assert record.activity == "Home2Product" and record.dwell_seconds == pytest.approx(3.0)
    client.close()


def test_close_idle_with_an_explicit_event_time(world, tmp_path):
    client = make_client(world, tmp_path / "store", FakeClock())
    assert client.close_idle() == 0  # nothing recorded yet
    for event in open_page("s1", NOW_MS):
        assert client.record(event).ok
    assert client.close_idle(now_ms=NOW_MS + 9000 + int(GAP_S * 1000)) == 0  # exactly the gap: still open
    assert client.close_idle(now_ms=NOW_MS + 9001 + int(GAP_S * 1000)) == 2
    client.close()
    assert client.close_idle(now_ms=NOW_MS * 2) == 0  # closed: a no-op


def test_erase_forgets_the_event_clock(world, tmp_path):
    clock = FakeClock()
    client = make_client(world, tmp_path / "store", clock)
    for event in open_page("s1", NOW_MS):
        assert client.record(event).ok
    client.erase()
    assert client.event_time_now() is None
    clock.advance(GAP_S * 2)
    assert client.close_idle() == 0 and stored(tmp_path / "store") == []
    client.close()


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_idle_timer_stores_idle_pages_and_close_stops_it(world, tmp_path):
    clock = FakeClock()
    client = make_client(world, tmp_path / "store", clock, idle_check_s=0.01)
    thread = client._timer[0]
    assert thread.daemon and thread.is_alive()
    for event in open_page("s1", NOW_MS):
        assert client.record(event).ok
    time.sleep(0.05)  # a few ticks: the page is not idle yet
    assert client.stats["idle_stored_records"] == 0
    clock.advance(GAP_S + 1)
    assert wait_for(lambda: client.stats["idle_stored_records"] == 2)
    assert len(stored(tmp_path / "store")) == 2
    client.close()
    assert not thread.is_alive() and client._timer is None
    assert client.stats["idle_errors"] == 0


def test_idle_timer_start_rules(world, tmp_path):
    client = make_client(world, tmp_path / "store", FakeClock())
    with pytest.raises(ValueError):
        client.start_idle_timer(0)
    client.start_idle_timer(0.05)
    with pytest.raises(RuntimeError, match="already running"):
        client.start_idle_timer(0.05)
    client.stop_idle_timer()
    client.stop_idle_timer()  # idempotent
    client.start_idle_timer(0.05)  # restartable
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.start_idle_timer(0.05)
    with pytest.raises(ValueError):
        make_client(world, tmp_path / "other", FakeClock(), idle_check_s=-1)


def test_idle_timer_races_recording_threads(world, tmp_path):
    """The timer shares the client's lock with recording threads: nothing lost, nothing raised."""
    clock = FakeClock()
    client = make_client(world, tmp_path / "store", clock, idle_check_s=0.001)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(40):
                page_t0 = NOW_MS + int(clock.now * 1000)  # the pages' clock runs with the device's
                for event in open_page(f"t{n}-{i}", page_t0):
                    assert client.record(event).ok
                clock.advance(GAP_S / 10)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    assert not errors and client.stats["idle_errors"] == 0
    records = stored(tmp_path / "store")
    assert len(records) == 3 * 40 * 2 == client.stats["stored_records"]
