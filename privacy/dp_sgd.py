"""Record-level DP-SGD of a RIB on one device, with Opacus: ``train_local_private`` is the one entry point.

What is private: one *record* is one session window (``model.local.WindowDataset``; a session longer than
``max_len`` gives several overlapping windows, so a long session is covered by several records). Each step
draws a Poisson batch (every window independently with probability q = batch_size / n_windows), clips
each window's gradient of its summed example losses (``model.local.window_losses``) to ``max_grad_norm``,
adds N(0, (noise_multiplier * max_grad_norm)^2) to the sum and divides by the expected batch size
(DP-SGD / DP-Adam, Abadi et al. 2016). Epsilon is the RDP accounting of that sampled Gaussian mechanism
(``privacy.accountant``); ``DPRun`` (from ``plan_private_run``) is what a ledger charges, known before
training starts, and ``train_local_private(ledger=...)`` charges it before the first step. An empty
Poisson batch still takes a noise-only step (skipping it would reveal that no record was drawn).

Built from Opacus' own parts (per-sample hooks, ``get_optimizer_class``, ``UniformWithReplacementSampler``,
``RDPAccountant``, ``ModuleValidator``) rather than ``PrivacyEngine.make_private``, because
``make_private`` derives the sample rate from the data loader as 1 / len(loader) = 1 / ceil(n / B): not
the batch_size / n_windows this module promises and the ledger charges. ``PrivateStep`` is one step.

The GRU: ``nn.GRU`` runs fused kernels Opacus cannot hook, so training swaps in ``opacus.layers.DPGRU``
(same weights, same function) and swaps back afterwards (``to_dp_gru`` / ``to_plain_gru``): the model
leaves with the plain layout that exports to ONNX and that ``model.local.get_weights`` reads. Noise lands
on the item embedding's padding row too, which torch never trains; it is put back after every step.

grad_sample_mode, measured on RIB (DPGRU + embeddings + attention + copy term; ``experiments/dp_step.py``,
results in ``benchmarks/results/dp_step``):
- "ghost" (ghost clipping, Li et al. 2022): works and gives the exact per-window norms. Linear and
  Embedding layers get norms without per-sample gradients (the (n_items + 1) x hidden output layer is the
  big one), DPGRU's cells (``RNNLinear``, called once per time step: tied weights) get per-sample
  gradients, then Opacus runs a SECOND backward pass with the clipping coefficients. Opacus' embedding
  norm sampler calls ``.view`` on the ids, so batches must be contiguous (``WindowDataset.batch`` is).
- "bookkeeping" (ghost clipping in one backward pass, Bu et al. 2023; ``RIBBookKeepingHooks``): the same
  norms, then the clipped sum written directly from what the hooks saw (no second pass). Same update as
  ghost and hooks (tested); the fastest, so "auto" tries it first, then "ghost", then "hooks", each
  fallback logged (a mode is only abandoned if it fails before its first update).
- "hooks": per-sample gradients of every parameter; exact, but it materialises (B, n_items + 1, hidden)
  and (B, n_items + 1, item_dim) tensors: slower and memory-hungry for big catalogues.
- "functorch": works, slowest. "ew" (expanded weights) does not support RIB's RNN cells: refused.
Where the time went with Opacus' stock samplers, and the fixes here (``fast_samplers=True``, same results
as Opacus' own, tested; installed on subclasses of Opacus' hook classes, never in its global registry):
the DPGRU cells' per-time-step einsum + accumulate (one einsum over all steps instead), the embedding
norm's ``torch.unique(dim=0)`` (a 1-D unique over combined keys instead), the output layer's g g^T
computed twice (once), and ghost clipping's second backward pass (bookkeeping).

Only loss="softmax" (full softmax) is supported: sampled softmax indexes weight rows inside a module,
which per-sample gradient hooks cannot attribute to windows; the paper loss is not what this model ships.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
from opacus.layers import DPGRU
from opacus.layers.dp_rnn import RNNLinear
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from model.data.dataset import SessionDataset
from model.local import IGNORE, LocalTrainConfig, WindowBatch, WindowDataset, make_optimizer, window_losses
from model.rib import RIB
from privacy.accountant import check_delta, epsilon_for, noise_for_epsilon
from privacy.ledger import PrivacyLedger

logger = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("auto", "bookkeeping", "ghost", "hooks", "functorch")
AUTO_ORDER = ("bookkeeping", "ghost", "hooks")  # fastest first (measured); each fallback is logged
_CLIPPED_GRAD_MODES = ("bookkeeping", "ghost")  # the optimizer receives clipped sums in p.grad
_OPACUS_PARAM_ATTRS = (
    "grad_sample",
    "_forward_counter",
    "_current_grad_sample",
    "_norm_sample",
    "summed_grad",
)
_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "_pending_steps", "_bk")


@dataclass(frozen=True)
class DPSGDConfig:
    """Record-level DP-SGD settings: give exactly one of noise_multiplier and target_epsilon."""

    noise_multiplier: float | None = None
    target_epsilon: float | None = None  # for this run alone, at ``delta``
    delta: float | None = None  # None: the ledger's delta if one is given, else 1 / n_windows
    max_grad_norm: float = 1.0  # per-window clipping bound
    grad_sample_mode: str = "auto"  # "auto" | "bookkeeping" | "ghost" | "hooks" | "functorch"
    poisson_sampling: bool = True  # False is refused: the accounting assumes Poisson sampling
    secure_mode: bool = False  # cryptographic RNG for noise and sampling (needs torchcsprng)
    fast_samplers: bool = True  # this module's faster (same-result) samplers; False: Opacus' stock ones

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not (0 < self.target_epsilon < math.inf):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {self.target_epsilon}")
        if self.delta is not None:
            check_delta(self.delta)
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}"
            )
        if self.grad_sample_mode == "bookkeeping" and not self.fast_samplers:
            raise ValueError(
                "grad_sample_mode='bookkeeping' is built on this module's samplers (fast_samplers=True)"
            )
        if not self.poisson_sampling:
            raise ValueError(
                "poisson_sampling=False is not supported: the privacy accounting assumes Poisson sampling"
            )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class DPRun:
    """One DP-SGD run as the accountant and the ledger see it: (sigma, q, steps) at delta."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    n_windows: int

    @property
    def epsilon(self) -> float:
        """Epsilon of this run alone."""
        return (
            epsilon_for(self.noise_multiplier, self.sample_rate, self.steps, self.delta)
            if self.steps
            else 0.0
        )

    def ledger_entry(self) -> tuple[float, float, int]:
        """(noise_multiplier, sample_rate, steps): what ``PrivacyLedger.charge`` takes."""
        return self.noise_multiplier, self.sample_rate, self.steps


