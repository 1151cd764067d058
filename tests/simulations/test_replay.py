"""Interactions -> device events -> extractor -> store reproduces the protocol's tuples (and where not, why)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.extract import DEVICE_EXTRACTOR_CONFIG, TupleExtractor
from edge_client.schema import EventType, MicroBehavior, SchemaError
from model.data.protocol import ProtocolConfig
from simulations.equivalence import compare_population
from simulations.population import build_population, open_population
from simulations.replay import device_dataset, protocol_tuples, rows_to_events

PROTOCOL = ProtocolConfig(min_item_support=1, test_fraction=0.25)


def _extract(events):
    extractor = TupleExtractor(DEVICE_EXTRACTOR_CONFIG)
    out = []
    for event in events:
        out += extractor.push(event)
    return out + extractor.flush()


def test_rows_to_events_uses_action_events_and_the_protocol_visits():
    ts = np.array([0, 0, 5_000, 5_000, 9_000, 20_000], dtype=np.int64)
    items = ["a", "a", "a", "b", "a", "a"]
    acts = ["view", "view", "add_cart", "view", "buy", "buy"]
    events, unreplayable = rows_to_events("d", ["s"] * 6, ts, items, acts)
    assert unreplayable == 0 and len(events) == 6
    # Every row is an action event under the log's own activity name: no device vocabulary to squeeze into.
    assert {e.event_type for e in events} == {EventType.ACTION}
    assert [e.action for e in events] == acts
    records = _extract(events)
    # Visits a (view, add_cart) | b (view) | a (buy): repeats within a visit collapse (the duplicate row is
    # also dropped as a duplicate event); dwell = time to the next visit's first event.
    got = [(r.item_id, r.activity, r.dwell_seconds) for r in records]
    assert got == [
        ("a", "view", 5.0),
        ("a", "add_cart", 5.0),
        ("b", "view", 4.0),
        ("a", "buy", 11.0),  # the last visit: closed at its last event by flush (the protocol says unknown)
    ]


def test_a_log_with_seven_actions_keeps_them_all_on_the_devices(tmp_path):
    """A hotel app's seven action types: the devices record each under its own name, and the server split
    is the centralized split (no collapse into a device vocabulary)."""
    from model.data.open import open_dataset
    from tests.app_logs import HOTEL_ACTIVITIES, write_hotel_log

    log, mapping = write_hotel_log(tmp_path, users=12, sessions=3)
    info = build_population(str(log), tmp_path / "pop", mapping=mapping, protocol=PROTOCOL, workers=2)
    assert info.raw["source_details"]["mapping"]["activities"] == list(HOTEL_ACTIVITIES)
    pop = open_population(tmp_path / "pop")
    split = pop.split()
    central = open_dataset(str(log), mapping=mapping, min_item_support=1, test_fraction=0.25)
    assert split.vocab.activities == central.vocab.activities
    assert np.array_equal(split.train.activities, central.train.activities)
    stored = {r.activity for i in pop.ok_indices() for r in pop.records(int(i))}
    assert stored == set(HOTEL_ACTIVITIES)
    report = compare_population(pop, max_devices=None)
    assert report["tuples"]["device"] == report["tuples"]["central"] > 0
    assert report["examples"]["devices_identical"] == report["devices"]


def test_a_mapping_for_device_event_sources_is_refused(tmp_path):
    from tests.app_logs import write_hotel_log

    _, mapping = write_hotel_log(tmp_path)
    with pytest.raises(SchemaError, match="applies to interaction logs"):
        build_population("synthetic", tmp_path / "pop", max_devices=3, mapping=mapping)


def test_given_dwell_becomes_page_leave():
    ts = np.array([0, 1_000, 30_000, 100_000], dtype=np.int64)
    items = ["a", "a", "b", "c"]
    acts = ["view", "cart", "view", "view"]
    dwell = np.array([12.0, 12.0, 80.0, 7.5])  # b's 80 s would run into c: not replayable
    events, unreplayable = rows_to_events("d", ["s"] * 4, ts, items, acts, dwell)
    assert unreplayable == 1
    assert [e.event_type for e in events].count(EventType.PAGE_LEAVE) == 2
    dwells = {r.item_id: r.dwell_seconds for r in _extract(events)}
    assert dwells == {"a": 12.0, "b": 70.0, "c": 7.5}  # b measured to the next visit instead


def test_protocol_tuples_and_device_dataset_filters():
    from edge_client.schema import ActivityVocabulary, DwellBuckets
    from model.data.dataset import Vocabulary

    recs = [
        MicroBehavior("s2", 10, "x", "Cart", 3.0),
        MicroBehavior("s1", 1, "a", "Cart", 2.0),
        MicroBehavior("s1", 2, "rare", "Cart", 2.0),
        MicroBehavior("s1", 3, "a", "Cart", 5.0),
        MicroBehavior("s1", 4, "b", "Order", 1.0),
        MicroBehavior("s2", 11, "a", "Cart", 3.0),
    ]
    tuples = protocol_tuples(recs)
    assert tuples.session_ids == ["s1"] * 4 + ["s2"] * 2  # session-id order, like the protocol
    assert tuples.session_ends() == {"s1": 4, "s2": 11}
    vocab = Vocabulary(np.array(["a", "b", "x"]), ActivityVocabulary(("Cart", "Order")), DwellBuckets((2.5,)))
    ds = device_dataset(recs, vocab, min_session_visits=3)
    # s1: a | rare | a | b = 4 visits; dropping 'rare' keeps the two a-visits apart (as the protocol does).
    assert list(ds.session_ids) == ["s1"]
    assert ds.items.tolist() == [1, 1, 2] and ds.visit_starts.tolist() == [True, True, True]
    assert ds.dwell_buckets.tolist() == [0, 1, 0]
    assert len(ds.examples()) == 2


def _write_log(path, with_dwell: bool) -> None:
    """12 users x 3 sessions (3 h apart) of visits with repeated actions, same-second rows and a duplicated
    row; with dwell, each visit's dwell is its own span + 10 s (so it ends before the next visit)."""
    rng = np.random.default_rng(0)
    lines = ["user_id,timestamp,item_id,action" + (",dwell_seconds" if with_dwell else "")]
    for user in range(12):
        t = 1_700_000_000 + user * 60
        for session in range(3):
            item = ""
            for _ in range(int(rng.integers(2, 7))):
                item = rng.choice([f"i{k}" for k in range(8) if f"i{k}" != item])  # a new visit each time
                rows = []
                for action in rng.choice(["view", "view", "cart", "buy"], size=int(rng.integers(1, 4))):
                    rows.append((t, action))
                    t += int(rng.integers(0, 3))
                if rng.random() < 0.2:
                    rows.append(rows[-1])  # an exact duplicate row
                dwell = f",{rows[-1][0] - rows[0][0] + 10}" if with_dwell else ""
                lines += [f"u{user},{ts},{item},{action}{dwell}" for ts, action in rows]
                t += int(rng.integers(20, 200))
            t += 3 * 3600 if session < 2 else 0
    path.write_text("\n".join(lines) + "\n")


