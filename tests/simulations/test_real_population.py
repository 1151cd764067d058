"""Populations from the shared real logs: the split is the centralized run's, the devices' tuples are the
protocol's apart from the documented differences (skipped without ../shared/data)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.schema import SchemaError
from model.data.open import open_dataset
from simulations.equivalence import compare_population
from simulations.population import build_population, open_population

pytestmark = pytest.mark.shared_data


def test_split_is_the_centralized_split(shared_data, tmp_path):
    info = build_population(
        "jdata2018_mkmsr_demo", tmp_path / "pop", max_devices=40, data_dir=shared_data, workers=2
    )
    split = open_population(tmp_path / "pop").split()
    central = open_dataset("jdata2018_mkmsr_demo", data_dir=shared_data)
    # The devices record the log's own activity names (action events): the vocabulary is the centralized one.
    assert split.vocab.activities == central.vocab.activities
    assert np.array_equal(split.vocab.item_ids, central.vocab.item_ids)
    assert split.vocab.dwell == central.vocab.dwell
    for part in ("train", "test"):
        mine, theirs = getattr(split, part), getattr(central, part)
        assert np.array_equal(mine.session_ids, theirs.session_ids)
        for name in ("items", "activities", "dwell_buckets", "visit_starts", "offsets", "timestamps_ms"):
            assert np.array_equal(getattr(mine, name), getattr(theirs, name)), (part, name)
    # The devices replay only the training period: no device holds a test session.
    pop = open_population(tmp_path / "pop")
    stored = {r.session_id for i in pop.ok_indices() for r in pop.records(int(i))}
    assert not stored & set(split.test.session_ids)
    assert info.partition == "user" and info.raw["source_details"]["excluded"]["test_only"] > 0


def test_jdata2016_devices_hold_the_protocols_tuples(shared_data, tmp_path):
    info = build_population(
        "jdata2016_sample", tmp_path / "pop", max_devices=60, seed=1, data_dir=shared_data, workers=2
    )
    # All 63 activities (58 click modules) reach the devices as action events: nothing is collapsed.
    central = open_dataset("jdata2016_sample", data_dir=shared_data)
    assert info.raw["source_details"]["mapping"]["activities"] == list(central.vocab.activities.names)
    assert len(central.vocab.activities) == 63
    report = compare_population(open_population(tmp_path / "pop"), max_devices=None)
    # Sessions cut per user at 30 min: every tuple equal, only the last visit's (unknown) dwell differs.
    assert set(report["sessions"]) == {"last_visit_dwell"}
    assert report["tuples"]["device"] == report["tuples"]["central"] > 0
    assert report["examples"]["devices_identical"] == report["devices"] == 60


def test_given_sessions_differ_only_across_long_gaps(shared_data, tmp_path):
    build_population(
        "jdata2018_mkmsr_demo", tmp_path / "pop", max_devices=150, data_dir=shared_data, workers=2
    )
    report = compare_population(open_population(tmp_path / "pop"), max_devices=None)
    assert set(report["sessions"]) <= {"last_visit_dwell", "session_gap"}
    assert report["sessions"]["last_visit_dwell"] > 5 * report["sessions"].get("session_gap", 0)
    assert report["tuples"]["device"] == report["tuples"]["central"]
    assert report["examples"]["device"] == report["examples"]["central"]


def test_session_partition_without_user_ids(shared_data, tmp_path):
    info = build_population(
        "yoochoose_100k", tmp_path / "pop", max_devices=50, data_dir=shared_data, workers=2
    )
    assert info.partition == "session"
    pop = open_population(tmp_path / "pop")
    for index in pop.ok_indices():
        assert len({r.session_id for r in pop.records(int(index))}) == 1  # one session per device
    with pytest.raises(SchemaError, match="devices by user need a user_id on every row"):
        build_population("diginetica_sample", tmp_path / "d", partition="user", data_dir=shared_data)
    info = build_population(
        "taobao_userbehavior_sample", tmp_path / "t", partition="session", data_dir=shared_data
    )
    assert info.partition == "session" and info.n_ok == info.n_devices


def test_min_examples_and_sampling(shared_data, tmp_path):
    full = build_population("taobao_userbehavior_sample", tmp_path / "a", data_dir=shared_data, workers=2)
    useful = build_population(
        "taobao_userbehavior_sample", tmp_path / "b", data_dir=shared_data, min_examples=1
    )
    assert useful.n_devices < full.n_devices
    assert useful.raw["source_details"]["excluded"]["too_few_examples"] == full.n_devices - useful.n_devices
    pop = open_population(tmp_path / "b")
    assert all(len(pop.device_dataset(int(i)).examples()) >= 1 for i in pop.ok_indices())
    sample = build_population(
        "taobao_userbehavior_sample", tmp_path / "c", max_devices=10, seed=4, data_dir=shared_data
    )
    ids = [line["device_id"] for line in open_population(tmp_path / "c").devices()]
    assert sample.n_devices == 10 and ids == sorted(ids)


def test_srgnn_splits_are_refused(shared_data, tmp_path):
    with pytest.raises(SchemaError, match="no users, no time"):
        build_population("diginetica", tmp_path / "p", data_dir=shared_data)
