"""Training RIB: windows/batches cover the examples exactly, validation by time, learning, persistence, CLI."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from model.data.open import open_dataset, synthetic_split
from model.data.synthetic import SyntheticConfig
from model.device import ENV_VAR, pick_device
from model.evaluate import evaluate, paired_bootstrap_diff
from model.recommender import PrefixBatch, SessionRecommender
from model.rib import RIB
from model.train import (
    RIBRecommender,
    TrainConfig,
    batch_tensors,
    length_batches,
    load_checkpoint,
    make_windows,
    rib_config_for,
    time_validation_split,
    train_rib,
)
from rib_edge.cli_model import eval_command, train_command

TINY = dict(item_dim=16, activity_dim=4, dwell_dim=4, hidden_dim=32)
FAST = TrainConfig(epochs=2, batch_size=64, lr=5e-3, val_fraction=0.1, patience=1, w2v_epochs=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def split():
    return open_dataset("synthetic")


# ---- device -----------------------------------------------------------------------------------------
def test_pick_device(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert pick_device("cuda") == torch.device("cpu")  # the environment wins
    monkeypatch.setenv(ENV_VAR, "tpu-please")
    with pytest.raises(ValueError):
        pick_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv(ENV_VAR, "cuda")
        with pytest.raises(RuntimeError):
            pick_device()


# ---- data plumbing ----------------------------------------------------------------------------------
def _pairs_from_batches(data, max_len: int) -> list[tuple[int, int]]:
    windows = make_windows(data, max_len)
    assert np.all(windows.end - windows.start <= max_len)
    pairs = []
    for rows in length_batches(windows, 17, np.random.default_rng(0)):
        batch = batch_tensors(data, windows, rows, torch.device("cpu"))
        index = torch.from_numpy(windows.start[rows])[:, None] + torch.arange(batch["mask"].shape[1])[None, :]
        assert torch.all(batch["items"][~batch["mask"]] == 0)
        pairs += list(zip(index[batch["positions"]].tolist(), batch["targets"].tolist(), strict=True))
    return sorted(pairs)


@pytest.mark.parametrize("max_len", [50, 5])
def test_windows_and_batches_cover_every_example_exactly_once(split, max_len):
    """Training positions == the dataset's examples (prefix end - 1 -> target), even with windowing."""
    data = split.train
    examples = data.examples()
    expected = sorted(zip((examples.ends - 1).tolist(), examples.targets.tolist(), strict=True))
    assert _pairs_from_batches(data, max_len) == expected


