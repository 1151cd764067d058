"""`bench_fl` end to end on a tiny synthetic population: fl.json's schema, DP rows within budget, plots."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("ray")

from experiments.bench_fl import bench_fl  # noqa: E402

ROW_KEYS = {"setting", "epsilon", "delta", "rounds", "recall@20", "mrr@20", "ratio_to_centralized"}


@pytest.mark.slow
def test_bench_fl_writes_table_targets_and_plots(tmp_path):
    dp_step = (
        tmp_path / "dp_step.json"
    )  # the DP-SGD benchmark's file, in the layout experiments/dp_step.py writes
    dp_step.write_text(
        json.dumps({"runs": [{"n_items": 50, "best": "ghost", "configs": {"ghost": {"ratio": 1.5}}}]})
    )
    out = tmp_path / "fl"
    result = bench_fl(
        "synthetic",
        out,
        rounds=2,
        fraction=0.5,
        local_steps=2,
        epsilons=(8.0,),
        item_dim=8,
        hidden_dim=8,
        devices=30,
        centralized_epochs=2,
        eval_max_examples=200,
        n_boot=50,
        dp_step_json=dp_step,
        measure_dp_step=False,
        spread_seeds=(1,),
        variants=[
            {"name": "fw2v", "init": "federated-w2v", "w2v": {"num-server-rounds": 1, "fraction-fit": 1.0}},
            {"name": "cat", "init": "catalog", "dp": "user", "dp-epsilon": 8.0},
        ],
    )
    written = json.loads((out / "fl.json").read_text())
    spread = written["centralized_seed_spread"]
    assert spread["seeds"] == [1] and spread["row_seed"] == 0
    assert {k: len(v) for k, v in spread["recall@20"].items()} == {
        "word2vec_init": 1,
        "random_init": 1,
        "catalog_init": 1,
    }
    assert "with other seeds [1]" in (out / "fl.md").read_text()
    staged, cat = written["variants"]
    # The catalog variant starts from the synthetic population's catalog; its centralized reference too.
    assert (
        cat["overrides"] == {"init": "catalog", "dp": "user", "dp-epsilon": 8.0}
        and 0 < cat["epsilon"] <= 8.0 + 1e-6
    )
    assert written["centralized_catalog_init"]["item_init"] == "item vectors"
    assert written["centralized_catalog_init"]["ranks_match_evaluator"]
    assert "catalog item init" in (out / "fl.md").read_text()
    stage = staged["w2v_stage"]
    assert stage["num-server-rounds"] == 1 and 0 <= stage["word2vec_recall@20"] <= 1
    assert 0 < stage["pooled_word2vec_recall@20"] <= 1
    assert "federated skip-gram run" in (out / "fl.md").read_text()
    assert written["targets"]["best_deployable_non_private_variant"]["name"] == "fw2v"
    assert written["dataset"] == "synthetic" and written["rows"] == json.loads(json.dumps(result["rows"]))
    rows = written["rows"]
    assert all(ROW_KEYS <= set(row) for row in rows)
    assert [r["setting"] for r in rows] == ["centralized", "fedavg", "fedavg+dp"]
    central, fedavg, dp = rows
    assert central["epsilon"] is None and central["ratio_to_centralized"] == 1.0 and central["recall@20"] > 0
    assert fedavg["epsilon"] is None and fedavg["rounds"] == 2
    assert dp["rounds"] == 2 and dp["target_epsilon"] == 8.0
    assert (
        math.isfinite(dp["epsilon"]) and 0 < dp["epsilon"] <= 8.0 + 1e-6
    )  # the accountant stays within budget
    assert dp["delta"] == pytest.approx(1 / 30)
    for row in rows[1:]:
        assert row["ratio_to_centralized"] == pytest.approx(row["recall@20"] / central["recall@20"])
    assert written["dp_step_ratio"] == 1.5 and written["targets"]["dp_step_ratio"]["met"] is True
    assert set(written["targets"]) >= {
        "fedavg_recall_ratio",
        "dp_recall_ratio_at_epsilon_le_8",
        "dp_step_ratio",
    }
    # The federated runs were re-scored from their last checkpoint on the evaluator's examples.
    for label in ("fedavg", "fedavg-dp-eps8"):
        boot = written["bootstrap"][label]
        assert boot["checkpoint_matches_last_row"] and boot["ci95"][0] <= boot["ci95"][1]
        assert written["round_time_breakdown"][label]["fit_seconds"] > 0
    assert written["centralized"]["ranks_match_evaluator"]
    # The like-for-like reference (centralized without word2vec init) and every run's ratio to it.
    like = written["centralized_random_init"]
    assert (
        like["w2v_init"] is False
        and written["centralized"]["w2v_init"] is True
        and like["ranks_match_evaluator"]
    )
    for label in ("fedavg", "fedavg-dp-eps8"):
        boot = written["bootstrap"][label]
        row = next(r for r in rows if r.get("run_dir") == label)
        assert boot["ratio_to_centralized_random_init"] == pytest.approx(row["recall@20"] / like["recall@20"])
        low, high = boot["ratio_to_centralized_random_init_ci95"]
        assert 0 <= low <= high
    assert "## Like for like" in (out / "fl.md").read_text()
    for name in ("fl.md", "fl_recall_vs_round.png", "fl_epsilon_vs_round.png"):
        assert (out / name).stat().st_size > 0
    assert "| fedavg+dp |" in (out / "fl.md").read_text()


def test_pooled_w2v_checkpoint_loads_as_an_initial_checkpoint_with_word2vec_items(tmp_path):
    """The diagnostic init: the run's own RIB config, item rows from Word2vec, the rest the seeded random init."""
    import torch

    from experiments.bench_fl import pooled_w2v_checkpoint
    from federation.task import federated_rib_config
    from model.data.open import open_dataset
    from model.rib import RIB
    from model.train import load_checkpoint

    split = open_dataset("synthetic")
    config = federated_rib_config(split.vocab, "SKU+Micro", 8, 8, 20)
    path = pooled_w2v_checkpoint(split.train, config, tmp_path / "init.pt", seed=3)
    loaded = load_checkpoint(path, device="cpu")
    assert loaded.rib_config == config and loaded.history["items_covered"] > 0
    torch.manual_seed(3)
    random = RIB(config).state_dict()
    state = loaded.model.state_dict()
    assert not torch.equal(state["item_emb.weight"], random["item_emb.weight"])
    assert torch.equal(state["gru.weight_ih_l0"], random["gru.weight_ih_l0"])  # only the items changed
    assert torch.all(state["item_emb.weight"][0] == 0)
    # Reused as is for the same settings, rebuilt for another seed.
    before = path.stat().st_mtime_ns
    assert (
        pooled_w2v_checkpoint(split.train, config, path, seed=3) == path and path.stat().st_mtime_ns == before
    )
    pooled_w2v_checkpoint(split.train, config, path, seed=4)
    assert load_checkpoint(path, device="cpu").train_config.seed == 4
    with pytest.raises(ValueError, match="unknown init"):
        bench_fl("synthetic", tmp_path / "fl", variants=[{"name": "x", "init": "magic"}])


