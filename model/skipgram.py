"""Skip-gram Word2vec in torch, one device's sessions at a time: the federated item2vec stage.

RIB starts its item embeddings from Word2vec (Section 4.1). gensim (``model/word2vec.py``) trains on the
pooled corpus, which a federation never has. Here each device computes the skip-gram negative-sampling
(SGNS) loss over its own visit sequences and takes SGD steps on the two tables (input vectors ``W_in``,
output vectors ``W_out``); the server averages the returned weights and its optimiser (FedAdam) sets the
real step, as gensim's SGD schedule does centrally. Measured on jdata2016 (in-process probes, nearest-item
Recall@20 of the vectors): every device for 100 rounds of one local step 0.353, 10 % of devices for 30
rounds of five local steps 0.283, gensim on the pooled sessions 0.359.

Negatives are drawn uniformly from the shared vocabulary: gensim's unigram^0.75 table needs global item
counts, which no party holds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.word2vec import ItemVectors

N_TABLES = 2  # W_in (the item vectors), W_out (context vectors)


@dataclass(frozen=True)
class SkipGramConfig:
    """One device's local skip-gram training in a federated round."""

    window: int = 5  # context items on each side (gensim's default)
    negatives: int = 5  # uniform negative items per (item, context) pair
    steps: int = 1  # full-batch SGD steps over the device's pairs
    lr: float = 1.0  # local step size (with FedAdam on the server, 1 step at lr 1 sends the mean gradient)
    max_pairs: int = 50_000  # a seeded sample of pairs per step bounds a heavy device's memory and time
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 1 or self.negatives < 1 or self.steps < 1 or self.max_pairs < 1:
            raise ValueError(f"window, negatives, steps and max_pairs must be >= 1 in {self}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def initial_weights(n_items: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    """[W_in, W_out], (n_items + 1, dim) float32: gensim's init (W_in uniform in +-0.5/dim, W_out zero), row 0 zero."""
    if n_items < 1 or dim < 1:
        raise ValueError(f"n_items and dim must be >= 1, got {n_items}, {dim}")
    rng = np.random.default_rng(seed)
    w_in = ((rng.random((n_items + 1, dim)) - 0.5) / dim).astype(np.float32)
    w_in[0] = 0.0  # padding
    return [w_in, np.zeros((n_items + 1, dim), dtype=np.float32)]


def skipgram_pairs(sequences: Sequence[np.ndarray], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(center items, context items): every ordered pair of positions at most ``window`` apart in a sequence."""
    centers: list[np.ndarray] = []
    contexts: list[np.ndarray] = []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        for offset in range(1, min(window, len(seq) - 1) + 1):
            left, right = seq[:-offset], seq[offset:]
            centers += [left, right]
            contexts += [right, left]
    if not centers:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(centers), np.concatenate(contexts)


def sgns_loss(
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    centers: torch.Tensor,
    contexts: torch.Tensor,
    negatives: torch.Tensor,
) -> torch.Tensor:
    """Mean over pairs of -log s(u_c . v_o) - sum_k log s(-u_c . v_k) (Mikolov et al. 2013)."""
    u = w_in[centers]  # (P, dim)
    positive = (u * w_out[contexts]).sum(-1)
    negative = torch.einsum("pd,pkd->pk", u, w_out[negatives])
    return -(F.logsigmoid(positive) + F.logsigmoid(-negative).sum(-1)).mean()


def check_weights(weights: Sequence[np.ndarray]) -> tuple[int, int]:
    """(n_items, dim) of a [W_in, W_out] pair; ValueError unless two equal, finite 2-D float tables."""
    if len(weights) != N_TABLES:
        raise ValueError(f"skip-gram weights are [W_in, W_out], got {len(weights)} arrays")
    w_in, w_out = (np.asarray(w) for w in weights)
    if w_in.ndim != 2 or w_in.shape != w_out.shape or w_in.shape[0] < 2:
        raise ValueError(f"W_in {w_in.shape} and W_out {w_out.shape} must be equal (n_items + 1, dim) tables")
    if not (np.isfinite(w_in).all() and np.isfinite(w_out).all()):
        raise ValueError("skip-gram weights hold non-finite values")
    return w_in.shape[0] - 1, w_in.shape[1]


def train_local_skipgram(
    weights: Sequence[np.ndarray], sequences: Sequence[np.ndarray], config: SkipGramConfig
) -> tuple[list[np.ndarray], dict[str, float | int]]:
    """SGD on this device's SGNS loss from ``weights``; returns (new [W_in, W_out], loss/pairs/steps/seconds)."""
    started = time.perf_counter()
    n_items, _ = check_weights(weights)
    centers, contexts = skipgram_pairs(sequences, config.window)
    if centers.size and (centers.min() < 1 or max(centers.max(), contexts.max()) > n_items):
        raise ValueError(f"item ids must lie in 1..{n_items} (the shared vocabulary)")
    w_in = torch.tensor(np.asarray(weights[0]), dtype=torch.float32, requires_grad=True)
    w_out = torch.tensor(np.asarray(weights[1]), dtype=torch.float32, requires_grad=True)
    stats: dict[str, float | int] = {"loss": 0.0, "pairs": int(centers.size), "steps": 0}
    if centers.size:
        rng = np.random.default_rng(config.seed)
        optimizer = torch.optim.SGD([w_in, w_out], lr=config.lr)
        losses = []
        for _ in range(config.steps):
            take = np.arange(centers.size)
            if centers.size > config.max_pairs:
                take = rng.choice(centers.size, config.max_pairs, replace=False)
            negatives = rng.integers(1, n_items + 1, size=(take.size, config.negatives))
            loss = sgns_loss(
                w_in, w_out, torch.from_numpy(centers[take]), torch.from_numpy(contexts[take]),
                torch.from_numpy(negatives),
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        stats.update(loss=float(np.mean(losses)), steps=len(losses))
    stats["seconds"] = time.perf_counter() - started
    return [w_in.detach().numpy().copy(), w_out.detach().numpy().copy()], stats


def item_vectors(weights: Sequence[np.ndarray]) -> ItemVectors:
    """The item vectors (W_in) of trained skip-gram weights; every vocabulary row counts as present."""
    check_weights(weights)
    vectors = np.asarray(weights[0], dtype=np.float32).copy()
    present = np.ones(len(vectors), dtype=bool)
    present[0] = False
    return ItemVectors(vectors, present)
