"""Session-based nearest neighbours: S-KNN, V-SKNN and STAN.

All three find the training sessions most similar to the current prefix and score an item by the
(weighted) similarities of the neighbours that contain it. They follow the reference implementations
of session-rec (Ludewig, Latifi & Jannach, "Empirical analysis of session-based recommendation
algorithms", UMUAI 2021; Ludewig & Jannach, "Evaluation of session-based recommendation algorithms",
UMUAI 2018) and, for STAN, Garg et al., "Sequence and Time Aware Neighborhood for Session-based
Recommendations: STAN", SIGIR 2019:

* candidates are the training sessions sharing at least one item with the prefix; of those, the
  ``sample_size`` most recent (by the session's last timestamp) are compared ("recent" sampling);
* the ``k`` most similar candidates are the neighbours (ties: the more recent session first);
* S-KNN: cosine similarity of item sets |s ∩ n| / sqrt(|s| |n|) (session-rec's ``cosine`` misplaces
  the parentheses; the textbook formula is used here), score = summed neighbour similarity.
* V-SKNN: similarity = sum over shared items of a position weight (``weighting``, default "div":
  pos / len, the last visit weighs 1) divided by |s|; each neighbour's contribution decays with how
  far back the most recent shared item is (``weighting_score``, default "div": 1 / steps back), and
  optionally grows with the item's IDF (``idf_weighting``: score *= 1 + idf_weighting * idf).
* STAN: cosine with position weights exp((pos - len) / lambda1) on the prefix, times the neighbour's
  recency exp(-|t_prefix - t_neighbour| / lambda2) (disabled when the data has no time), and item
  weights exp(-|p(j) - p(i*)| / lambda3) with p(i*) the latest position in the neighbour of an
  item shared with the prefix (session-rec's reading of the paper).

Everything is vectorised per batch with scipy.sparse: prefix-by-session overlaps come from one sparse
product with an item -> sessions index truncated to each item's ``sample_size`` most recent sessions
(exact: the most recent ``sample_size`` candidates of a union are among the union of each list's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import scipy.sparse as sp

from model.baselines.common import (
    PrefixVisits,
    VisitSequences,
    demote_last_items,
    dense_scores,
    rank_within_groups,
    resolve_exclude_last,
    rows_of_csr,
)
from model.data.dataset import SessionDataset
from model.recommender import PrefixBatch

_CHUNK = 256  # prefixes per sparse product: bounds the candidate matrix whatever the evaluator's batch


def position_weight(pos: np.ndarray, length: np.ndarray, weighting: str) -> np.ndarray:
    """V-SKNN's weight of a prefix item at 1-based ``pos`` of ``length`` visits (session-rec's decays)."""
    pos = np.asarray(pos, np.float64)
    length = np.asarray(length, np.float64)
    if weighting == "div":
        return pos / length
    if weighting == "same":
        return np.ones_like(pos)
    if weighting == "linear":
        return np.clip(1.0 - 0.1 * (length - pos), 0.0, None)
    if weighting == "quadratic":
        return (pos / length) ** 2
    if weighting == "log":
        return 1.0 / np.log10(length - pos + 1.7)
    raise ValueError(f"unknown weighting {weighting!r}")


def step_weight(steps: np.ndarray, weighting: str) -> np.ndarray:
    """V-SKNN's decay of a neighbour whose newest shared item is ``steps`` visits back (1 = last visit)."""
    steps = np.asarray(steps, np.float64)
    if weighting == "div":
        return 1.0 / steps
    if weighting == "same":
        return np.ones_like(steps)
    if weighting == "linear":
        return np.clip(1.0 - 0.1 * steps, 0.0, None)
    if weighting == "quadratic":
        return 1.0 / (steps * steps)
    if weighting == "log":
        return 1.0 / np.log10(steps + 1.7)
    raise ValueError(f"unknown weighting {weighting!r}")


@dataclass(frozen=True)
class SKNNConfig:
    """S-KNN: ``k`` neighbours among the ``sample_size`` most recent candidates (session-rec: 100, 500)."""

    k: int = 100
    sample_size: int = 500  # 0: compare against every candidate
    exclude_last: bool | None = (
        None  # demote the prefix's last item; None: learn from training (common.resolve_exclude_last)
    )


