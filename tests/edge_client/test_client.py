"""EdgeClient: raw events in, encrypted tuples stored, recommendations with explanations out."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from edge_client.client import EdgeClient
from edge_client.extract import DEVICE_EXTRACTOR_CONFIG, extract_population
from edge_client.runtime import latest_session
from edge_client.schema import RawEvent
from edge_client.store import TupleStore
from tests.edge_client.worlds import DEVICE, build_world  # noqa: F401 - build_world: for older importers


def make_client(world, store: Path, **kwargs) -> EdgeClient:
    return EdgeClient(store, world["package"], world["public"], device_id=DEVICE, **kwargs)


def test_records_and_recommends_with_explanations(world, tmp_path):
    events = world["events"]
    client = make_client(world, tmp_path / "store")
    results = [client.record(e) for e in events]
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    assert sum(r.stored for r in results) > 0
    # the current session equals the batch extractor's latest session (open visit included, not stored)
    expected = latest_session(extract_population(events, DEVICE_EXTRACTOR_CONFIG)[DEVICE])
    assert client.current_session() == expected
    stored = TupleStore(tmp_path / "store").read()
    assert len(stored) == client.stats["stored_records"] > 0
    on_disk = b"".join(f.read_bytes() for f in (tmp_path / "store").iterdir())
    assert not any(word in on_disk for word in (b"event_type", b"page_enter", b"timestamp_ms", b"Product"))
    recs = client.recommend(k=5)
    assert len(recs) == 5 and all(r.source == "model" for r in recs)
    weights = [t.weight for t in recs[0].explanation]
    assert len(weights) == len(expected) and math.isclose(sum(weights), 1.0, abs_tol=1e-4)
    assert not {r.item_id for r in recs} & {b.item_id for b in expected}  # seen items excluded
    banned = {recs[0].item_id}
    assert recs[0].item_id not in {r.item_id for r in client.recommend(k=5, exclude=banned)}
    client.close()


def test_accepts_dicts_lines_and_fills_device_id(world, tmp_path):
    client = make_client(world, tmp_path / "store")
    first, second, *_ = world["events"]
    as_dict = first.to_dict()
    del as_dict["device_id"]
    assert client.record(as_dict).ok
    assert client.record(second.to_json().encode()).ok
    assert client.record(RawEvent.from_dict({**second.to_dict(), "timestamp_ms": second.timestamp_ms + 1})).ok
    assert client.stats["recorded"] == 3
    client.close()


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (b"\xff\xfe\x00garbage", "not_utf8"),
        ("{not json", "bad_json"),
        (b"[1, 2, 3]", "bad_type"),
        (None, "bad_type"),
        (42, "bad_type"),
        ({"session_id": "s", "timestamp_ms": 1, "event_type": "teleport"}, "unknown_event_type"),
        ({"session_id": "s", "timestamp_ms": "soon", "event_type": "cart", "item_id": "1"}, "bad_type"),
        ({"session_id": ["s"], "timestamp_ms": 1, "event_type": "cart", "item_id": "1"}, "bad_type"),
        ({"session_id": "s", "timestamp_ms": 1, "event_type": "scroll", "value": [0.5] * 10_000}, "bad_type"),
        ({"session_id": "s", "timestamp_ms": 1, "event_type": "cart", "item_id": "x" * 100_000}, "bad_value"),
        (
            {"session_id": "s", "timestamp_ms": 1, "event_type": "cart", "item_id": "1", "extra": 1},
            "unknown_field",
        ),
        (
            {
                "device_id": "someone-else",
                "session_id": "s",
                "timestamp_ms": 1,
                "event_type": "cart",
                "item_id": "1",
            },
            "wrong_device",
        ),
        (b"{" + b'"a":1,' * 2000 + b"}", "too_large"),
        (
            '{"device_id": "device-000000", "session_id": "\\ud800", "timestamp_ms": 1, "event_type": "cart", "item_id": "1"}',
            "bad_value",
        ),
        ("[" * 2000 + "]" * 2000, "bad_json"),
    ],
)
def test_bad_input_returns_reason_and_stores_nothing(world, tmp_path, event, reason):
    client = make_client(world, tmp_path / "store")
    result = client.record(event)
    assert not result.ok and result.reason == reason and result.stored == 0
    assert client.stats[f"dropped_{reason}"] == 1
    client.close()
    assert TupleStore(tmp_path / "store").read() == []


def test_survives_restart(world, tmp_path):
    client = make_client(world, tmp_path / "store")
    for event in world["events"]:
        assert client.record(event).ok
    before = client.recommend(k=5)
    session = client.current_session()
    client.close()
    assert not client.record(world["events"][0]).ok  # closed
    again = make_client(world, tmp_path / "store")
    assert again.current_session() == session
    after = again.recommend(k=5)
    assert [r.item_id for r in after] == [r.item_id for r in before]
    assert [t.weight for t in after[0].explanation] == pytest.approx(
        [t.weight for t in before[0].explanation], abs=1e-6
    )
    again.close()


def test_bounded_sessions_pending_and_late(world, tmp_path):
    client = make_client(world, tmp_path / "store", max_open_sessions=2, max_pending_events=3)
    t0 = 1_700_000_000_000

    def cart(session: str, ts: int) -> dict[str, object]:
        return {"session_id": session, "timestamp_ms": ts, "event_type": "cart", "item_id": "1"}

    assert client.record(cart("a", t0)).ok
    assert client.record(cart("b", t0)).ok
    result = client.record(cart("c", t0))
    assert not result.ok and result.reason == "too_many_sessions"
    assert client.record(cart("c", t0 + 3_600_000)).ok  # a and b are idle past the gap: closed, c fits
    for i in range(1, 3):
        assert client.record(cart("c", t0 + 3_600_000 + i)).ok
    result = client.record(cart("c", t0 + 3_600_000 + 3))
    assert not result.ok and result.reason == "backpressure"
    assert client.record(cart("c", t0 + 3_610_000)).ok  # a newer event releases the held ones
    result = client.record(cart("c", t0 + 3_600_000))
    assert not result.ok and result.reason == "too_late"
    assert client.stats["dropped_too_many_sessions"] == 1 and client.stats["dropped_backpressure"] == 1
    client.close()


def test_erase_forgets_everything(world, tmp_path):
    client = make_client(world, tmp_path / "store")
    for event in world["events"]:
        client.record(event)
    client.close()
    client = make_client(world, tmp_path / "store")
    assert client.current_session()
    client.erase()
    assert client.current_session() == []
    cold = client.recommend(k=3)
    assert [r.item_id for r in cold] == world["popular"][:3] and all(r.source == "popularity" for r in cold)
    assert client.record(world["events"][0]).ok  # keeps working on a fresh store
    client.close()


def test_concurrent_recording(world, tmp_path):
    client = make_client(world, tmp_path / "store")
    events = world["events"]
    lines = [
        json.dumps({**e.to_dict(), "session_id": f"t{n}-{e.session_id}"})
        for n in range(4)
        for e in events[:40]
    ]
    errors: list[BaseException] = []

    def work(chunk: list[str]) -> None:
        try:
            for line in chunk:
                client.record(line)
                if len(line) % 7 == 0:
                    client.recommend(k=3)
        except BaseException as err:  # pragma: no cover - the assertion below reports it
            errors.append(err)

    threads = [threading.Thread(target=work, args=(lines[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(v for k, v in client.stats.items() if k == "recorded" or k.startswith("dropped_")) == len(
        lines
    )
    client.close()


def test_action_events_must_name_an_activity_of_the_installed_model(world, tmp_path):
    client = make_client(world, tmp_path / "store")
    item = world["events"][0].item_id
    base = {"session_id": "app", "event_type": "action", "item_id": item}
    unknown = client.record({**base, "timestamp_ms": 1_000, "action": "Book"})
    assert not unknown.ok and unknown.reason == "unknown_action" and "Book" in unknown.message
    assert "Detail_comments" in unknown.message  # the message lists what the model knows
    assert client.stats["dropped_unknown_action"] == 1
    # A name of the package's vocabulary is recorded, and the model uses the tuple it makes.
    assert client.record({**base, "timestamp_ms": 2_000, "action": "Detail_comments"}).ok
    session = client.current_session()
    assert [(r.item_id, r.activity) for r in session] == [(item, "Detail_comments")]
    recs = client.recommend(k=3)
    assert recs[0].source == "model" and [t.used for t in recs[0].explanation] == [True]
    client.close()
