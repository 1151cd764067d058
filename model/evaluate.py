"""The one evaluator: Recall@k, MRR@k and catalogue coverage@k over every test prefix.

Every model, central or federated, is measured here, the same way. Ranks are over the whole catalogue;
ties are broken by item index (as a stable sort of the scores would), never in the target's favour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from model.data.dataset import Examples, SessionDataset
from model.recommender import PrefixBatch, SessionRecommender

DEFAULT_KS = (10, 20)


@dataclass
class EvalResult:
    """Aggregate metrics plus the per-example ranks they came from (for bootstrap intervals)."""

    metrics: dict[str, float]
    ranks: np.ndarray = field(repr=False)  # 1-based rank of the target for every example
    n_examples: int = 0

    def per_example(self, metric: str) -> np.ndarray:
        """Per-example values of 'recall@k' or 'mrr@k'."""
        name, k = metric.split("@")
        k = int(k)
        if name == "recall":
            return (self.ranks <= k).astype(np.float64)
        if name == "mrr":
            return np.where(self.ranks <= k, 1.0 / self.ranks, 0.0)
        raise ValueError(f"unknown metric {metric!r}")

    def bootstrap_ci(
        self, metric: str, n_boot: int = 1000, seed: int = 0, level: float = 0.95
    ) -> tuple[float, float]:
        """Percentile bootstrap interval of a metric over examples."""
        return bootstrap_ci(self.per_example(metric), n_boot=n_boot, seed=seed, level=level)


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.array([values[rng.integers(0, values.size, values.size)].mean() for _ in range(n_boot)])
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def paired_bootstrap_diff(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of a - b over the same examples, with a paired percentile bootstrap interval."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    low, high = bootstrap_ci(diff, n_boot=n_boot, seed=seed, level=level)
    return float(diff.mean()), low, high


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target among items 1..N (column 0 is padding and never ranked)."""
    scores = np.asarray(scores, dtype=np.float32)
    if np.isnan(scores).any():  # copy a catalogue-wide matrix only when there is something to replace
        scores = np.where(np.isnan(scores), -np.inf, scores)
    rows = np.arange(len(targets))
    target_score = scores[rows, targets][:, None]
    item_index = np.arange(scores.shape[1])[None, :]
    real = item_index >= 1
    better = (scores > target_score) & real
    tied_before = (scores == target_score) & real & (item_index < targets[:, None])
    return 1 + better.sum(axis=1) + tied_before.sum(axis=1)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best real items per row, best first; ties go to the lower index (as in ranks)."""
    scores = np.asarray(scores, dtype=np.float32)
    if np.isnan(scores).any():
        scores = np.where(np.isnan(scores), -np.inf, scores)
    real = scores[:, 1:]  # column 0 is padding: a view, not a copy (catalogue-sized rows cost)
    n_real = real.shape[1]
    k = min(k, n_real)
    kth = np.partition(real, n_real - k, axis=1)[:, n_real - k : n_real - k + 1]
    greater = real > kth
    ties = real == kth
    room = k - greater.sum(axis=1, keepdims=True)
    chosen = greater | ties
    # Rows with more items tied at the k-th score than places left keep the lowest indices. Only those rows
    # pay for the running count: over a 43k-item catalogue it cost ~40% of an evaluation.
    crowded = np.flatnonzero(ties.sum(axis=1, keepdims=True) > room)
    if len(crowded):
        chosen[crowded] = greater[crowded] | (
            ties[crowded] & (np.cumsum(ties[crowded], axis=1) <= room[crowded])
        )
    index = np.nonzero(chosen)[1].reshape(len(real), k)
    order = np.lexsort((index, -np.take_along_axis(real, index, axis=1)), axis=1)
    return np.take_along_axis(index, order, axis=1) + 1


def evaluate(
    model: SessionRecommender,
    test: SessionDataset,
    ks: Sequence[int] = DEFAULT_KS,
    examples: Examples | None = None,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Score every test prefix with ``model`` and compute Recall@k, MRR@k and coverage@k."""
    examples = examples if examples is not None else test.examples()
    n_items = test.n_items
    # Keep a batch's score matrix near 64 MB whatever the catalogue size.
    batch_size = batch_size or max(16, min(4096, (1 << 24) // max(1, n_items + 1)))
    ranks = np.empty(len(examples), dtype=np.int64)
    seen_top = {k: np.zeros(n_items + 1, dtype=bool) for k in ks}
    for lo in range(0, len(examples), batch_size):
        hi = min(lo + batch_size, len(examples))
        batch = PrefixBatch(test, examples.starts[lo:hi], examples.ends[lo:hi])
        scores = np.asarray(model.score(batch))
        if scores.shape != (hi - lo, n_items + 1):
            raise ValueError(f"{model.name}.score returned {scores.shape}, expected {(hi - lo, n_items + 1)}")
        ranks[lo:hi] = target_ranks(scores, examples.targets[lo:hi])
        best = top_k(scores, max(ks))
        for k in ks:
            seen_top[k][best[:, :k].ravel()] = True
        if progress is not None:
            progress(hi, len(examples))
    metrics: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        metrics[f"recall@{k}"] = float(hit.mean()) if len(ranks) else float("nan")
        metrics[f"mrr@{k}"] = float(np.where(hit, 1.0 / ranks, 0.0).mean()) if len(ranks) else float("nan")
        metrics[f"coverage@{k}"] = float(seen_top[k][1:].sum() / max(1, n_items))
    return EvalResult(metrics=metrics, ranks=ranks, n_examples=len(examples))
