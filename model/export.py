"""Export a trained RIB to ONNX for the device (the torch side; the device needs only onnxruntime).

Two graphs, both built from the model's own submodules (embeddings, ``gru``, ``att_proj``/``att_score``,
``out``), so they hold exactly the trained weights, and one copy of those weights:

- **full** (``full.onnx``, the graph the device runs): ``items, activities, dwell`` int64 ``[B, L]``
  (dynamic B and L, valid steps first, padding after), ``lengths`` int64 ``[B]`` and an incoming running
  state ``hidden [B, H]``, ``run_max [B]``, ``run_den [B]``, ``run_num [B, H]`` -> ``scores [B, n_items + 1]``,
  attention ``weights [B, L]`` of the new tuples (zero on padding), their raw attention scores ``att [B, L]``
  (-inf on padding) and the state after them (``new_hidden``, ``new_run_max``, ``new_run_den``,
  ``new_run_num``). It *advances* a session by L tuples: from ``initial_step_state`` that is
  ``RIB.forward`` on the masked sequence (weights = the attention softmax); from the state of a live session
  with L = 1 it is the incremental step. Attention pooling over every past step stays exact online with a
  running softmax: m' = max(m, max_t s_t), den' = den e^(m-m') + sum_t e^(s_t-m'),
  num' = num e^(m-m') + sum_t e^(s_t-m') h_t, pooled = num'/den'. So each new event costs one GRU step and
  one output projection, and one onnxruntime session (one copy of the weights in memory) serves both.
- **step** (``step.onnx``): the one-tuple step graph with the historical interface (``item, activity,
  dwell`` int64 ``[B]`` plus the state -> the new state, ``scores`` and this step's raw attention score
  ``att [B]``), for tools. Its weights are *external data pointing into full.onnx* (offset and length in
  that file), so the graph file itself is ~90 KB; onnxruntime resolves it next to the graph file
  (``session_for``), or from memory (``SessionOptions.add_external_initializers_from_files_in_memory``).
- With the copy term both graphs also take the session's past copy keys ``keys [B, P, H]`` and items
  ``past_items [B, P]``; full returns the keys of its L new steps (``new_keys [B, L, H]``), step the key of
  its one step (``key``). The weight of step t after T steps is exp(s_t - m_T) / den_T (the runtime keeps
  the raw s_t).

Configs the graphs cannot reproduce faithfully are refused (``ExportError``): the paper loss, config fields
the exporter does not know set off their defaults. ``export_onnx`` also checks the exported graphs against ``RIB.forward``/``forward_all`` in torch before
returning (max abs diff on scores: the full graph on a padded batch; every prefix through the step graph
and through the full graph advanced chunk by chunk), so a model change the wrappers do not follow fails
loudly at export.

int8 (``quantize_int8``): graph surgery, no onnxruntime quantizer. The output projection (the hidden x
items MatMul that bounds a step) becomes one ``com.microsoft.DynamicQuantizeMatMul`` (activation quantized
on the fly, int8 weight, bias fused into the GEMM's output stage). With ``per_channel`` (the default) every
item column has its own scale s_j, applied by one Mul after the GEMM: the GEMM runs with a unit scale and
the bias b_j / s_j, so s_j (a acc_j + b_j / s_j) = s_j a acc_j + b_j. (Handing onnxruntime 1.32 the
per-column scales instead doubles the GEMM's time; the Mul adds under a tenth.) ``per_channel=False``:
one scale for the matrix, no Mul (slightly faster, less accurate on trained weights whose item columns
differ in norm). The item embedding table is stored int8 with one scale per row (Gather + Cast + Mul). The
GRU and the small hidden x hidden layers stay fp32 (a few hundred KB). The output weights are symmetric
7-bit (|q| <= 63, onnxruntime's ``reduce_range``): on x86 without VNNI (AVX2, most kiosks) the u8 x s8 kernel
adds pairs of products in saturating int16, and full-range weights (255 * 127 * 2 > 32767) gave scores off by
5% of their range there; at 7 bits the kernel is exact on every CPU. The embedding table is only gathered,
never multiplied in int8, so it keeps the full [-127, 127].
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import MISSING, dataclass, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.rib import RIB, RIBConfig

OPSET = 18
STATE_INPUTS = ("hidden", "run_max", "run_den", "run_num")
FULL_INPUTS = ("items", "activities", "dwell", "lengths", *STATE_INPUTS)
FULL_OUTPUTS = ("scores", "weights", "att", "new_hidden", "new_run_max", "new_run_den", "new_run_num")
STEP_INPUTS = ("item", "activity", "dwell", *STATE_INPUTS)
STEP_OUTPUTS = ("new_hidden", "new_run_max", "new_run_den", "new_run_num", "scores", "att")
# With the copy term both graphs also take the session's past copy keys and items, and return the new keys.
COPY_INPUTS = ("keys", "past_items")
COPY_STEP_INPUTS = COPY_INPUTS
COPY_FULL_OUTPUTS = ("new_keys",)
COPY_STEP_OUTPUTS = ("key",)
# Initial running max: finite (so exp(m - m') never sees inf - inf), far below any real attention score.
INITIAL_RUN_MAX = -1e30
PARITY_TOL = 1e-4
# step.onnx keeps initializers smaller than this inline; larger ones become external data in full.onnx.
EXTERNAL_MIN_BYTES = 1024
MS_DOMAIN = "com.microsoft"


class ExportError(ValueError):
    """The model (config) cannot be exported faithfully, or the exported graph does not match torch."""


# RIBConfig fields the graphs know how to reproduce (training-only knobs such as dropout included). A field
# added to RIBConfig later is refused unless it keeps its default, until the exporter learns it.
KNOWN_FIELDS = frozenset(
    {
        "n_items",
        "n_activities",
        "n_dwell",
        "item_dim",
        "activity_dim",
        "dwell_dim",
        "hidden_dim",
        "use_activity",
        "use_dwell",
        "use_attention",
        "dropout",
        "max_len",
        "loss",
        "copy",
        "attention_micro",
        "micro_dropout",
    }
)


def check_exportable(config: RIBConfig) -> None:
    """Raise ExportError for configs the ONNX graphs would not reproduce exactly."""
    for f in dataclass_fields(config):
        if f.name in KNOWN_FIELDS:
            continue
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else MISSING)
        )
        if getattr(config, f.name) != default:
            raise ExportError(
                f"RIBConfig.{f.name}={getattr(config, f.name)!r} is unknown to the ONNX exporter (only its default is supported)"
            )
    if config.loss not in ("softmax", "sampled"):
        raise ExportError(
            f"RIBConfig.loss={config.loss!r} is not supported by the ONNX export (softmax/sampled only)"
        )


def folded_for_export(model: RIB) -> RIB:
    """``model`` in the layout the graphs know: a tied output folded into one ``nn.Linear`` (weight E W_b,
    bias b: the same scores, one matrix product less per step) and the training-only ``freeze_items`` reset.
    Returns ``model`` itself when there is nothing to fold."""
    config = model.config
    if not (config.tie_output or config.freeze_items):
        return model
    if config.cosine_scale > 0:
        raise ExportError(
            "a cosine-scaled tied output (RIBConfig.cosine_scale > 0) has no linear form to export"
        )
    plain = RIB(replace(config, tie_output=False, freeze_items=False))
    state = model.state_dict()
    if config.tie_output:
        state = {k: v for k, v in state.items() if not k.startswith("out.")}
        with torch.no_grad():
            state["out.weight"] = model.item_emb.weight.detach() @ model.out.proj.weight.detach()
            state["out.bias"] = model.out.scores.bias.detach().clone()
    plain.load_state_dict(state)
    return plain.eval()


def _check_module(model: RIB) -> None:
    check_exportable(model.config)
    gru = model.gru
    if not isinstance(gru, nn.GRU) or gru.num_layers != 1 or gru.bidirectional or not gru.batch_first:
        raise ExportError(f"expected a single-layer, unidirectional, batch_first nn.GRU, got {gru!r}")
    out = model.out
    if not isinstance(out, nn.Linear) or out.out_features != model.config.n_items + 1:
        raise ExportError(f"expected an nn.Linear(hidden, n_items + 1) output, got {out!r}")


class _Embed(nn.Module):
    """e_t = concat(item, activity, dwell embeddings) and the micro part (or None); eval only."""

    def __init__(self, model: RIB) -> None:
        super().__init__()
        self.item_emb = model.item_emb
        self.activity_emb = model.activity_emb
        self.dwell_emb = model.dwell_emb

    def forward(
        self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        micro = []
        if self.activity_emb is not None:
            micro.append(self.activity_emb(activities))
        if self.dwell_emb is not None:
            micro.append(self.dwell_emb(dwell))
        micro_t = torch.cat(micro, dim=-1) if micro else None
        parts = [self.item_emb(items)] + ([micro_t] if micro_t is not None else [])
        return torch.cat(parts, dim=-1), micro_t


class _Scorer(nn.Module):
    """score_t = w_a . tanh(W_m h_t + b_m [+ W_x micro_t]) + b_a."""

    def __init__(self, model: RIB) -> None:
        super().__init__()
        self.att_proj = model.att_proj
        self.att_score = model.att_score
        self.att_micro = getattr(model, "att_micro", None)

    def forward(self, hidden: torch.Tensor, micro: torch.Tensor | None) -> torch.Tensor:
        pre = self.att_proj(hidden)
        if self.att_micro is not None and micro is not None:
            pre = pre + self.att_micro(micro)
        return self.att_score(torch.tanh(pre)).squeeze(-1)


def uses_copy(config: RIBConfig) -> bool:
    """Whether the model has the copy/repeat term (``RIBConfig.use_copy`` where the config resolves it)."""
    if hasattr(config, "use_copy"):
        return bool(config.use_copy)
    return bool(getattr(config, "copy", False))


class _Copy(nn.Module):
    """Copy term: logits[item_j] += softplus(gate(p)) * softmax_j(q(p) . k(h_j) / sqrt(H)) over valid steps j."""

    def __init__(self, model: RIB) -> None:
        super().__init__()
        self.copy_query = model.copy_query
        self.copy_key = model.copy_key
        self.copy_gate = model.copy_gate
        self.scale = float(model.config.hidden_dim) ** 0.5

    def forward(self, logits, pooled, keys, items, valid):
        query = self.copy_query(pooled)
        scores = (keys @ query[:, :, None]).squeeze(-1) / self.scale
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if valid is not None:
            weights = weights * valid
        amounts = torch.nn.functional.softplus(self.copy_gate(pooled)) * weights
        return logits.scatter_add(-1, items, amounts)


class _ExportedRIB(nn.Module):
    """The trained RIB's parts, shared by both exported graphs."""

    def __init__(self, model: RIB) -> None:
        super().__init__()
        _check_module(model)
        self.embed = _Embed(model)
        self.gru = model.gru
        self.use_attention = model.config.use_attention
        self.scorer = _Scorer(model) if self.use_attention else None
        self.out = model.out
        self.copy = _Copy(model) if uses_copy(model.config) else None


