"""Local training: window rows cover the examples exactly, per-window losses, weights in and out, the loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.data.open import synthetic_split
from model.data.synthetic import SyntheticConfig
from model.local import (
    IGNORE,
    LocalTrainConfig,
    WindowDataset,
    get_weights,
    set_weights,
    train_local,
    window_losses,
)
from model.rib import RIB
from model.train import batch_tensors, make_windows, rib_config_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = dict(item_dim=16, activity_dim=4, dwell_dim=4, hidden_dim=16)


@pytest.fixture(scope="module")
def data():
    return synthetic_split(SyntheticConfig(n_devices=40)).train


def make_model(data, seed: int = 0, **overrides) -> RIB:
    torch.manual_seed(seed)
    return RIB(rib_config_for(data, **{**TINY, **overrides}))


# ---- config ------------------------------------------------------------------------------------------
def test_config_round_trip_and_validation():
    config = LocalTrainConfig(steps=3, batch_size=4, lr=0.1, optimizer="sgd", grad_clip=None)
    assert LocalTrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        LocalTrainConfig.from_dict({"steps": 1, "epochs": 2})
    for bad in (
        dict(steps=-1),
        dict(batch_size=0),
        dict(lr=0.0),
        dict(optimizer="rmsprop"),
        dict(grad_clip=0.0),
    ):
        with pytest.raises(ValueError):
            LocalTrainConfig(**bad)


# ---- weights -----------------------------------------------------------------------------------------
def test_weights_round_trip_in_state_dict_order(data):
    source, target = make_model(data, seed=0), make_model(data, seed=1)
    weights = get_weights(source)
    state = source.state_dict()
    assert len(weights) == len(state)
    for array, (name, tensor) in zip(weights, state.items(), strict=True):
        assert array.dtype == np.float32 and array.shape == tuple(tensor.shape), name
    weights[0][...] = 7.0  # copies: editing them leaves the model alone
    assert not torch.all(next(iter(source.state_dict().values())) == 7.0)
    set_weights(target, get_weights(source))
    for (name, a), b in zip(target.state_dict().items(), source.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("damage", ["count", "shape", "nan"])
def test_set_weights_refuses_bad_input_and_changes_nothing(data, damage):
    model = make_model(data)
    before = [w.copy() for w in get_weights(model)]
    weights = get_weights(make_model(data, seed=3))
    if damage == "count":
        weights = weights[:-1]
    elif damage == "shape":
        weights[-1] = np.zeros(weights[-1].shape[0] + 1, np.float32)
    else:
        weights[-1][0] = np.nan  # the last entry: everything before it would already be loaded if not atomic
    with pytest.raises(ValueError):
        set_weights(model, weights)
    for a, b in zip(get_weights(model), before, strict=True):
        np.testing.assert_array_equal(a, b)


# ---- rows and losses ---------------------------------------------------------------------------------
@pytest.mark.parametrize("max_len", [50, 5])
def test_window_rows_cover_every_example_exactly_once(data, max_len):
    rows = WindowDataset(data, max_len)
    windows = make_windows(data, max_len)
    examples = data.examples()
    assert rows.n_examples == len(examples) and rows.items.shape[1] == max_len
    # Absolute tuple index of every row position: rows are the windows that have an example, in order.
    full = batch_tensors(data, windows, np.arange(len(windows)), torch.device("cpu"))
    kept = np.flatnonzero(full["positions"].any(1).numpy())
    assert len(rows) == len(kept)
    index = torch.from_numpy(windows.start[kept])[:, None] + torch.arange(max_len)[None, :]
    positions = rows.targets != IGNORE
    pairs = sorted(zip(index[positions].tolist(), rows.targets[positions].tolist(), strict=True))
    assert pairs == sorted(zip((examples.ends - 1).tolist(), examples.targets.tolist(), strict=True))
    assert positions.any(1).all()  # no row without an example
    assert not (positions & ~rows.mask).any() and torch.all(rows.items[~rows.mask] == 0)


def test_window_losses_sum_to_example_loss_and_ignore_batch_company(data):
    model = make_model(data, dropout=0.0).eval()
    rows = WindowDataset(data, 50)
    batch = rows.batch(np.arange(len(rows)))
    assert batch[3][:, -1].any()  # cut to the longest window
    per_window = window_losses(model, batch)
    assert per_window.shape == (len(rows),) and torch.all(per_window > 0)
    windows = make_windows(data, 50)
    full = batch_tensors(data, windows, np.arange(len(windows)), torch.device("cpu"))
    reference = model.example_loss(
        full["items"], full["activities"], full["dwell"], full["mask"], full["positions"], full["targets"]
    )
    torch.testing.assert_close(per_window.sum() / rows.n_examples, reference)
    for i in (0, 7, len(rows) - 1):  # alone (shorter padding) == inside the big batch
        torch.testing.assert_close(
            window_losses(model, rows.batch([i]))[0], per_window[i], rtol=1e-5, atol=1e-5
        )


def test_window_losses_need_the_full_softmax(data):
    model = make_model(data, loss="sampled")
    with pytest.raises(ValueError, match="softmax"):
        window_losses(model, WindowDataset(data, 50).batch([0]))


# ---- the loop ----------------------------------------------------------------------------------------
def _mean_window_loss(model: RIB, data) -> float:
    rows = WindowDataset(data, 50)
    with torch.no_grad():
        return float(window_losses(model.eval(), rows.batch(np.arange(len(rows)))).mean())


def test_train_local_learns_is_seeded_and_leaves_global_rng_alone(data):
    config = LocalTrainConfig(steps=25, batch_size=16, lr=1e-2, seed=4)
    model = make_model(data)
    before = _mean_window_loss(model, data)
    model.train(False)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    result = train_local(model, data, config)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert not model.training  # mode restored
    rows = WindowDataset(data, 50)
    assert result["steps"] == 25 and result["windows"] == len(rows) and result["examples"] == rows.n_examples
    assert result["examples_seen"] > 0 and result["seconds"] > 0 and np.isfinite(result["loss"])
    assert _mean_window_loss(model, data) < 0.9 * before
    again = make_model(data)
    train_local(again, data, config)
    for a, b in zip(get_weights(model), get_weights(again), strict=True):
        np.testing.assert_array_equal(a, b)
    other = make_model(data)
    train_local(other, data, LocalTrainConfig(steps=25, batch_size=16, lr=1e-2, seed=5))
    assert any(not np.array_equal(a, b) for a, b in zip(get_weights(model), get_weights(other), strict=True))


def test_train_local_sgd_and_zero_steps(data):
    model = make_model(data)
    start = get_weights(model)
    assert train_local(model, data, LocalTrainConfig(steps=0))["steps"] == 0
    for a, b in zip(get_weights(model), start, strict=True):
        np.testing.assert_array_equal(a, b)
    result = train_local(model, data, LocalTrainConfig(steps=2, optimizer="sgd", lr=0.1, grad_clip=None))
    assert result["steps"] == 2
    assert any(not np.array_equal(a, b) for a, b in zip(get_weights(model), start, strict=True))


def test_train_local_without_examples_does_nothing(data):
    lengths = data.session_lengths()
    single = (
        data.select_sessions(lengths == 1)
        if (lengths == 1).any()
        else data.select_sessions(np.zeros(0, np.int64))
    )
    empty = data.select_sessions(np.zeros(0, np.int64))
    model = make_model(data)
    start = get_weights(model)
    for subset in (single, empty):
        result = train_local(model, subset, LocalTrainConfig(steps=5))
        assert (
            result["steps"] == 0
            and result["examples"] == 0
            and result["windows"] == 0
            and result["loss"] == 0.0
        )
    for a, b in zip(get_weights(model), start, strict=True):
        np.testing.assert_array_equal(a, b)
