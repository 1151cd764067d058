"""The protocol: visits and dwell, temporal split, train-only filters, prefixes, leak-freedom, caching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from edge_client.schema import RIB_ACTIVITY_VOCAB, ActivityVocabulary, SchemaError
from model.data.dataset import SplitData
from model.data.events import events_to_frame
from model.data.protocol import ProtocolConfig, build_split, sessionize, to_visit_tuples
from model.data.synthetic import SyntheticConfig, generate_population

VOCAB = ActivityVocabulary(("view", "cart"), frozenset({"cart"}))


def frame(rows):
    return pd.DataFrame(rows, columns=["session_id", "timestamp_ms", "item_id", "activity"])


def test_visits_dwell_and_repeat_collapse():
    tuples = to_visit_tuples(
        frame(
            [
                ("s", 0, "a", "view"),
                ("s", 1000, "a", "view"),  # repeat within the visit: collapsed
                ("s", 2000, "a", "cart"),
                ("s", 10_000, "b", "view"),
                ("s", 70_000, "a", "view"),  # a revisit is a new visit
            ]
        ),
        ProtocolConfig(),
    )
    assert tuples["item_id"].tolist() == ["a", "a", "b", "a"]
    assert tuples["visit_start"].tolist() == [True, False, True, True]
    dwell = tuples["dwell_seconds"].tolist()
    assert dwell[:3] == [10.0, 10.0, 60.0] and np.isnan(dwell[3])


def test_sessionize_by_user_gap():
    rows = pd.DataFrame(
        {
            "user_id": ["u", "u", "u", "v"],
            "timestamp_ms": [0, 60_000, 60_000 + 31 * 60_000, 5],
            "item_id": list("abcd"),
            "activity": "view",
        }
    )
    out = sessionize(rows, 1800)
    assert out["session_id"].tolist()[0] == out["session_id"].tolist()[1] != out["session_id"].tolist()[2]
    with pytest.raises(SchemaError):
        sessionize(rows.drop(columns="user_id"), 1800)


def planted(n_sessions=400, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        t = s * 600_000
        for _ in range(rng.integers(2, 7)):
            t += int(rng.integers(5_000, 60_000))
            rows.append((f"s{s}", t, str(rng.integers(0, 40)), "view"))
    rows.append(("rare", 0, "only-once", "view"))
    rows.append(("rare", 1000, "1", "view"))
    return frame(rows)


def test_split_is_temporal_and_leak_free():
    data = planted()
    split = build_split(data, "planted", VOCAB, ProtocolConfig(test_fraction=0.25))
    train, test = split.train, split.test
    split_ms = split.info["split_time_ms"]
    # No test session, timestamp or unseen item reaches training.
    assert not set(train.session_ids) & set(test.session_ids)
    assert train.timestamps_ms.max() < split_ms
    ends = np.maximum.reduceat(test.timestamps_ms, test.offsets[:-1])
    assert ends.min() >= split_ms
    assert set(np.unique(test.items)) <= set(np.unique(train.items))
    # Filters: support counted on training visits only, sessions keep >= 2 visits.
    counts = np.bincount(train.items[train.visit_starts], minlength=train.n_items + 1)[1:]
    assert counts.min() >= 5
    assert (train.visits_per_session() >= 2).all() and (test.visits_per_session() >= 2).all()
    assert "only-once" not in set(split.vocab.item_ids)


def test_test_data_does_not_change_training_data():
    data = planted()
    split = build_split(data, "p", VOCAB, ProtocolConfig(test_fraction=0.25))
    # Rewrite every row of every test session: training must come out identical.
    session_end = data.groupby("session_id")["timestamp_ms"].transform("max")
    in_test = session_end >= split.info["split_time_ms"]
    assert in_test.any() and not in_test.all()
    scrambled = data.copy()
    scrambled.loc[in_test, "item_id"] = "x" + scrambled.loc[in_test, "item_id"]
    test_seconds = (data["timestamp_ms"].max() - split.info["split_time_ms"]) / 1000
    again = build_split(scrambled, "p", VOCAB, ProtocolConfig(test_seconds=test_seconds))
    assert again.info["split_time_ms"] == split.info["split_time_ms"]
    np.testing.assert_array_equal(again.train.items, split.train.items)
    np.testing.assert_array_equal(again.vocab.item_ids, split.vocab.item_ids)


def test_examples_are_every_prefix_predicting_the_next_visit():
    split = build_split(planted(), "p", VOCAB, ProtocolConfig(test_fraction=0.25, min_item_support=1))
    test = split.test
    examples = test.examples()
    assert len(examples) == int((test.visits_per_session() - 1).sum())
    for k in range(len(examples)):
        start, end = examples.starts[k], examples.ends[k]
        session = test.session(examples.session_index[k])
        assert start == session.start and start < end < session.stop
        assert test.visit_starts[end] and examples.targets[k] == test.items[end]


def test_missing_activity_is_an_error_not_a_silent_drop():
    with pytest.raises(SchemaError, match="not in the vocabulary"):
        build_split(frame([("s", 0, "a", "teleport"), ("s", 1, "b", "view")]), "x", VOCAB)
    with pytest.raises(SchemaError, match="no interactions"):
        build_split(frame([]), "x", VOCAB)


def test_save_load_round_trip(tmp_path):
    events = generate_population(SyntheticConfig(n_devices=40), seed=2)
    split = build_split(
        events_to_frame(events), "synthetic", RIB_ACTIVITY_VOCAB, ProtocolConfig(test_fraction=0.2)
    )
    split.save(tmp_path / "split.npz")
    loaded = SplitData.load(tmp_path / "split.npz")
    for part in ("train", "test"):
        a, b = getattr(split, part), getattr(loaded, part)
        for name in (
            "items",
            "activities",
            "dwell_buckets",
            "timestamps_ms",
            "visit_starts",
            "offsets",
            "session_ids",
        ):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert loaded.vocab.dwell == split.vocab.dwell and loaded.vocab.activities == split.vocab.activities
    assert loaded.info == split.info