class FullSession(_ExportedRIB):
    """The full graph: advance a session state by L tuples (see module docstring)."""

    def forward(
        self, items, activities, dwell, lengths, hidden, run_max, run_den, run_num, keys=None, past_items=None
    ):
        embedded, micro = self.embed(items, activities, dwell)
        out, _ = self.gru(embedded, hidden[None])
        steps = torch.arange(items.shape[1], device=items.device)
        last = lengths.clamp(min=1) - 1
        valid = steps[None, :] <= last[:, None]
        is_last = (steps[None, :] == last[:, None]).to(out.dtype)
        new_hidden = (is_last[:, :, None] * out).sum(
            1
        )  # a one-hot sum exports to far fewer nodes than a gather
        if self.use_attention:
            att = self.scorer(out, micro).masked_fill(~valid, float("-inf"))
            new_max = torch.maximum(run_max, att.max(dim=1).values)
            old_scale = torch.exp(run_max - new_max)
            scale = torch.exp(att - new_max[:, None])  # zero on padding
            new_den = run_den * old_scale + scale.sum(1)
            new_num = run_num * old_scale[:, None] + (scale[:, :, None] * out).sum(1)
            pooled = new_num / new_den[:, None]
            weights = scale / new_den[:, None]
        else:  # RIB-Attention: the last hidden state; the running state just tracks it
            weights = is_last
            att = torch.zeros_like(weights)
            new_max = torch.zeros_like(new_hidden[:, 0])
            new_den, new_num, pooled = torch.ones_like(new_max), new_hidden, new_hidden
        logits = self.out(pooled)
        if self.copy is None:
            return logits, weights, att, new_hidden, new_max, new_den, new_num
        new_keys = self.copy.copy_key(out)
        all_keys = torch.cat([keys, new_keys], dim=1)
        all_items = torch.cat([past_items, items * valid], dim=1)
        all_valid = torch.cat([torch.ones_like(past_items, dtype=torch.bool), valid], dim=1)
        logits = self.copy(logits, pooled, all_keys, all_items, all_valid)
        return logits, weights, att, new_hidden, new_max, new_den, new_num, new_keys


