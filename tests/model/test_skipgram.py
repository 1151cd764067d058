"""The federated skip-gram: pairs, one device's SGD steps, and the item vectors RIB starts from."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model import skipgram  # noqa: E402
from model.rib import RIB, RIBConfig  # noqa: E402
from model.train import load_checkpoint, save_init_checkpoint  # noqa: E402


def test_pairs_are_every_ordered_pair_within_the_window():
    centers, contexts = skipgram.skipgram_pairs([np.array([1, 2, 3]), np.array([4])], window=1)
    assert sorted(zip(centers.tolist(), contexts.tolist(), strict=True)) == [(1, 2), (2, 1), (2, 3), (3, 2)]
    centers, contexts = skipgram.skipgram_pairs([np.array([1, 2, 3])], window=5)
    assert len(centers) == 6 and (1, 3) in set(zip(centers.tolist(), contexts.tolist(), strict=True))
    assert skipgram.skipgram_pairs([np.array([7])], window=2)[0].size == 0


def test_initial_weights_follow_gensim_and_the_seed():
    w_in, w_out = skipgram.initial_weights(10, 4, seed=3)
    assert w_in.shape == w_out.shape == (11, 4) and w_in.dtype == np.float32
    assert not w_in[0].any() and not w_out.any()
    assert np.abs(w_in).max() <= 0.5 / 4
    np.testing.assert_array_equal(w_in, skipgram.initial_weights(10, 4, seed=3)[0])
    assert not np.array_equal(w_in, skipgram.initial_weights(10, 4, seed=4)[0])


def _loss(weights, centers, contexts, negatives) -> float:
    w_in, w_out = (torch.from_numpy(w) for w in weights)
    return float(
        skipgram.sgns_loss(w_in, w_out, *(torch.from_numpy(a) for a in (centers, contexts, negatives)))
    )


def test_local_steps_lower_the_devices_loss_and_leave_the_inputs_alone():
    sequences = [np.array([1, 2, 3, 1, 2]), np.array([4, 5, 4, 5])] * 3
    weights = skipgram.initial_weights(8, 6, seed=0)
    before = [w.copy() for w in weights]
    centers, contexts = skipgram.skipgram_pairs(sequences, 5)
    negatives = np.random.default_rng(1).integers(1, 9, size=(centers.size, 5))
    new, stats = skipgram.train_local_skipgram(weights, sequences, skipgram.SkipGramConfig(steps=30, lr=1.0))
    assert stats["steps"] == 30 and stats["pairs"] == centers.size
    assert _loss(new, centers, contexts, negatives) < _loss(weights, centers, contexts, negatives) - 0.5
    for a, b in zip(weights, before, strict=True):
        np.testing.assert_array_equal(a, b)
    # Items that share contexts end up closer than items that never meet.
    vectors = skipgram.item_vectors(new).unit()
    assert vectors[4] @ vectors[5] > vectors[4] @ vectors[7]


def test_a_device_without_pairs_sends_the_weights_back_unchanged():
    weights = skipgram.initial_weights(5, 3)
    new, stats = skipgram.train_local_skipgram(weights, [np.array([2])], skipgram.SkipGramConfig())
    assert stats["pairs"] == 0 and stats["steps"] == 0
    np.testing.assert_array_equal(new[0], weights[0])


@pytest.mark.parametrize(
    "weights, sequences, message",
    [
        ([np.zeros((5, 3), np.float32)], [np.array([1, 2])], "W_in, W_out"),
        ([np.zeros((5, 3), np.float32), np.zeros((5, 4), np.float32)], [np.array([1, 2])], "must be equal"),
        (
            [np.full((5, 3), np.nan, np.float32), np.zeros((5, 3), np.float32)],
            [np.array([1, 2])],
            "non-finite",
        ),
        (skipgram.initial_weights(4, 3), [np.array([1, 9])], "shared vocabulary"),
        (skipgram.initial_weights(4, 3), [np.array([0, 1])], "shared vocabulary"),
    ],
)
def test_bad_weights_or_items_are_clear_errors(weights, sequences, message):
    with pytest.raises(ValueError, match=message):
        skipgram.train_local_skipgram(weights, sequences, skipgram.SkipGramConfig())


def test_config_rejects_unusable_values():
    with pytest.raises(ValueError):
        skipgram.SkipGramConfig(window=0)
    with pytest.raises(ValueError):
        skipgram.SkipGramConfig(lr=0.0)


def test_init_checkpoint_carries_the_vectors_up_to_one_scale(tmp_path):
    config = RIBConfig(
        n_items=12, n_activities=3, n_dwell=4, item_dim=6, hidden_dim=8, max_len=10, loss="softmax"
    )
    weights = skipgram.initial_weights(12, 6, seed=2)
    weights[0][1:] += np.random.default_rng(0).normal(size=(12, 6)).astype(np.float32)
    path = save_init_checkpoint(config, skipgram.item_vectors(weights), tmp_path / "rib-init.pt", seed=5)
    loaded = load_checkpoint(path, device="cpu")
    assert loaded.rib_config == config
    table = loaded.model.item_emb.weight.detach().numpy()
    assert not table[0].any()  # padding
    ratio = table[1:] / weights[0][1:]
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.mean(table[1:] ** 2)), 1.0, rtol=1e-4)  # nn.Embedding's scale
    torch.manual_seed(5)
    fresh = RIB(config)  # every other weight is the seeded random init
    np.testing.assert_array_equal(
        loaded.model.gru.weight_hh_l0.detach().numpy(), fresh.gru.weight_hh_l0.detach().numpy()
    )