def test_length_batches_are_seeded_and_sorted_within(split):
    windows = make_windows(split.train, 50)
    a = length_batches(windows, 32, np.random.default_rng(3))
    b = length_batches(windows, 32, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert sorted(np.concatenate(a).tolist()) == list(range(len(windows)))
    lengths = windows.end - windows.start
    spread = [lengths[rows].max() - lengths[rows].min() for rows in a]
    assert np.median(spread) <= 2  # buckets of similar length, little padding


def test_validation_is_the_end_of_the_training_period(split):
    fit, val = time_validation_split(split.train, 0.2)
    assert val is not None and fit.n_sessions + val.n_sessions == split.train.n_sessions
    assert abs(val.n_sessions - 0.2 * split.train.n_sessions) <= 1
    fit_end = fit.timestamps_ms[fit.offsets[1:] - 1]
    val_end = val.timestamps_ms[val.offsets[1:] - 1]
    assert fit_end.max() <= val_end.min()
    assert time_validation_split(split.train, 0.0)[1] is None


# ---- learning ---------------------------------------------------------------------------------------
def _loss_before_after(data, steps: int = 15, **rib_overrides: object) -> tuple[float, float]:
    torch.manual_seed(0)
    model = RIB(rib_config_for(data, "SKU+Micro", dropout=0.0, **{**TINY, **rib_overrides}))
    windows = make_windows(data, 50)
    batches = [
        batch_tensors(data, windows, rows, torch.device("cpu"))
        for rows in length_batches(windows, 64, np.random.default_rng(0))[:4]
    ]

    def mean_loss() -> float:
        with torch.no_grad():
            return float(
                np.mean(
                    [
                        model.example_loss(
                            b["items"], b["activities"], b["dwell"], b["mask"], b["positions"], b["targets"]
                        ).item()
                        for b in batches
                    ]
                )
            )

    before = mean_loss()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = model.example_loss(
            b["items"], b["activities"], b["dwell"], b["mask"], b["positions"], b["targets"]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, mean_loss()


@pytest.mark.parametrize("loss", ["softmax", "paper"])
def test_loss_decreases_on_synthetic(split, loss):
    before, after = _loss_before_after(split.train, loss=loss)
    assert after < before


def test_loss_decreases_on_a_real_slice(shared_data):
    from model.data.loaders import load_dataset

    data = load_dataset("yoochoose_100k", data_dir=shared_data).train
    data = data.select_sessions(np.arange(400))
    before, after = _loss_before_after(data)
    assert after < 0.9 * before


def test_train_rib_history_and_protocol(split, tmp_path):
    config = replace(FAST, checkpoint_dir=str(tmp_path))
    rec, history = train_rib(split.train, rib_config_for(split.train, **TINY), config, progress=False)
    assert isinstance(rec, SessionRecommender) and rec.name == "RIB"
    assert 1 <= history["best_epoch"] <= len(history["epochs"]) <= 2
    for key in ("sessions_per_s", "peak_rss_mb", "total_seconds", "w2v_seconds", "best_val_recall@20"):
        assert history[key] > 0, key
    assert {"train_loss", "val_recall@20", "val_mrr@20", "sessions_per_s"} <= set(history["epochs"][0])
    assert (tmp_path / "rib.pt").exists()
    result = evaluate(rec, split.test)
    assert result.metrics["recall@20"] > 0


def test_same_seed_same_model_and_save_load_round_trip(split, tmp_path):
    examples = split.test.examples()
    batch = PrefixBatch(split.test, examples.starts[:200], examples.ends[:200])
    config = rib_config_for(split.train, "SKU+Dwell", use_attention=False, **TINY)
    a, _ = train_rib(split.train, config, FAST, progress=False)
    b, _ = train_rib(split.train, config, FAST, progress=False)
    np.testing.assert_array_equal(a.score(batch), b.score(batch))
    assert a.name == "RIB-Attention" and a.data_type == "SKU+Dwell"

    path = a.save(tmp_path / "model" / "rib.pt")
    loaded = load_checkpoint(path)
    np.testing.assert_array_equal(loaded.score(batch), a.score(batch))
    assert loaded.rib_config == a.rib_config and loaded.train_config == a.train_config
    assert loaded.history["best_epoch"] == a.history["best_epoch"]
    assert RIBRecommender.load(path).name == "RIB-Attention"


def test_a_checkpoint_remembers_its_vocabularies_and_refuses_others(split, tmp_path):
    import dataclasses

    from edge_client.schema import ActivityVocabulary, DwellBuckets
    from model.train import CheckpointError

    config = rib_config_for(split.train, **TINY)
    rec, _ = train_rib(split.train, config, replace(FAST, epochs=1), progress=False)
    loaded = load_checkpoint(rec.save(tmp_path / "rib.pt"))
    loaded.check_vocabulary(split.vocab)  # its own: fine
    vocab = split.vocab
    others = {
        "other ids or another order": dataclasses.replace(vocab, item_ids=vocab.item_ids[::-1].copy()),
        "activities": dataclasses.replace(
            vocab, activities=ActivityVocabulary(tuple(reversed(vocab.activities.names)))
        ),
        "dwell edges": dataclasses.replace(
            vocab, dwell=DwellBuckets(tuple(e + 1 for e in vocab.dwell.edges_s))
        ),
        "items: ": dataclasses.replace(vocab, item_ids=vocab.item_ids[:-1]),
    }
    for what, other in others.items():
        with pytest.raises(CheckpointError, match=f"other vocabularies.*{what}"):
            loaded.check_vocabulary(other)
    # A checkpoint from before the record: only the sizes can be checked (same sizes, other order passes).
    payload = torch.load(tmp_path / "rib.pt", weights_only=True)
    del payload["vocabulary"]
    torch.save(payload, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    old.check_vocabulary(others["other ids or another order"])
    with pytest.raises(CheckpointError, match=r"items: \d+ in the checkpoint, \d+ in the data"):
        old.check_vocabulary(others["items: "])


@pytest.mark.parametrize(
    "content", [b"", b"\x80\x02garbage", b"PK\x03\x04truncated", b"not a checkpoint at all"]
)
def test_a_file_that_is_not_a_checkpoint_is_a_checkpoint_error(tmp_path, content):
    from model.train import CheckpointError

    path = tmp_path / "rib.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a RIB checkpoint"):
        load_checkpoint(path)
    torch.save({"format": 1, "weights": [1, 2]}, path)  # a torch file, but no model in it
    with pytest.raises(CheckpointError, match="no model state"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_paper_loss_trains_and_its_ranking_follows_the_loss(split):
    """The paper's embedding-space loss falls, and ranking by -KL(t_j || o) improves with it (vs untrained)."""
    config = rib_config_for(split.train, loss="paper", **TINY)
    trained, history = train_rib(split.train, config, replace(FAST, val_fraction=0.0), progress=False)
    untrained, _ = train_rib(split.train, config, replace(FAST, val_fraction=0.0, epochs=0), progress=False)
    assert history["epochs"][-1]["train_loss"] < history["epochs"][0]["train_loss"]
    after, before = evaluate(trained, split.test), evaluate(untrained, split.test)
    mean, low, high = paired_bootstrap_diff(after.per_example("recall@20"), before.per_example("recall@20"))
    assert low > 0, f"trained - untrained Recall@20 = {mean:.4f} [{low:.4f}, {high:.4f}]"


def test_micro_behaviors_beat_sku_on_planted_signal():
    """The planted population: intent visits look engaged, distractors shallow, and the next intent item
    follows the previous intent item. With 100-item chains, top-20 cannot just list the intent category,
    so knowing WHICH earlier visit was intent (micro behaviors) must lift Recall@20 for real."""
    data = synthetic_split(SyntheticConfig(n_devices=1000, n_items=400, n_categories=4, intent_share=0.35))
    train_config = TrainConfig(epochs=8, batch_size=128, lr=5e-3, val_fraction=0.0, w2v_epochs=5)
    results = {}
    for data_type in ("SKU", "SKU+Micro"):
        config = rib_config_for(data.train, data_type, item_dim=32, hidden_dim=64)
        rec, _ = train_rib(data.train, config, train_config, progress=False)
        results[data_type] = evaluate(rec, data.test)
    mean, low, high = paired_bootstrap_diff(
        results["SKU+Micro"].per_example("recall@20"), results["SKU"].per_example("recall@20")
    )
    assert low > 0, f"SKU+Micro - SKU Recall@20 = {mean:.4f} [{low:.4f}, {high:.4f}]"


# ---- command line -----------------------------------------------------------------------------------
def test_cli_train_then_eval(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = [
        "--dataset",
        "synthetic",
        "--data-type",
        "SKU+Micro",
        "--epochs",
        "1",
        "--out",
        str(out),
        "--item-dim",
        "16",
        "--hidden-dim",
        "32",
    ]
    result = runner.invoke(train_command, args)
    assert result.exit_code == 0, result.output
    assert (out / "rib.pt").exists() and (out / "history.json").exists()
    result = runner.invoke(eval_command, ["--dataset", "synthetic", "--checkpoint", str(out / "rib.pt")])
    assert result.exit_code == 0, result.output
    assert "recall@20" in result.output and "95% CI" in result.output and "mrr@20" in result.output

    result = runner.invoke(train_command, [*args[:-4], "--data-type", "SKU+Everything"])
    assert result.exit_code != 0


# ---- sampled softmax and copy term through the training loop ---------------------------------------
@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_sampled_softmax_training_loop_and_checkpoint(split, tmp_path, sampler):
    config = replace(
        FAST, epochs=3, patience=5, n_negatives=32, negative_sampler=sampler, checkpoint_dir=str(tmp_path)
    )
    rib_config = rib_config_for(split.train, "SKU+Micro", loss="sampled", copy=True, **TINY)
    rec, history = train_rib(split.train, rib_config, config, progress=False)
    losses = [e["train_loss"] for e in history["epochs"]]
    assert losses[-1] < losses[0]
    assert history["loss"] == "sampled"
    loaded = load_checkpoint(tmp_path / "rib.pt")
    batch = PrefixBatch(split.test, split.test.examples().starts[:7], split.test.examples().ends[:7])
    np.testing.assert_allclose(loaded.score(batch), rec.score(batch), rtol=1e-5, atol=1e-5)
    assert loaded.score(batch).shape == (7, split.test.n_items + 1)


def test_negative_sampler_log_q_is_a_log_probability(split):
    from model.train import NegativeSampler

    sampler = NegativeSampler(
        split.train, replace(FAST, n_negatives=16, negative_sampler="popularity"), torch.device("cpu")
    )
    negatives, log_q = sampler.draw(50)
    assert negatives.shape == (16,) and int(negatives.min()) >= 1
    assert log_q.shape == (split.train.n_items + 1,)
    assert (log_q[1:] <= 0).all() and torch.isfinite(log_q[1:]).all()
    with pytest.raises(ValueError):
        NegativeSampler(split.train, replace(FAST, negative_sampler="zipf"), torch.device("cpu"))


def test_time_budget_stops_training_and_keeps_the_best_state(split):
    """max_train_seconds ends the epoch that crosses it (validated, then stop); 0 s trains no step."""
    config = rib_config_for(split.train, **TINY)
    _, history = train_rib(
        split.train, config, replace(FAST, epochs=50, patience=50, max_train_seconds=0.0), progress=False
    )
    assert history["stopped_by_time_budget"] and history["steps"] == 0 and len(history["epochs"]) == 1
    _, history = train_rib(
        split.train, config, replace(FAST, epochs=3, max_train_seconds=None), progress=False
    )
    assert not history["stopped_by_time_budget"] and history["steps"] > 0


def test_lr_decay_multiplies_the_learning_rate_every_epoch(split):
    """lr_decay = 0.5 halves the learning rate each epoch (recorded per epoch); outside (0, 1] is refused."""
    config = rib_config_for(split.train, **TINY)
    _, history = train_rib(
        split.train, config, replace(FAST, epochs=3, patience=3, lr_decay=0.5), progress=False
    )
    rates = [e["lr"] for e in history["epochs"]]
    assert rates == pytest.approx([FAST.lr, FAST.lr / 2, FAST.lr / 4])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="lr_decay"):
            train_rib(split.train, config, replace(FAST, lr_decay=bad), progress=False)


def test_refit_shares_the_time_budget_and_is_skipped_when_it_cannot_finish(split):
    """With max_train_seconds, the refit gets what the selection run left, and none when that is too little."""
    config = rib_config_for(split.train, "SKU+Micro", **TINY)
    tc = replace(FAST, epochs=2, patience=5, refit_on_all=True, max_train_seconds=10_000.0)
    history = RIBRecommender(config, tc).fit(split.train).history
    assert history["refit"]["epochs"] == history["best_epoch"]
    assert history["refit"]["budget_seconds"] == pytest.approx(10_000.0 - history["train_seconds"])
    # A budget the selection run already spent: the early-stopped model stays, and the history says why.
    spent = replace(tc, max_train_seconds=0.0)
    rec = RIBRecommender(config, spent).fit(split.train)
    assert "budget" in rec.history["refit"]["skipped"] and "epochs" not in rec.history["refit"]
    selected = RIBRecommender(config, replace(spent, refit_on_all=False)).fit(split.train)
    for name, value in selected.model.state_dict().items():
        torch.testing.assert_close(rec.model.state_dict()[name], value, rtol=0, atol=0)


def test_refit_on_all_trains_the_selected_epochs_on_every_training_session(split, tmp_path):
    """refit_on_all: early stopping picks the epochs, then a fresh model trains that long on fit + validation."""
    tc = replace(FAST, epochs=3, patience=5, refit_on_all=True, checkpoint_dir=str(tmp_path))
    config = rib_config_for(split.train, "SKU+Micro", **TINY)
    rec = RIBRecommender(config, tc).fit(split.train)
    history = rec.history
    best_epoch = history["best_epoch"]
    assert history["n_fit_sessions"] < split.train.n_sessions  # the selection run held validation out
    assert (
        history["refit"]["n_fit_sessions"] == split.train.n_sessions
        and history["refit"]["epochs"] == best_epoch
    )
    # The same as training best_epoch epochs on everything with the same seed, and that is what was saved.
    direct = RIBRecommender(config, replace(FAST, epochs=best_epoch, val_fraction=0.0)).fit(split.train)
    for name, value in direct.model.state_dict().items():
        torch.testing.assert_close(rec.model.state_dict()[name], value, rtol=0, atol=0)
    selected = RIBRecommender(config, replace(tc, refit_on_all=False, checkpoint_dir=None)).fit(split.train)
    assert any(not torch.equal(selected.model.state_dict()[n], v) for n, v in rec.model.state_dict().items())
    saved = load_checkpoint(tmp_path / "rib.pt")
    assert saved.history["refit"]["epochs"] == best_epoch
    for name, value in rec.model.state_dict().items():
        torch.testing.assert_close(saved.model.state_dict()[name], value, rtol=0, atol=0)
