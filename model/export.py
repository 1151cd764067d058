"""Export a trained RIB to ONNX for the device (the torch side; the device needs only onnxruntime).

Two graphs, both built from the model's own submodules (embeddings, ``gru``, ``att_proj``/``att_score``,
``out``), so they hold exactly the trained weights:

- **full** (``full.onnx``): ``items, activities, dwell`` int64 ``[B, L]`` (dynamic B and L, valid steps
  first, padding after) and ``lengths`` int64 ``[B]`` -> ``scores [B, n_items + 1]`` and attention
  ``weights [B, L]`` (zero on padding). Same as ``RIB.forward`` on the masked sequence.
- **step** (``step.onnx``): one tuple ``item, activity, dwell`` int64 ``[B]`` plus the state
  ``hidden [B, H]``, ``run_max [B]``, ``run_den [B]``, ``run_num [B, H]`` -> the new state, ``scores`` and
  this step's raw attention score ``att [B]``. Attention pooling over every past step stays exact online
  with a running softmax: m' = max(m, s), den' = den e^(m-m') + e^(s-m'), num' = num e^(m-m') + e^(s-m') h,
  pooled = num'/den'. So each new event costs one GRU step. The initial state is ``initial_step_state``.
  The weight of step t after T steps is exp(s_t - m_T) / den_T (the runtime keeps the raw s_t).

Configs the graphs cannot reproduce faithfully are refused (``ExportError``): the copy term, the paper
loss. ``export_onnx`` also checks the exported graphs against ``RIB.forward`` in torch before returning
(max abs diff on scores), so a model change that the wrappers do not follow fails loudly at export.

int8: ``quantize_int8`` runs onnxruntime's dynamic quantization on the embedding Gathers and the output
MatMul (the GRU op stays fp32 under dynamic quantization), per-channel by default.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import MISSING, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.rib import RIB, RIBConfig

OPSET = 18
FULL_INPUTS = ("items", "activities", "dwell", "lengths")
FULL_OUTPUTS = ("scores", "weights")
STEP_INPUTS = ("item", "activity", "dwell", "hidden", "run_max", "run_den", "run_num")
STEP_OUTPUTS = ("new_hidden", "new_run_max", "new_run_den", "new_run_num", "scores", "att")
# With the copy term the step graph also takes the session's past copy keys and items, and returns this step's key.
COPY_STEP_INPUTS = ("keys", "past_items")
COPY_STEP_OUTPUTS = ("key",)
# Initial running max: finite (so exp(m - m') never sees inf - inf), far below any real attention score.
INITIAL_RUN_MAX = -1e30
PARITY_TOL = 1e-4


class ExportError(ValueError):
    """The model (config) cannot be exported faithfully, or the exported graph does not match torch."""


# RIBConfig fields the graphs know how to reproduce (training-only knobs such as dropout included). A field
# added to RIBConfig later is refused unless it keeps its default, until the exporter learns it.
KNOWN_FIELDS = frozenset({
    "n_items", "n_activities", "n_dwell", "item_dim", "activity_dim", "dwell_dim", "hidden_dim", "use_activity",
    "use_dwell", "use_attention", "dropout", "max_len", "loss", "copy", "attention_micro", "micro_dropout",
})


def check_exportable(config: RIBConfig) -> None:
    """Raise ExportError for configs the ONNX graphs would not reproduce exactly."""
    for f in dataclass_fields(config):
        if f.name in KNOWN_FIELDS:
            continue
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else MISSING)
        if getattr(config, f.name) != default:
            raise ExportError(f"RIBConfig.{f.name}={getattr(config, f.name)!r} is unknown to the ONNX exporter (only its default is supported)")
    if config.loss not in ("softmax", "sampled"):
        raise ExportError(f"RIBConfig.loss={config.loss!r} is not supported by the ONNX export (softmax/sampled only)")


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

    def forward(self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    """The full-session graph (see module docstring)."""

    def forward(self, items, activities, dwell, lengths):
        embedded, micro = self.embed(items, activities, dwell)
        hidden, _ = self.gru(embedded)
        steps = torch.arange(items.shape[1], device=items.device)
        valid = steps[None, :] < lengths.clamp(min=1)[:, None]
        if self.use_attention:
            scores = self.scorer(hidden, micro).masked_fill(~valid, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
        else:
            weights = (steps[None, :] == (lengths.clamp(min=1) - 1)[:, None]).to(hidden.dtype)
        pooled = (weights[:, :, None] * hidden).sum(1)
        logits = self.out(pooled)
        if self.copy is not None:
            logits = self.copy(logits, pooled, self.copy.copy_key(hidden), items * valid, valid)
        return logits, weights


class IncrementalStep(_ExportedRIB):
    """The incremental step graph (see module docstring)."""

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
    """The step graph's state before the first tuple (``keys``/``past_items`` are only read with the copy term)."""
    return {
        "hidden": np.zeros((batch, hidden_dim), np.float32),
        "run_max": np.full((batch,), INITIAL_RUN_MAX, np.float32),
        "run_den": np.zeros((batch,), np.float32),
        "run_num": np.zeros((batch, hidden_dim), np.float32),
        "keys": np.zeros((batch, 0, hidden_dim), np.float32),
        "past_items": np.zeros((batch, 0), np.int64),
    }


