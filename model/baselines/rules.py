"""SR: sequential rules, Ludewig & Jannach (2018), "Evaluation of session-based recommendation algorithms".

A rule ``i -> j`` gains weight ``w(g)`` whenever ``j`` follows ``i`` by ``g <= steps`` positions in a
training session; a prefix is scored by the rules of its last item. Defaults follow session-rec's
``SequentialRules``: steps=10, "div" weighting w(g) = 1/g, each item keeps its 20 strongest rules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import scipy.sparse as sp

from model.baselines.common import VisitSequences, demote_last_items, rank_within_groups, resolve_exclude_last
from model.data.dataset import SessionDataset
from model.recommender import PrefixBatch

_WEIGHTINGS = ("div", "same", "linear", "quadratic", "log")


def gap_weight(gap: np.ndarray, weighting: str) -> np.ndarray:
    """Weight of a rule observed ``gap`` positions apart (session-rec's decay functions)."""
    gap = np.asarray(gap, dtype=np.float64)
    if weighting == "div":
        return 1.0 / gap
    if weighting == "same":
        return np.ones_like(gap)
    if weighting == "linear":
        return np.clip(1.0 - 0.1 * gap, 0.0, None)
    if weighting == "quadratic":
        return 1.0 / (gap * gap)
    if weighting == "log":
        return 1.0 / np.log10(gap + 1.7)
    raise ValueError(f"unknown weighting {weighting!r}; choose from {_WEIGHTINGS}")


@dataclass(frozen=True)
class SRConfig:
    """Rule window ``steps``, gap ``weighting``, ``pruning`` = rules kept per item (0 keeps all)."""

    steps: int = 10
    weighting: Literal["div", "same", "linear", "quadratic", "log"] = "div"
    pruning: int = 20
    exclude_last: bool | None = (
        None  # demote the prefix's last item; None: learn from training (common.resolve_exclude_last)
    )


class SequentialRules:
    """Weighted sequential rules i -> j mined within ``steps`` positions; score by the last item's rules."""

    name = "SR"

    def __init__(self, config: SRConfig | None = None, **overrides: object) -> None:
        self.config = replace(config or SRConfig(), **overrides)
        gap_weight(np.ones(1), self.config.weighting)  # fail early on a bad weighting name
        self.rules: sp.csr_matrix | None = None

    def fit(self, train: SessionDataset) -> SequentialRules:
        """Mine all rules in one pass per gap, then prune each item's list."""
        self._exclude_last = resolve_exclude_last(self.config.exclude_last, train)
        seqs = VisitSequences.from_dataset(train)
        session = seqs.session_of_visit()
        heads, tails, weights = [], [], []
        for gap in range(1, self.config.steps + 1):
            same = session[gap:] == session[:-gap] if len(session) > gap else np.zeros(0, bool)
            heads.append(seqs.items[:-gap][same] if len(same) else np.zeros(0, np.int64))
            tails.append(seqs.items[gap:][same] if len(same) else np.zeros(0, np.int64))
            weights.append(np.full(int(same.sum()), gap_weight(np.array([gap]), self.config.weighting)[0]))
        n = seqs.n_items + 1
        rules = sp.csr_matrix(
            (np.concatenate(weights), (np.concatenate(heads), np.concatenate(tails))),
            shape=(n, n),
            dtype=np.float64,
        )
        rules.sum_duplicates()
        if self.config.pruning > 0:
            rules = self._prune(rules, self.config.pruning)
        self.rules = rules.astype(np.float32)
        return self

    @staticmethod
    def _prune(rules: sp.csr_matrix, keep: int) -> sp.csr_matrix:
        """Keep the ``keep`` heaviest rules of every head item (ties: lower item index first)."""
        coo = rules.tocoo()
        # float32 keys: equal weights summed in another order must tie, not split on rounding noise.
        order = np.lexsort((coo.col, -coo.data.astype(np.float32), coo.row))
        row, col, data = coo.row[order], coo.col[order], coo.data[order]
        kept = rank_within_groups(row) < keep
        return sp.csr_matrix((data[kept], (row[kept], col[kept])), shape=rules.shape)

    def score(self, batch: PrefixBatch) -> np.ndarray:
        """Rule weights from the last item of each prefix, (len(batch), n_items + 1) float32."""
        if self.rules is None:
            raise RuntimeError("SR: call fit() before score()")
        last = batch.last_items()
        scores = np.asarray(self.rules[last].toarray(), dtype=np.float32)
        return demote_last_items(scores, last) if self._exclude_last else scores
