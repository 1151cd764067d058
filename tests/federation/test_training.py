"""Device-side training: what one round reads, refuses, and returns."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from edge_client.keys import KeyFileProvider  # noqa: E402
from edge_client.schema import MicroBehavior  # noqa: E402
from edge_client.store import StoreTamperError, TupleStore  # noqa: E402
from federation.client_app import EgressError, check_egress, training_config  # noqa: E402
from federation.config import FederationConfig  # noqa: E402
from federation.task import federated_rib_config  # noqa: E402
from federation.training import (  # noqa: E402
    METRIC_KEYS,
    DeviceTrainer,
    DeviceTrainingConfig,
    TrainingRefused,
)
from model.data.local import records_to_dataset  # noqa: E402
from model.local import LocalTrainConfig, get_weights  # noqa: E402
from model.rib import RIB  # noqa: E402
from tests.aggregator.conftest import dataset_records  # noqa: E402


@pytest.fixture(scope="module")
def split():
    from model.data.open import synthetic_split
    from model.data.synthetic import SyntheticConfig

    return synthetic_split(SyntheticConfig(n_devices=30, n_items=60, n_categories=5, days=8), seed=1)


def _device(tmp_path, records):
    store = TupleStore(tmp_path, key_provider=KeyFileProvider(tmp_path / "store.key"))
    store.append(records)
    store.close()
    return tmp_path


def test_records_to_dataset_reproduces_the_protocols_sessions(split):
    by_user = dataset_records(split.train)
    user = max(by_user, key=lambda u: len(by_user[u]))
    local = records_to_dataset(by_user[user], split.vocab)
    mask = split.train.user_ids == user
    central = split.train.select_sessions(mask)
    assert local.n_sessions == central.n_sessions
    np.testing.assert_array_equal(local.items, central.items)
    np.testing.assert_array_equal(local.activities, central.activities)
    np.testing.assert_array_equal(local.dwell_buckets, central.dwell_buckets)
    np.testing.assert_array_equal(local.visit_starts, central.visit_starts)


def test_items_outside_the_shared_vocabulary_are_dropped_not_reported(split):
    records = dataset_records(split.train)
    some = next(iter(records.values()))
    foreign = [
        MicroBehavior(r.session_id, r.timestamp_ms + 1, "never-seen-item", r.activity, r.dwell_seconds)
        for r in some
    ]
    local = records_to_dataset(some + foreign, split.vocab)
    assert local.n_items == split.vocab.n_items
    assert local.items.min() >= 1 and local.items.max() <= split.vocab.n_items


def test_a_round_returns_model_shaped_weights_and_allowed_metrics(split, tmp_path):
    by_user = dataset_records(split.train)
    records = [r for user in sorted(by_user)[:5] for r in by_user[user]]
    config = federated_rib_config(split.vocab, "SKU+Micro", 8, 8, 20)
    trainer = DeviceTrainer(_device(tmp_path, records), split.vocab, config)
    global_weights = get_weights(RIB(config))
    update = trainer.train(
        global_weights, DeviceTrainingConfig(local=LocalTrainConfig(steps=3, batch_size=4, max_len=20))
    )
    assert [w.shape for w in update.weights] == [w.shape for w in global_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(update.weights, global_weights, strict=True))
    assert set(update.metrics) <= set(METRIC_KEYS) and update.num_examples > 0
    check_egress(update.weights, [w.shape for w in global_weights], update.metrics)


def test_a_device_without_usable_sessions_declines(split, tmp_path):
    lonely = [MicroBehavior("s1", 1_700_000_000_000, str(split.vocab.item_ids[0]), "home", 12.0)]
    config = federated_rib_config(split.vocab, "SKU+Micro", 8, 8, 20)
    trainer = DeviceTrainer(_device(tmp_path, lonely), split.vocab, config)
    with pytest.raises(TrainingRefused) as err:
        trainer.train(get_weights(RIB(config)), DeviceTrainingConfig())
    assert err.value.reason == "no_data"


def test_missing_store_is_a_clear_error(split, tmp_path):
    with pytest.raises(FileNotFoundError):
        DeviceTrainer(tmp_path / "nothing", split.vocab, federated_rib_config(split.vocab, "SKU", 8, 8, 20))


@pytest.mark.parametrize(
    "arrays, shapes, metrics",
    [
        ([np.zeros((2, 3), np.float32)], [(3, 2)], {}),  # not the model's shape
        ([np.zeros((2, 3), np.int64)], [(2, 3)], {}),  # not weights
        ([np.zeros((2, 3), np.float32)], [(2, 3)], {"session_id": 1.0}),  # metric not on the list
        ([np.zeros((2, 3), np.float32)], [(2, 3)], {"train_loss": "s-17"}),  # a string
    ],
)
def test_egress_guard_refuses_anything_but_weights_and_scalars(arrays, shapes, metrics):
    with pytest.raises(EgressError):
        check_egress(arrays, shapes, metrics)


def test_round_seed_depends_on_run_round_and_device_only():
    fed = FederationConfig(seed=3)
    a, b = training_config(fed, 2, "000001"), training_config(fed, 2, "000001")
    assert a.local.seed == b.local.seed
    assert training_config(fed, 3, "000001").local.seed != a.local.seed
    assert training_config(fed, 2, "000002").local.seed != a.local.seed


def test_store_blobs_are_encrypted_and_bound_to_their_name(tmp_path):
    store = TupleStore(tmp_path, key_provider=KeyFileProvider(tmp_path / "store.key"))
    store.write_blob("privacy-ledger", b'{"spent": 1.5}')
    raw = (tmp_path / "blob-privacy-ledger.rblob").read_bytes()
    assert b"spent" not in raw
    assert store.read_blob("privacy-ledger") == b'{"spent": 1.5}'
    assert store.read_blob("other") is None
    (tmp_path / "blob-other.rblob").write_bytes(raw)  # a blob moved under another name
    with pytest.raises(StoreTamperError):
        store.read_blob("other")
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    (tmp_path / "blob-privacy-ledger.rblob").write_bytes(bytes(flipped))
    with pytest.raises(StoreTamperError):
        store.read_blob("privacy-ledger")
    with pytest.raises(ValueError):
        store.write_blob("../escape", b"x")
    store.erase()
    assert not list(tmp_path.glob("blob-*"))


def test_record_dp_charges_the_ledger_in_the_store_and_refuses_past_the_budget(split, tmp_path):
    pytest.importorskip("opacus")
    by_user = dataset_records(split.train)
    records = [r for user in sorted(by_user)[:8] for r in by_user[user]]
    config = federated_rib_config(split.vocab, "SKU+Micro", 8, 8, 20)
    trainer = DeviceTrainer(_device(tmp_path, records), split.vocab, config)
    weights = get_weights(RIB(config))
    settings = DeviceTrainingConfig(
        local=LocalTrainConfig(steps=2, batch_size=4, max_len=20),
        record_dp_noise_multiplier=1.0,
        budget_epsilon=0.0,
        delta=1e-5,
    )
    first = trainer.train(weights, settings)
    spent = first.metrics["device_epsilon"]
    assert first.metrics["record_dp"] == 1.0 and spent > 0
    assert trainer.store.read_blob("privacy-ledger") is not None  # kept encrypted in the device's store
    # A budget that one more identical run would exceed: the device refuses, and the ledger does not grow.
    from model.local import WindowDataset

    rate = min(1.0, 4 / len(WindowDataset(trainer.dataset(), 20)))
    after_two = trainer.ledger(settings).would_spend(1.0, rate, 2)
    assert after_two > spent  # composition costs
    tight = DeviceTrainingConfig(**{**settings.__dict__, "budget_epsilon": (spent + after_two) / 2})
    with pytest.raises(TrainingRefused) as err:
        trainer.train(weights, tight)
    assert err.value.reason == "budget_exhausted"
    assert trainer.ledger(tight).spent() == pytest.approx(spent)


def test_a_word2vec_round_returns_skipgram_tables_weighted_by_pairs(split, tmp_path):
    from model import skipgram

    by_user = dataset_records(split.train)
    records = [r for user in sorted(by_user)[:5] for r in by_user[user]]
    config = federated_rib_config(split.vocab, "SKU+Micro", 8, 8, 20)
    trainer = DeviceTrainer(_device(tmp_path, records), split.vocab, config)
    tables = skipgram.initial_weights(split.vocab.n_items, 8, seed=0)
    fed = FederationConfig(task="word2vec", local_steps=2, local_lr=1.0)
    update = trainer.train(tables, training_config(fed, 1, "000000"))
    assert [w.shape for w in update.weights] == [w.shape for w in tables]
    assert not np.array_equal(update.weights[1], tables[1])  # W_out starts at zero and moves
    sequences = [s for s in trainer.dataset().session_visit_sequences() if len(s) > 1]
    assert update.num_examples == skipgram.skipgram_pairs(sequences, fed.w2v_window)[0].size > 0
    assert set(update.metrics) <= set(METRIC_KEYS) and update.metrics["steps"] == 2
    check_egress(update.weights, [w.shape for w in tables], update.metrics)
    uniform = trainer.train(
        tables, training_config(FederationConfig(task="word2vec", dp="user", dp_epsilon=1.0), 1, "0")
    )
    assert uniform.num_examples == 1  # user-level DP averages devices, not pairs


def test_a_device_with_single_visit_sessions_declines_the_word2vec_stage(split, tmp_path):
    item = str(split.vocab.item_ids[0])
    one_visit = [MicroBehavior("s1", 1_700_000_000_000 + k * 1000, item, "home", 3.0) for k in range(3)]
    trainer = DeviceTrainer(
        _device(tmp_path, one_visit), split.vocab, federated_rib_config(split.vocab, "SKU", 8, 8, 20)
    )
    from model import skipgram

    with pytest.raises(TrainingRefused) as err:
        trainer.train(skipgram.initial_weights(split.vocab.n_items, 8), DeviceTrainingConfig(task="word2vec"))
    assert err.value.reason == "no_data"
