"""Membership-inference audit: the AUC and its interval, the member / non-member split, one window per
session, the attacks' scores, the accounting cross-check, and a tiny end-to-end audit."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from experiments.audit import (
    AuditConfig,
    auc,
    auc_ci,
    audit,
    balanced_accuracy,
    calibrated_threshold,
    dp_auc_bound,
    epsilon_dp_accounting,
    epsilon_pld,
    lira_offline_scores,
    mean_auc,
    mean_auc_ci,
    one_window_sessions,
    split_members,
    target_met,
    tpr_at_fpr,
)
from model.data.open import synthetic_split
from model.data.synthetic import SyntheticConfig
from model.local import WindowDataset
from privacy.accountant import epsilon_for

pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG", "ignore:Optimal order", "ignore:.*autocast", "ignore:Full backward hook is firing"
)


@pytest.fixture(scope="module")
def split():
    return synthetic_split(SyntheticConfig(n_devices=40))


def brute_force_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Every (member, non-member) pair: 1 when the member scores higher, 1/2 on a tie."""
    pairs = [(m > n) + 0.5 * (m == n) for m, n in itertools.product(members, nonmembers)]
    return float(np.mean(pairs))


# ---- AUC ---------------------------------------------------------------------------------------------
def test_auc_known_values():
    assert auc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == 1.0  # perfect separation
    assert auc([0.0, 1.0], [3.0, 4.0, 5.0]) == 0.0  # perfectly wrong
    assert auc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5  # identical scores
    assert auc([1.0, 2.0], [1.0, 0.0]) == 0.875  # one tie of four pairs: (0.5 + 1 + 1 + 1) / 4
    assert auc([2.0, 0.0], [1.0]) == 0.5


def test_auc_matches_pair_counting_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        members = rng.integers(0, 5, rng.integers(1, 30)).astype(float)  # few distinct values: many ties
        nonmembers = rng.integers(0, 5, rng.integers(1, 30)).astype(float)
        assert auc(members, nonmembers) == pytest.approx(brute_force_auc(members, nonmembers), abs=1e-12)
        # swapping the roles mirrors the AUC
        assert auc(nonmembers, members) == pytest.approx(1 - auc(members, nonmembers), abs=1e-12)


def test_auc_refuses_empty_and_non_finite():
    with pytest.raises(ValueError):
        auc([], [1.0])
    with pytest.raises(ValueError):
        auc([np.nan], [1.0])


def test_auc_interval_brackets_the_estimate_and_collapses_on_separation():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(0.5, 1, 200), rng.normal(0, 1, 200)
    lo, hi = auc_ci(members, nonmembers, n_boot=300, seed=0)
    assert lo < auc(members, nonmembers) < hi
    assert auc_ci(members, nonmembers, n_boot=300, seed=0) == (lo, hi)  # seeded
    assert auc_ci([5.0, 6.0], [1.0, 2.0], n_boot=50) == (1.0, 1.0)


def test_swapped_targets_cancel_a_split_bias_exactly():
    """One model that ignores the split (e.g. untrained): one target's AUC is biased, the swapped pair's is 0.5."""
    first = np.arange(60) % 2 == 0
    scores = np.arange(60.0) % 20 + 5.0 * first  # the first half happens to be "easier"
    assert auc(scores[first], scores[~first]) > 0.6
    assert mean_auc([scores, scores], [first, ~first]) == pytest.approx(0.5, abs=1e-12)
    assert mean_auc([scores], [first]) == auc(scores[first], scores[~first])
    lo, hi = mean_auc_ci([scores, scores], [first, ~first], n_boot=100)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # the cancellation holds in every resample
    single = mean_auc_ci([scores], [first], n_boot=100, seed=0)
    assert single[0] < auc(scores[first], scores[~first]) < single[1]


def test_audit_config_is_checked():
    with pytest.raises(ValueError):
        AuditConfig(n_shadows=1)
    with pytest.raises(ValueError):
        AuditConfig(epochs=0)
    with pytest.raises(ValueError, match="item_catalog"):
        AuditConfig(freeze_items=True)


def test_tpr_at_fpr():
    nonmembers = np.arange(100, dtype=float)  # 90% quantile = 89.1
    assert tpr_at_fpr(np.array([95.0, 50.0]), nonmembers, fpr=0.1) == 0.5


