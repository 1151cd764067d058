"""Figure-8 case study: weights per data type sum to one over the tuples, ranks, text and PNG output."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from experiments.case_study import case_study, case_study_text, pick_session, session_prefix, write_case_study
from model.data.open import open_dataset
from model.train import TrainConfig, rib_config_for, train_rib
from rib_edge.cli_model import case_study_command

TINY = dict(item_dim=16, activity_dim=4, dwell_dim=4, hidden_dim=24, max_len=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    split = open_dataset("synthetic")  # what the CLI opens
    root = tmp_path_factory.mktemp("ckpt")
    paths = []
    for data_type in ("SKU+Micro", "SKU", "SKU+Activity"):  # out of order on purpose
        out = root / data_type.replace("+", "_")
        train_rib(
            split.train,
            rib_config_for(split.train, data_type, **TINY),
            TrainConfig(epochs=1, w2v_epochs=1, checkpoint_dir=str(out), min_steps=0),
            progress=False,
        )
        paths.append(out / "rib.pt")
    return split, paths


def test_weights_sum_to_one_and_rows_are_in_paper_order(trained):
    split, paths = trained
    session = pick_session(split.test, 3, 20)
    start, end, target = session_prefix(split.test, session)
    study = case_study(split.test, paths, session)
    assert [r["data_type"] for r in study["rows"]] == ["SKU", "SKU+Activity", "SKU+Micro"]
    assert len(study["tuples"]) == end - start and study["target"]["item_index"] == target
    for row in study["rows"]:
        assert len(row["weights"]) == end - start
        # The model looks at the last max_len tuples; earlier tuples get zero weight.
        assert sum(row["weights"]) == pytest.approx(1.0, abs=1e-4)
        assert all(w == 0 for w in row["weights"][: max(0, (end - start) - TINY["max_len"])])
        assert 1 <= row["target_rank"] <= split.test.n_items
    assert "rank of the true next item" in case_study_text(study)


def test_png_and_cli(trained, tmp_path):
    split, paths = trained
    session = pick_session(split.test, 3, 20)
    written = write_case_study(case_study(split.test, paths[:1], session), tmp_path / "direct")
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    args = ["--dataset", "synthetic", "--session", str(session), "--out", str(tmp_path / "cli")]
    for path in paths:
        args += ["--checkpoint", str(path)]
    result = CliRunner().invoke(case_study_command, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "case_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "cli" / "case_study.json").read_text())
    assert len(saved["rows"]) == 3
    bad = CliRunner().invoke(
        case_study_command,
        [
            "--dataset",
            "synthetic",
            "--session",
            "100000",
            "--checkpoint",
            str(paths[0]),
            "--out",
            str(tmp_path / "bad"),
        ],
    )
    assert bad.exit_code != 0 and "out of range" in bad.output
