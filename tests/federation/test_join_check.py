"""A device checks that it belongs to the run before any training, and says why not in a way the server counts."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from edge_client.keys import KeyFileProvider  # noqa: E402
from edge_client.schema import MicroBehavior  # noqa: E402
from edge_client.store import TupleStore  # noqa: E402
from federation.client_app import JoinRefused, check_device, check_round, expected_shapes  # noqa: E402
from federation.config import FederationConfig  # noqa: E402
from federation.task import VOCAB_KEY, declined_reason, declined_text, vocab_fingerprint  # noqa: E402
from federation.training import TrainingRefused  # noqa: E402
from model.data.dataset import SplitData  # noqa: E402
from tests.aggregator.conftest import write_population  # noqa: E402
from tests.edge_client.worlds import shared_world  # noqa: E402

FED = FederationConfig(item_dim=16, hidden_dim=16)


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    return write_population(tmp_path_factory.mktemp("population"), n_devices=3)


@pytest.fixture(scope="module")
def vocab(population):
    return SplitData.load(population / "server" / "split.npz").vocab


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory.mktemp("world"))


def _weights(shapes):
    return [np.zeros(s, np.float32) for s in shapes]


def test_a_round_of_this_devices_model_passes(vocab):
    check_round(_weights(expected_shapes(FED, vocab)), {VOCAB_KEY: vocab_fingerprint(vocab)}, FED, vocab)


def test_another_vocabulary_is_declined_before_training(vocab, world):
    with pytest.raises(TrainingRefused) as caught:
        check_round(
            _weights(expected_shapes(FED, vocab)), {VOCAB_KEY: vocab_fingerprint(world["vocab"])}, FED, vocab
        )
    assert caught.value.reason == "vocab_mismatch" and f"{vocab.n_items} items" in str(caught.value)


def test_weights_of_another_shape_are_declined_before_training(vocab):
    shapes = expected_shapes(FED, vocab)
    wrong = [(shapes[0][0] + 3, shapes[0][1]), *shapes[1:]]
    with pytest.raises(TrainingRefused) as caught:
        check_round(_weights(wrong), {}, FED, vocab)
    assert caught.value.reason == "shape_mismatch" and "array 0" in str(caught.value)
    with pytest.raises(TrainingRefused, match="arrays, this device's model has"):
        check_round(_weights(shapes[:-1]), {}, FED, vocab)


def test_the_decline_text_round_trips_to_the_servers_reason():
    text = declined_text("vocab_mismatch", "the run's vocabulary\nis another " + "x" * 1000)
    assert declined_reason(text) == "vocab_mismatch" and "\n" not in text and len(text) < 400


def _store(directory, records):
    store = TupleStore(directory, key_provider=KeyFileProvider(directory / "store.key"))
    store.append(records)
    store.close()
    return directory


def test_join_checks_package_store_and_activities(world, tmp_path):
    activity = world["vocab"].activities.names[0]
    item = str(world["vocab"].item_ids[0])
    records = [MicroBehavior("s1", 1_700_000_000_000 + k, item, activity, 3.0) for k in range(3)]
    found = check_device(_store(tmp_path / "ok", records), world["package"], world["public"])
    assert found["records"] == 3 and found["sessions"] == 1 and found["items"] == world["vocab"].n_items

    foreign = [MicroBehavior("s1", 1_700_000_000_000, item, "checked_in_at_front_desk", 3.0)]
    with pytest.raises(JoinRefused) as caught:
        check_device(_store(tmp_path / "foreign", foreign), world["package"], world["public"])
    assert caught.value.reason == "activity_mismatch"

    with pytest.raises(JoinRefused) as caught:
        check_device(tmp_path / "empty-dir", world["package"], world["public"])
    assert caught.value.reason == "store_unreadable"

    (tmp_path / "ok" / "store.key").write_bytes(b"\0" * 32)  # another key: the store cannot be read
    with pytest.raises(JoinRefused) as caught:
        check_device(tmp_path / "ok", world["package"], world["public"])
    assert caught.value.reason == "store_unreadable"


def test_a_tampered_package_is_refused_at_join(world, tmp_path):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(world["package"], copy)
    vocab_file = copy / "vocab.json"
    vocab_file.write_bytes(vocab_file.read_bytes().replace(b"{", b"{ ", 1))
    with pytest.raises(JoinRefused) as caught:
        check_device(_store(tmp_path / "s", []), copy, world["public"])
    assert caught.value.reason == "package_invalid"


def test_devices_with_another_package_decline_and_the_run_fails_saying_why(population, world, tmp_path):
    """The observation this guards: every device crashed on a shape mismatch, the run exited 0 and published a
    release of the untrained model. Now each declines before training and the run fails with the reason."""
    from aggregator.checkpoint import CheckpointStore
    from aggregator.workflow import RunFailed
    from edge_client.package import generate_keypair
    from tests.aggregator.loopback import run_federation

    private, _ = generate_keypair(tmp_path / "keys")
    fed = FederationConfig(
        population_dir=str(population),
        num_server_rounds=2,
        fraction_fit=1.0,
        min_fit_clients=3,
        min_available_clients=3,
        checkpoint_dir=str(tmp_path / "ckpt"),
        release_dir=str(tmp_path / "releases"),
        signing_key=str(private),
        item_dim=16,
        hidden_dim=16,
        eval_max_examples=50,
    )
    nodes = lambda p: {  # noqa: E731 - a deployment node: its own store, the package it installed
        "device-dir": str(population / "devices" / f"{p:06d}"),
        "package-dir": str(world["package"]),
        "public-key": str(world["public"]),
    }
    strategy, _, error = run_federation(fed, range(3), node_config_for=nodes)
    assert isinstance(error, RunFailed) and "vocab_mismatch 3" in str(error)
    assert strategy.rounds[1]["failure_reasons"] == {"vocab_mismatch": 3}
    assert CheckpointStore(tmp_path / "ckpt").rounds() == [0] and not (tmp_path / "releases").exists()