# ---- the split and the records -----------------------------------------------------------------------
@pytest.mark.parametrize("n,fraction", [(100, 0.5), (101, 0.5), (10, 1.0), (963, 0.6)])
def test_split_is_disjoint_balanced_and_seeded(n, fraction):
    parts = split_members(n, seed=3, target_fraction=fraction)
    groups = [set(parts.members), set(parts.nonmembers), set(parts.shadow_pool)]
    assert sum(map(len, groups)) == len(set.union(*groups))  # pairwise disjoint
    assert set.union(*groups) <= set(range(n))
    assert len(parts.members) == len(parts.nonmembers) == int(round(n * fraction)) // 2
    assert len(parts.shadow_pool) == n - int(round(n * fraction))
    again = split_members(n, seed=3, target_fraction=fraction)
    assert all(
        np.array_equal(a, b) for a, b in zip(again.__dict__.values(), parts.__dict__.values(), strict=True)
    )
    other = split_members(n, seed=4, target_fraction=fraction)
    assert not np.array_equal(other.members, parts.members)


def test_split_refuses_too_few_sessions():
    with pytest.raises(ValueError):
        split_members(1, seed=0)
    with pytest.raises(ValueError):
        split_members(10, seed=0, target_fraction=0.0)


@pytest.mark.parametrize("max_len", [3, 8, 50])
def test_one_window_sessions_are_prefixes_of_one_window_each(split, max_len):
    data = split.train
    cut = one_window_sessions(data, max_len)
    assert cut.n_sessions > 0
    assert cut.session_lengths().max() <= max_len
    assert len(WindowDataset(cut, max_len)) == cut.n_sessions  # one record per session
    assert set(np.unique(cut.examples().session_index)) == set(range(cut.n_sessions))  # each has an example
    where = {sid: s for s, sid in enumerate(data.session_ids)}
    for s in range(cut.n_sessions):
        original = data.session(where[cut.session_ids[s]])
        n = len(cut.items[cut.session(s)])
        assert n == min(max_len, original.stop - original.start)
        assert np.array_equal(cut.items[cut.session(s)], data.items[original][:n])
        assert np.array_equal(cut.visit_starts[cut.session(s)], data.visit_starts[original][:n])


# ---- attacks and accounting --------------------------------------------------------------------------
def test_lira_scores_rank_by_loss_below_the_shadow_mean():
    shadow = np.array([[2.0, 5.0, 1.0], [4.0, 7.0, 3.0]])  # means 3, 6, 2; pooled std sqrt(2)
    scores = lira_offline_scores(np.array([1.0, 6.0, 2.0]), shadow)
    np.testing.assert_allclose(scores, np.array([2.0, 0.0, 0.0]) / math.sqrt(2))
    with pytest.raises(ValueError):
        lira_offline_scores(np.zeros(2), shadow)


def test_calibrated_threshold_separates_separable_losses():
    inside, outside = np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0])
    threshold = calibrated_threshold(inside, outside)
    assert 0.3 < threshold <= 1.0
    assert balanced_accuracy(inside, outside, threshold) == 1.0


def test_dp_auc_bound():
    assert dp_auc_bound(0.0, 0.0) == pytest.approx(0.5, abs=1e-6)
    for eps in (0.5, 1.0, 4.0):  # delta = 0: the region's boundary integrates to e^eps / (1 + e^eps)
        assert dp_auc_bound(eps, 0.0) == pytest.approx(math.exp(eps) / (1 + math.exp(eps)), abs=1e-6)
    assert dp_auc_bound(1.0, 1e-3) > dp_auc_bound(1.0, 0.0)
    assert dp_auc_bound(math.inf, 1e-5) == 1.0


def test_epsilon_cross_check_agrees_with_the_project_accountant():
    sigma, q, steps, delta = 1.5, 32 / 241, 226, 1 / 241
    reported = epsilon_for(sigma, q, steps, delta)
    assert epsilon_dp_accounting(sigma, q, steps, delta) == pytest.approx(reported, rel=0.01)
    assert epsilon_pld(sigma, q, steps, delta) <= reported  # RDP's conversion is never tighter than PLD
    assert epsilon_dp_accounting(0.0, q, steps, delta) == math.inf


# ---- end to end ------------------------------------------------------------------------------------
def test_tiny_audit_end_to_end(split):
    """A small RIB trained to overfit 21 sessions: members' losses are lower than non-members' at eps = inf."""
    config = AuditConfig(item_dim=16, hidden_dim=16, epochs=10, batch_size=8, lr=1e-2, n_shadows=2, n_boot=50)
    result = audit(split, epsilons=(math.inf, 4.0), config=config)
    plain, private = result["rows"]
    assert result["sessions"]["targets"] == len(plain["per_target"]) == 2  # roles swapped by default
    assert plain["epsilon"] == math.inf and plain["noise_multiplier"] == 0.0
    for target in plain["per_target"]:  # each target fits its own members better than the held-out half
        assert target["loss_members"] < target["loss_nonmembers"]
    assert plain["generalization_gap"] == pytest.approx(plain["loss_nonmembers"] - plain["loss_members"])
    assert private["steps"] == plain["steps"] > 0  # the same recipe with and without DP
    assert private["epsilon_reported"] <= 4.0
    # At q = 8/21 dp_accounting drops the fractional orders below 2 it cannot converge (its RDP epsilon is
    # then a looser, still valid bound); the reported epsilon sits between the near-tight PLD bound and it.
    assert (
        private["epsilon_pld"] <= private["epsilon_reported"] <= private["epsilon_dp_accounting"] * (1 + 1e-6)
    )
    assert private["delta"] == pytest.approx(1 / result["sessions"]["members"])
    for row in result["rows"]:
        for key in ("auc_loss", "auc_shadow"):
            lo, hi = row[f"{key}_ci"]
            assert 0.0 <= lo <= hi <= 1.0
        assert 0.0 <= row["test_recall@20"] <= 1.0