@dataclass(frozen=True)
class VSKNNConfig:
    """V-SKNN: neighbours, sample, prefix position ``weighting``, neighbour decay, IDF boost (session-rec defaults)."""

    k: int = 100
    sample_size: int = 1000
    weighting: Literal["div", "same", "linear", "quadratic", "log"] = "div"
    weighting_score: Literal["div", "same", "linear", "quadratic", "log"] = "div"
    idf_weighting: float = 0.0  # 0 disables; session-rec tunes it in {1, 2, 5, 10}
    exclude_last: bool | None = (
        None  # demote the prefix's last item; None: learn from training (common.resolve_exclude_last)
    )


@dataclass(frozen=True)
class STANConfig:
    """STAN: neighbours, sample, and the three decays (session-rec defaults; None disables a decay)."""

    k: int = 100
    sample_size: int = 5000
    lambda1: float | None = 1.02  # prefix position decay, in visits
    lambda2_days: float | None = 5.0  # neighbour-session recency decay, in days
    lambda3: float | None = 2.05  # distance to the shared item in the neighbour, in visits
    exclude_last: bool | None = (
        None  # demote the prefix's last item; None: learn from training (common.resolve_exclude_last)
    )


@dataclass
class _Neighbours:
    """The chosen neighbours of a chunk of prefixes, as parallel arrays (one row per pair)."""

    row: np.ndarray  # prefix index
    session: np.ndarray  # neighbour session (recency rank)
    sim: np.ndarray  # similarity


