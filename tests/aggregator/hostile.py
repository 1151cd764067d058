"""Malformed training replies, as one hostile device would send them (shared by tests and experiments).

Each entry of ``HOSTILE`` rewrites an honest device's reply message into one malformed reply type, at the
level the wire allows: arrays that are not float, bytes that are not arrays, wrong shapes, NaN / inf, a
float64 1e300, a 1e30 update, non-numeric or unknown metrics, example counts of 0 or below, records missing
or of the wrong kind. ``EXPECTED`` is the reason the server must count it under. ``hostile_mod`` is an
outermost client mod that applies a kind (chosen per round) to one device's replies; under SecAgg+ it rewrites
the masked-vector stage's reply instead (``SECAGG_HOSTILE``).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

PARAMS, EXAMPLES, METRICS, STATUS = (
    "fitres.parameters",
    "fitres.num_examples",
    "fitres.metrics",
    "fitres.status",
)


def _copy(content: RecordDict) -> RecordDict:
    out = RecordDict()
    for name, record in content.array_records.items():
        out.array_records[name] = ArrayRecord({k: v for k, v in record.items()})
    for name, record in content.metric_records.items():
        out.metric_records[name] = MetricRecord(dict(record))
    for name, record in content.config_records.items():
        out.config_records[name] = ConfigRecord(dict(record))
    return out


def _arrays(content: RecordDict) -> list[np.ndarray]:
    return [a.numpy() for a in content.array_records[PARAMS].values()]


def _with_arrays(content: RecordDict, arrays: list[np.ndarray | Array]) -> RecordDict:
    content.array_records[PARAMS] = ArrayRecord(
        {str(i): a if isinstance(a, Array) else Array(np.asarray(a)) for i, a in enumerate(arrays)}
    )
    return content


def _metric(content: RecordDict, key: str, value: object) -> RecordDict:
    metrics = dict(content.config_records[METRICS])
    metrics[key] = value
    content.config_records[METRICS] = ConfigRecord(metrics)
    return content


def _examples(content: RecordDict, n: int) -> RecordDict:
    content.metric_records[EXAMPLES] = MetricRecord({"num_examples": n})
    return content


def _drop(content: RecordDict, kind: str, name: str) -> RecordDict:
    del getattr(content, kind)[name]
    return content


def _garbage(arrays: list[np.ndarray]) -> list[Array]:
    return [
        Array(dtype="float32", shape=a.shape, stype="numpy.ndarray", data=b"\x93NUMPY garbage")
        for a in arrays
    ]


# kind -> rewrite of an honest reply's content (a copy)
HOSTILE: dict[str, Callable[[RecordDict], RecordDict]] = {
    "int_arrays": lambda c: _with_arrays(c, [a.astype(np.int32) for a in _arrays(c)]),
    "object_bytes": lambda c: _with_arrays(c, _garbage(_arrays(c))),
    "wrong_shape": lambda c: _with_arrays(c, [np.zeros((3, 3), np.float32)] + _arrays(c)[1:]),
    "missing_array": lambda c: _with_arrays(c, _arrays(c)[:-1]),
    "nan": lambda c: _with_arrays(c, [np.full_like(a, np.nan) for a in _arrays(c)]),
    "inf": lambda c: _with_arrays(c, [np.full_like(a, np.inf) for a in _arrays(c)]),
    "float64_1e300": lambda c: _with_arrays(c, [np.full(a.shape, 1e300, np.float64) for a in _arrays(c)]),
    "huge_norm": lambda c: _with_arrays(c, [a + np.float32(1e30) for a in _arrays(c)]),
    "metric_string": lambda c: _metric(c, "train_loss", "abc"),
    "metric_nan": lambda c: _metric(c, "train_loss", float("nan")),
    "metric_unknown": lambda c: _metric(c, "session_id", 12345),
    "zero_examples": lambda c: _examples(c, 0),
    "negative_examples": lambda c: _examples(c, -7),
    "no_parameters": lambda c: _drop(c, "array_records", PARAMS),
    "metric_list": lambda c: _metric(c, "train_loss", [1.0, 2.0]),
    "no_status": lambda c: _drop(c, "config_records", STATUS),
}
EXPECTED = {
    "int_arrays": "not_float",
    "object_bytes": "bad_array",
    "wrong_shape": "wrong_shape",
    "missing_array": "wrong_shape",
    "nan": "non_finite",
    "inf": "non_finite",
    "float64_1e300": "non_finite",
    "huge_norm": "too_large",
    "metric_string": "bad_metric",
    "metric_nan": "bad_metric",
    "metric_unknown": "bad_metric",
    "zero_examples": "bad_examples",
    "negative_examples": "bad_examples",
    "no_parameters": "malformed_reply",
    "metric_list": "malformed_reply",
    "no_status": "malformed_reply",
}


def _masked(content: RecordDict, rewrite: Callable[[list[bytes]], list[bytes]]) -> RecordDict:
    configs = dict(content.config_records[RECORD_KEY_CONFIGS])
    configs[Key.MASKED_PARAMETERS] = rewrite(list(configs[Key.MASKED_PARAMETERS]))
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
    return content


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# Under SecAgg+ the server never sees a device's weights: what a hostile device controls is its masked vectors
# and the scalars beside them.
SECAGG_HOSTILE: dict[str, Callable[[RecordDict], RecordDict]] = {
    "metric_string": lambda c: _metric(c, "train_loss", "abc"),
    "masked_garbage": lambda c: _masked(c, lambda blobs: [b"not an array"] * len(blobs)),
    "masked_wrong_shape": lambda c: _masked(
        c, lambda blobs: [blobs[0], _npy(np.zeros(5, np.int64)), *blobs[2:]]
    ),
    "masked_floats": lambda c: _masked(
        c, lambda blobs: [_npy(np.load(io.BytesIO(b)).astype(np.float64)) for b in blobs]
    ),
}


def hostile_mod(kind_for_round: Callable[[int], str | None], secagg: bool = False):
    """A client mod rewriting this device's training reply as ``kind_for_round(round)`` (None: honest)."""
    table = SECAGG_HOSTILE if secagg else HOSTILE

    def mod(msg: Message, ctxt, call_next):
        training = msg.metadata.message_type == MessageType.TRAIN
        if training and secagg:  # read before SecAgg+'s mod, which pops the stage from the message
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            training = configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
        out = call_next(msg, ctxt)
        if not training or out.has_error():
            return out
        kind = kind_for_round(int(msg.metadata.group_id or 0))
        if kind is None:
            return out
        return Message(table[kind](_copy(out.content)), reply_to=msg)

    return mod
