"""BPR-MF (Rendle et al., UAI 2009; RIB's [28]) for sessions, trained with the ``implicit`` library.

Training sessions play the users of the user-item matrix. A test prefix is a new session, so it has
no learned factor: as in Hidasi et al.'s and session-rec's session-based BPR baseline, its factor is
the mean of the item factors of its visits, and an item's score is that mean · item factor + item bias.
Defaults are implicit's (100 factors, lr 0.01, reg 0.01, 100 epochs). ``num_threads=1`` by default
because implicit's multi-threaded SGD is Hogwild-style and therefore not reproducible under a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
from implicit.cpu.bpr import BayesianPersonalizedRanking

from model.baselines.common import PrefixVisits, VisitSequences, demote_last_items, resolve_exclude_last
from model.data.dataset import SessionDataset
from model.recommender import PrefixBatch


@dataclass(frozen=True)
class BPRMFConfig:
    """implicit's BPR hyper-parameters; ``num_threads`` > 1 trains faster but is not deterministic."""

    factors: int = 100
    learning_rate: float = 0.01
    regularization: float = 0.01
    iterations: int = 100
    verify_negative_samples: bool = True
    seed: int = 0
    num_threads: int = 1
    exclude_last: bool | None = (
        None  # demote the prefix's last item; None: learn from training (common.resolve_exclude_last)
    )


class BPRMF:
    """Session-as-user BPR matrix factorisation; a prefix is the mean of its items' factors."""

    name = "BPR-MF"

    def __init__(self, config: BPRMFConfig | None = None, **overrides: object) -> None:
        self.config = replace(config or BPRMFConfig(), **overrides)
        self.item_factors: np.ndarray | None = None  # (n_items + 1, factors)
        self.item_bias: np.ndarray | None = None  # (n_items + 1,)
        self.seen: np.ndarray | None = None  # items with at least one training visit

    def fit(self, train: SessionDataset) -> BPRMF:
        """Factorise the binary session x item matrix of the training data."""
        self._exclude_last = resolve_exclude_last(self.config.exclude_last, train)
        cfg = self.config
        seqs = VisitSequences.from_dataset(train)
        user_items = seqs.session_item_matrix().astype(bool).astype(np.float32)
        user_items = sp.csr_matrix(
            user_items[np.diff(user_items.indptr) > 0]
        )  # implicit skips empty users anyway
        model = BayesianPersonalizedRanking(
            factors=cfg.factors,
            learning_rate=cfg.learning_rate,
            regularization=cfg.regularization,
            dtype=np.float32,
            iterations=cfg.iterations,
            num_threads=cfg.num_threads,
            verify_negative_samples=cfg.verify_negative_samples,
            random_state=cfg.seed,
        )
        model.fit(user_items, show_progress=False)
        # implicit stores the item bias as the last factor column (the user side holds a constant 1 there).
        factors = np.asarray(model.item_factors, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(factors[:, :-1])
        self.item_bias = np.ascontiguousarray(factors[:, -1])
        self.seen = seqs.visit_counts() > 0
        return self

    def score(self, batch: PrefixBatch) -> np.ndarray:
        """mean(prefix item factors) · item factors + item bias, (len(batch), n_items + 1) float32."""
        if self.item_factors is None or self.item_bias is None or self.seen is None:
            raise RuntimeError("BPR-MF: call fit() before score()")
        visits = PrefixVisits.from_batch(batch)
        weights = 1.0 / np.maximum(visits.lengths, 1)[visits.row]
        n = self.item_factors.shape[0]
        averaging = sp.csr_matrix(
            (weights.astype(np.float32), (visits.row, visits.items)), shape=(len(visits), n)
        )
        session_factors = averaging @ self.item_factors  # (B, factors); repeats count, as in the reference
        scores = session_factors @ self.item_factors.T + self.item_bias[None, :]
        scores[:, ~self.seen] = 0.0  # no evidence about items without training visits
        scores = scores.astype(np.float32, copy=False)
        return demote_last_items(scores, batch.last_items()) if self._exclude_last else scores
