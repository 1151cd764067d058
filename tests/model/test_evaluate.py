"""The evaluator: exact metric arithmetic, tie handling, and that models never see targets."""

from __future__ import annotations

import numpy as np
import pandas as pd

from edge_client.schema import ActivityVocabulary
from model.data.protocol import ProtocolConfig, build_split
from model.evaluate import bootstrap_ci, evaluate, paired_bootstrap_diff, target_ranks, top_k
from model.recommender import PrefixBatch


def test_target_ranks_ignore_padding_and_break_ties_against_target():
    scores = np.array([[9.0, 1.0, 3.0, 3.0, 0.0], [9.0, 5.0, 5.0, 5.0, 5.0]])
    # Row 0: target 3 ties with item 2, which has the lower index -> rank 2. Padding (9.0) never counts.
    # Row 1: all tied, target 4 -> rank 4.
    np.testing.assert_array_equal(target_ranks(scores, np.array([3, 4])), [2, 4])
    np.testing.assert_array_equal(top_k(scores, 2), [[2, 3], [1, 2]])


def test_top_k_matches_a_stable_sort_with_and_without_ties():
    """top_k = the first k real items of a stable descending sort (ties, none, NaN), never the padding column."""
    rng = np.random.default_rng(0)
    for trial in range(50):
        n_items, k = int(rng.integers(2, 60)), int(rng.integers(1, 25))
        coarse = rng.integers(0, 4, size=(7, n_items + 1)).astype(np.float32)  # heavy ties
        fine = rng.standard_normal((7, n_items + 1)).astype(np.float32)  # none
        fine[0, 1:] = 1.0  # one row all tied
        fine[1, 3] = np.nan  # NaN ranks last
        for scores in (coarse, fine):
            real = np.where(np.isnan(scores), -np.inf, scores)[:, 1:]  # padding (column 0) is never returned
            expected = 1 + np.argsort(-real, axis=1, kind="stable")[:, : min(k, n_items)]
            np.testing.assert_array_equal(top_k(scores, k), expected, err_msg=f"trial {trial}")


class Oracle:
    """Cheats if it can: ranks the item right after the prefix first. Records what it was shown."""

    name = "oracle"

    def __init__(self):
        self.shown = []

    def fit(self, train):
        return self

    def score(self, batch: PrefixBatch) -> np.ndarray:
        scores = np.zeros((len(batch), batch.dataset.n_items + 1), np.float32)
        for k in range(len(batch)):
            self.shown.append((int(batch.starts[k]), int(batch.ends[k])))
            scores[k, batch.items(k)[-1]] = 1.0  # the last item it was allowed to see
        return scores


def make_split():
    rng = np.random.default_rng(1)
    rows = []
    for s in range(300):
        for j in range(int(rng.integers(2, 6))):
            rows.append((f"s{s}", s * 1000 + j, str(int(rng.integers(0, 30))), "view"))
    data = pd.DataFrame(rows, columns=["session_id", "timestamp_ms", "item_id", "activity"])
    return build_split(data, "t", ActivityVocabulary(("view",)), ProtocolConfig(test_fraction=0.3))


def test_model_is_shown_prefixes_only():
    split = make_split()
    oracle = Oracle()
    result = evaluate(oracle, split.test, batch_size=7)
    examples = split.test.examples()
    assert oracle.shown == list(zip(examples.starts.tolist(), examples.ends.tolist(), strict=True))
    # Consecutive visits never share an item, so "repeat the last item" can never be right.
    assert result.metrics["recall@20"] < 0.9 or split.test.n_items <= 20
    assert result.n_examples == len(examples)


def test_metrics_match_hand_computation():
    split = make_split()

    class Fixed:
        name = "fixed"

        def fit(self, train):
            return self

        def score(self, batch):
            return np.tile(-np.arange(batch.dataset.n_items + 1, dtype=np.float32), (len(batch), 1))

    result = evaluate(Fixed(), split.test)
    ranks = split.test.examples().targets  # item i sits at rank i under these scores
    assert np.isclose(result.metrics["recall@10"], np.mean(ranks <= 10))
    assert np.isclose(result.metrics["mrr@20"], np.mean(np.where(ranks <= 20, 1 / ranks, 0)))
    assert np.isclose(result.metrics["coverage@10"], 10 / split.test.n_items)
    low, high = result.bootstrap_ci("recall@10")
    assert low <= result.metrics["recall@10"] <= high


def test_bootstrap_intervals():
    values = np.r_[np.ones(300), np.zeros(700)]
    low, high = bootstrap_ci(values, n_boot=500)
    assert low < 0.3 < high and high - low < 0.1
    mean, low, high = paired_bootstrap_diff(values, np.zeros(1000), n_boot=500)
    assert np.isclose(mean, 0.3) and low > 0
