"""Record-level DP-SGD: the GRU swap, per-window clipping and noise exactly as promised, accounting,
Poisson corner cases, the grad_sample_mode fallback, and the model left in its plain layout."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from opacus.layers import DPGRU
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from model.data.open import synthetic_split
from model.data.synthetic import SyntheticConfig
from model.local import LocalTrainConfig, WindowDataset, get_weights, window_losses
from model.rib import RIB
from model.train import rib_config_for
from privacy import dp_sgd
from privacy.accountant import epsilon_for
from privacy.dp_sgd import DPSGDConfig, plan_private_run, to_dp_gru, to_plain_gru, train_local_private
from privacy.ledger import BudgetExhausted, FileLedgerStorage, PrivacyLedger

TINY = dict(item_dim=16, activity_dim=4, dwell_dim=4, hidden_dim=16, dropout=0.0)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG", "ignore:Optimal order", "ignore:.*autocast", "ignore:Full backward hook is firing"
)


@pytest.fixture(scope="module")
def data():
    full = synthetic_split(SyntheticConfig(n_devices=40)).train
    return full.select_sessions(np.arange(40))  # a few dozen sessions: one device's worth


def make_model(data, seed: int = 0, **overrides) -> RIB:
    torch.manual_seed(seed)
    return RIB(rib_config_for(data, **{**TINY, **overrides}))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---- the GRU swap --------------------------------------------------------------------------------------
def test_gru_swap_round_trips_weights_and_function(data):
    model = make_model(data).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = WindowDataset(data, 50)
    batch = rows.batch(np.arange(len(rows)))
    before = model.forward_all(*batch[:4])
    gru = model.gru
    x = torch.randn(5, 9, gru.input_size)
    expected, expected_h = gru(x)

    to_dp_gru(model)
    assert isinstance(model.gru, DPGRU) and not model.gru.training
    got, got_h = model.gru(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h, expected_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.forward_all(*batch[:4]), before, rtol=1e-5, atol=1e-5)
    assert set(model.gru.state_dict()) == {k.removeprefix("gru.") for k in state if k.startswith("gru.")}
    with pytest.raises(ValueError, match="nn.GRU"):  # nested, DPGRU's state dict also carries its cells' keys
        get_weights(model)
    assert to_dp_gru(model).gru is model.gru  # idempotent

    to_plain_gru(model)
    assert type(model.gru) is nn.GRU and model.gru.batch_first
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name  # bit-exact round trip
    assert to_plain_gru(model).gru is model.gru


# ---- configuration --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(noise_multiplier=1.0, target_epsilon=1.0),
        dict(noise_multiplier=-1.0),
        dict(target_epsilon=0.0),
        dict(noise_multiplier=1.0, delta=1.0),
        dict(noise_multiplier=1.0, max_grad_norm=0.0),
        dict(noise_multiplier=1.0, grad_sample_mode="ew"),
        dict(noise_multiplier=1.0, poisson_sampling=False),
        dict(noise_multiplier=1.0, grad_sample_mode="bookkeeping", fast_samplers=False),
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        DPSGDConfig(**kwargs)


@pytest.mark.parametrize("loss", ["sampled", "paper"])
def test_refuses_losses_other_than_the_full_softmax(data, loss):
    with pytest.raises(ValueError, match="softmax"):
        train_local_private(
            make_model(data, loss=loss), data, LocalTrainConfig(steps=1), DPSGDConfig(noise_multiplier=1.0)
        )


def test_refuses_cosine_scoring_but_trains_the_plain_tied_output(data):
    """cosine_scale normalises the item table inside the output module: no per-sample rule, so refused."""
    dp = DPSGDConfig(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="cosine_scale"):
        train_local_private(
            make_model(data, tie_output=True, cosine_scale=16.0), data, LocalTrainConfig(steps=1), dp
        )
    model = make_model(data, tie_output=True)
    before = flat_params(model)
    train_local_private(model, data, LocalTrainConfig(steps=1), dp)
    assert not torch.equal(before, flat_params(model))


def test_plan():
    local = LocalTrainConfig(steps=10, batch_size=32)
    run = plan_private_run(200, local, DPSGDConfig(noise_multiplier=1.3))
    assert (run.noise_multiplier, run.sample_rate, run.steps, run.delta) == (1.3, 32 / 200, 10, 1 / 200)
    assert run.ledger_entry() == (1.3, 0.16, 10) and run.epsilon == epsilon_for(1.3, 0.16, 10, 1 / 200)
    assert plan_private_run(20, local, DPSGDConfig(noise_multiplier=1.0, delta=1e-6)).sample_rate == 1.0
    assert plan_private_run(200, local, DPSGDConfig(noise_multiplier=1.0), ledger_delta=1e-7).delta == 1e-7
    assert plan_private_run(0, local, DPSGDConfig(noise_multiplier=1.0)).steps == 0
    with pytest.raises(ValueError, match="delta"):
        plan_private_run(1, local, DPSGDConfig(noise_multiplier=1.0))


# ---- what one step does ----------------------------------------------------------------------------------
def clipped_mean(model: RIB, rows: WindowDataset, clip: float) -> torch.Tensor:
    """Reference DP-SGD direction: each window's own gradient, clipped as Opacus clips, averaged over all."""
    total = torch.zeros_like(flat_params(model))
    for i in range(len(rows)):
        model.zero_grad()
        window_losses(model, rows.batch([i]))[0].backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        total += grad * min(1.0, clip / (float(grad.norm()) + 1e-6))
    return total / len(rows)