def test_federated_w2v_stage_writes_an_initial_checkpoint_and_is_reused(tmp_path):
    """The deployable init: a skip-gram federation on the devices' own stores, then a RIB starting point."""
    from experiments.bench_fl import base_settings, federated_w2v_checkpoint
    from model.train import load_checkpoint
    from simulations.population import build_population

    pop_dir = tmp_path / "population"
    build_population("synthetic", pop_dir, partition="user", max_devices=8, seed=0, min_examples=1)
    settings = base_settings("synthetic", 1, 1.0, 1, 8, 8, 0, 8, 0.005, 100, 8, 2)
    stage = {"num-server-rounds": 2, "fraction-fit": 1.0, "local-steps": 2}
    path, report = federated_w2v_checkpoint(settings, stage, tmp_path / "stage", pop_dir)
    loaded = load_checkpoint(path, device="cpu")
    assert loaded.rib_config.item_dim == 8 and "skip-gram" in loaded.history["init"]
    assert (
        report["num-server-rounds"] == 2
        and report["local-steps"] == 2
        and 0 <= report["word2vec_recall@20"] <= 1
    )
    before = path.stat().st_mtime_ns
    assert federated_w2v_checkpoint(settings, stage, tmp_path / "stage", pop_dir)[0] == path  # reused
    assert path.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="unknown w2v stage settings"):
        federated_w2v_checkpoint(settings, {"epochs": 3}, tmp_path / "stage", pop_dir)


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"name": "x", "w2v": {"num-server-rounds": 3}}, "need init"),
        ({"name": "x", "fed": {"server_lr": 0.1}}, "unknown run-config key 'fed'"),
        ({"name": "x", "init": "federated-w2v", "w2v": {"epochs": 3}}, "unknown w2v stage settings"),
    ],
)
def test_bad_w2v_stage_variants_fail_before_any_run(tmp_path, variant, message):
    with pytest.raises(ValueError, match=message):
        bench_fl("synthetic", tmp_path / "fl", variants=[variant])
    assert not (tmp_path / "fl").exists()


def test_targets_never_count_the_pooled_word2vec_diagnostic_as_deployable():
    from experiments.bench_fl import targets

    rows = [{"setting": "fedavg", "ratio_to_centralized": 0.85, "epsilon": None}]
    variants = [
        {
            "setting": "diag",
            "epsilon": None,
            "ratio_to_centralized": 0.99,
            "overrides": {"init": "pooled-w2v"},
        },
        {
            "setting": "real",
            "epsilon": None,
            "ratio_to_centralized": 0.96,
            "overrides": {"init": "federated-w2v"},
        },
        {"setting": "dp", "epsilon": 8.0, "ratio_to_centralized": 0.97, "overrides": {"dp-epsilon": 8.0}},
    ]
    out = targets(rows, variants, None)
    assert out["fedavg_recall_ratio"]["met"] is False
    assert out["best_non_private_variant"]["name"] == "diag"
    assert out["best_deployable_non_private_variant"] == {
        "name": "real",
        "ratio": 0.96,
        "meets_fedavg_target": True,
    }
    assert out["best_dp_variant_at_epsilon_le_8"] == {
        "name": "dp",
        "epsilon": 8.0,
        "ratio": 0.97,
        "meets_dp_target": True,
    }
    variants[1]["ratio_to_centralized"] = 0.9
    assert (
        targets(rows, variants, None)["best_deployable_non_private_variant"]["meets_fedavg_target"] is False
    )