def _example_full(config: RIBConfig, batch: int = 2, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, config.n_items + 1, (batch, length), generator=g)
    activities = torch.randint(0, config.n_activities, (batch, length), generator=g)
    dwell = torch.randint(0, config.n_dwell, (batch, length), generator=g)
    lengths = torch.full((batch,), length, dtype=torch.long)
    lengths[-1] = max(1, length - 3)
    return items, activities, dwell, lengths


def _example_step(config: RIBConfig, batch: int = 2) -> tuple[torch.Tensor, ...]:
    items, activities, dwell, _ = _example_full(config, batch, 1)
    state = {k: torch.from_numpy(v) for k, v in initial_step_state(config.hidden_dim, batch).items() if k in STEP_INPUTS}
    args = (items[:, 0], activities[:, 0], dwell[:, 0], state["hidden"], state["run_max"], state["run_den"], state["run_num"])
    if uses_copy(config):  # two past steps, so the exporter sees a real (dynamic) history length
        past, _, _, _ = _example_full(config, batch, 2, seed=5)
        args = (*args, torch.randn(batch, 2, config.hidden_dim), past)
    return args


def _export(module: nn.Module, args: tuple, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], dynamic: dict) -> None:
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
        return {"full": str(self.full), "step": str(self.step), "full_max_abs_diff": self.full_max_abs_diff, "step_max_abs_diff": self.step_max_abs_diff}


