"""Heterogeneity knobs: the rates match the knobs, and every draw is a pure function of its key."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.heterogeneity import Heterogeneity, hash_uniform

DEVICES = np.arange(20_000)


def test_hash_uniform_is_uniform_and_keyed():
    u = hash_uniform(7, 1, DEVICES, 3)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 1800  # no empty or thin decile
    assert np.array_equal(u, hash_uniform(7, 1, DEVICES, 3))
    # Any key component changes the draws.
    for other in (
        hash_uniform(8, 1, DEVICES, 3),
        hash_uniform(7, 2, DEVICES, 3),
        hash_uniform(7, 1, DEVICES, 4),
    ):
        assert abs(np.corrcoef(u, other)[0, 1]) < 0.05
    with pytest.raises(ValueError):
        hash_uniform(0, 1, [-1], 0)


def test_dropout_rate_and_determinism():
    het = Heterogeneity(dropout=0.3, seed=11)
    rates = [het.dropouts(DEVICES, r).mean() for r in range(1, 6)]
    assert all(abs(rate - 0.3) < 0.015 for rate in rates)
    # Scalar and vector forms agree; a fresh object with the same knobs agrees; call order is irrelevant.
    again = Heterogeneity(dropout=0.3, seed=11)
    picks = [(d, r) for d in (0, 5, 999, 12_345) for r in (1, 2, 50)]
    assert [het.drops_out(d, r) for d, r in picks] == [again.drops_out(d, r) for d, r in reversed(picks)][
        ::-1
    ]
    assert [het.drops_out(d, 2) for d in range(50)] == het.dropouts(np.arange(50), 2).tolist()
    # A device does not drop out of every round: draws are independent across rounds.
    per_round = np.array([het.drops_out(42, r) for r in range(2000)])
    assert abs(per_round.mean() - 0.3) < 0.04
    assert (
        Heterogeneity(dropout=0.3, seed=12).dropouts(DEVICES, 1).tolist() != het.dropouts(DEVICES, 1).tolist()
    )


def test_always_available_and_diurnal_rate():
    assert Heterogeneity().online(DEVICES, 5).all()
    assert Heterogeneity(availability="always").availability is None
    het = Heterogeneity(availability="diurnal", online_hours=6.0, rounds_per_day=24, seed=3)
    shares = np.array([het.online(DEVICES, r).mean() for r in range(24)])
    assert np.all(np.abs(shares - 0.25) < 0.02)  # 6 of 24 hours, at every hour of the day
    # One device: online exactly 6 consecutive hours (rounds) per day, the same hours every day.
    device = np.array([het.is_online(17, r) for r in range(48)])
    assert device.sum() == 12
    assert np.array_equal(device[:24], device[24:])
    assert (
        np.count_nonzero(np.diff(np.r_[device[:24], device[:24]].astype(int)) == 1) == 1
    )  # one window a day


def test_stragglers_and_deadline():
    het = Heterogeneity(straggler_fraction=0.2, straggler_delay_s=10.0, deadline_s=12.0, seed=5)
    slow = het.stragglers(DEVICES)
    assert abs(slow.mean() - 0.2) < 0.015
    delays = het.delays_s(DEVICES, 4)
    assert np.all(delays[~slow] == 0)
    assert np.all((delays[slow] >= 5.0) & (delays[slow] < 15.0))
    assert abs(delays[slow].mean() - 10.0) < 0.2
    # Late: compute + delay over the deadline. Delay uniform in [5, 15): with 0 compute, 30 % of stragglers.
    late = het.late(DEVICES, 4)
    assert not late[~slow].any()
    assert abs(late[slow].mean() - 0.3) < 0.04
    assert het.late(DEVICES, 4, compute_s=13.0).all()
    assert het.misses_deadline(1, 4, compute_s=0.0) == bool(late[1])
    assert het.delay_s(1, 4) == delays[1]
    assert (
        not Heterogeneity(straggler_fraction=1.0, straggler_delay_s=99.0).late(DEVICES, 1).any()
    )  # no deadline


def test_volume_weights_follow_a_zipf_law():
    assert Heterogeneity().session_budget(3) is None
    het = Heterogeneity(volume_skew=1.0, seed=2, volume_base_sessions=2, volume_max_sessions=10**6)
    weights = np.sort(het.volume_weights(DEVICES))[::-1]
    assert weights.min() >= 1.0
    # Rank-size slope on log-log over the body of the distribution is about -1.
    ranks = np.arange(1, len(weights) + 1)
    body = slice(10, 5000)
    slope = np.polyfit(np.log(ranks[body]), np.log(weights[body]), 1)[0]
    assert -1.15 < slope < -0.85
    budgets = [het.session_budget(d) for d in range(2000)]
    assert min(budgets) >= 2 and max(budgets) > 50
    capped = Heterogeneity(volume_skew=2.0, volume_max_sessions=40)
    assert max(capped.session_budget(d) for d in range(2000)) == 40


def test_sampling_picks_online_devices_deterministically():
    het = Heterogeneity(availability="diurnal", online_hours=8.0, seed=9)
    picked = het.sample(10_000, 0.05, round_=7)
    online = het.online(np.arange(10_000), 7)
    assert online[picked].all()
    assert len(picked) == int(np.ceil(0.05 * online.sum()))
    assert np.array_equal(picked, het.sample(10_000, 0.05, round_=7))
    assert not np.array_equal(picked, het.sample(10_000, 0.05, round_=8))
    assert len(Heterogeneity().sample(5, 0.01, 1, min_devices=3)) == 3
    assert len(Heterogeneity().sample(0, 0.5, 1)) == 0


def test_plan_round_partitions_the_sampled_devices():
    het = Heterogeneity(
        dropout=0.2,
        availability="diurnal",
        online_hours=12,
        straggler_fraction=0.3,
        straggler_delay_s=20,
        deadline_s=25,
        seed=4,
    )
    sampled = np.arange(0, 20_000, 3)
    plan = het.plan_round(sampled, 5, compute_s=10.0)
    parts = [plan.participants, plan.offline, plan.dropped, plan.late]
    assert sum(len(p) for p in parts) == len(sampled)
    assert np.array_equal(np.sort(np.concatenate(parts)), sampled)
    assert abs(len(plan.offline) / len(sampled) - 0.5) < 0.03
    online = len(sampled) - len(plan.offline)
    assert abs(len(plan.dropped) / online - 0.2) < 0.03
    counts = plan.to_dict()
    assert counts["participants"] == len(plan.participants) and counts["dropouts"] == len(plan.dropped)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dropout": 1.5},
        {"straggler_fraction": -0.1},
        {"availability": "weekends"},
        {"deadline_s": 0},
        {"volume_skew": -1},
        {"online_hours": 0},
        {"seed": -3},
    ],
)
def test_bad_knobs_are_refused(kwargs):
    with pytest.raises(ValueError):
        Heterogeneity(**kwargs)


def test_from_settings_ignores_other_keys():
    het = Heterogeneity.from_settings({"dropout": 0.1, "rounds": 50, "availability": "always", "seed": 4})
    assert het == Heterogeneity(dropout=0.1, seed=4)
    assert Heterogeneity.from_settings(het.to_dict()) == het
