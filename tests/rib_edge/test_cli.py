"""The CLI end to end on the synthetic population: files written, JSON contracts, clear errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rib_edge.cli import main


@pytest.fixture()
def runner():
    return CliRunner()


def test_synth_then_extract_counts_bad_lines(runner, tmp_path):
    events = tmp_path / "events.jsonl"
    result = runner.invoke(main, ["data", "synth", "--out", str(events), "--devices", "5"])
    assert result.exit_code == 0, result.output
    good_lines = events.read_bytes().count(b"\n")
    with events.open("ab") as handle:
        handle.write(
            b"{broken\n\xff\xfe\n"
            + json.dumps(
                {"device_id": "d", "session_id": "s", "timestamp_ms": 1, "event_type": "warp"}
            ).encode()
            + b"\n"
        )
    out = tmp_path / "tuples.csv"
    result = runner.invoke(main, ["data", "extract", str(events), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"read {good_lines + 3}, kept {good_lines}, skipped 3" in result.output
    assert out.read_text().startswith("session_id,user_id,timestamp,item_id,action,dwell_seconds")


def test_extract_of_an_empty_file_is_a_clear_error(runner, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = runner.invoke(main, ["data", "extract", str(empty), "--out", str(tmp_path / "t.csv")])
    assert result.exit_code != 0
    assert "no valid events" in result.output
    assert "Traceback" not in result.output


def test_bench_baselines_writes_rows_contract(runner, tmp_path):
    result = runner.invoke(
        main, ["bench", "baselines", "--dataset", "synthetic", "--models", "POP,SR", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "baselines.json").read_text())
    rows = {row["model"]: row for row in payload["rows"]}
    assert set(rows) == {"POP", "SR"}
    for row in rows.values():
        assert {"model", "data_type", "recall@20", "mrr@20"} <= set(row)
        assert 0 <= row["mrr@20"] <= row["recall@20"] <= 1
    # The synthetic population plants sequential structure: rules must beat popularity.
    assert rows["SR"]["recall@20"] > rows["POP"]["recall@20"]
    assert (tmp_path / "baselines.md").read_text().count("|") > 10


def test_bench_rejects_unknown_model_and_dataset(runner, tmp_path):
    result = runner.invoke(
        main, ["bench", "baselines", "--dataset", "synthetic", "--models", "GPT", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "unknown model" in result.output
    result = runner.invoke(
        main, ["bench", "baselines", "--dataset", "no-such-dataset", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_quickstart_end_to_end(runner, tmp_path):
    result = runner.invoke(main, ["quickstart", "--out", str(tmp_path), "--devices", "60"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "quickstart.json").read_text())
    assert summary["tuples"] > 0 and summary["test"]["examples"] > 0
    assert len(summary["example_recommendation"]["top5"]) == 5
    assert {row["data_type"] for row in summary["models"] if row["model"] == "RIB"} == {"SKU", "SKU+Micro"}
    # The on-device step used a signed package that the device-side verifier accepts.
    from edge_client.package import verify_package

    manifest = verify_package(tmp_path / "package", summary["package"]["public_key"])
    assert manifest.model_version == summary["package"]["model_version"] == 1
    assert (tmp_path / "stats" / "stats.json").exists()
    assert any(p.suffix == ".png" for p in (tmp_path / "stats").iterdir())


def test_data_catalog_writes_a_catalog_or_says_why_not(runner, tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("RIB_EDGE_DATA", str(shared_data))
    out = tmp_path / "catalog.csv"
    result = runner.invoke(main, ["data", "catalog", "jdata2016_sample", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from model.catalog import read_catalog

    catalog = read_catalog(out)
    assert catalog.fields == ("category", "brand") and len(catalog) > 1000
    result = runner.invoke(main, ["data", "catalog", "yoochoose_100k", "--out", str(tmp_path / "y.csv")])
    assert result.exit_code != 0 and "ships no item catalog" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "y.csv").exists()


def test_train_from_a_catalog_item_init(runner, tmp_path):
    from model.catalog import catalog_from_rows
    from model.data.open import open_dataset

    items = [str(i) for i in open_dataset("synthetic").vocab.item_ids]
    catalog = catalog_from_rows([[item, f"b{k % 7}"] for k, item in enumerate(items)], ("brand",))
    path = catalog.write_csv(tmp_path / "catalog.csv")
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--epochs", "1", "--item-dim", "8", "--hidden-dim", "8"]
    result = runner.invoke(main, [*args, "--out", str(out), "--item-catalog", str(path)])
    assert result.exit_code == 0, result.output
    assert f"item init from {path}: {len(items)} of {len(items)} items" in result.output
    assert json.loads((out / "history.json").read_text())["item_init"] == "item vectors"
    (tmp_path / "other.csv").write_text("item_id,brand\nnot-an-item,b\n")
    result = runner.invoke(
        main, [*args, "--out", str(tmp_path / "x"), "--item-catalog", str(tmp_path / "other.csv")]
    )
    assert result.exit_code != 0 and "describes none" in result.output and "Traceback" not in result.output


def test_train_with_a_frozen_tied_item_table(runner, tmp_path):
    """--tie-output --freeze-items: the checkpoint scores with the item table, which training left at its init."""
    from model.train import load_checkpoint

    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--epochs", "1", "--item-dim", "8", "--hidden-dim", "8"]
    result = runner.invoke(
        main, [*args, "--out", str(out), "--tie-output", "--freeze-items", "--refit-on-all"]
    )
    assert result.exit_code == 0, result.output
    rec = load_checkpoint(out / "rib.pt")
    assert rec.rib_config.tie_output and rec.rib_config.freeze_items
    assert not rec.model.item_emb.weight.requires_grad
    refit = json.loads((out / "history.json").read_text())["refit"]
    assert (
        refit["epochs"] == rec.history["best_epoch"]
        and f"refit {refit['epochs']} epochs on all" in result.output
    )
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "x"), "--tie-output", "--loss", "paper"])
    assert result.exit_code != 0 and "tie_output" in result.output and "Traceback" not in result.output


# ---- rib-edge fl: what can be refused before any process starts -------------------------------------------


@pytest.fixture(scope="module")
def population_split(tmp_path_factory):
    from model.data.open import synthetic_split
    from model.data.synthetic import SyntheticConfig

    path = tmp_path_factory.mktemp("split") / "split.npz"
    synthetic_split(SyntheticConfig(n_devices=30, n_items=40, n_categories=4, days=6)).save(path)
    return path


def _free_port() -> str:
    from aggregator.deploy import free_port

    return str(free_port())


def test_fl_run_refuses_a_bad_run_config_in_one_line(runner, tmp_path):
    base = ["fl", "run", "--superlink", "127.0.0.1:1", "--insecure", "--wait-s", "0"]
    result = runner.invoke(main, [*base, "-c", "num-server-roundz=2"])
    assert result.exit_code == 2 and "unknown run-config key 'num-server-roundz'" in result.output
    result = runner.invoke(main, [*base, "-c", f"eval-split={tmp_path / 'nope.npz'}"])
    assert result.exit_code == 2 and "eval-split:" in result.output and "not found" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    result = runner.invoke(main, [*base, "-c", "release-dir=rel"])
    assert result.exit_code == 2  # no eval split (and a release dir without a signing key)


def test_fl_run_without_a_superlink_says_so(runner, population_split):
    args = ["fl", "run", "--superlink", "127.0.0.1:1", "--insecure", "--wait-s", "0"]
    result = runner.invoke(main, [*args, "-c", f"eval-split={population_split}"])
    assert result.exit_code == 1 and "no SuperLink answers on 127.0.0.1:1" in result.output


def test_a_second_fl_join_on_a_busy_port_names_the_flag(runner, tmp_path):
    """The second SuperNode on one machine needs its own --port: one line saying so, not a traceback."""
    import socket

    from edge_client.keys import KeyFileProvider
    from edge_client.schema import MicroBehavior
    from edge_client.store import TupleStore
    from tests.edge_client.worlds import shared_world

    world = shared_world(tmp_path / "world")
    store = TupleStore(tmp_path / "store", key_provider=KeyFileProvider(tmp_path / "store" / "store.key"))
    item, activity = str(world["vocab"].item_ids[0]), world["vocab"].activities.names[0]
    store.append([MicroBehavior("s", 1_700_000_000_000, item, activity, 2.0)])
    store.close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        args = ["fl", "join", "--superlink", "127.0.0.1:9092", "--insecure", "--port", port]
        args += ["--device-dir", str(tmp_path / "store"), "--package-dir", str(world["package"])]
        result = runner.invoke(main, [*args, "--public-key", str(world["public"])])
    assert result.exit_code == 2 and f"port {port} on 127.0.0.1 is busy" in result.output
    assert "--port" in result.output and "Traceback" not in result.output


def test_fl_join_refuses_a_device_that_cannot_take_part(runner, tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    (tmp_path / "pkg").mkdir()
    args = ["fl", "join", "--superlink", "127.0.0.1:9092", "--insecure", "--port", _free_port()]
    result = runner.invoke(
        main,
        [
            *args,
            "--device-dir",
            str(tmp_path),
            "--package-dir",
            str(tmp_path / "pkg"),
            "--public-key",
            str(key),
        ],
    )
    assert result.exit_code == 2 and "refusing to join (package_invalid)" in result.output


def test_fl_demo_never_writes_into_a_directory_it_did_not_make(runner, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = runner.invoke(main, ["fl", "demo", "--out", str(tmp_path), "--prepare-only"])
    assert result.exit_code == 2 and "not written by `rib-edge fl demo`" in result.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    result = runner.invoke(main, ["fl", "demo", "--out", str(tmp_path / "d"), "-c", "local-steps=0"])
    assert result.exit_code == 2 and "local-steps" in result.output
