"""The strategy stack: reproducible sampling, rejected updates, DP noise calibrated to what arrived."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402

from aggregator.strategy import SeededClientManager, build_strategy  # noqa: E402
from federation.config import FederationConfig  # noqa: E402


class _Proxy:
    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.node_id = int(cid)


def _result(values: list[np.ndarray], n: int = 1):
    return _Proxy("1"), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(values), n, {"train_loss": 1.0})


def _manager(n: int, seed: int) -> SeededClientManager:
    manager = SeededClientManager(seed)
    for i in range(n):
        manager.register(_Proxy(str(100 + i)))
    return manager


def test_sampling_depends_only_on_seed_and_round():
    a, b = _manager(20, seed=1), _manager(20, seed=1)
    a.round = b.round = 4
    assert [p.cid for p in a.sample(5)] == [p.cid for p in b.sample(5)]
    b.round = 5
    assert [p.cid for p in a.sample(5)] != [p.cid for p in b.sample(5)]


def test_non_finite_updates_are_rejected_and_counted():
    zero = [np.zeros(3, np.float32)]
    strategy = build_strategy(FederationConfig(min_fit_clients=1), zero, None, population=10)
    good = _result([np.ones(3, np.float32)])
    bad = _result([np.array([1.0, np.nan, 1.0], np.float32)])
    parameters, _ = strategy.aggregate_fit(1, [good, bad], [RuntimeError("dropped")])
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], np.ones(3))
    record = strategy.rounds[1]
    assert (record["results"], record["failures"], record["accepted"], record["rejected"]) == (2, 1, 1, 1)
    assert record["failure_reasons"] == {"error": 1, "non_finite": 1} and record["trained"]


def test_only_bad_updates_leave_the_model_unchanged_and_the_round_untrained():
    strategy = build_strategy(
        FederationConfig(min_fit_clients=1), [np.zeros(2, np.float32)], None, population=10
    )
    parameters, _ = strategy.aggregate_fit(1, [_result([np.array([np.inf, 0], np.float32)])], [])
    assert parameters is None
    assert not strategy.rounds[1]["trained"] and "0 usable update(s)" in strategy.rounds[1]["failed"]


def test_fewer_usable_replies_than_min_fit_clients_fail_the_round():
    strategy = build_strategy(
        FederationConfig(min_fit_clients=3), [np.zeros(2, np.float32)], None, population=10
    )
    declined = [RuntimeError("Error(code=0, reason='declined: vocab_mismatch: another vocabulary')")] * 2
    parameters, _ = strategy.aggregate_fit(1, [_result([np.ones(2, np.float32)])], declined)
    assert parameters is None
    record = strategy.rounds[1]
    assert not record["trained"] and record["failure_reasons"] == {"vocab_mismatch": 2}
    assert "1 usable update(s), min-fit-clients is 3 (failed: vocab_mismatch 2)" == record["failed"]


def test_dp_noise_is_calibrated_to_the_updates_that_arrived():
    fed = FederationConfig(dp="user", dp_noise_multiplier=1.0, dp_clipping_norm=2.0, fraction_fit=0.5)
    strategy = build_strategy(fed, [np.zeros(50_000, np.float32)], None, population=20)
    results = [_result([np.zeros(50_000, np.float32)]) for _ in range(4)]
    parameters, _ = strategy.aggregate_fit(1, results, [RuntimeError("dropout")] * 6)
    noise = parameters_to_ndarrays(parameters)[0]
    # 4 of 10 sampled devices replied: std = sigma * C / 4, not / 10 (and the round is not dropped).
    assert strategy.rounds[1]["dp_noise_std"] == pytest.approx(0.5)
    assert noise.std() == pytest.approx(0.5, rel=0.05)


def test_an_update_beyond_max_update_norm_is_dropped_and_counted():
    fed = FederationConfig(max_update_norm=1.0, min_fit_clients=1)
    strategy = build_strategy(fed, [np.zeros(4, np.float32)], None, population=10)
    manager = _manager(3, seed=0)
    strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(4, np.float32)]), manager)
    honest = _result([np.full(4, 0.1, np.float32)])
    attacker = _result([np.full(4, 1e6, np.float32)])
    parameters, _ = strategy.aggregate_fit(1, [honest, attacker], [])
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], 0.1, rtol=1e-6)
    assert strategy.rounds[1]["failure_reasons"] == {"too_large": 1}
    assert strategy.rounds[1]["update_norm_max"] == pytest.approx(0.2)


def test_the_default_bounds_a_1e30_update():
    assert 0 < FederationConfig().max_update_norm < 1e6
    strategy = build_strategy(
        FederationConfig(min_fit_clients=1), [np.zeros(4, np.float32)], None, population=10
    )
    strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(4, np.float32)]), _manager(3, seed=0))
    parameters, _ = strategy.aggregate_fit(
        1, [_result([np.full(4, 0.1, np.float32)]), _result([np.full(4, 1e30, np.float32)])], []
    )
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], 0.1, rtol=1e-6)


def test_under_dp_a_large_update_is_clipped_to_the_clipping_norm():
    fed = FederationConfig(dp="user", dp_noise_multiplier=1e-9, dp_clipping_norm=1.0, min_fit_clients=1)
    strategy = build_strategy(fed, [np.zeros(4, np.float32)], None, population=10)
    strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(4, np.float32)]), _manager(3, seed=0))
    honest = _result([np.full(4, 0.1, np.float32)])
    large = _result([np.full(4, 10.0, np.float32)])  # norm 20: within max-update-norm, beyond the DP clip
    parameters, _ = strategy.aggregate_fit(1, [honest, large], [])
    assert strategy.rounds[1]["clipped"] == 1
    # The large update counts with norm 1 (0.5 per entry), not 20.
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], (0.1 + 0.5) / 2, rtol=1e-5)


def test_under_dp_the_clipping_norm_is_enforced_without_secagg():
    fed = FederationConfig(dp="user", dp_noise_multiplier=0.5, dp_clipping_norm=0.25)
    assert build_strategy(fed, [np.zeros(2, np.float32)], None, population=10).max_update_norm == 0.25
    with_secagg = FederationConfig(dp="user", dp_noise_multiplier=0.5, secagg=True)
    assert build_strategy(with_secagg, [np.zeros(2, np.float32)], None, population=10).max_update_norm == 0.0


def test_fedadam_under_dp_steps_on_the_noised_average():
    """FedAdam after the DP wrapper: the noise is calibrated to the plain average, Adam post-processes it."""
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg

    start = [np.zeros(40_000, np.float32)]
    fed = FederationConfig(
        dp="user",
        dp_noise_multiplier=1.0,
        dp_clipping_norm=1.0,
        strategy="fedadam",
        server_lr=0.1,
        server_tau=1e-9,
        fraction_fit=1.0,
    )
    strategy = build_strategy(fed, start, None, population=4)
    assert isinstance(strategy.dp_wrapper, DifferentialPrivacyClientSideFixedClipping)
    assert type(strategy.dp_wrapper.strategy) is FedAvg and isinstance(strategy.post_adam, FedAdam)
    updates = [np.full(40_000, 1e-3 * (k + 1), np.float32) for k in range(4)]  # mean 2.5e-3, noise std 0.25
    parameters, _ = strategy.aggregate_fit(1, [_result([u]) for u in updates], [])
    stepped = parameters_to_ndarrays(parameters)[0]
    assert strategy.rounds[1]["dp_noise_std"] == pytest.approx(0.25)
    # Adam's first step is eta_norm * sign(delta) wherever |delta| >> tau: every entry moves by the same
    # amount, whatever the noise drew; the noised average itself would spread with std 0.25.
    eta_norm = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(np.abs(stepped), eta_norm, rtol=0.02)
    assert 0.4 < (stepped > 0).mean() < 0.6  # the noise dominates the tiny mean update, as calibrated
    state = strategy.optimizer_state()
    np.testing.assert_array_equal(state["current_weights"][0], stepped)
    assert set(state) == {"current_weights", "m_t", "v_t"}


def test_frozen_arrays_leave_a_dp_fedadam_round_exactly_as_they_came():
    """A frozen public table: the DP wrapper noises every array and FedAdam would walk on it; it must not move."""
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    start = [table, np.zeros(5, np.float32), table]  # a tied copy of the table appears twice
    fed = FederationConfig(
        dp="user", dp_noise_multiplier=1.0, dp_clipping_norm=1.0, strategy="fedadam", fraction_fit=1.0
    )
    strategy = build_strategy(fed, start, None, population=3)
    strategy.frozen = {0: table.copy(), 2: table.copy()}
    for server_round in (1, 2):
        updates = [[table, np.full(5, 0.01 * k, np.float32), table] for k in range(3)]
        parameters, _ = strategy.aggregate_fit(server_round, [_result(u) for u in updates], [])
        arrays = parameters_to_ndarrays(parameters)
        np.testing.assert_array_equal(arrays[0], table)
        np.testing.assert_array_equal(arrays[2], table)
        assert np.abs(arrays[1]).max() > 0  # the trainable array did move
        np.testing.assert_array_equal(strategy.post_adam.current_weights[0], table)
