"""Item-KNN: recommend items that co-occur in training sessions with the prefix's last item.

RIB (Section 5.2) defines the similarity as the conditional-probability style
``sim(i, j) = Freq(ij) / (Freq(i) * Freq(j))`` with ``Freq(t)`` the number of training sessions that
contain ``t`` and ``Freq(ij)`` the number containing both (after Deshpande & Karypis 2004, RIB's [9]);
the ``cosine`` option divides by ``sqrt(Freq(i) * Freq(j))`` instead. Like Hidasi et al.'s item-KNN
baseline (ICLR 2016), a prefix is scored by similarity to its last item only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import scipy.sparse as sp

from model.baselines.common import VisitSequences
from model.data.dataset import SessionDataset
from model.recommender import PrefixBatch


@dataclass(frozen=True)
class ItemKNNConfig:
    """Similarity normaliser: "paper" = Freq(i)·Freq(j) (RIB Section 5.2), "cosine" = its square root."""

    similarity: Literal["paper", "cosine"] = "paper"


class ItemKNN:
    """Session co-occurrence item-to-item similarity, scored against the last item of the prefix."""

    name = "Item-KNN"

    def __init__(self, config: ItemKNNConfig | None = None, **overrides: object) -> None:
        self.config = replace(config or ItemKNNConfig(), **overrides)
        if self.config.similarity not in ("paper", "cosine"):
            raise ValueError(f"Item-KNN: unknown similarity {self.config.similarity!r}")
        self.similarity: sp.csr_matrix | None = None
        self.freq: np.ndarray | None = None

    def fit(self, train: SessionDataset) -> ItemKNN:
        """Build the sparse (n_items + 1)^2 similarity matrix from session co-occurrence counts."""
        sessions = VisitSequences.from_dataset(train).session_item_matrix()
        binary = sessions.astype(bool).astype(np.float32)  # a session counts once per item
        freq = np.asarray(binary.sum(axis=0)).ravel()
        co = (binary.T @ binary).tocoo()
        off_diagonal = co.row != co.col  # the next visit is never the current item itself
        i, j, both = co.row[off_diagonal], co.col[off_diagonal], co.data[off_diagonal]
        norm = freq[i] * freq[j]
        if self.config.similarity == "cosine":
            norm = np.sqrt(norm)
        self.similarity = sp.csr_matrix((both / norm, (i, j)), shape=co.shape, dtype=np.float32)
        self.freq = freq
        return self

    def score(self, batch: PrefixBatch) -> np.ndarray:
        """sim(last item of each prefix, j) for every item j, (len(batch), n_items + 1) float32."""
        if self.similarity is None:
            raise RuntimeError("Item-KNN: call fit() before score()")
        return np.asarray(self.similarity[batch.last_items()].toarray(), dtype=np.float32)
