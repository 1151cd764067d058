"""The accuracy bench (paper Table 3 layout): JSON contract, skipped variants, improvements, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from experiments.accuracy import (
    BASELINE_NAMES,
    DATA_TYPE_NAMES,
    RIB_NAMES,
    missing_field,
    quick_settings,
    run_accuracy,
)
from model.data.dataset import SplitData
from model.data.open import synthetic_split
from model.data.synthetic import SyntheticConfig
from rib_edge.cli_model import bench_accuracy_command

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_split() -> SplitData:
    return synthetic_split(SyntheticConfig(n_devices=60))


def _item_only(split: SplitData) -> SplitData:
    return SplitData(
        replace(split.train, has_activity=False, has_dwell=False),
        replace(split.test, has_activity=False, has_dwell=False),
        dict(split.info),
    )


def test_json_contract_names_and_improvements(small_split, tmp_path):
    payload = run_accuracy(small_split, "synthetic-small", tmp_path, quick_settings(epochs=1))
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(payload["rows"]))
    models = [(r["model"], r["data_type"]) for r in saved["rows"]]
    expected = [(m, "SKU") for m in BASELINE_NAMES] + [(m, d) for d in DATA_TYPE_NAMES for m in RIB_NAMES]
    assert models == expected
    for row in saved["rows"]:
        assert {"model", "data_type", "recall@20", "mrr@20", "train_seconds"} <= set(row)
        assert "skipped" not in row
        assert 0.0 <= row["recall@20"] <= 1.0 and row["n_examples"] > 0
        assert row["recall@20_ci95"][0] <= row["recall@20"] <= row["recall@20_ci95"][1]
        if row["model"] in RIB_NAMES:
            assert row["sessions_per_s"] > 0 and row["peak_rss_mb"] > 0
            best = saved["best_baseline"]["recall@20"]["value"]
            assert row["recall@20_vs_best_baseline"] == pytest.approx(row["recall@20"] / best - 1, abs=2e-3)
    pairs = {(d["a"], d["b"].split(" ")[0], d["metric"]) for d in saved["paired_diffs"]}
    assert ("RIB SKU+Micro", "RIB", "recall@20") in pairs
    assert any(d["a"] == "RIB SKU+Micro" and "best baseline" in d["b"] for d in saved["paired_diffs"])
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "| RIB | SKU+Micro |" in markdown and "%)" in markdown
    assert (tmp_path / "checkpoints").is_dir()
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_item_only_split_skips_micro_variants(small_split, tmp_path):
    split = _item_only(small_split)
    assert missing_field(split.train, "SKU") is None
    assert missing_field(split.train, "SKU+Activity") == "no activities in this data"
    assert missing_field(split.train, "SKU+Micro") == "no activities or dwell times in this data"
    payload = run_accuracy(split, "items-only", tmp_path, quick_settings(epochs=1, models=("POP", "RIB")))
    rows = {(r["model"], r["data_type"]): r for r in payload["rows"]}
    assert set(rows) == {
        ("POP", "SKU"),
        ("RIB", "SKU"),
        ("RIB", "SKU+Activity"),
        ("RIB", "SKU+Dwell"),
        ("RIB", "SKU+Micro"),
    }
    assert "skipped" not in rows[("RIB", "SKU")]
    assert rows[("RIB", "SKU+Dwell")]["skipped"] == "no dwell times in this data"
    assert rows[("RIB", "SKU+Activity")]["recall@20"] is None
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "skipped: no activities in this data" in markdown


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError):
        quick_settings(models=("GRU4Rec",))
    with pytest.raises(ValueError):
        quick_settings(data_types=("SKU+Click",))


def test_cli_accuracy_subset(tmp_path):
    result = CliRunner().invoke(
        bench_accuracy_command,
        [
            "--dataset",
            "synthetic",
            "--quick",
            "--models",
            "POP,S-KNN,RIB",
            "--data-types",
            "SKU,SKU+Micro",
            "--epochs",
            "1",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert [(r["model"], r["data_type"]) for r in rows] == [
        ("POP", "SKU"),
        ("S-KNN", "SKU"),
        ("RIB", "SKU"),
        ("RIB", "SKU+Micro"),
    ]
    bad = CliRunner().invoke(
        bench_accuracy_command, ["--dataset", "synthetic", "--models", "NARM", "--out", str(tmp_path)]
    )
    assert bad.exit_code != 0 and "unknown models" in bad.output


def test_merge_parallel_runs(small_split, tmp_path):
    from experiments.accuracy import merge_accuracy

    run_accuracy(
        small_split,
        "s",
        tmp_path / "a",
        quick_settings(epochs=1, models=("RIB",), data_types=("SKU", "SKU+Micro")),
    )
    run_accuracy(small_split, "s", tmp_path / "b", quick_settings(epochs=1, models=("POP", "S-KNN")))
    merged = merge_accuracy([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert [(r["model"], r["data_type"]) for r in merged["rows"]] == [
        ("POP", "SKU"),
        ("S-KNN", "SKU"),
        ("RIB", "SKU"),
        ("RIB", "SKU+Micro"),
    ]
    assert merged["best_baseline"]["recall@20"]["model"] in ("POP", "S-KNN")
    assert all("recall@20_vs_best_baseline" in r for r in merged["rows"] if r["model"] == "RIB")
    assert {d["a"] for d in merged["paired_diffs"]} == {"RIB SKU", "RIB SKU+Micro"}
    assert (tmp_path / "m" / "accuracy.md").exists()


def test_last_state_goes_to_rib_only(small_split, tmp_path):
    """The large-catalogue setting last_state needs attention: RIB gets it, RIB-Attention trains without it."""
    from model.train import load_checkpoint

    settings = quick_settings(
        epochs=1, models=RIB_NAMES, data_types=("SKU",), rib_overrides={"last_state": True}
    )
    payload = run_accuracy(small_split, "synthetic-small", tmp_path, settings)
    assert [r["model"] for r in payload["rows"]] == list(RIB_NAMES)
    assert all(r["recall@20"] is not None for r in payload["rows"])
    configs = {
        name: load_checkpoint(tmp_path / "checkpoints" / f"{name}_SKU" / "rib.pt").rib_config
        for name in RIB_NAMES
    }
    assert configs["RIB"].last_state and configs["RIB"].use_attention
    assert not configs["RIB-Attention"].last_state and not configs["RIB-Attention"].use_attention


def _write_catalog(path, item_ids, categories: int = 4) -> None:
    lines = ["item_id,category"] + [f"{item},c{i % categories}" for i, item in enumerate(item_ids)]
    path.write_text("\n".join(lines) + "\n")


def test_item_catalog_replaces_word2vec_init(small_split, tmp_path):
    """--item-catalog: RIB's item table starts from the catalog's vectors and the run records where it came from."""
    from model.train import load_checkpoint

    catalog = tmp_path / "catalog.csv"
    _write_catalog(catalog, small_split.vocab.item_ids)
    settings = quick_settings(epochs=1, models=("RIB",), data_types=("SKU",), item_catalog=str(catalog))
    payload = run_accuracy(small_split, "synthetic-small", tmp_path / "run", settings)
    (row,) = payload["rows"]
    assert row["item_init"] == "item vectors" and row["recall@20"] is not None
    assert payload["settings"]["item_catalog"] == str(catalog)
    assert f"catalog `{catalog}`" in (tmp_path / "run" / "accuracy.md").read_text()
    assert (
        load_checkpoint(tmp_path / "run" / "checkpoints" / "RIB_SKU" / "rib.pt").history["item_init"]
        == "item vectors"
    )
    default = run_accuracy(
        small_split, "synthetic-small", None, quick_settings(epochs=1, models=("RIB",), data_types=("SKU",))
    )
    assert default["rows"][0]["item_init"] == "word2vec"


def test_item_catalog_that_covers_no_item_fails_before_training(small_split, tmp_path):
    from model.catalog import CatalogError

    catalog = tmp_path / "other_shop.csv"
    _write_catalog(catalog, [f"elsewhere-{i}" for i in range(10)])
    with pytest.raises(CatalogError, match="none of the"):
        run_accuracy(
            small_split,
            "synthetic-small",
            tmp_path / "run",
            quick_settings(epochs=1, item_catalog=str(catalog)),
        )
    assert not (tmp_path / "run").exists()  # nothing fitted, no checkpoint written
    result = CliRunner().invoke(
        bench_accuracy_command,
        [
            "--dataset",
            "synthetic",
            "--quick",
            "--item-catalog",
            str(tmp_path / "missing.csv"),
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code != 0 and "is not a file" in result.output
    result = CliRunner().invoke(
        bench_accuracy_command,
        [
            "--dataset",
            "synthetic",
            "--quick",
            "--models",
            "RIB",
            "--data-types",
            "SKU",
            "--item-catalog",
            str(catalog),
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code != 0 and "none of the" in result.output


def test_item_table_is_chosen_on_validation_and_applied_to_every_rib_row(small_split, tmp_path):
    from experiments.accuracy import ITEM_TABLES
    from model.train import load_checkpoint

    settings = quick_settings(epochs=2, models=RIB_NAMES, data_types=("SKU", "SKU+Micro"))
    payload = run_accuracy(small_split, "synthetic-small", tmp_path, settings)
    selection = payload["item_table_selection"]
    assert selection["data_type"] == "SKU+Micro" and set(selection["val_recall@20"]) == set(ITEM_TABLES)
    best = max(selection["val_recall@20"].values())
    assert selection["val_recall@20"][selection["chosen"]] == best
    chosen = ITEM_TABLES[selection["chosen"]]
    for name in RIB_NAMES:
        for data_type in ("SKU", "SKU_Micro"):
            config = load_checkpoint(tmp_path / "checkpoints" / f"{name}_{data_type}" / "rib.pt").rib_config
            assert config.freeze_items == chosen.get("freeze_items", False)
            assert config.tie_output == chosen.get("tie_output", False)
    assert "Item table chosen on validation" in (tmp_path / "accuracy.md").read_text()
    # Small catalogue: each reported model is retrained on all training sessions for its best epoch count.
    assert all(r["refit_epochs"] == r["best_epoch"] for r in payload["rows"])
    # Item-only data: the selection runs on SKU; switched off, there is none.
    only = run_accuracy(
        _item_only(small_split), "s", None, quick_settings(epochs=1, models=("RIB",), data_types=("SKU",))
    )
    assert only["item_table_selection"]["data_type"] == "SKU"
    off = run_accuracy(
        small_split,
        "s",
        None,
        quick_settings(epochs=1, models=("RIB",), data_types=("SKU",), select_item_table=False),
    )
    assert off["item_table_selection"] is None and "freeze_items" not in off["settings"]["rib_overrides"]


def test_rib_training_reports_every_epoch_and_the_refit(small_split):
    """A RIB run reports each epoch through the progress callback, the selection run's and then the refit's."""
    messages: list[str] = []
    settings = quick_settings(epochs=2, models=("RIB",), data_types=("SKU",), select_item_table=False)
    payload = run_accuracy(small_split, "s", None, settings, progress=messages.append)
    row = next(r for r in payload["rows"] if r["model"] == "RIB")
    selection = [m for m in messages if m.startswith("RIB SKU: epoch ")]
    refit = [m for m in messages if m.startswith("RIB SKU: refit epoch ")]
    assert len(selection) == row["epochs_run"] and all("val recall@20" in m for m in selection)
    assert len(refit) == row["refit_epochs"] and not any("val recall@20" in m for m in refit)