@pytest.fixture(scope="module")
def reference(data):
    model = make_model(data).train()
    rows = WindowDataset(data, 50)
    return flat_params(model), clipped_mean(model, rows, clip=0.5), len(rows)


def one_full_batch_step(data, mode: str, fast: bool, noise: float) -> tuple[torch.Tensor, dict]:
    """SGD(lr=1), q = 1 (batch_size >= windows): the parameter change is exactly the privatised mean gradient."""
    model = make_model(data)
    local = LocalTrainConfig(steps=1, batch_size=10_000, lr=1.0, optimizer="sgd", seed=3)
    dp = DPSGDConfig(noise_multiplier=noise, max_grad_norm=0.5, grad_sample_mode=mode, fast_samplers=fast)
    before = flat_params(model)
    result = train_local_private(model, data, local, dp)
    return before - flat_params(model), result


@pytest.mark.parametrize(
    "mode,fast",
    [
        ("bookkeeping", True),
        ("ghost", True),
        ("hooks", True),
        ("ghost", False),
        ("hooks", False),
        ("functorch", True),
    ],
)
def test_one_step_is_the_mean_of_per_window_clipped_gradients(data, reference, mode, fast):
    start, expected, n = reference
    step, result = one_full_batch_step(data, mode, fast, noise=0.0)
    assert result["grad_sample_mode"] == mode and result["sample_rate"] == 1.0 and result["steps"] == 1
    assert result["epsilon"] == math.inf  # no noise, no privacy
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)


def test_noise_has_the_promised_scale_and_is_the_same_in_every_mode(data, reference):
    _, expected, n = reference
    ghost, _ = one_full_batch_step(data, "ghost", True, noise=2.0)
    for mode in ("hooks", "bookkeeping"):
        other, _ = one_full_batch_step(data, mode, True, noise=2.0)
        torch.testing.assert_close(other, ghost, rtol=1e-4, atol=1e-5)  # same sampler and noise streams
    residual = ghost - expected
    marker = make_model(data)
    with torch.no_grad():
        for p in marker.parameters():
            p.zero_()
        marker.item_emb.weight[0] = 1.0
    padding_row = flat_params(marker).bool()
    assert torch.all(residual[padding_row] == 0)  # the padding embedding row is put back (post-processing)
    std = float(residual[~padding_row].std())
    assert std == pytest.approx(2.0 * 0.5 / n, rel=0.1)  # sigma * C / expected batch size


# ---- a whole run -------------------------------------------------------------------------------------------
def test_run_accounts_and_leaves_a_plain_exportable_model(data):
    model = make_model(data, dropout=0.1)
    model.eval()
    start = get_weights(model)
    local = LocalTrainConfig(steps=4, batch_size=8, lr=1e-2, seed=1)
    result = train_local_private(model, data, local, DPSGDConfig(noise_multiplier=1.1))
    n = len(WindowDataset(data, 50))
    assert result["windows"] == n and result["steps"] == 4 and result["grad_sample_mode"] == "bookkeeping"
    assert result["sample_rate"] == 8 / n and result["delta"] == 1 / n and result["noise_multiplier"] == 1.1
    assert result["epsilon"] == pytest.approx(epsilon_for(1.1, 8 / n, 4, 1 / n))
    assert type(model.gru) is nn.GRU and not model.training
    for p in model.parameters():
        assert not any(
            hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample")
        )
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    weights = get_weights(model)
    assert any(not np.array_equal(a, b) for a, b in zip(weights, start, strict=True))
    assert torch.all(model.item_emb.weight[0] == 0)
    again = make_model(data, dropout=0.1)
    train_local_private(again, data, local, DPSGDConfig(noise_multiplier=1.1))
    for a, b in zip(get_weights(again), weights, strict=True):
        np.testing.assert_array_equal(a, b)  # seeded


