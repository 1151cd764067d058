"""Population directories: layout, the device stores, the server split, skips, resume, and clear errors."""

from __future__ import annotations

import gzip
import json
import os
import stat
from itertools import groupby

import numpy as np
import pytest

from edge_client.keys import KEY_FILE_NAME, KeyFileProvider, default_key_provider
from edge_client.store import TupleStore
from model.data.dataset import SplitData
from model.data.protocol import ProtocolConfig
from model.data.synthetic import SyntheticConfig, generate_population
from simulations.equivalence import compare_population
from simulations.heterogeneity import Heterogeneity
from simulations.population import PopulationError, build_population, open_population

N = 30
SMALL = ProtocolConfig(min_item_support=1, test_fraction=0.2)  # tiny populations keep some items


@pytest.fixture(scope="module")
def synthetic_pop(tmp_path_factory):
    out = tmp_path_factory.mktemp("pop") / "syn"
    info = build_population("synthetic", out, max_devices=N, seed=3, split_devices=N, workers=2)
    return out, info


def test_layout_and_summary(synthetic_pop):
    out, info = synthetic_pop
    summary = json.loads((out / "population.json").read_text())
    for key in (
        "format",
        "source",
        "partition",
        "n_devices",
        "seed",
        "created",
        "vocab_items",
        "skipped",
        "events",
        "records",
    ):
        assert key in summary
    assert summary["format"] == 1 and summary["source"] == "synthetic" and summary["n_devices"] == N
    assert not (out / "build.json").exists()
    lines = [json.loads(line) for line in (out / "devices.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(N))
    for line in lines:
        assert {"index", "device_id", "events", "records", "sessions", "status"} <= set(line)
    ok = [line for line in lines if line["status"] == "ok"]
    assert len(ok) == info.n_ok and info.n_ok + sum(info.skipped.values()) == N
    assert (
        sum(line["records"] for line in ok) == info.records
        and sum(line["events"] for line in ok) == info.events
    )
    for line in lines:
        assert (out / "devices" / f"{line['index']:06d}").is_dir() == (line["status"] == "ok")
    # Devices whose sessions all fall in the test period have nothing to train on: skipped, counted.
    assert set(info.skipped) <= {"no_training_sessions"}


def test_device_store_is_a_real_device_store(synthetic_pop):
    out, _ = synthetic_pop
    pop = open_population(out)
    index = int(pop.ok_indices()[0])
    directory = pop.device_dir(index)
    assert directory == out / "devices" / f"{index:06d}"
    key = directory / KEY_FILE_NAME
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    records = TupleStore(directory, key_provider=KeyFileProvider(key)).read()
    assert (
        records
        == TupleStore(directory, key_provider=default_key_provider(directory, prefer_keyring=False)).read()
    )
    line = next(line for line in pop.devices() if line["index"] == index)
    assert len(records) == line["records"] > 0
    assert len({r.session_id for r in records}) == line["sessions"]
    # Records are RIB tuples the model's vocabulary knows.
    assert {r.activity for r in records} <= set(pop.split().vocab.activities.names)
    # The device keeps recording into the same store afterwards.
    with TupleStore(directory, key_provider=KeyFileProvider(key)) as store:
        store.append(records[:1])
        assert store.count() == len(records) + 1


def test_server_split_holds_out_later_sessions(synthetic_pop):
    out, _ = synthetic_pop
    pop = open_population(out)
    split = pop.split()
    assert isinstance(split, SplitData) and split.test.n_sessions > 0
    assert split.vocab.n_items == pop.info.vocab_items
    stored = {
        f"{pop.device_id(int(i))}/{r.session_id}" for i in pop.ok_indices() for r in pop.records(int(i))
    }
    assert not stored & set(split.test.session_ids)  # no device holds an evaluation session
    assert set(split.train.session_ids) <= stored  # every centralized training session is on its device
    split_ms = split.info["split_time_ms"]
    assert max(r.timestamp_ms for i in pop.ok_indices() for r in pop.records(int(i))) < split_ms


def test_device_datasets_equal_the_centralized_training_data(synthetic_pop):
    pop = open_population(synthetic_pop[0])
    report = compare_population(pop, max_devices=None)
    assert report["examples"]["devices_identical"] == report["devices"] == pop.info.n_ok
    assert report["examples"]["device"] == report["examples"]["central"] == len(pop.split().train.examples())


def test_rebuild_is_a_no_op_and_other_arguments_are_refused(synthetic_pop, tmp_path):
    out, info = synthetic_pop
    again = build_population("synthetic", out, max_devices=N, seed=3, split_devices=N, workers=2)
    assert again.created == info.created  # found, not rebuilt
    with pytest.raises(PopulationError, match="other settings.*seed.*delete it or use another directory"):
        build_population("synthetic", out, max_devices=N, seed=4, split_devices=N)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PopulationError, match="not a population directory"):
        build_population("synthetic", foreign, max_devices=3, overwrite=True)
    assert (foreign / "notes.txt").exists()


def test_interrupted_build_resumes_to_the_same_population(tmp_path):
    class Killed(Exception):
        pass

    def kill_at_7(done, total):
        if done == 7:
            raise Killed

    args = {"max_devices": 16, "seed": 1, "split_devices": 16}
    with pytest.raises(Killed):
        build_population("synthetic", tmp_path / "a", workers=3, progress=kill_at_7, **args)
    with pytest.raises(PopulationError, match="incomplete.*7 devices.*resume"):
        open_population(tmp_path / "a")
    # A torn last line (killed mid-write) is cut off and that device redone.
    with (tmp_path / "a" / "devices.jsonl").open("a") as handle:
        handle.write('{"index": 7, "devi')
    seen = []
    resumed = build_population(
        "synthetic", tmp_path / "a", workers=3, progress=lambda d, t: seen.append(d), **args
    )
    assert seen[0] == 8  # started after the 7 acknowledged devices
    fresh = build_population("synthetic", tmp_path / "b", workers=1, **args)
    strip = lambda path: [  # noqa: E731
        {k: v for k, v in json.loads(line).items()}
        for line in (path / "devices.jsonl").read_text().splitlines()
    ]
    assert strip(tmp_path / "a") == strip(tmp_path / "b")
    assert (resumed.n_ok, resumed.records, resumed.events, resumed.skipped) == (
        fresh.n_ok,
        fresh.records,
        fresh.events,
        fresh.skipped,
    )
    a, b = open_population(tmp_path / "a"), open_population(tmp_path / "b")
    for index in a.ok_indices():
        assert a.records(int(index)) == b.records(int(index))
    assert sorted(os.listdir(tmp_path / "a" / "devices")) == sorted(os.listdir(tmp_path / "b" / "devices"))


def test_concurrent_builds_of_one_directory_are_refused(tmp_path):
    from simulations.population import _exclusive

    (tmp_path / "p").mkdir()
    with _exclusive(tmp_path / "p"), pytest.raises(PopulationError, match="another build"):
        build_population("synthetic", tmp_path / "p", max_devices=4, protocol=SMALL)
    with pytest.raises(PopulationError, match="not a directory"):
        (tmp_path / "file").write_text("x")
        build_population("synthetic", tmp_path / "file", max_devices=4)


def test_overwrite_rebuilds(tmp_path):
    build_population("synthetic", tmp_path / "p", max_devices=4, protocol=SMALL, workers=1)
    info = build_population(
        "synthetic", tmp_path / "p", max_devices=6, protocol=SMALL, overwrite=True, workers=1
    )
    assert info.n_devices == 6 and open_population(tmp_path / "p").n_devices == 6


def test_open_population_errors(tmp_path, synthetic_pop):
    with pytest.raises(PopulationError, match="not a directory"):
        open_population(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PopulationError, match="not a population directory"):
        open_population(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "population.json").write_text("{not json")
    with pytest.raises(PopulationError, match="corrupt"):
        open_population(bad)
    (bad / "population.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(PopulationError, match="missing field"):
        open_population(bad)
    summary = json.loads((synthetic_pop[0] / "population.json").read_text())
    (bad / "population.json").write_text(json.dumps({**summary, "format": 2}))
    with pytest.raises(PopulationError, match="format 2"):
        open_population(bad)
    (bad / "population.json").write_text(json.dumps(summary))
    with pytest.raises(PopulationError, match="split.npz is missing"):
        open_population(bad)
    (bad / "server").mkdir()
    (bad / "server" / "split.npz").write_bytes(b"garbage")
    (bad / "devices.jsonl").write_text("")
    pop = open_population(bad)
    with pytest.raises(PopulationError, match="corrupt"):
        pop.split()
    with pytest.raises(IndexError):
        pop.device_dir(N)
    with pytest.raises(PopulationError, match="no store"):
        pop.store(0)


def _write_device_logs(directory, n=8):
    directory.mkdir()
    events = generate_population(SyntheticConfig(n_devices=n, sessions_per_device=(3, 5)), seed=5)
    for device_id, group in groupby(events, key=lambda e: e.device_id):
        (directory / f"{device_id}.jsonl").write_text("".join(e.to_json() + "\n" for e in group))


def test_event_log_directory_skips_missing_and_corrupt_logs(tmp_path):
    logs = tmp_path / "logs"
    _write_device_logs(logs)
    (logs / "zz-garbage.jsonl").write_text('not json\n{"event_type": "nope"}\n')
    (logs / "zz-badgzip.jsonl.gz").write_bytes(b"\x1f\x8bnot really gzip")
    os.symlink(tmp_path / "gone.jsonl", logs / "zz-gone.jsonl")
    good = gzip.compress((logs / "device-000001.jsonl").read_bytes() + b"{broken line\n")
    (logs / "device-000001.jsonl").unlink()
    (logs / "device-000001.jsonl.gz").write_bytes(good)
    info = build_population(str(logs), tmp_path / "pop", protocol=SMALL, workers=2)
    assert info.n_devices == 11
    assert info.skipped.get("no_valid_events") == 1
    assert info.skipped.get("unreadable") == 1
    assert info.skipped.get("missing") == 1
    assert info.raw["event_log_skips"] == {"bad_json": 1}  # the gzipped log's broken line
    pop = open_population(tmp_path / "pop")
    statuses = {line["device_id"]: line["status"] for line in pop.devices()}
    assert statuses["zz-gone"] == "skipped:missing" and statuses["device-000001"] == "ok"
    assert not pop.device_dir(10).exists()
    report = compare_population(pop, max_devices=None)
    assert report["examples"].get("devices_different", 0) == 0


def test_volume_skew_shapes_synthetic_devices(tmp_path):
    het = Heterogeneity(volume_skew=1.5, seed=2, volume_max_sessions=30)
    info = build_population(
        "synthetic", tmp_path / "p", max_devices=24, split_devices=24, heterogeneity=het, workers=2
    )
    pop = open_population(tmp_path / "p")
    budgets = np.array([het.session_budget(i) for i in range(24)])
    assert budgets.max() > 3 * budgets.min()
    # Each device was generated with its budget of sessions; the test period holds some of them back.
    for line in pop.devices():
        if line["status"] == "ok":
            assert 1 <= line["sessions"] <= budgets[line["index"]]
    assert info.raw["build"]["volume"]["volume_skew"] == 1.5


def test_bad_arguments(tmp_path):
    from edge_client.schema import SchemaError

    with pytest.raises(SchemaError, match="max_devices"):
        build_population("synthetic", tmp_path / "p", max_devices=0)
    with pytest.raises(SchemaError, match="unknown_dataset|neither"):
        build_population("no-such-dataset", tmp_path / "q")
