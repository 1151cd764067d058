"""`rib-edge simulate` end to end on a small synthetic population (Flower simulation, Ray backend)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("ray")

from rib_edge.cli import main  # noqa: E402

REQUIRED = {
    "round",
    "recall@20",
    "mrr@20",
    "epsilon",
    "participants",
    "dropouts",
    "seconds",
    "bytes_up",
    "bytes_down",
}


@pytest.mark.slow
def test_simulate_writes_rounds_summary_and_plots_with_dropouts_and_dp(tmp_path):
    out = tmp_path / "sim"
    args = ["simulate", "--preset", "smoke", "--devices", "30", "--rounds", "2", "--fraction", "0.5"]
    args += ["--dropout", "0.4", "--dp-epsilon", "8", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert REQUIRED <= set(row)
        assert row["participants"] + row["dropouts"] == row["sampled"] == 15
        assert row["bytes_up"] < row["bytes_down"] or row["dropouts"] == 0
    reasons = {k for r in rows[1:] for k in r["failure_reasons"]}
    assert "dropout" in reasons  # the heterogeneity mod's dropouts reach the server as such
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] <= 8.0 + 1e-6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["devices"] == 30
    assert (out / "metric_and_epsilon.png").stat().st_size > 0 and (out / "participation.png").exists()
    assert "round   2" in result.output  # per-round progress lines


def test_unknown_preset_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["simulate", "--preset", "nope", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown preset" in result.output