@torch.no_grad()
def export_onnx(model: RIB, out_dir: str | Path, check: bool = True, tol: float = PARITY_TOL) -> ExportResult:
    """Write ``full.onnx`` and ``step.onnx`` (fp32) to ``out_dir``; with ``check``, verify against torch."""
    model = model.eval().cpu()
    config = model.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full_path, step_path = out_dir / "full.onnx", out_dir / "step.onnx"
    _export(
        FullSession(model).eval(),
        _example_full(config),
        full_path,
        FULL_INPUTS,
        FULL_OUTPUTS,
        {"items": {0: "batch", 1: "steps"}, "activities": {0: "batch", 1: "steps"}, "dwell": {0: "batch", 1: "steps"},
         "lengths": {0: "batch"}, "scores": {0: "batch"}, "weights": {0: "batch", 1: "steps"}},
    )
    step_inputs, step_outputs = STEP_INPUTS, STEP_OUTPUTS
    step_dynamic: dict[str, dict[int, str]] = {name: {0: "batch"} for name in STEP_INPUTS + STEP_OUTPUTS}
    if uses_copy(config):
        step_inputs, step_outputs = STEP_INPUTS + COPY_STEP_INPUTS, STEP_OUTPUTS + COPY_STEP_OUTPUTS
        step_dynamic.update(keys={0: "batch", 1: "past"}, past_items={0: "batch", 1: "past"}, key={0: "batch"})
    _export(IncrementalStep(model).eval(), _example_step(config), step_path, step_inputs, step_outputs, step_dynamic)
    full_diff = step_diff = float("nan")
    if check:
        full_diff, step_diff = check_parity(model, full_path, step_path)
        if not (full_diff < tol and step_diff < tol):
            raise ExportError(f"ONNX parity check failed: max abs diff full={full_diff:.3g}, step={step_diff:.3g} (tolerance {tol})")
    return ExportResult(full_path, step_path, full_diff, step_diff)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feed_for(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the inputs ``session`` declares (the exporter drops inputs a config never reads, e.g. ``dwell``
    without dwell embeddings, or the running-softmax state without attention)."""
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def step_advance(step_session, state: dict[str, np.ndarray], item: int, activity: int, dwell: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One call of the step graph (batch 1): (new state, outputs by name)."""
    feed = {"item": np.array([item], np.int64), "activity": np.array([activity], np.int64), "dwell": np.array([dwell], np.int64), **state}
    names = [o.name for o in step_session.get_outputs()]
    out = dict(zip(names, step_session.run(None, feed_for(step_session, feed)), strict=True))
    new_state = {"hidden": out["new_hidden"], "run_max": out["new_run_max"], "run_den": out["new_run_den"],
                 "run_num": out["new_run_num"], "keys": state["keys"], "past_items": state["past_items"]}
    if "key" in out:  # copy term: the session's keys and items grow by one
        new_state["keys"] = np.concatenate([state["keys"], out["key"][:, None]], axis=1)
        new_state["past_items"] = np.concatenate([state["past_items"], np.array([[item]], np.int64)], axis=1)
    return new_state, out


def run_steps(step_session, hidden_dim: int, items: np.ndarray, activities: np.ndarray, dwell: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feed one sequence tuple by tuple through a step session: (scores after each step (L, N), raw
    attention scores (L,), final attention weights (L,))."""
    state = initial_step_state(hidden_dim)
    all_scores, att = [], []
    for t in range(len(items)):
        state, out = step_advance(step_session, state, items[t], activities[t], dwell[t])
        all_scores.append(out["scores"][0])
        att.append(float(out["att"][0]))
    att_arr = np.asarray(att, np.float64)
    weights = np.exp(att_arr - float(state["run_max"][0])) / float(state["run_den"][0])
    return np.stack(all_scores), att_arr, weights


@torch.no_grad()
def check_parity(model: RIB, full_path: Path, step_path: Path, n_rows: int = 4, length: int = 12, seed: int = 1) -> tuple[float, float]:
    """Max abs score diff of the full graph (padded batch) and of the step graph (every prefix) vs ``RIB.forward``."""
    model = model.eval()
    config = model.config
    items, activities, dwell, lengths = _example_full(config, n_rows, length, seed)
    lengths = torch.tensor([length, max(1, length // 2), 1, length - 1][:n_rows] + [length] * max(0, n_rows - 4))
    mask = torch.arange(length)[None, :] < lengths[:, None]
    items, activities, dwell = (torch.where(mask, x, torch.zeros_like(x)) for x in (items, activities, dwell))
    expected = model(items, activities, dwell, mask).numpy()
    full = _session(full_path)
    feed = {"items": items.numpy(), "activities": activities.numpy(), "dwell": dwell.numpy(), "lengths": lengths.numpy()}
    got, _ = full.run(None, feed_for(full, feed))
    full_diff = float(np.abs(got - expected).max())
    step = _session(step_path)
    row = 0
    step_scores, _, _ = run_steps(step, config.hidden_dim, items[row].numpy(), activities[row].numpy(), dwell[row].numpy())
    prefix_expected = model.forward_all(items[row : row + 1], activities[row : row + 1], dwell[row : row + 1], mask[row : row + 1])[0].numpy()
    step_diff = float(np.abs(step_scores - prefix_expected).max())
    return full_diff, step_diff


def quantize_int8(src: str | Path, dst: str | Path, per_channel: bool = True) -> Path:
    """Dynamic int8 quantization of the embedding Gathers and MatMuls (GRU stays fp32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(
            str(pre),
            str(dst),
            op_types_to_quantize=["Gather", "MatMul", "Gemm"],
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
        )
    return dst


def model_summary(config: RIBConfig) -> dict[str, object]:
    """What a package's manifest records about the model."""
    keys = ("n_items", "n_activities", "n_dwell", "item_dim", "activity_dim", "dwell_dim", "hidden_dim",
            "use_activity", "use_dwell", "use_attention", "max_len", "loss")
    data = config.to_dict()
    summary = {k: data[k] for k in keys if k in data}
    summary["data_type"] = config.data_type
    summary["attention_micro"] = bool(data.get("attention_micro", False))
    summary["copy"] = uses_copy(config)
    return summary


def export_files(model: RIB, out_dir: str | Path, int8: bool = True, per_channel: bool = True) -> dict[str, object]:
    """fp32 export (+ parity check) and, with ``int8``, quantized graphs replacing them in ``out_dir``.

    Returns a report: parity figures, precision, sizes in bytes.
    """
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        result = export_onnx(model, tmp)
        report: dict[str, object] = {
            "full_max_abs_diff": result.full_max_abs_diff,
            "step_max_abs_diff": result.step_max_abs_diff,
            "precision": "int8" if int8 else "fp32",
            "fp32_bytes": os.path.getsize(result.full) + os.path.getsize(result.step),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, path in (("full.onnx", result.full), ("step.onnx", result.step)):
            if int8:
                quantize_int8(path, out_dir / name, per_channel=per_channel)
            else:
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
    return sign_package(out_dir, private_key, model_version, model_summary(config), precision=report["precision"], extra=info)


def real_prefixes(dataset, max_len: int, n: int = 200, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Up to ``n`` example prefixes of a SessionDataset (the last ``max_len`` tuples each), as index arrays."""
    examples = dataset.examples()
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(examples), size=min(n, len(examples)), replace=False) if len(examples) else []
    out = []
    for k in sorted(int(p) for p in picks):
        end = int(examples.ends[k])
        start = max(int(examples.starts[k]), end - max_len)
        out.append(tuple(np.asarray(getattr(dataset, f)[start:end], np.int64) for f in ("items", "activities", "dwell_buckets")))
    return out


def topk_agreement(reference, candidate, prefixes, k: int = 20) -> float:
    """Mean |top-k(reference) & top-k(candidate)| / k over prefixes; both are full-graph onnxruntime sessions
    (or paths). The padding column 0 is never ranked."""
    reference = _session(Path(reference)) if isinstance(reference, (str, Path)) else reference
    candidate = _session(Path(candidate)) if isinstance(candidate, (str, Path)) else candidate
    overlaps = []
    for items, activities, dwell in prefixes:
        feed = {"items": items[None], "activities": activities[None], "dwell": dwell[None], "lengths": np.array([len(items)], np.int64)}
        tops = []
        for sess in (reference, candidate):
            scores = sess.run(None, feed_for(sess, feed))[0][0].copy()
            scores[0] = -np.inf
            tops.append(set(np.argpartition(-scores, k - 1)[:k].tolist()))
        overlaps.append(len(tops[0] & tops[1]) / k)
    return float(np.mean(overlaps)) if overlaps else float("nan")
