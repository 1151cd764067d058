"""The one interface every recommender implements, central or federated, baseline or RIB."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from model.data.dataset import SessionDataset


@dataclass
class PrefixBatch:
    """A batch of session prefixes: tuples [starts[k], ends[k]) of ``dataset``. Targets are never included."""

    dataset: SessionDataset
    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return int(len(self.starts))

    def items(self, k: int) -> np.ndarray:
        """Tuple-level items of prefix k."""
        return self.dataset.items[self.starts[k] : self.ends[k]]

    def visit_items(self, k: int) -> np.ndarray:
        """Visit-level items of prefix k (one per macro interaction), oldest first."""
        return self.dataset.visit_items(int(self.starts[k]), int(self.ends[k]))

    def last_items(self) -> np.ndarray:
        """Item of the last tuple of every prefix."""
        return self.dataset.items[self.ends - 1]

    def padded(self, field: str, max_len: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Left-aligned (B, L) array of ``field`` over the last ``max_len`` tuples, and its validity mask."""
        column = getattr(self.dataset, field)
        lengths = np.minimum(self.ends - self.starts, max_len)
        out = np.full((len(self), max_len), pad, dtype=column.dtype)
        mask = np.arange(max_len)[None, :] < lengths[:, None]
        index = (self.ends - lengths)[:, None] + np.arange(max_len)[None, :]
        out[mask] = column[index[mask]]
        return out, mask


@runtime_checkable
class SessionRecommender(Protocol):
    """Fit on training sessions; score every catalogue item for a batch of prefixes."""

    name: str

    def fit(self, train: SessionDataset) -> SessionRecommender:
        """Learn from training sessions only."""
        ...

    def score(self, batch: PrefixBatch) -> np.ndarray:
        """(len(batch), n_items + 1) float scores, higher is better; column 0 (padding) is ignored."""
        ...