class IncrementalStep(_ExportedRIB):
    """The one-tuple step graph (see module docstring)."""

    def forward(self, item, activity, dwell, hidden, run_max, run_den, run_num, keys=None, past_items=None):
        embedded, micro = self.embed(item[:, None], activity[:, None], dwell[:, None])
        out, _ = self.gru(embedded, hidden[None])
        h = out[:, 0]
        if self.use_attention:
            s = self.scorer(h, micro[:, 0] if micro is not None else None)
            new_max = torch.maximum(run_max, s)
            old_scale = torch.exp(run_max - new_max)
            new_scale = torch.exp(s - new_max)
            new_den = run_den * old_scale + new_scale
            new_num = run_num * old_scale[:, None] + new_scale[:, None] * h
            pooled = new_num / new_den[:, None]
        else:  # RIB-Attention: the last hidden state; the running state just tracks it
            s = torch.zeros_like(run_max)
            new_max, new_den, new_num, pooled = s, torch.ones_like(run_den), h, h
        logits = self.out(pooled)
        if self.copy is None:
            return h, new_max, new_den, new_num, logits, s
        key = self.copy.copy_key(h)
        all_keys = torch.cat([keys, key[:, None]], dim=1)
        all_items = torch.cat([past_items, item[:, None]], dim=1)
        return h, new_max, new_den, new_num, self.copy(logits, pooled, all_keys, all_items, None), s, key


def initial_step_state(hidden_dim: int, batch: int = 1) -> dict[str, np.ndarray]:
    """The running state before the first tuple (``keys``/``past_items`` are only read with the copy term)."""
    return {
        "hidden": np.zeros((batch, hidden_dim), np.float32),
        "run_max": np.full((batch,), INITIAL_RUN_MAX, np.float32),
        "run_den": np.zeros((batch,), np.float32),
        "run_num": np.zeros((batch, hidden_dim), np.float32),
        "keys": np.zeros((batch, 0, hidden_dim), np.float32),
        "past_items": np.zeros((batch, 0), np.int64),
    }


def _example_full(
    config: RIBConfig, batch: int = 2, length: int = 7, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, config.n_items + 1, (batch, length), generator=g)
    activities = torch.randint(0, config.n_activities, (batch, length), generator=g)
    dwell = torch.randint(0, config.n_dwell, (batch, length), generator=g)
    lengths = torch.full((batch,), length, dtype=torch.long)
    lengths[-1] = max(1, length - 3)
    return items, activities, dwell, lengths


