"""Fuzzing the server with device replies: one generated reply among three honest ones, through Flower's own fit
workflow, the ``CheckedGrid`` and the strategy's checks (``aggregator/validation.py``).

Each case builds a training reply record by record (array records of random dtypes, shapes, values or bytes;
example counts and metrics of any type Flower's records carry; a status; any record may be missing) and runs
one round of ``default_fit_workflow`` with the real strategy stack. Property: nothing raises; the generated
reply is either used (then its update is finite, of the model's shapes and within ``max-update-norm``) or
counted under exactly one documented reason; the round's model is finite; all within a memory bound.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server import LegacyContext, ServerConfig  # noqa: E402
from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: E402
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key  # noqa: E402
from flwr.server.workflow.default_workflows import default_fit_workflow  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from aggregator.strategy import SeededClientManager, build_strategy  # noqa: E402
from aggregator.validation import REJECT_REASONS, CheckedGrid, update_norm  # noqa: E402
from federation.config import FederationConfig  # noqa: E402
from tests.fuzzing import FuzzSurface, context_fixture, fuzz_settings, run_bounded  # noqa: E402

SHAPES = [(6, 4), (4,), (3, 2, 2)]
HONEST = (1, 2, 3)
HOSTILE = 4
MAX_NORM = 5.0
LIMIT = 64 << 20  # bytes traced per case: the model is tiny, whatever the reply claims


class _Grid:
    """Answers each training message: honest nodes with global + a small step, node 4 with the case's reply."""

    def __init__(self) -> None:
        self.reply: RecordDict | None = None
        self.run = type("Run", (), {"run_id": 11})()

    def get_node_ids(self) -> list[int]:
        return [*HONEST, HOSTILE]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"
            message.metadata.__dict__["_src_node_id"] = 1
            node = message.metadata.dst_node_id
            if node == HOSTILE:
                replies.append(Message(self.reply, reply_to=message))
                continue
            fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
            weights = [w + np.float32(0.01 * node) for w in parameters_to_ndarrays(fitins.parameters)]
            res = compat.fitres_to_recorddict(_fitres(weights, 10 * node), keep_input=True)
            replies.append(Message(res, reply_to=message))
        return replies


def _fitres(weights: list[np.ndarray], n: int) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), n, {"train_loss": 1.0})


@dataclass
class ReplyFixture:
    grid: _Grid
    start: list[np.ndarray]


@contextlib.contextmanager
def reply_context(tmp: Path) -> Iterator[ReplyFixture]:
    """A tiny global model and a grid of three honest devices and one fuzzed one."""
    rng = np.random.default_rng(0)
    start = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 11, 1
    try:
        yield ReplyFixture(_Grid(), start)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
SHAPE = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)
DTYPE = st.sampled_from(["float32", "float64", "float16", "int32", "int64", "bool", "complex64", "uint8"])
# One array of the reply: a well-formed model array with chosen values, an array of any dtype and shape, an
# .npy header claiming more than it holds, or plain bytes.
ARRAY = st.one_of(
    st.tuples(st.just("model"), st.integers(0, len(SHAPES) - 1), FLOATS, DTYPE),
    st.tuples(st.just("any"), SHAPE, DTYPE, FLOATS),
    st.tuples(st.just("truncated"), st.integers(0, len(SHAPES) - 1), st.integers(0, 40)),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
)
SCALAR = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    FLOATS,
    st.booleans(),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.lists(st.integers(-5, 5), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3),
)
METRIC_KEY = st.sampled_from(
    ["train_loss", "examples", "steps", "seconds", "device_epsilon", "record_dp"]
) | st.text(max_size=10)


