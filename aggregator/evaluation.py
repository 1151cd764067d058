"""Central evaluation of the global model on held-out real sessions, through the project's one evaluator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.data.dataset import Examples, SessionDataset
from model.device import pick_device
from model.evaluate import evaluate
from model.local import set_weights
from model.recommender import PrefixBatch
from model.rib import RIB, RIBConfig
from model.train import RIBRecommender, TrainConfig

REPORTED = ("recall@10", "recall@20", "mrr@10", "mrr@20")


def held_out_examples(test: SessionDataset, max_examples: int | None, seed: int) -> Examples:
    """The evaluation examples: every test prefix, or a seeded sample of ``max_examples`` (kept in order)."""
    examples = test.examples()
    if max_examples and len(examples) > max_examples:
        keep = np.sort(np.random.default_rng(seed).choice(len(examples), max_examples, replace=False))
        examples = examples.subset(keep)
    return examples


def reported_metrics(metrics: dict[str, float], n_examples: int) -> dict[str, float]:
    """The metrics a round reports (Recall/MRR at 10 and 20) and how many examples they cover."""
    out = {k: float(v) for k, v in metrics.items() if k in REPORTED}
    out["eval_examples"] = float(n_examples)
    return out


class _ScoringRIB(RIBRecommender):
    """A RIBRecommender that also accumulates the cross-entropy of the targets it scores."""

    def __init__(self, model: RIB, device: torch.device) -> None:
        super().__init__(model.config, TrainConfig(device=str(device)))
        self.model = model
        self.nll_sum = 0.0
        self.targets: np.ndarray | None = None

    def score(self, batch: PrefixBatch) -> np.ndarray:
        scores = super().score(batch)
        if self.targets is not None:
            targets = self.targets[: len(scores)]
            self.targets = self.targets[len(scores) :]
            shifted = scores - scores.max(axis=1, keepdims=True)
            log_z = np.log(np.exp(shifted).sum(axis=1))
            self.nll_sum += float((log_z - shifted[np.arange(len(scores)), targets]).sum())
        return scores


class CentralEvaluator:
    """Flower ``evaluate_fn``: (round, weights, config) -> (loss, {recall@20, mrr@20, ...}) on held-out sessions."""

    def __init__(
        self,
        test: SessionDataset,
        rib_config: RIBConfig,
        max_examples: int | None = 5000,
        seed: int = 0,
        device: str | None = None,
    ) -> None:
        self.test = test
        self.rib_config = rib_config
        self.device = pick_device(device or None)
        self.examples = held_out_examples(test, max_examples, seed)

    def __call__(
        self, server_round: int, weights: Sequence[np.ndarray], config: dict
    ) -> tuple[float, dict[str, float]]:
        """Evaluate one set of global weights (the round loop times it)."""
        model = RIB(self.rib_config)
        set_weights(model, list(weights))
        model.to(self.device).eval()
        scorer = _ScoringRIB(model, self.device)
        scorer.targets = self.examples.targets.copy()
        result = evaluate(scorer, self.test, examples=self.examples)
        n = max(1, len(self.examples))
        metrics = reported_metrics(result.metrics, len(self.examples))
        return scorer.nll_sum / n, metrics


class SkipGramEvaluator:
    """``evaluate_fn`` of a federated Word2vec run: the paper's Word2vec baseline (items nearest the last
    visited item) over the global item vectors, on the same held-out examples as ``CentralEvaluator``."""

    def __init__(self, test: SessionDataset, max_examples: int | None = 5000, seed: int = 0) -> None:
        self.test = test
        self.examples = held_out_examples(test, max_examples, seed)

    def __call__(
        self, server_round: int, weights: Sequence[np.ndarray], config: dict
    ) -> tuple[float, dict[str, float]]:
        """(0.0: no loss is scored, Recall/MRR@10/20 of nearest-item recommendations)."""
        from model.skipgram import item_vectors
        from model.word2vec import Word2VecRecommender

        scorer = Word2VecRecommender.from_item_vectors(item_vectors(list(weights)))
        result = evaluate(scorer, self.test, examples=self.examples)
        metrics = reported_metrics(result.metrics, len(self.examples))
        return 0.0, metrics