def _example_state(config: RIBConfig, batch: int, past: int = 2) -> tuple[torch.Tensor, ...]:
    """A non-trivial running state (and, with the copy term, ``past`` keys and items) for tracing."""
    g = torch.Generator().manual_seed(7)
    h = config.hidden_dim
    state = (
        torch.randn(batch, h, generator=g),
        torch.randn(batch, generator=g),
        torch.rand(batch, generator=g) + 1.0,
        torch.randn(batch, h, generator=g),
    )
    if uses_copy(config):  # a real (dynamic) past length
        items, _, _, _ = _example_full(config, batch, past, seed=5)
        state = (*state, torch.randn(batch, past, h, generator=g), items)
    return state


def _example_step(config: RIBConfig, batch: int = 2) -> tuple[torch.Tensor, ...]:
    items, activities, dwell, _ = _example_full(config, batch, 1)
    return (items[:, 0], activities[:, 0], dwell[:, 0], *_example_state(config, batch))


def _export(
    module: nn.Module,
    args: tuple,
    path: Path,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    dynamic: dict,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


@dataclass
class ExportResult:
    """Paths of the exported graphs and the parity measured against torch."""

    full: Path
    step: Path
    full_max_abs_diff: float
    step_max_abs_diff: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "full": str(self.full),
            "step": str(self.step),
            "full_max_abs_diff": self.full_max_abs_diff,
            "step_max_abs_diff": self.step_max_abs_diff,
        }


def _export_graphs(model: RIB, full_path: Path, step_path: Path) -> None:
    """Both graphs as torch writes them (each with its weights inline)."""
    config = model.config
    copy = uses_copy(config)
    full_inputs = FULL_INPUTS + (COPY_INPUTS if copy else ())
    full_outputs = FULL_OUTPUTS + (COPY_FULL_OUTPUTS if copy else ())
    full_dynamic: dict[str, dict[int, str]] = {name: {0: "batch"} for name in full_inputs + full_outputs}
    for name in ("items", "activities", "dwell", "weights", "att", "new_keys"):
        full_dynamic[name] = {0: "batch", 1: "steps"}
    full_dynamic.update(keys={0: "batch", 1: "past"}, past_items={0: "batch", 1: "past"})
    _export(
        FullSession(model).eval(),
        (*_example_full(config), *_example_state(config, 2)),
        full_path,
        full_inputs,
        full_outputs,
        full_dynamic,
    )
    step_inputs = STEP_INPUTS + (COPY_STEP_INPUTS if copy else ())
    step_outputs = STEP_OUTPUTS + (COPY_STEP_OUTPUTS if copy else ())
    step_dynamic: dict[str, dict[int, str]] = {name: {0: "batch"} for name in step_inputs + step_outputs}
    step_dynamic.update(keys={0: "batch", 1: "past"}, past_items={0: "batch", 1: "past"})
    _export(
        IncrementalStep(model).eval(),
        _example_step(config),
        step_path,
        step_inputs,
        step_outputs,
        step_dynamic,
    )


def link_to_full(
    step_src: str | Path,
    full_path: str | Path,
    step_dst: str | Path,
    min_bytes: int = EXTERNAL_MIN_BYTES,
    max_inline_bytes: int = 1 << 20,
) -> int:
    """Write ``step_src`` to ``step_dst`` with every initializer of at least ``min_bytes`` whose bytes occur
    exactly once inside ``full_path`` turned into external data pointing there (``full_path`` must sit next
    to ``step_dst`` under its own name). The rest stays inline (small layers torch wrote transposed in one
    graph); ExportError if that exceeds ``max_inline_bytes`` (the graphs should share their big weights).
    Returns the number of bytes moved out of the step graph.
    """
    import onnx

    full_path, step_dst = Path(full_path), Path(step_dst)
    if full_path.parent.resolve() != step_dst.parent.resolve():
        raise ValueError("the step graph's external data must be a sibling file")
    full_bytes = full_path.read_bytes()
    step = onnx.load(str(step_src))
    moved = inline = 0
    for tensor in step.graph.initializer:
        raw = tensor.raw_data
        offset = full_bytes.find(raw) if len(raw) >= min_bytes else -1
        if offset < 0 or full_bytes.find(raw, offset + 1) >= 0:
            inline += len(raw)
            continue
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", full_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        moved += len(raw)
    if inline > max_inline_bytes:
        raise ExportError(f"the step graph keeps {inline} bytes of weights not found in {full_path.name}")
    step_dst.write_bytes(step.SerializeToString())
    return moved


@torch.no_grad()
def export_onnx(model: RIB, out_dir: str | Path, check: bool = True, tol: float = PARITY_TOL) -> ExportResult:
    """Write ``full.onnx`` and ``step.onnx`` (fp32; step's weights live in full) to ``out_dir``; with
    ``check``, verify both against torch."""
    model = folded_for_export(model.eval().cpu())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full_path, step_path = out_dir / "full.onnx", out_dir / "step.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        inline_step = Path(tmp) / "step.onnx"
        _export_graphs(model, full_path, inline_step)
        link_to_full(inline_step, full_path, step_path)
    full_diff = step_diff = float("nan")
    if check:
        full_diff, step_diff = check_parity(model, full_path, step_path)
        if not (full_diff < tol and step_diff < tol):
            raise ExportError(
                f"ONNX parity check failed: max abs diff full={full_diff:.3g}, step={step_diff:.3g} (tolerance {tol})"
            )
    return ExportResult(full_path, step_path, full_diff, step_diff)