def test_audit_with_a_frozen_public_item_table(split, tmp_path):
    """Every model of the audit starts from the same catalog table and never moves it, DP or not."""
    from experiments import audit as audit_module
    from model.catalog import dataset_catalog

    catalog = dataset_catalog("synthetic").write_csv(tmp_path / "catalog.csv")
    config = AuditConfig(
        item_dim=16, hidden_dim=16, epochs=4, batch_size=8, lr=1e-2, n_shadows=2, n_boot=50,
        item_catalog=str(catalog), tie_output=True, freeze_items=True,
    )  # fmt: skip
    tables = []
    original = audit_module.train_model

    def spy(*args, **kwargs):
        model, info = original(*args, **kwargs)
        tables.append(model.item_emb.weight.detach().clone())
        return model, info

    audit_module.train_model = spy
    try:
        result = audit_module.audit(split, epsilons=(math.inf, 4.0), config=config)
    finally:
        audit_module.train_model = original
    assert len(tables) == 2 * (2 + 2)  # per epsilon: two shadows, two targets
    start = audit_module.fresh_model(
        audit_module.rib_config_for_audit(split.train, config),
        0,
        audit_module.item_vectors_for_audit(split.train, config),
    ).item_emb.weight.detach()
    for table in tables:
        torch.testing.assert_close(table, start, rtol=0, atol=0)
    assert result["config"]["item_catalog"] == str(catalog) and len(result["rows"]) == 2


def _frontier_module():
    from experiments import dp_frontier

    return dp_frontier


def _fake_audit(dataset: str, clip: float, rows: list[tuple[object, float, float, float]]) -> dict:
    return {
        "dataset": dataset,
        "config": {"max_grad_norm": clip, "n_boot": 200},
        "rows": [
            {
                "epsilon": eps,
                "test_recall@20": recall,
                "auc_loss": a_loss,
                "auc_loss_ci": [a_loss - 0.02, a_loss + 0.02],
                "auc_shadow": a_shadow,
                "auc_shadow_ci": [a_shadow - 0.03, a_shadow + 0.03],
            }
            for eps, recall, a_loss, a_shadow in rows
        ],
    }


def test_dp_frontier_orders_points_and_flags_the_target(tmp_path):
    """The frontier script: one point per (epsilon, C), ordered by recall, 'yes' only when both AUCs <= 0.55."""
    frontier = _frontier_module()
    sweep = _fake_audit("d", 1.0, [(1.0, 0.22, 0.53, 0.54), ("inf", 0.38, 0.94, 0.95)])
    clipped = _fake_audit("d", 50.0, [(8.0, 0.26, 0.54, 0.56)])
    points = frontier.frontier_rows([sweep, clipped])
    assert [(p["epsilon"], p["max_grad_norm"]) for p in points] == [(1.0, 1.0), (8.0, 50.0), (math.inf, None)]
    lines = frontier.markdown(points).splitlines()[2:]
    assert [line.rsplit("|", 2)[-2].strip() for line in lines] == ["yes", "no", "no"]
    with pytest.raises(ValueError, match="one dataset"):
        frontier.frontier_rows([sweep, _fake_audit("other", 1.0, [(1.0, 0.2, 0.5, 0.5)])])
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, audit_json in zip(paths, (sweep, clipped), strict=True):
        path.write_text(json.dumps(audit_json))
    frontier.main([*map(str, paths), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "frontier.json").read_text())[-1]["epsilon"] == "inf"


def test_target_is_judged_over_every_audited_epsilon_and_only_those():
    def row(eps, loss, shadow):
        return {"epsilon": eps, "auc_loss": loss, "auc_shadow": shadow}

    assert not target_met([row(math.inf, 0.52, 0.52)])  # nothing at eps <= 8 audited
    assert target_met([row(8.0, 0.52, 0.53), row(math.inf, 0.95, 0.95)])  # eps = inf does not count
    assert not target_met([row(1.0, 0.50, 0.50), row(8.0, 0.52, 0.56)])  # either attack over 0.55 fails it
    assert not target_met([row(4.0, 0.551, 0.50)])
