"""Privacy accounting: Opacus' RDP epsilon cross-checked against dp_accounting and closed forms; the
federated (user-level) accountant."""

from __future__ import annotations

import itertools
import json
import logging
import math
import warnings

import numpy as np
import pytest

from privacy.accountant import (
    ORDERS,
    FederatedAccountant,
    epsilon_for,
    epsilon_of,
    noise_for_epsilon,
    rdp_of,
)

# Opacus warns when the best RDP order sits at the edge of its grid (tiny epsilons): valid, looser bounds.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order")

# The regime DP training runs in. dp_accounting drops low fractional orders whose series it cannot converge
# for low noise at high sampling rates over many steps (e.g. sigma <= 2, q = 0.2, 1000 steps), so its
# epsilon is then looser than Opacus' (see test_opacus_rdp_matches_numerical_integration); those corners
# are left out of the 1% comparison.
GRID = [
    *itertools.product([0.8, 1.0, 2.0, 4.0], [0.001, 0.01, 0.05], [10, 100, 1000], [1e-5, 1e-6]),
    *itertools.product([1.0, 2.0], [0.2], [10, 100], [1e-5]),
]


@pytest.mark.parametrize("sigma,q,steps,delta", GRID[::3])  # every third point keeps the test fast
def test_epsilon_matches_dp_accounting(sigma, q, steps, delta, caplog):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    caplog.set_level(logging.ERROR)  # dp_accounting logs its series' convergence on the root logger
    reference = RdpAccountant(orders=list(ORDERS))  # same orders: compares the RDP curves and the conversion
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    expected = reference.get_epsilon(delta)
    assert epsilon_for(sigma, q, steps, delta) == pytest.approx(expected, rel=0.01)