def session_options(threads: int = 1):
    """onnxruntime options of every session here and in the benchmark: ``threads`` intra-op threads, sequential."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def session_for(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session of a graph file (a step graph finds its weights in the sibling full.onnx)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def feed_for(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the inputs ``session`` declares (the exporter drops inputs a config never reads, e.g. ``dwell``
    without dwell embeddings, or the running-softmax state without attention). A full graph fed no state
    starts from ``initial_step_state`` (batch and hidden size from the feed and the graph)."""
    declared = {i.name: i for i in session.get_inputs()}
    if "items" in feed and "hidden" in declared and "hidden" not in feed:
        batch = int(np.shape(feed["items"])[0])
        hidden_dim = int(declared["hidden"].shape[1])
        feed = {**initial_step_state(hidden_dim, batch), **feed}
    return {k: v for k, v in feed.items() if k in declared}


def step_advance(
    step_session, state: dict[str, np.ndarray], item: int, activity: int, dwell: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One call of the step graph (batch 1): (new state, outputs by name)."""
    feed = {
        "item": np.array([item], np.int64),
        "activity": np.array([activity], np.int64),
        "dwell": np.array([dwell], np.int64),
        **state,
    }
    out = _run_named(step_session, feed)
    new_keys = out["key"][:, None] if "key" in out else None  # copy term: the session's keys grow by one
    return _next_state(state, out, new_keys, np.array([[item]], np.int64)), out


def full_advance(
    full_session, state: dict[str, np.ndarray], items: np.ndarray, activities: np.ndarray, dwell: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One call of the full graph on one session (batch 1): advance ``state`` by the tuples given (L >= 1);
    (new state, outputs by name). This is what the device runs, for a whole session and for a step."""
    items, activities, dwell = (np.asarray(x, np.int64).reshape(1, -1) for x in (items, activities, dwell))
    feed = {
        "items": items,
        "activities": activities,
        "dwell": dwell,
        "lengths": np.array([items.shape[1]], np.int64),
        **state,
    }
    out = _run_named(full_session, feed)
    return _next_state(state, out, out.get("new_keys"), items), out


def _run_named(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One call of ``session`` on the inputs it declares; the outputs by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed_for(session, feed)), strict=True))


def _next_state(
    state: dict[str, np.ndarray], out: dict[str, np.ndarray], new_keys: np.ndarray | None, items: np.ndarray
) -> dict[str, np.ndarray]:
    """The running state after a call: the graph's new state, and with the copy term (``new_keys`` given)
    the session's keys and items grown by this call's."""
    grown = new_keys is not None
    return {
        "hidden": out["new_hidden"],
        "run_max": out["new_run_max"],
        "run_den": out["new_run_den"],
        "run_num": out["new_run_num"],
        "keys": np.concatenate([state["keys"], new_keys], axis=1) if grown else state["keys"],
        "past_items": np.concatenate([state["past_items"], items], axis=1) if grown else state["past_items"],
    }


