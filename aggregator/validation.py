"""Every device reply is checked here before anything aggregates it; a bad one is dropped with a reason.

Two levels, both called from one place each:

- ``CheckedGrid`` (the round loop hands it to Flower's fit workflow): a reply whose records Flower itself could
  not convert (a missing ``fitres`` record, a metric that is a list, a SecAgg+ stage answer without its keys,
  masked vectors that are not integer arrays of the model's shapes) becomes an error reply
  ``rejected: malformed_reply: ...`` before Flower's code reads it, so it counts as that device's failure.
- ``check_reply`` (``RoundRecorder.aggregate_fit`` runs it on every result): arrays that decode as numpy arrays
  without pickles, of the global model's count and shapes, floating point, finite once cast to the global
  dtype, an update whose L2 distance from the global model is at most ``max-update-norm``; metrics that are
  finite numbers under the device's metric names; an integer example count >= 1, forced to 1 under DP (the
  noise is calibrated to a plain average) and clamped to ``max-device-examples`` otherwise. The reply that
  passes is rebuilt from what was checked (cast arrays, float metrics), so nothing unchecked reaches Flower's
  aggregation.

After aggregation ``aggregate_problem`` checks the new global model (shapes, finiteness) before it is applied.
Failures are named by ``failure_reason``: a device's own decline (``declined: no_data``), a simulated
vanishing (offline, dropout, late), a rejection from here, or Flower's error class (crash, unreachable).
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.common import Code, FitRes, Parameters, ndarrays_to_parameters
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from federation.task import METRIC_KEYS, SIMULATED_PREFIX, declined_reason

# Why a reply is dropped here (counted per round beside the devices' own failure reasons).
REJECT_REASONS = (
    "malformed_reply",  # records Flower could not convert (CheckedGrid)
    "bad_array",  # bytes that are not a numpy array (or one that needs pickle)
    "not_float",  # integer, complex, boolean or object arrays
    "wrong_shape",  # not the global model's number of arrays or shapes
    "non_finite",  # NaN or inf, also after the cast to the global dtype (a float64 1e300)
    "too_large",  # the update's distance from the global model exceeds max-update-norm
    "bad_metric",  # a metric that is not a finite number, or not one of the device's metric names
    "bad_examples",  # an example count that is not an integer >= 1
)
_REJECTED_RE = re.compile(r"rejected: ([a-z_]+)")
_SIMULATED_RE = re.compile(re.escape(SIMULATED_PREFIX) + r"([a-z_]+)")
# Flower's error codes for a device that never answered, and for a ClientApp that raised or died.
_UNREACHABLE = {
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.NODE_UNAVAILABLE,
}
_CRASH = {
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
    ErrorCode.CLIENT_APP_CRASHED,
    ErrorCode.MOD_FAILED_PRECONDITION,
    ErrorCode.INVALID_FAB,
}
_HEADER_BYTES = 4096  # an .npy header is at most a few hundred bytes


class RejectedReply(ValueError):
    """A device reply that does not pass ``check_reply``; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class ReplyRules:
    """What a usable reply of this run looks like."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    uniform_weight: bool = False  # user-level DP: every update counts once
    max_examples: int = 10_000
    max_update_norm: float = 0.0  # 0: no bound (under SecAgg+ the server never sees a single update)
    metric_keys: tuple[str, ...] = METRIC_KEYS

    @classmethod
    def for_weights(cls, weights: Sequence[np.ndarray], **settings: object) -> ReplyRules:
        """Rules whose shapes and dtypes are those of ``weights`` (the run's initial model)."""
        shapes = tuple(tuple(int(d) for d in w.shape) for w in weights)
        return cls(shapes=shapes, dtypes=tuple(np.dtype(w.dtype) for w in weights), **settings)  # type: ignore[arg-type]


# ---- why a device did not contribute ---------------------------------------------------------------------


def failure_reason(failure: object) -> str:
    """The reason a sampled device did not contribute, from what Flower handed the strategy for it."""
    if isinstance(failure, tuple) and len(failure) == 2 and isinstance(failure[1], FitRes):
        return "error"  # a reply with a non-OK status: honest ClientApps never send one
    error = failure.args[0] if isinstance(failure, BaseException) and failure.args else None
    text = error.reason if isinstance(error, Error) else str(failure)
    text = text or ""
    for pattern in (_REJECTED_RE, _SIMULATED_RE):
        match = pattern.search(text)
        if match:
            return match.group(1)
    declined = declined_reason(text)
    if declined is not None:
        return declined
    if isinstance(error, Error):
        if error.code in _UNREACHABLE:
            return "unreachable"
        if error.code in _CRASH:
            return "crash"
    return "error"


def distinct_failures(failures: Iterable[object]) -> list[object]:
    """Each device's failure once: Flower's SecAgg+ workflow lists a device that failed its masked-vector stage
    twice (one ``Exception`` per loop over the replies, both wrapping the same error)."""
    seen: set[int] = set()
    out = []
    for failure in failures:
        error = failure.args[0] if isinstance(failure, BaseException) and failure.args else None
        if isinstance(error, Error):
            if id(error) in seen:
                continue
            seen.add(id(error))
        out.append(failure)
    return out


# ---- single results (after Flower converted them) ----------------------------------------------------------


def _decode(tensor: object, expected_size: int) -> np.ndarray:
    if not isinstance(tensor, bytes):
        raise RejectedReply("bad_array", f"an array arrived as {type(tensor).__name__}, not bytes")
    # A float64 copy of the expected array plus its header is the most an honest array can take.
    if len(tensor) > expected_size * 8 + _HEADER_BYTES:
        raise RejectedReply("wrong_shape", f"{len(tensor):,} bytes for {expected_size:,} values")
    try:
        array = np.load(io.BytesIO(tensor), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises many types for bad bytes; each means the same
        raise RejectedReply("bad_array", f"not a numpy array ({type(err).__name__})") from None
    if not isinstance(array, np.ndarray):
        raise RejectedReply("bad_array", "not a single numpy array")
    return array


def _checked_arrays(parameters: Parameters, rules: ReplyRules) -> list[np.ndarray]:
    tensors = parameters.tensors if isinstance(parameters, Parameters) else None
    if not isinstance(tensors, list):
        raise RejectedReply("bad_array", "no list of arrays")
    if len(tensors) != len(rules.shapes):
        raise RejectedReply("wrong_shape", f"{len(tensors)} arrays, the model has {len(rules.shapes)}")
    arrays = []
    for index, (tensor, shape, dtype) in enumerate(zip(tensors, rules.shapes, rules.dtypes, strict=True)):
        array = _decode(tensor, max(1, math.prod(shape)))
        if array.dtype.kind != "f":
            raise RejectedReply("not_float", f"array {index} has dtype {array.dtype}")
        if tuple(array.shape) != shape:
            raise RejectedReply("wrong_shape", f"array {index} has shape {array.shape}, expected {shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            cast = array.astype(dtype, copy=False)
        if not np.isfinite(cast).all():
            raise RejectedReply("non_finite", f"array {index} holds NaN or inf (as {dtype})")
        arrays.append(cast)
    return arrays


def update_norm(arrays: Sequence[np.ndarray], global_weights: Sequence[np.ndarray]) -> float:
    """L2 distance between a reply's weights and the global weights (float64)."""
    total = 0.0
    for array, base in zip(arrays, global_weights, strict=True):
        delta = np.subtract(array, base, dtype=np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def _checked_metrics(metrics: object, keys: tuple[str, ...]) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise RejectedReply("bad_metric", "metrics are not a mapping")
    out = {}
    for key, value in metrics.items():
        if key not in keys:
            raise RejectedReply("bad_metric", f"metric {str(key)[:40]!r} is not one a device reports")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RejectedReply(
                "bad_metric", f"metric {key!r} is {type(value).__name__}, not a finite number"
            )
        out[key] = float(value)
    return out


def _checked_examples(num_examples: object, rules: ReplyRules) -> int:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise RejectedReply("bad_examples", f"example count {str(num_examples)[:40]} is not an integer >= 1")
    if rules.uniform_weight:
        return 1
    return min(num_examples, rules.max_examples)


def check_reply(
    res: FitRes, rules: ReplyRules, global_weights: Sequence[np.ndarray] | None = None
) -> tuple[FitRes, float | None]:
    """The reply rebuilt from its checked parts, and its update norm (None without global weights).

    Raises ``RejectedReply`` with the first problem found.
    """
    arrays = _checked_arrays(res.parameters, rules)
    norm = None
    if global_weights is not None:
        norm = update_norm(arrays, global_weights)
        if not math.isfinite(norm) or (rules.max_update_norm > 0 and norm > rules.max_update_norm):
            raise RejectedReply(
                "too_large", f"update norm {norm:.4g} exceeds max-update-norm {rules.max_update_norm:g}"
            )
    metrics = _checked_metrics(res.metrics, rules.metric_keys)
    examples = _checked_examples(res.num_examples, rules)
    return FitRes(res.status, ndarrays_to_parameters(arrays), examples, metrics), norm


@dataclass
class Screened:
    """What ``screen_results`` kept and why it dropped the rest."""

    usable: list
    rejected: Counter
    norms: list[float]
    clamped: int


def screen_results(
    results: Iterable[tuple[object, FitRes]],
    rules: ReplyRules,
    global_weights: Sequence[np.ndarray] | None = None,
) -> Screened:
    """Check every (proxy, FitRes); keep the checked replies, count the others by reason. Never raises."""
    screened = Screened([], Counter(), [], 0)
    for proxy, res in results:
        try:
            checked, norm = check_reply(res, rules, global_weights)
        except RejectedReply as err:
            screened.rejected[err.reason] += 1
            continue
        screened.clamped += int(not rules.uniform_weight and checked.num_examples < res.num_examples)
        screened.usable.append((proxy, checked))
        if norm is not None:
            screened.norms.append(norm)
    return screened


def aggregate_problem(arrays: Sequence[np.ndarray] | None, rules: ReplyRules) -> str | None:
    """Why an aggregated model must not be applied (None when it may)."""
    if arrays is None:
        return "no aggregate"
    if [tuple(a.shape) for a in arrays] != list(rules.shapes):
        return "the aggregate does not have the model's shapes"
    if not all(np.isfinite(a).all() for a in arrays):
        return "the aggregate holds NaN or inf"
    return None


# ---- whole reply messages (before Flower converts them) ---------------------------------------------------


def _scalar(value: object) -> bool:
    return isinstance(value, bool | int | float | str | bytes)


def _fitres_problem(content, parameters_expected: bool) -> str | None:
    params = content.array_records.get("fitres.parameters")
    if not isinstance(params, ArrayRecord):
        return "no fitres.parameters record"
    if parameters_expected and not len(params):
        return "no arrays"
    examples = content.metric_records.get("fitres.num_examples")
    if not isinstance(examples, MetricRecord) or "num_examples" not in examples:
        return "no example count"
    metrics = content.config_records.get("fitres.metrics")
    if not isinstance(metrics, ConfigRecord) or not all(_scalar(v) for v in metrics.values()):
        return "metrics missing or not scalars"
    status = content.config_records.get("fitres.status")
    if not isinstance(status, ConfigRecord) or not isinstance(status.get("code"), int):
        return "no status"
    if status.get("code") not in {c.value for c in Code} or not isinstance(status.get("message"), str):
        return "bad status"
    return None


def _list_of(value: object, kind: type, max_items: int) -> bool:
    return isinstance(value, list) and len(value) <= max_items and all(isinstance(v, kind) for v in value)


def _masked_problem(value: object, shapes: list[tuple[int, ...]]) -> str | None:
    """SecAgg+ masked vectors: the quantised weight factor, then one integer array per model array."""
    expected = [(1,), *shapes]
    if not _list_of(value, bytes, len(expected)) or len(value) != len(expected):  # type: ignore[arg-type]
        return "masked vectors missing or of another count"
    for blob, shape in zip(value, expected, strict=True):  # type: ignore[call-overload]
        if len(blob) > max(1, math.prod(shape)) * 8 + _HEADER_BYTES:
            return "masked vector too large"
        try:
            array = np.load(io.BytesIO(blob), allow_pickle=False)
        except Exception:  # noqa: BLE001 - any failure to decode means the same
            return "masked vector is not a numpy array"
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "iu" or tuple(array.shape) != shape:
            return "masked vector is not an integer array of the model's shape"
    return None


def reply_problem(reply: Message, instruction: Message, shapes: list[tuple[int, ...]]) -> str | None:
    """Why Flower's fit workflow could not take this training reply (None when it can); ``shapes``: the
    global model's array shapes."""
    if reply.has_error():
        return None  # already a failure: Flower counts it as one
    if not reply.has_content():
        return "no content"
    content = reply.content
    configs = (
        instruction.content.config_records.get(RECORD_KEY_CONFIGS) if instruction.has_content() else None
    )
    stage = configs.get(Key.STAGE) if isinstance(configs, ConfigRecord) else None
    if stage is None:
        return _fitres_problem(content, parameters_expected=True)
    answer = content.config_records.get(RECORD_KEY_CONFIGS)
    if not isinstance(answer, ConfigRecord):
        return "no SecAgg+ answer"
    limit = 100_000  # node ids and shares: at most one per sampled device
    if stage == Stage.SETUP:
        keys = answer.get(Key.PUBLIC_KEY_1), answer.get(Key.PUBLIC_KEY_2)
        if not all(isinstance(k, bytes) and 0 < len(k) <= 1024 for k in keys):
            return "SecAgg+ public keys missing"
    elif stage == Stage.SHARE_KEYS:
        dsts, ctxts = answer.get(Key.DESTINATION_LIST), answer.get(Key.CIPHERTEXT_LIST)
        if not (_list_of(dsts, int, limit) and _list_of(ctxts, bytes, limit) and len(dsts) == len(ctxts)):
            return "SecAgg+ key shares missing"
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        problem = _fitres_problem(content, parameters_expected=False)
        if problem is None:
            problem = _masked_problem(answer.get(Key.MASKED_PARAMETERS), shapes)
        return problem
    elif stage == Stage.UNMASK:
        nids, shares = answer.get(Key.NODE_ID_LIST), answer.get(Key.SHARE_LIST)
        if not (_list_of(nids, int, limit) and _list_of(shares, bytes, limit) and len(nids) == len(shares)):
            return "SecAgg+ unmask shares missing"
    return None


class CheckedGrid:
    """A Flower Grid whose ``send_and_receive`` turns malformed training replies into failures of their device.

    Everything else is the wrapped grid's. A replaced reply is an error reply from the same node, so Flower's
    workflows count it as that device's failure and the strategy names it (``rejected: malformed_reply``).
    ``shapes``: the global model's array shapes (SecAgg+ masked vectors must have them).
    """

    def __init__(self, grid, shapes: Sequence[tuple[int, ...]]) -> None:
        self._grid = grid
        self._shapes = [tuple(shape) for shape in shapes]

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        """Flower's send_and_receive, with every reply checked against its instruction."""
        outgoing = list(messages)
        by_node = {m.metadata.dst_node_id: m for m in outgoing}
        replies = []
        for reply in self._grid.send_and_receive(outgoing, timeout=timeout):
            instruction = by_node.get(reply.metadata.src_node_id)
            problem = None
            if instruction is not None:
                try:
                    problem = reply_problem(reply, instruction, self._shapes)
                except Exception as err:  # noqa: BLE001 - whatever a hostile reply trips on is its problem
                    problem = f"unreadable reply ({type(err).__name__})"
            if problem is not None:
                reply = Message(
                    Error(code=0, reason=f"rejected: malformed_reply: {problem}"), reply_to=instruction
                )
            replies.append(reply)
        return replies