# --------------------------------------------------------------------------------------------------
# The GRU swap
# --------------------------------------------------------------------------------------------------


def to_dp_gru(model: RIB) -> RIB:
    """Swap ``model.gru`` (nn.GRU) for an Opacus DPGRU with identical weights, in place; returns model."""
    gru = model.gru
    if isinstance(gru, DPGRU):
        return model
    dp_gru = ModuleValidator.fix(gru)  # Opacus' registered nn.GRU -> DPGRU fixer (copies the state dict)
    if not isinstance(dp_gru, DPGRU):
        raise TypeError(f"Opacus turned {type(gru).__name__} into {type(dp_gru).__name__}, expected DPGRU")
    model.gru = dp_gru.to(next(gru.parameters()).device).train(gru.training)
    return model


def to_plain_gru(model: RIB) -> RIB:
    """Swap a DPGRU back for nn.GRU with identical weights, in place; returns model."""
    dp_gru = model.gru
    if not isinstance(dp_gru, DPGRU):
        return model
    gru = nn.GRU(
        dp_gru.input_size,
        dp_gru.hidden_size,
        num_layers=dp_gru.num_layers,
        bias=dp_gru.bias,
        batch_first=dp_gru.batch_first,
        dropout=dp_gru.dropout,
        bidirectional=dp_gru.bidirectional,
    )
    gru.load_state_dict(dp_gru.state_dict())  # DPGRU's state dict already uses nn.GRU's names
    model.gru = gru.to(next(dp_gru.parameters()).device).train(dp_gru.training)
    return model