def run_steps(
    step_session,
    hidden_dim: int,
    items: np.ndarray,
    activities: np.ndarray,
    dwell: np.ndarray,
    chunks: tuple[int, ...] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feed one sequence through a step graph tuple by tuple, or through a full graph (advanced by ``chunks``
    tuples per call, then one per call): (scores after each call (calls, N), raw attention scores (L,), final
    attention weights (L,))."""
    is_full = any(i.name == "items" for i in step_session.get_inputs())
    state = initial_step_state(hidden_dim)
    all_scores, att = [], []
    sizes = [c for c in chunks if c > 0] if is_full else []
    sizes += [1] * (len(items) - sum(sizes))
    start = 0
    for size in sizes:
        stop = start + size
        if is_full:
            state, out = full_advance(
                step_session, state, items[start:stop], activities[start:stop], dwell[start:stop]
            )
            att.extend(float(a) for a in out["att"][0])
        else:
            state, out = step_advance(step_session, state, items[start], activities[start], dwell[start])
            att.append(float(out["att"][0]))
        all_scores.append(out["scores"][0])
        start = stop
    att_arr = np.asarray(att, np.float64)
    weights = np.exp(att_arr - float(state["run_max"][0])) / float(state["run_den"][0])
    return np.stack(all_scores), att_arr, weights


@torch.no_grad()
def check_parity(
    model: RIB, full_path: Path, step_path: Path, n_rows: int = 4, length: int = 12, seed: int = 1
) -> tuple[float, float]:
    """Max abs score diff of the full graph (padded batch from the initial state) vs ``RIB.forward``, and of
    every prefix through the step graph and through the full graph (a chunk of 3, then tuple by tuple) vs
    ``RIB.forward_all``."""
    model = model.eval()
    config = model.config
    items, activities, dwell, lengths = _example_full(config, n_rows, length, seed)
    lengths = torch.tensor(
        [length, max(1, length // 2), 1, length - 1][:n_rows] + [length] * max(0, n_rows - 4)
    )
    mask = torch.arange(length)[None, :] < lengths[:, None]
    items, activities, dwell = (torch.where(mask, x, torch.zeros_like(x)) for x in (items, activities, dwell))
    expected = model(items, activities, dwell, mask).numpy()
    full = session_for(full_path)
    feed = {
        "items": items.numpy(),
        "activities": activities.numpy(),
        "dwell": dwell.numpy(),
        "lengths": lengths.numpy(),
    }
    got = full.run(None, feed_for(full, feed))[0]
    full_diff = float(np.abs(got - expected).max())
    row = 0
    prefix_expected = model.forward_all(
        items[row : row + 1], activities[row : row + 1], dwell[row : row + 1], mask[row : row + 1]
    )[0].numpy()
    seq = (items[row].numpy(), activities[row].numpy(), dwell[row].numpy())
    step_scores, _, _ = run_steps(session_for(step_path), config.hidden_dim, *seq)
    step_diff = float(np.abs(step_scores - prefix_expected).max())
    chunk = 3
    advanced, _, _ = run_steps(full, config.hidden_dim, *seq, chunks=(chunk,))
    advance_diff = float(np.abs(advanced - prefix_expected[chunk - 1 :]).max())
    return full_diff, max(step_diff, advance_diff)


# ---- int8 ------------------------------------------------------------------------------------------------


# |q| bound of the output GEMM's weights: 7 bits, so u8 x s8 pair sums fit int16 on AVX2 (module docstring).
OUTPUT_WEIGHT_QMAX = 63
EMBEDDING_QMAX = 127


def _symmetric_int8(
    values: np.ndarray, axis: int | None, qmax: int = EMBEDDING_QMAX
) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales) with q = round(v / scale) in [-qmax, qmax]; one scale per slice along
    ``axis`` (None: one for the tensor). Slices whose peak is below 1e-12 (zero for all purposes) get scale 1,
    so dividing by a scale never overflows. Per-slice scales are rounded up to float16 values when all of
    them are normal float16 numbers (``_scale_tensor`` then stores them in half the bytes, exactly)."""
    peak = np.abs(values).max() if axis is None else np.abs(values).max(axis=axis, keepdims=True)
    scale = np.where(peak > 1e-12, peak / float(qmax), 1.0).astype(np.float32)
    if axis is not None and _fits_float16(scale):
        half = scale.astype(np.float16)
        half = np.where(half.astype(np.float32) < scale, np.nextafter(half, np.float16(np.inf)), half)
        scale = half.astype(np.float32)
    q = np.clip(np.rint(values / scale), -qmax, qmax).astype(np.int8)
    return q, scale


def _fits_float16(scale: np.ndarray) -> bool:
    return bool(np.all((scale >= 2.0**-14) & (scale <= 6.0e4)))


def _scale_tensor(scale: np.ndarray, name: str) -> tuple[list, list]:
    """(initializers, nodes) making the float32 tensor ``name`` from ``scale``: stored as float16 plus a Cast
    when that is exact (onnxruntime folds the Cast at load), else as float32."""
    from onnx import TensorProto, helper, numpy_helper

    half = scale.astype(np.float16)
    if scale.ndim and _fits_float16(scale) and np.array_equal(half.astype(np.float32), scale):
        return [numpy_helper.from_array(half, f"{name}_fp16")], [
            helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}_cast", to=TensorProto.FLOAT)
        ]
    return [numpy_helper.from_array(scale.astype(np.float32), name)], []


