"""Item2vec with gensim: skip-gram Word2vec over training visit sequences (RIB Sections 4.1 and 5.2).

Two uses:
- initialising RIB's item embeddings W_P (the paper trains the initial weights with Word2vec);
- the paper's baselines "Word2vec" (items nearest, by cosine, to the last visited item) and "Word2vec-Avg"
  (items nearest to the average of the prefix's item vectors), behind the SessionRecommender protocol.

Sentences are visit-level item sequences (one token per product visit), so repeated micro behaviors on
one item do not inflate its context. ``workers=1`` and a fixed seed make training deterministic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from model.baselines.common import PrefixVisits, demote_last_items
from model.data.dataset import SessionDataset
from model.recommender import PrefixBatch

# Score given to items Word2vec never saw (below any cosine, above -inf so ranks stay well defined).
UNSEEN_SCORE = -2.0


@dataclass(frozen=True)
class Word2VecConfig:
    """gensim Word2Vec settings (skip-gram, negative sampling)."""

    vector_size: int = 64
    window: int = 5
    min_count: int = 1
    negative: int = 10
    sample: float = 1e-3  # down-sampling of frequent items (gensim default; 1e-4 starves small corpora)
    epochs: int = 20
    alpha: float = 0.025
    seed: int = 0
    workers: int = 1  # >1 makes gensim non-deterministic


@dataclass
class ItemVectors:
    """Word2vec item vectors indexed by dense item id: row i is item i; ``present`` marks trained rows."""

    vectors: np.ndarray  # float32, (n_items + 1, dim); row 0 (padding) and unseen items are zero
    present: np.ndarray  # bool, (n_items + 1,)

    @property
    def dim(self) -> int:
        """Vector size."""
        return int(self.vectors.shape[1])

    def unit(self) -> np.ndarray:
        """Rows scaled to unit length (zero rows stay zero), for cosine similarity."""
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        return np.divide(self.vectors, norms, out=np.zeros_like(self.vectors), where=norms > 0)


def train_item_vectors(train: SessionDataset, config: Word2VecConfig | None = None) -> ItemVectors:
    """Train skip-gram Word2vec on ``train``'s visit-level item sequences and return dense-indexed vectors."""
    from gensim.models import Word2Vec  # heavy import only when used

    config = config or Word2VecConfig()
    sentences = [[str(int(item)) for item in seq] for seq in train.session_visit_sequences() if len(seq) > 1]
    vectors = np.zeros((train.n_items + 1, config.vector_size), dtype=np.float32)
    present = np.zeros(train.n_items + 1, dtype=bool)
    if not sentences:
        return ItemVectors(vectors, present)
    model = Word2Vec(
        sentences=sentences,
        vector_size=config.vector_size,
        window=config.window,
        min_count=config.min_count,
        sg=1,
        negative=config.negative,
        sample=config.sample,
        epochs=config.epochs,
        alpha=config.alpha,
        seed=config.seed,
        workers=config.workers,
    )
    keys = np.array([int(key) for key in model.wv.index_to_key], dtype=np.int64)
    vectors[keys] = model.wv.vectors
    present[keys] = True
    return ItemVectors(vectors, present)


class _Word2VecBase:
    """Shared fit/score: cosine between a query vector per prefix and every item vector."""

    name = "Word2vec"

    def __init__(self, config: Word2VecConfig | None = None, **overrides: object) -> None:
        self.config = replace(config or Word2VecConfig(), **overrides)
        self.item_vectors: ItemVectors | None = None
        self._unit: np.ndarray | None = None

    def fit(self, train: SessionDataset) -> _Word2VecBase:
        """Train the item vectors on training sessions."""
        self.item_vectors = train_item_vectors(train, self.config)
        self._unit = self.item_vectors.unit()
        return self

    @classmethod
    def from_item_vectors(cls, vectors: ItemVectors) -> _Word2VecBase:
        """A fitted recommender over given item vectors (e.g. the federated skip-gram's)."""
        rec = cls(vector_size=vectors.dim)
        rec.item_vectors = vectors
        rec._unit = vectors.unit()
        return rec

    def _query(self, visits: PrefixVisits, unit: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score(self, batch: PrefixBatch) -> np.ndarray:
        """(len(batch), n_items + 1) cosine similarities; unseen items get UNSEEN_SCORE, the last item the minimum."""
        if self._unit is None or self.item_vectors is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        visits = PrefixVisits.from_batch(batch)
        query = self._query(visits, self._unit)
        norms = np.linalg.norm(query, axis=1, keepdims=True)
        query = np.divide(query, norms, out=np.zeros_like(query), where=norms > 0)
        scores = query @ self._unit.T
        scores[:, ~self.item_vectors.present] = UNSEEN_SCORE
        # The next visit is a different item than the current one (consecutive tuples on one item are one
        # visit), and the last item is its own nearest neighbour, so it would waste rank 1.
        return demote_last_items(scores.astype(np.float32), batch.last_items())

    def to_dict(self) -> dict[str, object]:
        """Hyper-parameters, for reports."""
        return asdict(self.config)


class Word2VecRecommender(_Word2VecBase):
    """The paper's "Word2vec" baseline: nearest items to the last visited item's vector."""

    name = "Word2vec"

    def _query(self, visits: PrefixVisits, unit: np.ndarray) -> np.ndarray:
        last = np.cumsum(visits.lengths) - 1  # index of each prefix's last visit in the flat arrays
        query = np.zeros((len(visits), unit.shape[1]), dtype=np.float32)
        has = visits.lengths > 0
        query[has] = unit[visits.items[last[has]]]
        return query


class Word2VecAvgRecommender(_Word2VecBase):
    """The paper's "Word2vec Avg." baseline: nearest items to the mean of the prefix's item vectors."""

    name = "Word2vec-Avg"

    def _query(self, visits: PrefixVisits, unit: np.ndarray) -> np.ndarray:
        # Mean of the raw item vectors of every visit in the prefix (as the paper), unseen items add zeros.
        raw = self.item_vectors.vectors
        query = np.zeros((len(visits), raw.shape[1]), dtype=np.float64)
        np.add.at(query, visits.row, raw[visits.items])
        query /= np.maximum(visits.lengths, 1)[:, None]
        return query.astype(np.float32)