def test_generic_log_population_matches_the_protocol(tmp_path):
    log = tmp_path / "log.csv"
    _write_log(log, with_dwell=False)
    info = build_population(str(log), tmp_path / "pop", protocol=PROTOCOL, workers=2)
    assert info.partition == "user" and info.n_ok == info.n_devices == 12
    assert info.raw["split"]["test_sessions"] >= 6  # the third sessions are the server's test set
    pop = open_population(tmp_path / "pop")
    report = compare_population(pop, max_devices=None)
    # Sessions cut per user never have inner gaps: only the last visit's dwell differs (unknown centrally).
    assert set(report["sessions"]) == {"last_visit_dwell"}
    assert report["tuples"]["device"] == report["tuples"]["central"]
    assert report["examples"]["devices_identical"] == report["devices"]
    assert report["examples"]["device"] == report["examples"]["central"] > 0


def test_generic_log_with_dwell_is_exact(tmp_path):
    log = tmp_path / "log.csv"
    _write_log(log, with_dwell=True)
    build_population(str(log), tmp_path / "pop", protocol=PROTOCOL, workers=2)
    pop = open_population(tmp_path / "pop")
    report = compare_population(pop, max_devices=None)
    # Every given dwell ends before the next visit: replayed as a page_leave, every tuple is the protocol's,
    # the last visit's dwell included.
    assert pop.info.raw["unreplayable_dwell"] == 0
    assert set(report["sessions"]) == {"exact"}
    assert report["examples"]["devices_identical"] == report["devices"] == pop.n_devices


def test_volume_skew_caps_real_devices_to_their_latest_sessions(tmp_path):
    from simulations.heterogeneity import Heterogeneity

    log = tmp_path / "log.csv"
    _write_log(log, with_dwell=False)
    full = build_population(str(log), tmp_path / "full", protocol=PROTOCOL, workers=1)
    het = Heterogeneity(volume_skew=0.5, volume_base_sessions=1, seed=1)
    capped = build_population(str(log), tmp_path / "capped", protocol=PROTOCOL, heterogeneity=het, workers=1)
    assert capped.records < full.records
    a, b = open_population(tmp_path / "full"), open_population(tmp_path / "capped")
    for index in range(a.n_devices):
        budget = het.session_budget(index)
        kept = {r.session_id for r in b.records(index)}
        ends = protocol_tuples(a.records(index)).session_ends()
        assert kept == set(sorted(ends, key=lambda s: ends[s])[-budget:])  # the most recent `budget` sessions
