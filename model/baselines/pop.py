"""POP: recommend the most popular training items to everyone (RIB Section 5.2, first baseline)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from model.baselines.common import VisitSequences
from model.data.dataset import SessionDataset
from model.recommender import PrefixBatch


@dataclass(frozen=True)
class PopConfig:
    """POP has no hyper-parameters: the score of an item is its number of training visits."""


class Pop:
    """Training popularity (visit counts), the same ranking for every prefix."""

    name = "POP"

    def __init__(self, config: PopConfig | None = None, **overrides: object) -> None:
        self.config = replace(config or PopConfig(), **overrides)
        self.counts: np.ndarray | None = None

    def fit(self, train: SessionDataset) -> Pop:
        """Count visits per item."""
        self.counts = VisitSequences.from_dataset(train).visit_counts().astype(np.float32)
        return self

    def score(self, batch: PrefixBatch) -> np.ndarray:
        """Popularity for every prefix, (len(batch), n_items + 1) float32."""
        if self.counts is None:
            raise RuntimeError("POP: call fit() before score()")
        return np.repeat(self.counts[None, :], len(batch), axis=0)