def test_opacus_rdp_matches_numerical_integration():
    """Low noise, high sampling rate: Opacus' RDP at fractional orders equals the SGM integral."""
    sigma, q = 0.5, 0.3
    z = np.linspace(-12 * sigma, 12 * sigma + 1, 400_001)
    density = np.exp(-(z**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    ratio = (1 - q) + q * np.exp((2 * z - 1) / (2 * sigma**2))  # mixture / base Gaussian
    curve = rdp_of([(sigma, q, 1)])
    for order in (1.1, 1.5, 2.5, 4.0):
        a = np.trapezoid(density * ratio**order, z)
        assert curve[ORDERS.index(order)] == pytest.approx(math.log(a) / (order - 1), rel=1e-6)


def test_full_batch_is_the_gaussian_mechanism():
    """q = 1: RDP(alpha) = steps * alpha / (2 sigma^2); epsilon = min over the orders of the conversion."""
    sigma, steps, delta = 3.0, 20, 1e-5
    alphas = np.array(ORDERS)
    rdp = steps * alphas / (2 * sigma**2)
    eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    assert epsilon_for(sigma, 1.0, steps, delta) == pytest.approx(float(eps.min()), rel=1e-9)


def test_epsilon_is_monotone_and_has_the_edge_cases():
    base = epsilon_for(1.0, 0.01, 100, 1e-5)
    assert epsilon_for(1.0, 0.01, 200, 1e-5) > base  # more steps
    assert epsilon_for(2.0, 0.01, 100, 1e-5) < base  # more noise
    assert epsilon_for(1.0, 0.02, 100, 1e-5) > base  # higher sampling rate
    assert epsilon_for(1.0, 0.01, 100, 1e-3) < base  # weaker delta
    assert epsilon_for(1.0, 0.01, 0, 1e-5) == 0.0
    assert epsilon_for(0.0, 0.01, 10, 1e-5) == math.inf


@pytest.mark.parametrize(
    "args",
    [
        (-1.0, 0.1, 1, 1e-5),
        (1.0, 0.0, 1, 1e-5),
        (1.0, 1.5, 1, 1e-5),
        (1.0, 0.1, -1, 1e-5),
        (1.0, 0.1, 1.5, 1e-5),
        (1.0, 0.1, 1, 0.0),
        (1.0, 0.1, 1, 1.0),
        (math.nan, 0.1, 1, 1e-5),
        (math.inf, 0.1, 1, 1e-5),
    ],
)
def test_bad_parameters_are_refused(args):
    with pytest.raises(ValueError):
        epsilon_for(*args)


def test_noise_for_epsilon_reaches_the_target_from_below():
    q, steps, delta = 0.05, 200, 1e-5
    for target in (0.5, 2.0, 8.0):
        sigma = noise_for_epsilon(target, q, steps, delta)
        achieved = epsilon_for(sigma, q, steps, delta)
        assert target - 0.02 <= achieved <= target
    with pytest.raises(ValueError):
        noise_for_epsilon(0.0, q, steps, delta)
    with pytest.raises(ValueError):
        noise_for_epsilon(1.0, q, 0, delta)


def test_composition_is_rdp_not_a_sum():
    a, b = (1.0, 0.05, 100), (2.0, 0.1, 50)
    delta = 1e-5
    both = epsilon_of([a, b], delta)
    ea, eb = epsilon_for(*a, delta), epsilon_for(*b, delta)
    assert max(ea, eb) < both < ea + eb
    assert epsilon_of([a, a], delta) == pytest.approx(epsilon_for(1.0, 0.05, 200, delta), rel=1e-12)
    assert epsilon_of([], delta) == 0.0
    assert epsilon_of([a, (0.0, 0.1, 1)], delta) == math.inf


# ---- federated (user-level) ---------------------------------------------------------------------------
def test_federated_accountant_tracks_rounds():
    acc = FederatedAccountant(noise_multiplier=1.1, sample_rate=20 / 1000, population=1000)
    assert acc.delta == pytest.approx(1e-3) and acc.epsilon() == 0.0
    acc.step()
    acc.step(rounds=49)
    assert acc.rounds == 50
    assert acc.epsilon() == pytest.approx(epsilon_for(1.1, 0.02, 50, 1e-3), rel=1e-9)
    assert acc.epsilon(delta=1e-6) > acc.epsilon()
    curve = acc.per_round()
    assert [r for r, _ in curve] == list(range(1, 51))
    eps = [e for _, e in curve]
    assert all(x < y for x, y in zip(eps, eps[1:], strict=False)) and eps[-1] == pytest.approx(acc.epsilon())
    with pytest.raises(ValueError):
        acc.step(-1)


def test_federated_accountant_state_round_trips_through_json():
    acc = FederatedAccountant(noise_multiplier=0.9, sample_rate=0.1, delta=1e-5)
    acc.step(7)
    restored = FederatedAccountant.from_state(json.loads(json.dumps(acc.state())))
    assert restored.rounds == 7 and restored.epsilon() == acc.epsilon() and restored.delta == 1e-5
    restored.step()
    assert restored.epsilon() > acc.epsilon()
    for bad in (
        {},
        {"format": 99},
        {**acc.state(), "sample_rate": 2.0},
        {k: v for k, v in acc.state().items() if k != "rounds"},
    ):
        with pytest.raises(ValueError):
            FederatedAccountant.from_state(bad)


def test_federated_accountant_validation():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FederatedAccountant(0.0, 0.1, delta=1e-5, rounds=1).epsilon() == math.inf
    for kwargs in (
        dict(noise_multiplier=1.0, sample_rate=0.1),  # no delta and no population
        dict(noise_multiplier=-1.0, sample_rate=0.1, delta=1e-5),
        dict(noise_multiplier=1.0, sample_rate=0.0, delta=1e-5),
        dict(noise_multiplier=1.0, sample_rate=1.1, delta=1e-5),
        dict(noise_multiplier=1.0, sample_rate=0.1, population=1),
        dict(noise_multiplier=1.0, sample_rate=0.1, delta=2.0),
    ):
        with pytest.raises(ValueError):
            FederatedAccountant(**kwargs)