def test_target_epsilon_is_met(data):
    result = train_local_private(
        make_model(data),
        data,
        LocalTrainConfig(steps=3, batch_size=8),
        DPSGDConfig(target_epsilon=3.0, delta=1e-4),
    )
    assert 2.95 <= result["epsilon"] <= 3.0 and result["delta"] == 1e-4


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_empty_poisson_batches_still_take_noisy_steps(data, mode):
    local = LocalTrainConfig(steps=6, batch_size=1, seed=2)
    n = len(WindowDataset(data, 50))
    sizes = [
        len(b)
        for b in UniformWithReplacementSampler(
            num_samples=n, sample_rate=1 / n, generator=torch.Generator().manual_seed(2), steps=6
        )
    ]
    assert 0 in sizes and any(sizes)  # this seed draws empty and non-empty batches
    model = make_model(data)
    before = flat_params(model)
    result = train_local_private(model, data, local, DPSGDConfig(noise_multiplier=1.0, grad_sample_mode=mode))
    assert result["steps"] == 6 and result["epsilon"] == pytest.approx(epsilon_for(1.0, 1 / n, 6, 1 / n))
    assert not torch.equal(before, flat_params(model))


def test_auto_falls_back_mode_by_mode_to_hooks(data, monkeypatch, caplog):
    local = LocalTrainConfig(steps=2, batch_size=8, seed=5)
    direct = make_model(data)
    train_local_private(direct, data, local, DPSGDConfig(noise_multiplier=1.0, grad_sample_mode="hooks"))

    class Broken:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError("ghost clipping unsupported here")

    def broken_write(self):
        raise RuntimeError("bookkeeping unsupported here")

    monkeypatch.setattr(dp_sgd, "DPTensorFastGradientClipping", Broken)
    monkeypatch.setattr(dp_sgd.RIBBookKeepingHooks, "write_clipped_grads", broken_write)
    model = make_model(data)
    with caplog.at_level(logging.WARNING, logger="privacy.dp_sgd"):
        result = train_local_private(model, data, local, DPSGDConfig(noise_multiplier=1.0))
    assert result["grad_sample_mode"] == "hooks" and result["steps"] == 2
    warned = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warned) == 2 and "'bookkeeping' failed" in warned[0] and "'ghost' failed" in warned[1]
    for a, b in zip(get_weights(model), get_weights(direct), strict=True):
        np.testing.assert_array_equal(a, b)  # a clean restart: same as running hooks directly
    with pytest.raises(RuntimeError, match="first step"):  # an explicit mode does not fall back
        train_local_private(
            make_model(data), data, local, DPSGDConfig(noise_multiplier=1.0, grad_sample_mode="ghost")
        )
    assert type(model.gru) is nn.GRU


def test_ledger_is_charged_before_training_and_refuses_when_spent(data, tmp_path):
    local = LocalTrainConfig(steps=3, batch_size=8)
    dp = DPSGDConfig(noise_multiplier=1.0)
    n = len(WindowDataset(data, 50))
    one_run, two_runs = epsilon_for(1.0, 8 / n, 3, 1e-5), epsilon_for(1.0, 8 / n, 6, 1e-5)
    budget = (one_run + two_runs) / 2  # room for one run, not two
    ledger = PrivacyLedger(FileLedgerStorage(tmp_path / "ledger.json"), budget_epsilon=budget, delta=1e-5)
    model = make_model(data)
    result = train_local_private(model, data, local, dp, ledger=ledger, round=7)
    assert result["delta"] == 1e-5 and ledger.entries[0]["round"] == 7 and ledger.entries[0]["steps"] == 3
    reloaded = PrivacyLedger(FileLedgerStorage(tmp_path / "ledger.json"), budget_epsilon=budget, delta=1e-5)
    assert reloaded.spent() == pytest.approx(one_run)
    before = get_weights(model)
    with pytest.raises(BudgetExhausted):
        train_local_private(model, data, local, dp, ledger=reloaded)
    for a, b in zip(get_weights(model), before, strict=True):
        np.testing.assert_array_equal(a, b)  # refused: nothing trained
    assert len(reloaded.entries) == 1


def test_no_windows_no_steps(data):
    empty = data.select_sessions(np.zeros(0, np.int64))
    result = train_local_private(
        make_model(data), empty, LocalTrainConfig(steps=5), DPSGDConfig(noise_multiplier=1.0)
    )
    assert result["steps"] == 0 and result["epsilon"] == 0.0 and result["grad_sample_mode"] is None


def test_secure_mode_without_torchcsprng_fails_before_charging(data, tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed")
    ledger = PrivacyLedger(FileLedgerStorage(tmp_path / "ledger.json"), budget_epsilon=100.0, delta=1e-5)
    with pytest.raises(ImportError, match="torchcsprng"):
        train_local_private(
            make_model(data),
            data,
            LocalTrainConfig(steps=1),
            DPSGDConfig(noise_multiplier=1.0, secure_mode=True),
            ledger=ledger,
        )
    assert ledger.entries == [] and not (tmp_path / "ledger.json").exists()