class _SessionKNNBase:
    """Index building and neighbour search shared by the three variants."""

    name = "session-knn"
    config: SKNNConfig | VSKNNConfig | STANConfig

    def __init__(self) -> None:
        self.sessions: sp.csr_matrix | None = (
            None  # (n_sessions, n_items + 1), rows by recency, data = last position
        )
        self.postings: sp.csr_matrix | None = (
            None  # (n_items + 1, n_sessions), truncated to sample_size newest
        )
        self.session_size: np.ndarray | None = None  # distinct items per session
        self.session_time_s: np.ndarray | None = None  # last timestamp per session (recency order), seconds
        self.has_time = False
        self.n_items = 0

    # ---- hooks ------------------------------------------------------------------------------------
    def _k(self) -> int:
        raise NotImplementedError

    def _sample_size(self) -> int:
        raise NotImplementedError

    def _query_weight(self, pos: np.ndarray, length: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _similarity(self, overlap: np.ndarray, row: np.ndarray, session: np.ndarray, ctx: dict) -> np.ndarray:
        raise NotImplementedError

    def _item_values(
        self, nb: _Neighbours, owner: np.ndarray, items: np.ndarray, npos: np.ndarray, ctx: dict
    ) -> np.ndarray:
        raise NotImplementedError

    # ---- fitting ----------------------------------------------------------------------------------
    def fit(self, train: SessionDataset) -> _SessionKNNBase:
        """Index training sessions by recency and build the item -> sessions lists."""
        self._exclude_last = resolve_exclude_last(self.config.exclude_last, train)
        seqs = VisitSequences.from_dataset(train)
        order = np.lexsort((np.arange(seqs.n_sessions), seqs.last_time_ms))  # oldest first, stable on ties
        self.sessions = seqs.session_item_matrix(order)
        self.sessions.sort_indices()
        self.session_size = np.diff(self.sessions.indptr).astype(np.float64)
        self.session_time_s = seqs.last_time_ms[order].astype(np.float64) / 1000.0
        self.has_time = bool(train.has_time)
        self.n_items = seqs.n_items
        postings = self.sessions.astype(bool).astype(np.float64).T.tocsr()
        postings.sort_indices()
        sample = self._sample_size()
        if sample > 0:
            # Column index = recency rank, so an item's newest sessions are the tail of its row.
            slot = np.arange(postings.nnz)
            row_end = np.repeat(postings.indptr[1:], np.diff(postings.indptr))
            keep = row_end - slot <= sample
            coo = postings.tocoo()
            postings = sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=postings.shape)
        self.postings = postings
        self._fit_extra(seqs)
        return self

    def _fit_extra(self, seqs: VisitSequences) -> None:
        """Variant-specific statistics (IDF); nothing by default."""

    # ---- scoring ----------------------------------------------------------------------------------
    def score(self, batch: PrefixBatch) -> np.ndarray:
        """Neighbourhood scores, (len(batch), n_items + 1) float32."""
        if self.sessions is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        out = np.zeros((len(batch), self.n_items + 1), dtype=np.float32)
        for lo in range(0, len(batch), _CHUNK):
            hi = min(lo + _CHUNK, len(batch))
            chunk = PrefixBatch(batch.dataset, batch.starts[lo:hi], batch.ends[lo:hi])
            out[lo:hi] = self._score_chunk(chunk)
        return demote_last_items(out, batch.last_items()) if self._exclude_last else out

    def _score_chunk(self, batch: PrefixBatch) -> np.ndarray:
        assert self.sessions is not None and self.postings is not None
        visits = PrefixVisits.from_batch(batch)
        n_rows = len(visits)
        q_row, q_item, q_pos = visits.distinct()
        q_weight = self._query_weight(q_pos, visits.lengths[q_row])
        query = sp.csr_matrix((q_weight, (q_row, q_item)), shape=(n_rows, self.n_items + 1))
        ctx = {
            "visits": visits,
            "q_key": q_row * (self.n_items + 1) + q_item,  # sorted: distinct() orders by (row, item)
            "q_pos": q_pos,
            "q_weight": q_weight,
            "n_distinct": np.bincount(q_row, minlength=n_rows).astype(np.float64),
            "q_norm": np.sqrt(np.bincount(q_row, weights=q_weight * q_weight, minlength=n_rows)),
        }
        nb = self._neighbours(query, ctx)
        if len(nb.row) == 0:
            return np.zeros((n_rows, self.n_items + 1), np.float32)
        owner, slots = rows_of_csr(self.sessions, nb.session)
        items = self.sessions.indices[slots].astype(np.int64)
        npos = self.sessions.data[slots].astype(np.float64)
        values = self._item_values(nb, owner, items, npos, ctx)
        return dense_scores(nb.row[owner], items, values, n_rows, self.n_items)

    def _neighbours(self, query: sp.csr_matrix, ctx: dict) -> _Neighbours:
        """Sample the newest candidates per prefix, then keep the k most similar."""
        overlap = (query @ self.postings).tocsr()  # (B, n_sessions): weighted shared items
        overlap.sort_indices()
        lengths = np.diff(overlap.indptr)
        row = np.repeat(np.arange(overlap.shape[0]), lengths)
        session = overlap.indices.astype(np.int64)
        data = overlap.data
        sample = self._sample_size()
        if sample > 0:
            newest = np.repeat(overlap.indptr[1:], lengths) - np.arange(overlap.nnz) <= sample
            row, session, data = row[newest], session[newest], data[newest]
        sim = self._similarity(data, row, session, ctx)
        # Per prefix: most similar first, newer on ties; compare at float32 precision so that sums taken
        # in a different order (1/3 + 2/3 vs 2/3 + 1/3) still tie instead of splitting on rounding noise.
        order = np.lexsort((-session, -sim.astype(np.float32), row))
        row, session, sim = row[order], session[order], sim[order]
        top = (rank_within_groups(row) < self._k()) & (sim > 0)
        return _Neighbours(row[top], session[top], sim[top])

    # ---- helpers for the variants -----------------------------------------------------------------
    def _shared(
        self, nb: _Neighbours, owner: np.ndarray, items: np.ndarray, ctx: dict
    ) -> tuple[np.ndarray, np.ndarray]:
        """For every gathered neighbour item: is it in the prefix, and its last position there (0 if not)."""
        key = nb.row[owner] * (self.n_items + 1) + items
        q_key = ctx["q_key"]
        at = np.minimum(np.searchsorted(q_key, key), max(len(q_key) - 1, 0))
        found = q_key[at] == key if len(q_key) else np.zeros(len(key), bool)
        return found, np.where(found, ctx["q_pos"][at], 0)

    @staticmethod
    def _per_pair_max(values: np.ndarray, owner: np.ndarray, n_pairs: int) -> np.ndarray:
        """Max of ``values`` over each neighbour's gathered items (every neighbour has at least one)."""
        starts = np.searchsorted(owner, np.arange(n_pairs))
        return np.maximum.reduceat(values, starts)


