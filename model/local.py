"""Local (on-device) training of a RIB for a fixed number of optimizer steps, and the weights it exchanges.

One readable loop, no Flower and no privacy code; ``privacy/dp_sgd.py`` trains the same model on the same
rows and per-window losses under DP-SGD.

- Rows are session *windows* (``model.train.make_windows``: a session, or overlapping ``max_len`` windows of
  a longer one), padded to one fixed width, with the target item at every position whose next tuple opens
  a new visit and ``IGNORE`` elsewhere. Taken together the rows' positions are exactly the dataset's
  examples, each once. Windows without an example carry no signal and are left out.
- ``window_losses`` is the per-window SUM of full-softmax cross-entropy (copy term included) over that
  window's examples: one window is one record, the unit whose gradient DP-SGD clips. Every trainable
  module sees batch-first inputs (the output layer scores (B, P, H) example slots, never a flattened
  (N, H)), which is what Opacus' per-sample gradient hooks need.
- ``train_local``: ``steps`` optimizer steps on batches of ``batch_size`` windows drawn by cycling through
  seeded shuffles of all windows; the loss of a step is the MEAN over its windows of ``window_losses``
  (a window with many examples weighs more, as under DP-SGD's ``loss_reduction="mean"``). A fresh
  optimizer each call: federated rounds start from the server's weights, not from stale moments.
- ``get_weights`` / ``set_weights``: every ``state_dict`` entry in order as float32 numpy arrays (the
  plain ``nn.GRU`` layout, which is what ONNX export and federated averaging see).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from model.data.dataset import SessionDataset
from model.rib import RIB, CopyTerm
from model.train import batch_tensors, make_windows

IGNORE = -100  # target of a position that is not an example (F.cross_entropy's default ignore_index)
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class LocalTrainConfig:
    """Settings of one local training call (what a federated round sends to a device)."""

    steps: int = 20  # optimizer steps per call
    batch_size: int = 32  # windows (≈ sessions) per step
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd"
    max_len: int = 50  # window length in tuples
    seed: int = 0
    grad_clip: float | None = 5.0  # max global gradient norm (non-private path; DP-SGD clips per window)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.max_len < 1:
            raise ValueError(f"steps must be >= 0, batch_size and max_len >= 1 in {self}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> LocalTrainConfig:
        """Inverse of to_dict; unknown keys are an error, missing ones take defaults."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown LocalTrainConfig fields {sorted(unknown)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _require_plain_gru(model: RIB) -> None:
    if type(model.gru) is not nn.GRU:
        raise ValueError(
            f"expected the plain nn.GRU layout, found {type(model.gru).__name__} (call to_plain_gru)"
        )


def get_weights(model: RIB) -> list[np.ndarray]:
    """Every state_dict entry of ``model``, in order, as float32 numpy copies."""
    _require_plain_gru(model)
    return [v.detach().cpu().numpy().astype(np.float32, copy=True) for v in model.state_dict().values()]


def frozen_indices(model: RIB) -> list[int]:
    """Positions in ``get_weights``' list that training never changes (frozen parameters, tied copies included)."""
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    return [i for i, value in enumerate(model.state_dict(keep_vars=True).values()) if id(value) in frozen]


def set_weights(model: RIB, weights: list[np.ndarray]) -> None:
    """Load arrays in ``get_weights`` order into ``model``; ValueError on count, shape or non-finite values."""
    _require_plain_gru(model)
    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(f"got {len(weights)} weight arrays, the model has {len(state)} state entries")
    loaded = {}
    for (name, current), array in zip(state.items(), weights, strict=True):
        array = np.asarray(array)
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(f"{name}: shape {tuple(array.shape)} != model's {tuple(current.shape)}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name}: non-finite values")
        loaded[name] = torch.from_numpy(np.array(array, dtype=np.float32)).to(current)
    model.load_state_dict(loaded, strict=True)


# --------------------------------------------------------------------------------------------------
# Rows and losses
# --------------------------------------------------------------------------------------------------

WindowBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class WindowDataset(Dataset):
    """Session windows padded to ``max_len``: rows (items, activities, dwell, mask, targets), all (max_len,).

    ``targets[t]`` is the next visit's item where position t is an example, ``IGNORE`` elsewhere. Rows are
    plain tuples of tensors (what Opacus' empty-batch collate expects).
    """

    def __init__(self, data: SessionDataset, max_len: int) -> None:
        windows = make_windows(data, max_len)
        width = max_len
        self.items = torch.zeros(0, width, dtype=torch.long)
        self.activities, self.dwell, self.targets = self.items, self.items, self.items
        self.mask = torch.zeros(0, width, dtype=torch.bool)
        self.n_examples = 0
        if len(windows):
            batch = batch_tensors(data, windows, np.arange(len(windows)), torch.device("cpu"))
            targets = torch.full_like(batch["items"], IGNORE)
            targets[batch["positions"]] = batch["targets"]
            keep = batch["positions"].any(1)  # a window without an example carries no signal
            pad = width - batch["items"].shape[1]

            def fit(t: torch.Tensor, value: int | bool) -> torch.Tensor:
                return F.pad(t[keep], (0, pad), value=value)

            self.items, self.activities, self.dwell = (
                fit(batch[k], 0) for k in ("items", "activities", "dwell")
            )
            self.mask, self.targets = fit(batch["mask"], False), fit(targets, IGNORE)
            self.n_examples = int(batch["positions"].sum())

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def __getitem__(self, index: int) -> WindowBatch:
        return (
            self.items[index],
            self.activities[index],
            self.dwell[index],
            self.mask[index],
            self.targets[index],
        )

    def batch(
        self, rows: torch.Tensor | np.ndarray | list[int], device: torch.device | str = "cpu"
    ) -> WindowBatch:
        """Rows stacked and cut to their longest window (padding after, so the model's outputs don't change)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return trim_batch(
            (self.items[rows], self.activities[rows], self.dwell[rows], self.mask[rows], self.targets[rows]),
            device,
        )


def trim_batch(batch: WindowBatch, device: torch.device | str = "cpu") -> WindowBatch:
    """Drop the all-padding columns on the right of a (B, L) window batch (keeps >= 1 column) and move it."""
    mask = batch[3]
    width = max(1, int(mask.sum(1).max())) if mask.shape[0] else 1
    # contiguous: Opacus' embedding norm sampler (ghost clipping) calls .view on the index tensor
    return tuple(t[:, :width].contiguous().to(device) for t in batch)  # type: ignore[return-value]


def window_losses(model: RIB, batch: WindowBatch) -> torch.Tensor:
    """(B,) per-window SUM of full-softmax cross-entropy (with the copy term) over the window's examples."""
    items, activities, dwell, mask, targets = batch
    if model.config.loss != "softmax":
        raise ValueError(
            f"window_losses needs loss='softmax' (full softmax), the model has {model.config.loss!r}"
        )
    out = model.outputs_all(items, activities, dwell, mask)
    # Example slots (B, P): each row's example positions first, in order; P = most examples in one window.
    positions = targets != IGNORE
    counts = positions.sum(1)
    slots = max(1, int(counts.max())) if len(counts) else 1
    order = torch.argsort((~positions).to(torch.int8), dim=1, stable=True)[:, :slots]
    valid = torch.arange(slots, device=items.device)[None, :] < counts[:, None]
    slot_targets = torch.where(valid, targets.gather(1, order), IGNORE)
    pooled = out.pooled.gather(1, order[:, :, None].expand(-1, -1, out.pooled.shape[-1]))
    copy = None
    if out.copy is not None:
        amounts = out.copy.gather(1, order[:, :, None].expand(-1, -1, out.copy.shape[-1]))
        copy = CopyTerm(amounts, items[:, None, :].expand(-1, slots, -1))
    logits = model.logits(pooled, copy)  # (B, P, n_items + 1): the same scoring as training and evaluation
    losses = F.cross_entropy(
        logits.flatten(0, 1), slot_targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return losses.view(slot_targets.shape).sum(1)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, config: LocalTrainConfig) -> torch.optim.Optimizer:
    """A fresh Adam or SGD over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr)


def _cycle_batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of row indices: each pass is a fresh shuffle cut into batch_size pieces (last may be short)."""
    while True:
        order = rng.permutation(n)
        yield from (order[i : i + batch_size] for i in range(0, n, batch_size))


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_local(model: RIB, data: SessionDataset, config: LocalTrainConfig) -> dict[str, float | int]:
    """Train ``model`` in place for ``config.steps`` steps on ``data``'s windows.

    Step loss = mean over the batch's windows of ``window_losses`` (per-window sums). Returns
    ``loss`` (mean step loss; 0.0 when nothing ran), ``steps``, ``examples`` and ``windows`` (in ``data``),
    ``examples_seen`` (over all steps) and ``seconds``. No examples in ``data``: nothing runs, steps = 0.
    """
    started = time.perf_counter()
    dataset = WindowDataset(data, config.max_len)
    result: dict[str, float | int] = {
        "loss": 0.0,
        "steps": 0,
        "examples": dataset.n_examples,
        "windows": len(dataset),
    }
    result["examples_seen"] = 0
    if len(dataset) == 0 or config.steps == 0:
        result["seconds"] = time.perf_counter() - started
        return result
    device = _model_device(model)
    was_training = model.training
    rng = np.random.default_rng(config.seed)
    optimizer = make_optimizer(model, config)
    losses: list[float] = []
    batches = _cycle_batches(len(dataset), config.batch_size, rng)
    with torch.random.fork_rng(devices=[]):  # seeded dropout without touching the caller's global RNG
        torch.manual_seed(config.seed)
        model.train()
        for _ in range(config.steps):
            batch = dataset.batch(next(batches), device)
            loss = window_losses(model, batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            result["examples_seen"] += int((batch[4] != IGNORE).sum())
    model.train(was_training)
    result.update(loss=float(np.mean(losses)), steps=len(losses), seconds=time.perf_counter() - started)
    return result
