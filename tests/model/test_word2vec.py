"""Word2vec item vectors (gensim) and the paper's Word2vec / Word2vec-Avg baselines."""

from __future__ import annotations

import numpy as np
import pytest

from model.baselines import make_baseline
from model.data.open import open_dataset
from model.evaluate import evaluate, paired_bootstrap_diff
from model.recommender import PrefixBatch, SessionRecommender
from model.word2vec import (
    UNSEEN_SCORE,
    Word2VecAvgRecommender,
    Word2VecConfig,
    Word2VecRecommender,
    train_item_vectors,
)


@pytest.fixture(scope="module")
def split():
    return open_dataset("synthetic")


def test_item_vectors_are_deterministic_and_dense_indexed(split):
    config = Word2VecConfig(vector_size=16, epochs=5)
    a = train_item_vectors(split.train, config)
    b = train_item_vectors(split.train, config)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.vectors.shape == (split.train.n_items + 1, 16) and a.dim == 16
    assert not a.present[0] and np.all(a.vectors[0] == 0)
    # Every item that occurs in a multi-visit training session gets a vector.
    seen = np.unique(np.concatenate([s for s in split.train.session_visit_sequences() if len(s) > 1]))
    assert a.present[seen].all()
    np.testing.assert_allclose(np.linalg.norm(a.unit()[seen], axis=1), 1.0, rtol=1e-5)
    other_seed = train_item_vectors(split.train, Word2VecConfig(vector_size=16, epochs=5, seed=1))
    assert not np.array_equal(a.vectors, other_seed.vectors)


@pytest.mark.parametrize("cls", [Word2VecRecommender, Word2VecAvgRecommender])
def test_scores_shape_protocol_and_last_item_demoted(split, cls):
    model = cls(vector_size=16, epochs=5).fit(split.train)
    assert isinstance(model, SessionRecommender)
    examples = split.test.examples().subset(slice(0, 50))
    batch = PrefixBatch(split.test, examples.starts, examples.ends)
    scores = model.score(batch)
    assert scores.shape == (50, split.test.n_items + 1) and scores.dtype == np.float32
    rows = np.arange(50)
    last = batch.last_items()
    assert np.all(scores[rows, last] <= scores[:, 1:].min(axis=1))
    unseen = ~model.item_vectors.present
    unseen[0] = False
    for item in np.flatnonzero(unseen):
        assert np.all(scores[last != item, item] == UNSEEN_SCORE)


def test_avg_differs_from_last_item(split):
    examples = split.test.examples()
    long = examples.subset(np.flatnonzero(examples.ends - examples.starts > 6)[:20])
    batch = PrefixBatch(split.test, long.starts, long.ends)
    last = Word2VecRecommender(vector_size=16, epochs=5).fit(split.train).score(batch)
    avg = Word2VecAvgRecommender(vector_size=16, epochs=5).fit(split.train).score(batch)
    assert not np.allclose(last, avg)


def test_unfitted_model_refuses_to_score(split):
    examples = split.test.examples().subset(slice(0, 2))
    with pytest.raises(RuntimeError):
        Word2VecRecommender().score(PrefixBatch(split.test, examples.starts, examples.ends))


@pytest.mark.parametrize("cls", [Word2VecRecommender, Word2VecAvgRecommender])
def test_word2vec_baselines_beat_pop_on_synthetic(split, cls):
    """Sequence-aware embeddings beat popularity on the planted-chain population (paper Table 3's ordering)."""
    pop = evaluate(make_baseline("POP").fit(split.train), split.test)
    model = evaluate(cls().fit(split.train), split.test)
    mean, low, high = paired_bootstrap_diff(model.per_example("recall@20"), pop.per_example("recall@20"))
    assert low > 0, f"{cls.name} - POP Recall@20 = {mean:.4f} [{low:.4f}, {high:.4f}]"
    assert model.metrics["mrr@20"] > pop.metrics["mrr@20"]
