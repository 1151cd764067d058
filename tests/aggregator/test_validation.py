"""Every device reply is checked before aggregation: a hostile device among honest ones cannot stop a run,
and the model is the one the honest devices alone would have produced."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Error  # noqa: E402
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from aggregator.checkpoint import CheckpointStore  # noqa: E402
from aggregator.validation import RejectedReply, ReplyRules, check_reply, failure_reason  # noqa: E402
from aggregator.workflow import RunFailed  # noqa: E402
from federation.config import FederationConfig  # noqa: E402
from federation.task import declined_text  # noqa: E402
from tests.aggregator.hostile import EXPECTED, SECAGG_HOSTILE, hostile_mod  # noqa: E402
from tests.aggregator.loopback import run_federation  # noqa: E402

SHAPES = [(4, 3), (5,)]
RULES = ReplyRules.for_weights(
    [np.zeros(s, np.float32) for s in SHAPES], max_update_norm=10.0, max_examples=50
)
GLOBAL = [np.zeros(s, np.float32) for s in SHAPES]


def _fit(arrays, n=3, metrics=None) -> FitRes:
    parameters = arrays if isinstance(arrays, Parameters) else ndarrays_to_parameters(arrays)
    return FitRes(Status(Code.OK, ""), parameters, n, {"train_loss": 1.5} if metrics is None else metrics)


def _honest(value: float = 0.1) -> list[np.ndarray]:
    return [np.full(s, value, np.float32) for s in SHAPES]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)  # a pickled object array: refused on load
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (_fit([a.astype(np.int64) for a in _honest()]), "not_float"),
        (_fit([a.astype(np.complex64) for a in _honest()]), "not_float"),
        (_fit(Parameters([b"not an array", _npy(_honest()[1])], "numpy.ndarray")), "bad_array"),
        (_fit(Parameters(["a string", _npy(_honest()[1])], "numpy.ndarray")), "bad_array"),
        (
            _fit(Parameters([_npy(np.array([{"a": 1}] * 12, dtype=object).reshape(4, 3)), b""], "x")),
            "bad_array",
        ),
        (_fit(_honest()[:1]), "wrong_shape"),
        (_fit([np.zeros((3, 4), np.float32), _honest()[1]]), "wrong_shape"),
        (_fit([np.zeros(1_000_000, np.float32), _honest()[1]]), "wrong_shape"),
        (_fit([np.full((4, 3), np.nan, np.float32), _honest()[1]]), "non_finite"),
        (_fit([np.full((4, 3), 1e300), _honest()[1]]), "non_finite"),  # float64: inf once cast to float32
        (_fit([np.full((4, 3), 1e30, np.float32), _honest()[1]]), "too_large"),
        (_fit(_honest(), metrics={"train_loss": "abc"}), "bad_metric"),
        (_fit(_honest(), metrics={"train_loss": float("inf")}), "bad_metric"),
        (_fit(_honest(), metrics={"train_loss": True}), "bad_metric"),
        (_fit(_honest(), metrics={"user": 1.0}), "bad_metric"),
        (_fit(_honest(), n=0), "bad_examples"),
        (_fit(_honest(), n=-3), "bad_examples"),
        (_fit(_honest(), n=2.5), "bad_examples"),
    ],
)
def test_each_malformed_reply_is_rejected_with_its_reason(reply, reason):
    with pytest.raises(RejectedReply) as caught:
        check_reply(reply, RULES, GLOBAL)
    assert caught.value.reason == reason


def test_an_honest_reply_passes_rebuilt_from_what_was_checked():
    honest = _honest()
    checked, norm = check_reply(_fit([a.astype(np.float64) for a in honest], n=7), RULES, GLOBAL)
    assert norm == pytest.approx(np.sqrt(17 * 0.01), rel=1e-6)
    assert checked.num_examples == 7 and checked.metrics == {"train_loss": 1.5}
    from flwr.common import parameters_to_ndarrays

    arrays = parameters_to_ndarrays(checked.parameters)
    assert [a.dtype for a in arrays] == [np.float32, np.float32]  # cast to the global model's dtype


def test_example_counts_are_clamped_or_forced_to_one_under_dp():
    assert check_reply(_fit(_honest(), n=10**12), RULES, GLOBAL)[0].num_examples == 50
    private = ReplyRules.for_weights(GLOBAL, uniform_weight=True)
    assert check_reply(_fit(_honest(), n=10**12), private, GLOBAL)[0].num_examples == 1


def test_failures_are_named_by_their_reason():
    def error(code: int, reason: str) -> Exception:
        return Exception(Error(code=code, reason=reason))

    assert failure_reason(error(0, declined_text("vocab_mismatch", "another vocabulary"))) == "vocab_mismatch"
    assert failure_reason(error(0, declined_text("budget_exhausted", "spent"))) == "budget_exhausted"
    assert failure_reason(error(0, "rib-edge-simulated:dropout")) == "dropout"
    assert failure_reason(error(0, "rejected: malformed_reply: no status")) == "malformed_reply"
    crash = "<class 'ValueError'>:<'item_emb.weight: shape (290, 64) != model's (293, 64)'>"
    assert failure_reason(error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, crash)) == "crash"
    assert failure_reason(error(ErrorCode.NODE_UNAVAILABLE, "gone")) == "unreachable"
    assert (
        failure_reason(error(0, "declined: made_up: x")) == "error"
    )  # only documented reasons count as such


# ---- one hostile device among honest ones, through Flower's real fit workflow and the real ClientApps -----

SMALL = dict(
    item_dim=16, hidden_dim=16, local_steps=1, local_batch_size=8, eval_max_examples=100, eval_every=1000
)
# A representative subset in CI (the full matrix, with DP and SecAgg+: python -m experiments.hostile_fl).
KINDS = (
    "int_arrays",
    "object_bytes",
    "wrong_shape",
    "float64_1e300",
    "huge_norm",
    "metric_string",
    "zero_examples",
    "metric_list",
)


def _fed(population, tmp_path, name: str, rounds: int, **extra) -> FederationConfig:
    settings = {"fraction_fit": 1.0, "min_fit_clients": 3, "min_available_clients": 3, **SMALL, **extra}
    return FederationConfig(
        population_dir=str(population),
        num_server_rounds=rounds,
        checkpoint_dir=str(tmp_path / name),
        **settings,
    )


def test_a_hostile_device_leaves_the_model_of_the_honest_ones(population, tmp_path):
    """Device 0 sends a different malformed reply each round; the run completes and every round's model is
    bit for bit the model of the same run without device 0."""
    rounds = len(KINDS)
    mods = lambda partition: [hostile_mod(lambda r: KINDS[r - 1])] if partition == 0 else []  # noqa: E731
    strategy, history, error = run_federation(_fed(population, tmp_path, "with", rounds), range(4), mods)
    assert error is None, error
    for server_round, kind in enumerate(KINDS, start=1):
        record = strategy.rounds[server_round]
        assert record["failure_reasons"] == {EXPECTED[kind]: 1}, kind
        assert record["accepted"] == 3 and record["trained"]
    _, _, error = run_federation(_fed(population, tmp_path, "without", rounds), range(1, 4))
    assert error is None, error
    with_hostile = CheckpointStore(tmp_path / "with").load(rounds).weights
    without = CheckpointStore(tmp_path / "without").load(rounds).weights
    for a, b in zip(with_hostile, without, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_under_secagg_and_dp_a_hostile_device_cannot_stop_the_run(population, tmp_path):
    kinds = list(SECAGG_HOSTILE)
    fed = _fed(
        population,
        tmp_path,
        "secagg",
        len(kinds),
        secagg=True,
        secagg_num_shares=5,
        secagg_reconstruction_threshold=3,
        dp="user",
        dp_noise_multiplier=0.5,
        min_fit_clients=4,
        min_available_clients=6,
    )
    mods = lambda p: [hostile_mod(lambda r: kinds[r - 1], secagg=True)] if p == 0 else []  # noqa: E731
    strategy, _, error = run_federation(fed, range(6), mods)
    assert error is None, error
    for server_round, kind in enumerate(kinds, start=1):
        record = strategy.rounds[server_round]
        assert record["trained"] and record["accepted"] == 5, kind
        assert record["failure_reasons"] == {
            "bad_metric" if kind == "metric_string" else "malformed_reply": 1
        }


def test_a_round_with_too_few_usable_replies_fails_the_run_and_publishes_nothing(population, tmp_path):
    from edge_client.package import generate_keypair

    private, _ = generate_keypair(tmp_path / "keys")
    fed = _fed(
        population,
        tmp_path,
        "ckpt",
        2,
        min_fit_clients=6,
        min_available_clients=6,
        release_dir=str(tmp_path / "releases"),
        signing_key=str(private),
        metrics_path=str(tmp_path / "metrics.jsonl"),
    )
    # Partitions 6 and 7 hold no store: those devices decline with no_data, leaving 4 usable replies of 6.
    strategy, history, error = run_federation(fed, [0, 1, 2, 3, 6, 7])
    assert isinstance(error, RunFailed)
    assert str(error) == "round 1: 4 usable update(s), min-fit-clients is 6 (failed: no_data 2)"
    assert CheckpointStore(tmp_path / "ckpt").rounds() == [0]  # nothing written for the round that failed
    assert not (tmp_path / "releases").exists()
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["trained"] is False
    assert rows[1]["failure_reasons"] == {"no_data": 2} and rows[1]["participants"] == 4
    assert len(history) == 1  # the checkpointed history holds round 0 only