def quantize_int8(src: str | Path, dst: str | Path, per_channel: bool = True) -> Path:
    """int8 version of an exported graph (full or step): the output projection becomes one
    ``DynamicQuantizeMatMul`` (int8 weight, bias fused) with, by default, one scale per item applied by a Mul
    after it (``per_channel=False``: one scale, no Mul), the item embedding table int8 with a scale per row.
    Everything else stays fp32 (see the module docstring)."""
    import onnx
    from onnx import helper, numpy_helper

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    new_nodes, drop, add = [], set(), []
    found = {"out": 0, "emb": 0}
    for node in nodes:
        if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] == "out.weight":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if (
                attrs.get("transA", 0)
                or not attrs.get("transB", 0)
                or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0
            ):
                raise ExportError(f"unexpected output Gemm attributes {attrs}")
            weight = numpy_helper.to_array(inits["out.weight"]).T  # (H, n_items + 1)
            q, scale = _symmetric_int8(weight, axis=0 if per_channel else None, qmax=OUTPUT_WEIGHT_QMAX)
            name = f"{node.name or 'out'}_int8"
            bias = node.input[2] if len(node.input) > 2 else ""
            add.append(numpy_helper.from_array(q, "out.weight_int8"))
            if per_channel:  # unit scale and bias / s in the GEMM, then one Mul by s
                scale = scale.reshape(-1)
                bias_values = numpy_helper.to_array(inits[bias]) if bias else np.zeros_like(scale)
                scale_inits, scale_nodes = _scale_tensor(scale, "out.weight_scale")
                add += [
                    numpy_helper.from_array(np.ones((), np.float32), "out.weight_unit_scale"),
                    numpy_helper.from_array((bias_values / scale).astype(np.float32), "out.bias_over_scale"),
                    *scale_inits,
                ]
                new_nodes += [
                    *scale_nodes,
                    helper.make_node(
                        "DynamicQuantizeMatMul",
                        [
                            node.input[0],
                            "out.weight_int8",
                            "out.weight_unit_scale",
                            "",
                            "out.bias_over_scale",
                        ],
                        [f"{node.output[0]}_unscaled"],
                        name=name,
                        domain=MS_DOMAIN,
                    ),
                    helper.make_node(
                        "Mul",
                        [f"{node.output[0]}_unscaled", "out.weight_scale"],
                        list(node.output),
                        name=f"{name}_scale",
                    ),
                ]
                if bias:
                    drop.add(bias)
            else:
                add.append(numpy_helper.from_array(scale.reshape(()), "out.weight_scale"))
                new_nodes.append(
                    helper.make_node(
                        "DynamicQuantizeMatMul",
                        [node.input[0], "out.weight_int8", "out.weight_scale", "", bias],
                        list(node.output),
                        name=name,
                        domain=MS_DOMAIN,
                    )
                )
            drop.add("out.weight")
            found["out"] += 1
        elif node.op_type == "Gather" and node.input[0] == "embed.item_emb.weight":
            table = numpy_helper.to_array(inits["embed.item_emb.weight"])
            q, scale = _symmetric_int8(table, axis=1)  # one scale per item row
            base = node.name or "item_emb"
            out = node.output[0]
            if not found["emb"]:
                scale_inits, scale_nodes = _scale_tensor(scale, "embed.item_emb.weight_row_scale")
                add += [numpy_helper.from_array(q, "embed.item_emb.weight_int8"), *scale_inits]
                new_nodes += scale_nodes
            new_nodes += [
                helper.make_node(
                    "Gather",
                    ["embed.item_emb.weight_int8", node.input[1]],
                    [f"{out}_int8"],
                    name=f"{base}_int8",
                ),
                helper.make_node(
                    "Cast", [f"{out}_int8"], [f"{out}_cast"], name=f"{base}_cast", to=onnx.TensorProto.FLOAT
                ),
                helper.make_node(
                    "Gather",
                    ["embed.item_emb.weight_row_scale", node.input[1]],
                    [f"{out}_scale"],
                    name=f"{base}_scale",
                ),
                helper.make_node("Mul", [f"{out}_cast", f"{out}_scale"], [out], name=f"{base}_dequant"),
            ]
            drop.add("embed.item_emb.weight")
            found["emb"] += 1
        else:
            new_nodes.append(node)
    if found["out"] != 1 or found["emb"] < 1:
        raise ExportError(
            f"{src.name}: expected one output Gemm on out.weight and the item embedding Gather, found {found}"
        )
    still_used = {i for n in new_nodes for i in n.input}
    if drop & still_used:
        raise ExportError(
            f"{sorted(drop & still_used)} are still read by other nodes; cannot quantize them away"
        )
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + add)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(model.SerializeToString())
    return dst


def model_summary(config: RIBConfig) -> dict[str, object]:
    """What a package's manifest records about the model."""
    keys = (
        "n_items",
        "n_activities",
        "n_dwell",
        "item_dim",
        "activity_dim",
        "dwell_dim",
        "hidden_dim",
        "use_activity",
        "use_dwell",
        "use_attention",
        "max_len",
        "loss",
    )
    data = config.to_dict()
    summary = {k: data[k] for k in keys if k in data}
    summary["data_type"] = config.data_type
    summary["attention_micro"] = bool(data.get("attention_micro", False))
    summary["copy"] = uses_copy(config)
    return summary


