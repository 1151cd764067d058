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
        handle.write(b"{broken\n\xff\xfe\n" + json.dumps({"device_id": "d", "session_id": "s", "timestamp_ms": 1, "event_type": "warp"}).encode() + b"\n")
    out = tmp_path / "tuples.csv"
    result = runner.invoke(main, ["data", "extract", str(events), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"read {good_lines + 3}, kept {good_lines}, skipped 3" in result.output
    assert out.read_text().startswith("session_id,user_id,timestamp_ms,item_id,activity,dwell_seconds")


def test_extract_of_an_empty_file_is_a_clear_error(runner, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = runner.invoke(main, ["data", "extract", str(empty), "--out", str(tmp_path / "t.csv")])
    assert result.exit_code != 0
    assert "no valid events" in result.output
    assert "Traceback" not in result.output


def test_bench_baselines_writes_rows_contract(runner, tmp_path):
    result = runner.invoke(main, ["bench", "baselines", "--dataset", "synthetic", "--models", "POP,SR", "--out", str(tmp_path)])
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
    result = runner.invoke(main, ["bench", "baselines", "--dataset", "synthetic", "--models", "GPT", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown model" in result.output
    result = runner.invoke(main, ["bench", "baselines", "--dataset", "no-such-dataset", "--out", str(tmp_path)])
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