class SKNN(_SessionKNNBase):
    """S-KNN: cosine-similar training sessions vote for their items with their similarity."""

    name = "S-KNN"

    def __init__(self, config: SKNNConfig | None = None, **overrides: object) -> None:
        super().__init__()
        self.config = replace(config or SKNNConfig(), **overrides)

    def _k(self) -> int:
        return self.config.k

    def _sample_size(self) -> int:
        return self.config.sample_size

    def _query_weight(self, pos: np.ndarray, length: np.ndarray) -> np.ndarray:
        return np.ones(len(pos), np.float64)

    def _similarity(self, overlap: np.ndarray, row: np.ndarray, session: np.ndarray, ctx: dict) -> np.ndarray:
        assert self.session_size is not None
        return overlap / np.sqrt(ctx["n_distinct"][row] * self.session_size[session])

    def _item_values(
        self, nb: _Neighbours, owner: np.ndarray, items: np.ndarray, npos: np.ndarray, ctx: dict
    ) -> np.ndarray:
        return nb.sim[owner]


class VSKNN(_SessionKNNBase):
    """V-SKNN: position-weighted overlap, neighbours decayed by how far back their match lies."""

    name = "V-SKNN"

    def __init__(self, config: VSKNNConfig | None = None, **overrides: object) -> None:
        super().__init__()
        self.config = replace(config or VSKNNConfig(), **overrides)
        position_weight(np.ones(1), np.ones(1), self.config.weighting)  # fail early on bad names
        step_weight(np.ones(1), self.config.weighting_score)
        self.idf: np.ndarray | None = None

    def _k(self) -> int:
        return self.config.k

    def _sample_size(self) -> int:
        return self.config.sample_size

    def _fit_extra(self, seqs: VisitSequences) -> None:
        counts = seqs.visit_counts().astype(np.float64)
        with np.errstate(divide="ignore"):
            self.idf = np.where(counts > 0, np.log(max(seqs.n_sessions, 1) / np.maximum(counts, 1)), 0.0)

    def _query_weight(self, pos: np.ndarray, length: np.ndarray) -> np.ndarray:
        return position_weight(pos, length, self.config.weighting)

    def _similarity(self, overlap: np.ndarray, row: np.ndarray, session: np.ndarray, ctx: dict) -> np.ndarray:
        return overlap / ctx["n_distinct"][row]

    def _item_values(
        self, nb: _Neighbours, owner: np.ndarray, items: np.ndarray, npos: np.ndarray, ctx: dict
    ) -> np.ndarray:
        found, q_pos = self._shared(nb, owner, items, ctx)
        newest_match = self._per_pair_max(np.where(found, q_pos, 0), owner, len(nb.row))
        steps = ctx["visits"].lengths[nb.row] - newest_match + 1
        values = (nb.sim * step_weight(steps, self.config.weighting_score))[owner]
        if self.config.idf_weighting:
            assert self.idf is not None
            values = values * (1.0 + self.config.idf_weighting * self.idf[items])
        return values


class STAN(_SessionKNNBase):
    """STAN: S-KNN with prefix-position, neighbour-recency and in-neighbour distance decays."""

    name = "STAN"

    def __init__(self, config: STANConfig | None = None, **overrides: object) -> None:
        super().__init__()
        self.config = replace(config or STANConfig(), **overrides)

    def _k(self) -> int:
        return self.config.k

    def _sample_size(self) -> int:
        return self.config.sample_size

    def _query_weight(self, pos: np.ndarray, length: np.ndarray) -> np.ndarray:
        if self.config.lambda1 is None:
            return np.ones(len(pos), np.float64)
        return np.exp((np.asarray(pos, np.float64) - length) / self.config.lambda1)

    def _similarity(self, overlap: np.ndarray, row: np.ndarray, session: np.ndarray, ctx: dict) -> np.ndarray:
        assert self.session_size is not None and self.session_time_s is not None
        sim = overlap / (ctx["q_norm"][row] * np.sqrt(self.session_size[session]))
        if self.config.lambda2_days is not None and self.has_time:
            prefix_time = ctx["visits"].last_time_ms[row] / 1000.0
            age = np.abs(prefix_time - self.session_time_s[session])
            sim = sim * np.exp(-age / (self.config.lambda2_days * 86400.0))
        return sim

    def _item_values(
        self, nb: _Neighbours, owner: np.ndarray, items: np.ndarray, npos: np.ndarray, ctx: dict
    ) -> np.ndarray:
        values = nb.sim[owner]
        if self.config.lambda3 is not None:
            found, _ = self._shared(nb, owner, items, ctx)
            anchor = self._per_pair_max(np.where(found, npos, 0.0), owner, len(nb.row))
            values = values * np.exp(-np.abs(npos - anchor[owner]) / self.config.lambda3)
        return values