def _mostly(strategy: st.SearchStrategy, usual: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` (what an honest reply has) 3 times in 4, else ``strategy`` or a missing record."""
    return st.tuples(st.integers(0, 7), usual, strategy).map(
        lambda t: t[1] if t[0] < 6 else (None if t[0] == 6 else t[2])
    )


CASES = st.fixed_dictionaries(
    {
        "arrays": st.one_of(st.lists(ARRAY, max_size=5), st.just("honest")),
        "num_examples": _mostly(st.one_of(st.integers(-(2**63), 2**63 - 1), FLOATS), st.integers(1, 100)),
        "metrics": _mostly(
            st.dictionaries(METRIC_KEY, SCALAR, max_size=4),
            st.dictionaries(st.sampled_from(["train_loss", "steps"]), st.floats(0, 10), max_size=2),
        ),
        "status": _mostly(st.tuples(st.integers(-3, 5), st.text(max_size=8)), st.just((0, ""))),
    }
)


def _array(spec, start) -> Array:
    kind = spec[0]
    if kind == "model":
        _, index, value, dtype = spec
        with np.errstate(all="ignore"):
            return Array(np.full(SHAPES[index], value).astype(dtype))
    if kind == "any":
        _, shape, dtype, value = spec
        with np.errstate(all="ignore"):
            return Array(np.full(shape, value).astype(dtype))
    if kind == "truncated":
        _, index, cut = spec
        blob = _npy(start[index])
        return Array(
            dtype="float32", shape=SHAPES[index], stype="numpy.ndarray", data=blob[: max(0, len(blob) - cut)]
        )
    return Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=spec[1])


def build_reply(case: dict, start: list[np.ndarray]) -> RecordDict | None:
    """The case as a reply's records, or None when Flower's records refuse to carry it (it cannot be sent)."""
    content = RecordDict()
    try:
        if case["arrays"] == "honest":
            content.array_records["fitres.parameters"] = ArrayRecord(
                {str(i): Array(w + np.float32(0.02)) for i, w in enumerate(start)}
            )
        elif case["arrays"] is not None:
            arrays = {str(i): _array(spec, start) for i, spec in enumerate(case["arrays"])}
            content.array_records["fitres.parameters"] = ArrayRecord(arrays)
        if case["num_examples"] is not None:
            content.metric_records["fitres.num_examples"] = MetricRecord(
                {"num_examples": case["num_examples"]}
            )
        if case["metrics"] is not None:
            content.config_records["fitres.metrics"] = ConfigRecord(case["metrics"])
        if case["status"] is not None:
            code, message = case["status"]
            content.config_records["fitres.status"] = ConfigRecord({"code": code, "message": message})
    except (TypeError, ValueError, OverflowError):
        return None
    return content


def check_reply_case(fx: ReplyFixture, case: dict) -> str:
    """One round with the case's reply beside three honest ones: used, or dropped under one documented reason."""
    reply = build_reply(case, fx.start)
    if reply is None:
        return "unsendable"
    fed = FederationConfig(
        min_fit_clients=3, min_available_clients=4, fraction_fit=1.0, max_update_norm=MAX_NORM
    )
    strategy = build_strategy(fed, fx.start, None, population=4)
    manager = SeededClientManager(0)
    for node in fx.grid.get_node_ids():
        manager.register(GridClientProxy(node, fx.grid, 11))
    context = LegacyContext(
        context=Context(11, 1, {}, RecordDict(), {}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=manager,
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(fx.start), True
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    fx.grid.reply = reply
    grid = CheckedGrid(fx.grid, SHAPES)
    run_bounded(lambda: default_fit_workflow(grid, context), LIMIT, ())
    record = strategy.rounds[1]
    assert record["trained"], f"three honest replies did not train the round: {record.get('failed')}"
    model = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    )
    assert [a.shape for a in model] == SHAPES and all(np.isfinite(a).all() for a in model)
    reasons = record["failure_reasons"]
    if record["accepted"] == 4:
        assert not reasons
        assert update_norm(model, fx.start) <= MAX_NORM + 1e-3 and math.isfinite(record["update_norm_max"])
        return "accepted"
    assert record["accepted"] == 3 and sum(reasons.values()) == 1, record
    (reason,) = reasons
    assert reason in REJECT_REASONS or reason == "error", reason  # "error": a reply whose status is not OK
    return reason


SURFACES = (
    FuzzSurface(
        "federated_reply",
        "one generated training reply among three honest ones, through Flower's fit workflow and the checks",
        CASES,
        reply_context,
        check_reply_case,
    ),
)

fuzz_replies = context_fixture(reply_context, "fuzz-replies")


@fuzz_settings()
@given(case=CASES)
def test_fuzz_federated_replies(fuzz_replies, case):
    check_reply_case(fuzz_replies, case)


def test_an_honest_reply_is_used(fuzz_replies):
    case = {"arrays": "honest", "num_examples": 5, "metrics": {"train_loss": 0.5}, "status": (0, "")}
    assert check_reply_case(fuzz_replies, case) == "accepted"