# --------------------------------------------------------------------------------------------------
# Faster per-sample samplers (same results as Opacus' own; see experiments/dp_step.py)
# --------------------------------------------------------------------------------------------------


def _rnn_linear_grad_sample(
    layer: RNNLinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict:
    """Per-sample gradients of a DPGRU cell's Linear summed over time steps, in ONE einsum.

    Opacus calls a cell's sampler once per time step (backward order) and adds each (B, out, in) result
    into an accumulator: T small einsums + T additions. Here the steps' (input, backprop) pairs are kept
    until the cell's last call (``_forward_counter`` == 1: Opacus decrements it after the call) and
    reduced together: sum_t g_t x_t^T = einsum over the stacked (B, T, .) tensors.
    """
    pending = layer.__dict__.setdefault("_pending_steps", [])
    pending.append((activations[0], backprops))
    if layer.weight._forward_counter > 1:
        return {}
    inputs = torch.stack([a for a, _ in pending], 1).to(backprops.dtype)
    grads = torch.stack([g for _, g in pending], 1)
    pending.clear()
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.einsum("ntg,nti->ngi", grads, inputs)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grads.sum(1)
    return out


def _embedding_norm_sample(
    layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict:
    """Per-sample gradient norms of an embedding (ghost clipping) with a 1-D unique over (row, id) keys.

    Opacus' version runs ``torch.unique(dim=0)`` on (row, id) pairs, which is slow on CPU; a combined
    integer key gives the same groups. Ids equal to ``padding_idx`` get no gradient in torch, so none here.
    """
    ids = activations[0]
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    grads = backprops.reshape(batch * ids.shape[1], -1)
    keys = (torch.arange(batch, device=ids.device)[:, None] * layer.num_embeddings + ids).reshape(-1)
    if layer.padding_idx is not None:
        keep = ids.reshape(-1) != layer.padding_idx
        keys, grads = keys[keep], grads[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = grads.new_zeros(len(unique), grads.shape[1]).index_add_(0, inverse, grads)
    squared = grads.new_zeros(batch).scatter_add_(0, unique // layer.num_embeddings, summed.pow(2).sum(1))
    return {layer.weight: squared.sqrt()}


def _linear_norm_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample gradient norms of a Linear (ghost clipping): Opacus' formulas, with g g^T computed once.

    For (B, T, .) inputs ||sum_t g_t a_t^T||^2 = <G G^T, A A^T>, never materialising (B, out, in); the
    bias norm reuses G G^T (Opacus computes it twice, and for the item output layer it is the big one).
    """
    acts = activations[0].to(backprops.dtype)
    out = {}
    if backprops.dim() == 2:
        g2 = backprops.pow(2).sum(1)
        if layer.weight.requires_grad:
            out[layer.weight] = (g2 * acts.pow(2).sum(1)).sqrt()
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = g2.sqrt()
        return out
    grads = backprops.reshape(backprops.shape[0], -1, backprops.shape[-1])
    acts = acts.reshape(acts.shape[0], -1, acts.shape[-1])
    ggt = torch.bmm(grads, grads.transpose(1, 2))
    if layer.weight.requires_grad:
        aat = torch.bmm(acts, acts.transpose(1, 2))
        out[layer.weight] = (ggt * aat).sum((1, 2)).clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = ggt.sum((1, 2)).clamp(min=0).sqrt()
    return out


class RIBGradSampleHooks(GradSampleHooks):
    """Opacus' per-sample gradient hooks with the one-einsum DPGRU cell sampler (own registry, no global change)."""

    GRAD_SAMPLERS = {**GradSampleHooks.GRAD_SAMPLERS, RNNLinear: _rnn_linear_grad_sample}


class RIBGhostClippingHooks(GradSampleHooksFastGradientClipping):
    """Opacus' ghost clipping hooks with the faster DPGRU cell, Embedding and Linear samplers."""

    GRAD_SAMPLERS = {**GradSampleHooksFastGradientClipping.GRAD_SAMPLERS, RNNLinear: _rnn_linear_grad_sample}
    NORM_SAMPLERS = {
        **GradSampleHooksFastGradientClipping.NORM_SAMPLERS,
        nn.Embedding: _embedding_norm_sample,
        nn.Linear: _linear_norm_sample,
    }


def _keep_inputs(
    norm_sampler, layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict:
    """Run a norm sampler and keep (inputs, output gradients) on the layer for the clipped sum."""
    layer.__dict__["_bk"] = (activations[0], backprops)
    return norm_sampler(layer, activations, backprops)


def _keep_grads(layer: RNNLinear, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """The one-einsum cell sampler, also keeping the finished per-sample gradients on the layer."""
    out = _rnn_linear_grad_sample(layer, activations, backprops)
    if out:
        layer.__dict__["_bk"] = dict(out)
    return out


class RIBBookKeepingHooks(RIBGhostClippingHooks):
    """Ghost clipping in ONE backward pass ("book-keeping", Bu et al. 2023).

    Ghost clipping needs the per-window clipping coefficients before it can form the clipped sum, so
    Opacus runs a second backward pass with them. The hooks already see everything that sum needs:
    each Linear's/Embedding's inputs and output gradients, and the DPGRU cells' per-sample gradients.
    Here the samplers keep them (``_bk`` on the module) and ``write_clipped_grads`` then sets every
    p.grad = sum_i c_i g_i directly: one matmul per Linear, one index_add per Embedding, one weighted
    sum per GRU cell, instead of a second pass through the whole network. Costs memory: the output
    layer's (B, P, n_items + 1) gradient is kept until then.
    """

    GRAD_SAMPLERS = {**RIBGhostClippingHooks.GRAD_SAMPLERS, RNNLinear: _keep_grads}
    NORM_SAMPLERS = {
        **RIBGhostClippingHooks.NORM_SAMPLERS,
        nn.Embedding: partial(_keep_inputs, _embedding_norm_sample),
        nn.Linear: partial(_keep_inputs, _linear_norm_sample),
    }

    @torch.no_grad()
    def write_clipped_grads(self) -> None:
        """p.grad = clipping-coefficient-weighted sum of per-window gradients, for every trainable parameter.

        Raises RuntimeError (nothing is released) if some trainable parameter was not covered.
        """
        coef = self.get_clipping_coef()
        covered: set[int] = set()
        for module in self._module.modules():
            kept = module.__dict__.pop("_bk", None)
            if kept is None:
                continue
            if isinstance(kept, dict):  # per-sample gradients (GRU cells)
                for p, per_sample in kept.items():
                    p.grad = torch.einsum("n,n...->...", coef.to(per_sample), per_sample)
                    covered.add(id(p))
                continue
            inputs, grads = kept
            grads = grads * coef.to(grads).view(-1, *[1] * (grads.dim() - 1))
            if isinstance(module, nn.Embedding):
                ids, rows = inputs.reshape(-1), grads.reshape(-1, module.embedding_dim)
                if module.padding_idx is not None:
                    keep = ids != module.padding_idx
                    ids, rows = ids[keep], rows[keep]
                module.weight.grad = torch.zeros_like(module.weight).index_add_(0, ids, rows)
            else:
                flat = grads.reshape(-1, grads.shape[-1])
                if module.weight.requires_grad:
                    module.weight.grad = flat.T @ inputs.reshape(-1, inputs.shape[-1]).to(flat)
                if module.bias is not None and module.bias.requires_grad:
                    module.bias.grad = flat.sum(0)
            covered.update(id(p) for p in module.parameters(recurse=False))
        missing = [n for n, p in self._module.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise RuntimeError(f"bookkeeping clipping has no clipped gradient for {missing}")


def attach_grad_sampler(
    model: nn.Module, mode: str, max_grad_norm: float, fast: bool = True
) -> GradSampleHooks | GradSampleHooksFastGradientClipping:
    """Per-sample gradient (or ghost-clipping norm) hooks on ``model`` itself (no wrapper); ``.cleanup()`` removes them.

    ``fast``: this module's samplers (same results, measured faster); False: Opacus' stock ones.
    """
    common = {"batch_first": True, "loss_reduction": "mean", "strict": True}
    if mode in ("ghost", "bookkeeping"):
        if mode == "bookkeeping":
            cls = RIBBookKeepingHooks
        else:
            cls = RIBGhostClippingHooks if fast else GradSampleHooksFastGradientClipping
        return cls(model, max_grad_norm=max_grad_norm, use_ghost_clipping=True, **common)
    if mode in ("hooks", "functorch"):
        cls = RIBGradSampleHooks if fast else GradSampleHooks
        return cls(model, force_functorch=mode == "functorch", **common)
    raise ValueError(f"unsupported grad_sample_mode {mode!r}; use one of {GRAD_SAMPLE_MODES[1:]}")


# --------------------------------------------------------------------------------------------------
# Planning and training
# --------------------------------------------------------------------------------------------------


def check_private_model(model: RIB) -> None:
    """ValueError unless the model can be trained under DP-SGD here (full-softmax loss)."""
    if model.config.loss != "softmax":
        raise ValueError(
            f"DP-SGD needs loss='softmax' (full softmax); this RIB has loss={model.config.loss!r}. Sampled softmax "
            "scores rows chosen per batch inside the output module, so per-window gradients cannot be clipped"
        )
    if model.config.cosine_scale > 0:
        raise ValueError(
            "DP-SGD cannot train cosine_scale > 0: the output normalises the item table inside the module, "
            "which Opacus has no per-sample gradient rule for (train with cosine_scale=0)"
        )


def plan_private_run(
    n_windows: int, local: LocalTrainConfig, dp: DPSGDConfig, ledger_delta: float | None = None
) -> DPRun:
    """The (sigma, q, steps, delta) a run on ``n_windows`` windows will use (steps 0 when there is nothing)."""
    if n_windows <= 0 or local.steps == 0:
        return DPRun(
            float(dp.noise_multiplier or 0.0),
            0.0,
            0,
            dp.delta or ledger_delta or 1.0 / max(2, n_windows),
            n_windows,
        )
    if n_windows == 1 and dp.delta is None and ledger_delta is None:
        raise ValueError("one window: delta = 1 / n_windows = 1 is meaningless; set DPSGDConfig.delta")
    sample_rate = min(1.0, local.batch_size / n_windows)
    delta = dp.delta or ledger_delta or 1.0 / n_windows
    if dp.noise_multiplier is not None:
        sigma = float(dp.noise_multiplier)
    else:
        sigma = noise_for_epsilon(float(dp.target_epsilon), sample_rate, local.steps, delta)  # type: ignore[arg-type]
    return DPRun(sigma, sample_rate, local.steps, delta, n_windows)


def _generators(dp: DPSGDConfig, seed: int) -> tuple[torch.Generator, torch.Generator]:
    """(sampling, noise) generators: seeded for experiments, cryptographic in secure mode."""
    if dp.secure_mode:
        try:
            import torchcsprng as csprng
        except ImportError as err:
            raise ImportError("DPSGDConfig(secure_mode=True) needs the torchcsprng package") from err
        rng = csprng.create_random_device_generator("/dev/urandom")
        return rng, rng
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


def capture_padding_rows(model: nn.Module) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(weight, row, value) of every embedding's padding row, as they are now."""
    return [
        (m.weight, m.padding_idx, m.weight.detach()[m.padding_idx].clone())
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.padding_idx is not None
    ]


@torch.no_grad()
def restore_padding_rows(rows: list[tuple[torch.Tensor, int, torch.Tensor]]) -> None:
    """Put padding rows back: noise lands on every row, but torch gives padding rows no gradient.

    Pure post-processing of the noisy update (no privacy cost); it keeps the padding embedding fixed,
    as non-private training does.
    """
    for weight, row, value in rows:
        weight[row] = value


def _detach(hooks: GradSampleHooks, model: nn.Module) -> None:
    """Remove the hooks and everything Opacus (or this module) left on parameters and modules.

    ``cleanup`` clears the parameters; a step that failed between forward and backward also leaves
    captured activations on the modules, which a retry would otherwise consume as its own.
    """
    hooks.cleanup()
    for p in model.parameters():
        for attr in _OPACUS_PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
    for m in model.modules():
        for attr in _OPACUS_MODULE_ATTRS:
            if attr in m.__dict__:
                delattr(m, attr)


class PrivateStep:
    """One DP-SGD step of a RIB holding a DPGRU: per-window losses, per-window clipping, noise, optimizer.

    Holds the per-sample hooks and Opacus' DP optimizer for one grad_sample_mode; ``close()`` removes
    every trace from the model. ``train_local_private`` drives it with Poisson batches;
    ``experiments/dp_step.py`` times it on a fixed batch.
    """

    def __init__(
        self,
        model: RIB,
        mode: str,
        local: LocalTrainConfig,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        noise_generator: torch.Generator | None = None,
        secure_mode: bool = False,
        fast: bool = True,
    ) -> None:
        if not isinstance(model.gru, DPGRU):
            raise ValueError("PrivateStep needs the DPGRU layout (to_dp_gru)")
        ModuleValidator.validate(model, strict=True)
        self.model, self.mode = model, mode
        self.clipped_sums = mode in _CLIPPED_GRAD_MODES  # the optimizer receives clipped sums in p.grad
        self.hooks = attach_grad_sampler(model, mode, max_grad_norm, fast=fast)
        try:
            optimizer_class = get_optimizer_class(
                clipping="flat", distributed=False, grad_sample_mode="ghost" if self.clipped_sums else mode
            )
            self.optimizer: DPOptimizer = optimizer_class(
                make_optimizer(model, local),
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size,
                loss_reduction="mean",
                generator=noise_generator,
                secure_mode=secure_mode,
            )
        except BaseException:
            self.close()
            raise
        self.padding = capture_padding_rows(model)

    def __call__(self, batch: WindowBatch | None, times: dict[str, float] | None = None) -> float | None:
        """Take the step on ``batch`` (None or empty: a noise-only step); the mean window loss, or None.

        ``times`` (optional) receives the seconds spent in forward, backward (all passes, clipping
        included) and optimizer (noise, scaling, the update).
        """
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        if batch is None or len(batch[0]) == 0:
            self._noise_only()
            restore_padding_rows(self.padding)
            return None
        per_window = window_losses(self.model, batch)
        t1 = time.perf_counter()
        if self.mode == "ghost":
            DPTensorFastGradientClipping(self.hooks, self.optimizer, per_window, "mean").backward()
        else:
            per_window.mean().backward()
            if self.mode == "bookkeeping":
                self.hooks.write_clipped_grads()
        t2 = time.perf_counter()
        self.optimizer.step()
        restore_padding_rows(self.padding)
        if times is not None:
            times.update(forward=t1 - t0, backward=t2 - t1, optimizer=time.perf_counter() - t2)
        return float(per_window.detach().mean())

    def _noise_only(self) -> None:
        """A DP step for an empty Poisson batch: zero clipped sum, noise added as usual."""
        for p in self.optimizer.params:
            if self.clipped_sums:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()

    def close(self) -> None:
        """Remove the hooks and Opacus' attributes from the model."""
        _detach(self.hooks, self.model)


class _FirstStepFailed(RuntimeError):
    """A grad_sample_mode failed before any update: safe to retry with another mode."""


def _run(
    model: RIB, dataset: WindowDataset, run: DPRun, local: LocalTrainConfig, dp: DPSGDConfig, mode: str
) -> dict:
    """``run.steps`` DP steps with one grad_sample_mode on Poisson batches; the model must hold a DPGRU."""
    sampling, noise = _generators(dp, local.seed)
    try:
        step = PrivateStep(
            model,
            mode,
            local,
            noise_multiplier=run.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=run.sample_rate * len(dataset),  # = batch_size unless q was capped at 1
            noise_generator=noise,
            secure_mode=dp.secure_mode,
            fast=dp.fast_samplers,
        )
    except Exception as err:
        raise _FirstStepFailed(f"grad_sample_mode={mode!r} could not be set up: {err!r}") from err
    try:
        accountant = RDPAccountant()  # counts the noisy steps actually taken
        step.optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=run.sample_rate))
        sampler = UniformWithReplacementSampler(
            num_samples=len(dataset), sample_rate=run.sample_rate, generator=sampling, steps=run.steps
        )
        device = next(model.parameters()).device
        losses: list[float] = []
        examples_seen = 0
        for i, rows in enumerate(sampler):
            batch = dataset.batch(rows, device) if len(rows) else None
            try:
                loss = step(batch)
            except Exception as err:
                if i == 0:
                    raise _FirstStepFailed(
                        f"grad_sample_mode={mode!r} failed on the first step: {err!r}"
                    ) from err
                raise
            if loss is not None:
                losses.append(loss)
                examples_seen += int((batch[4] != IGNORE).sum())
        steps = sum(n for _, _, n in accountant.history)
        return {
            "loss": float(np.mean(losses)) if losses else 0.0,
            "steps": steps,
            "examples_seen": examples_seen,
        }
    finally:
        step.close()


def train_local_private(
    model: RIB,
    data: SessionDataset,
    local: LocalTrainConfig,
    dp: DPSGDConfig,
    ledger: PrivacyLedger | None = None,
    round: int | None = None,
) -> dict[str, object]:
    """``local.steps`` DP-SGD steps on ``data``'s windows, updating ``model`` in place (left with nn.GRU).

    With a ``ledger`` the run is charged (and persisted) before training starts; ``BudgetExhausted``
    means nothing ran. Returns train_local's keys plus epsilon (of this run, at delta), delta,
    noise_multiplier, sample_rate, max_grad_norm and grad_sample_mode (the mode that actually ran).
    ``local.grad_clip`` does not apply: DP-SGD clips every window's gradient to ``dp.max_grad_norm``.
    """
    started = time.perf_counter()
    check_private_model(model)
    dataset = WindowDataset(data, local.max_len)
    run = plan_private_run(len(dataset), local, dp, None if ledger is None else ledger.delta)
    result: dict[str, object] = {
        "loss": 0.0,
        "steps": 0,
        "examples": dataset.n_examples,
        "windows": len(dataset),
        "examples_seen": 0,
        "epsilon": 0.0,
        "delta": run.delta,
        "noise_multiplier": run.noise_multiplier,
        "sample_rate": run.sample_rate,
        "max_grad_norm": dp.max_grad_norm,
        "grad_sample_mode": None,
    }
    if run.steps == 0:
        result["seconds"] = time.perf_counter() - started
        return result
    _generators(dp, local.seed)  # secure mode without torchcsprng fails here, before the ledger is charged
    if ledger is not None:
        ledger.charge(*run.ledger_entry(), round=round)  # raises BudgetExhausted: nothing trains
    modes = AUTO_ORDER if dp.grad_sample_mode == "auto" else (dp.grad_sample_mode,)
    initial = copy.deepcopy(model.state_dict())
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]):  # seeded dropout without touching the caller's global RNG
            for i, mode in enumerate(modes):
                torch.manual_seed(local.seed)
                to_dp_gru(model).train()
                try:
                    outcome = _run(model, dataset, run, local, dp, mode)
                except _FirstStepFailed as err:
                    if i + 1 == len(modes):
                        raise
                    logger.warning("%s; falling back to grad_sample_mode=%r", err, modes[i + 1])
                    to_plain_gru(model).load_state_dict(initial)  # no update was released; start clean
                    continue
                result.update(outcome, grad_sample_mode=mode)
                break
    finally:
        to_plain_gru(model).train(was_training)
    result["epsilon"] = epsilon_for(run.noise_multiplier, run.sample_rate, int(result["steps"]), run.delta)
    result["seconds"] = time.perf_counter() - started
    return result