def export_files(
    model: RIB, out_dir: str | Path, int8: bool = True, per_channel: bool = True
) -> dict[str, object]:
    """fp32 export (+ parity check) and, with ``int8``, quantized graphs: ``full.onnx`` and ``step.onnx`` in
    ``out_dir`` (step's weights are external data inside full, so the package carries them once).

    Returns a report: parity figures, precision, sizes in bytes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = export_onnx(model, tmp)
        report: dict[str, object] = {
            "full_max_abs_diff": result.full_max_abs_diff,
            "step_max_abs_diff": result.step_max_abs_diff,
            "precision": "int8" if int8 else "fp32",
            "fp32_bytes": os.path.getsize(result.full) + os.path.getsize(result.step),
        }
        if int8:
            quantize_int8(result.full, out_dir / "full.onnx", per_channel=per_channel)
            step8 = quantize_int8(result.step, Path(tmp) / "step8.onnx", per_channel=per_channel)
            link_to_full(step8, out_dir / "full.onnx", out_dir / "step.onnx")
            report["int8_output_scales"] = "per-channel" if per_channel else "per-tensor"
        else:  # step.onnx points into full.onnx by offset: copy both verbatim
            for name, path in (("full.onnx", result.full), ("step.onnx", result.step)):
                (out_dir / name).write_bytes(path.read_bytes())
        report["bytes"] = os.path.getsize(out_dir / "full.onnx") + os.path.getsize(out_dir / "step.onnx")
    return report


def dump_json(data: object) -> str:
    """Stable JSON text."""
    return json.dumps(data, indent=2, sort_keys=True)


def popularity_from(dataset, top: int = 1000) -> tuple[list[str], list[float]]:
    """The ``top`` most frequent items of a SessionDataset (ids and counts), for the cold-start fallback."""
    counts = np.bincount(np.asarray(dataset.items, dtype=np.int64), minlength=dataset.n_items + 1)[1:]
    order = np.lexsort((np.arange(len(counts)), -counts))[:top]
    order = order[counts[order] > 0]
    return [str(dataset.vocab.item_ids[i]) for i in order], [float(counts[i]) for i in order]


def build_package(
    model: RIB,
    vocab,
    out_dir: str | Path,
    private_key,
    model_version: int,
    popular: tuple[list[str], list[float]] | None = None,
    int8: bool = True,
    per_channel: bool = True,
    extra: dict[str, object] | None = None,
):
    """Export, (quantize,) write the vocabulary/popularity files and sign: a device-ready package directory.

    ``vocab`` is a ``model.data.dataset.Vocabulary``; ``popular`` defaults to an empty list. ``out_dir``
    must not exist or be empty. Returns the signed ``edge_client.package.Manifest``.
    """
    from edge_client.package import sign_package, write_payload

    model = folded_for_export(model)
    config = model.config
    check_exportable(config)
    if vocab.n_items != config.n_items:
        raise ExportError(f"vocabulary has {vocab.n_items} items, the model {config.n_items}")
    if len(vocab.activities) != config.n_activities or vocab.dwell.vocab_size != config.n_dwell:
        raise ExportError("vocabulary activities/dwell sizes do not match the model config")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    report = export_files(model, out_dir, int8=int8, per_channel=per_channel)
    items, counts = popular if popular is not None else ([], [])
    write_payload(out_dir, [str(i) for i in vocab.item_ids], vocab.activities, vocab.dwell, items, counts)
    info = {"export": {k: v for k, v in report.items() if k != "precision"}, **(extra or {})}
    return sign_package(
        out_dir, private_key, model_version, model_summary(config), precision=report["precision"], extra=info
    )


def real_examples(
    dataset, max_len: int, n: int = 200, seed: int = 0
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], np.ndarray]:
    """Up to ``n`` example prefixes of a SessionDataset (the last ``max_len`` tuples each, as index arrays) and
    the next item of each (the evaluation protocol's target)."""
    examples = dataset.examples()
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(examples), size=min(n, len(examples)), replace=False) if len(examples) else []
    out, targets = [], []
    for k in sorted(int(p) for p in picks):
        end = int(examples.ends[k])
        start = max(int(examples.starts[k]), end - max_len)
        out.append(
            tuple(
                np.asarray(getattr(dataset, f)[start:end], np.int64)
                for f in ("items", "activities", "dwell_buckets")
            )
        )
        targets.append(int(examples.targets[k]))
    return out, np.asarray(targets, np.int64)


def real_prefixes(
    dataset, max_len: int, n: int = 200, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Up to ``n`` example prefixes of a SessionDataset (the last ``max_len`` tuples each), as index arrays."""
    return real_examples(dataset, max_len, n, seed)[0]


def _prefix_scores(session, items: np.ndarray, activities: np.ndarray, dwell: np.ndarray) -> np.ndarray:
    """(n_items + 1,) scores of one whole prefix through a full-graph session (from the initial state)."""
    feed = {
        "items": items[None],
        "activities": activities[None],
        "dwell": dwell[None],
        "lengths": np.array([len(items)], np.int64),
    }
    return session.run(None, feed_for(session, feed))[0][0]


def recall_mrr(session, prefixes, targets: np.ndarray, k: int = 20) -> tuple[float, float]:
    """Recall@k and MRR@k of a full-graph session (or path) on prefixes with known next items (the padding
    column 0 is never ranked; ties count against the target)."""
    session = session_for(session) if isinstance(session, (str, Path)) else session
    hits, rr = [], []
    for prefix, target in zip(prefixes, targets, strict=True):
        scores = _prefix_scores(session, *prefix)
        rank = int(
            (scores[1:] >= scores[target]).sum()
        )  # items scoring at least the target's score, itself included
        hits.append(rank <= k)
        rr.append(1.0 / rank if rank <= k else 0.0)
    return (float(np.mean(hits)), float(np.mean(rr))) if hits else (float("nan"), float("nan"))


def topk_agreement(reference, candidate, prefixes, k: int = 20) -> float:
    """Mean |top-k(reference) & top-k(candidate)| / k over prefixes; both are full-graph onnxruntime sessions
    (or paths). The padding column 0 is never ranked."""
    reference = session_for(reference) if isinstance(reference, (str, Path)) else reference
    candidate = session_for(candidate) if isinstance(candidate, (str, Path)) else candidate
    overlaps = []
    for prefix in prefixes:
        tops = []
        for sess in (reference, candidate):
            scores = _prefix_scores(sess, *prefix).copy()
            scores[0] = -np.inf
            tops.append(set(np.argpartition(-scores, k - 1)[:k].tolist()))
        overlaps.append(len(tops[0] & tops[1]) / k)
    return float(np.mean(overlaps)) if overlaps else float("nan")
