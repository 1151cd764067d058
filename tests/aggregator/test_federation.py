"""Federated RIB end to end in Flower's simulation engine: rounds, SecAgg+, user-level DP, egress, releases,
checkpoint/resume. Each ``run_simulation`` starts a Ray backend (seconds), so runs are shared per module."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.simulation import run_simulation  # noqa: E402

from aggregator.checkpoint import CheckpointStore  # noqa: E402
from aggregator.server_app import make_server_app  # noqa: E402
from edge_client.keys import KeyFileProvider  # noqa: E402
from edge_client.package import generate_keypair, verify_package  # noqa: E402
from edge_client.store import TupleStore  # noqa: E402
from federation.client_app import describe_message, make_client_app  # noqa: E402
from federation.config import FederationConfig  # noqa: E402

N_DEVICES = 6
BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}
SMALL = {"item_dim": 16, "hidden_dim": 16, "local_steps": 3, "local_batch_size": 8, "eval_max_examples": 200}


def simulate(fed: FederationConfig, extra_mods=None, stop_after: int | None = None) -> None:
    """One Flower simulation of the population with these settings."""
    run_simulation(
        make_server_app(fed, stop_after=stop_after),
        make_client_app(extra_mods=extra_mods, fed=fed),
        num_supernodes=N_DEVICES,
        backend_config=BACKEND,
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class WireTap:
    """Outermost client mod: writes down everything each message a device sends carries (one JSON file per
    message, since simulated devices run in Ray worker processes)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def __call__(self, msg, ctxt, call_next):
        out = call_next(msg, ctxt)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{uuid.uuid4().hex}.json").write_text(json.dumps(describe_message(out)))
        return out

    def sent(self) -> list[dict]:
        """Every message written down so far."""
        return [json.loads(p.read_text()) for p in sorted(self.directory.glob("*.json"))]


@pytest.fixture(scope="module")
def secure_dp_run(population: Path, tmp_path_factory) -> dict:
    """Two rounds with SecAgg+, user-level DP, a signed release, checkpoints and a wire tap."""
    out = tmp_path_factory.mktemp("secure_dp")
    private, public = generate_keypair(out / "keys")
    fed = FederationConfig(
        population_dir=str(population),
        num_server_rounds=2,
        fraction_fit=1.0,
        min_fit_clients=N_DEVICES,
        min_available_clients=N_DEVICES,
        dp="user",
        dp_noise_multiplier=0.8,
        dp_clipping_norm=0.5,
        secagg=True,
        secagg_num_shares=5,
        secagg_reconstruction_threshold=3,
        checkpoint_dir=str(out / "ckpt"),
        release_dir=str(out / "releases"),
        signing_key=str(private),
        metrics_path=str(out / "metrics.jsonl"),
        **SMALL,
    )
    tap = WireTap(out / "wire")
    simulate(fed, extra_mods=[tap])
    return {"fed": fed, "out": out, "tap": tap, "public": public, "rows": rows(out / "metrics.jsonl")}


def test_rounds_run_with_secagg_and_dp(secure_dp_run):
    history = secure_dp_run["rows"]
    assert [r["round"] for r in history] == [0, 1, 2]
    for row in history[1:]:
        assert row["participants"] == N_DEVICES and row["dropouts"] == 0
        assert 0.0 <= row["recall@20"] <= 1.0
    # Epsilon grows with rounds (user-level accountant, q = 1 here).
    assert 0 < history[1]["epsilon"] < history[2]["epsilon"]
    assert history[2]["delta"] == pytest.approx(1.0 / N_DEVICES)


def test_global_model_changes_and_is_checkpointed(secure_dp_run):
    store = CheckpointStore(secure_dp_run["fed"].checkpoint_dir)
    assert store.rounds()[-1] == 2
    first, last = store.load(store.rounds()[0]), store.load(2)
    assert any(not np.allclose(a, b) for a, b in zip(first.weights, last.weights, strict=True))
    assert last.accountant is not None and last.accountant["rounds"] == 2


def test_release_is_signed_and_versioned_by_round(secure_dp_run):
    release = Path(secure_dp_run["rows"][-1]["release"])
    manifest = verify_package(release, secure_dp_run["public"])
    assert manifest.model_version == 2


def test_devices_send_nothing_but_weights_and_allowed_scalars(secure_dp_run, population):
    sent = [m for m in secure_dp_run["tap"].sent() if not m["error"]]
    assert len(sent) >= 2 * 3 * N_DEVICES, "the wire tap missed SecAgg+ stages"
    # What the devices hold: every session id, item id and timestamp in their stores.
    secrets_str: set[str] = set()
    timestamps: set[int] = set()
    for device in sorted((population / "devices").iterdir()):
        store = TupleStore(device, key_provider=KeyFileProvider(device / "store.key"))
        for record in store.read():
            secrets_str.update({record.session_id, record.item_id})
            timestamps.add(int(record.timestamp_ms))
        store.close()
    secrets_hex = {s.encode().hex() for s in secrets_str if len(s) >= 4}
    for message in sent:
        leaked = set(message["str"]) & secrets_str
        assert not leaked, f"a device sent {sorted(leaked)[:3]}"
        assert not any(h in b for b in message["bytes"] for h in secrets_hex)
        assert not set(message["int"]) & timestamps
        # Arrays are numbers only (SecAgg+ masked vectors or weights), never encoded records.
        assert all(kind in "fiu" for kind, _ in message["arrays"])


def test_resume_continues_at_the_next_round_with_the_same_result(population, tmp_path):
    settings = dict(
        population_dir=str(population),
        num_server_rounds=3,
        fraction_fit=1.0,
        min_fit_clients=N_DEVICES,
        min_available_clients=N_DEVICES,
        strategy="fedadam",
        server_lr=0.05,
        **SMALL,
    )
    straight = FederationConfig(
        checkpoint_dir=str(tmp_path / "a"), metrics_path=str(tmp_path / "a.jsonl"), **settings
    )
    simulate(straight)
    resumed = FederationConfig(
        checkpoint_dir=str(tmp_path / "b"), metrics_path=str(tmp_path / "b.jsonl"), **settings
    )
    simulate(resumed, stop_after=1)  # the "kill": the server ends after round 1's checkpoint
    assert CheckpointStore(resumed.checkpoint_dir).rounds()[-1] == 1
    simulate(resumed)
    a, b = CheckpointStore(straight.checkpoint_dir).load(3), CheckpointStore(resumed.checkpoint_dir).load(3)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa, wb)  # content-ordered aggregation: bit for bit
    assert [r["round"] for r in rows(tmp_path / "b.jsonl")] == [0, 1, 2, 3]
    assert rows(tmp_path / "b.jsonl")[-1]["recall@20"] == pytest.approx(
        rows(tmp_path / "a.jsonl")[-1]["recall@20"], abs=1e-9
    )


def test_a_federated_word2vec_stage_seeds_the_rib_run_after_it(population, tmp_path):
    from aggregator.server_app import INIT_CHECKPOINT
    from model import skipgram
    from model.train import load_checkpoint

    common = dict(
        population_dir=str(population),
        fraction_fit=1.0,
        min_fit_clients=N_DEVICES,
        min_available_clients=N_DEVICES,
        strategy="fedadam",
        **SMALL,
    )
    stage = FederationConfig(
        task="word2vec",
        num_server_rounds=3,
        server_lr=0.05,
        local_lr=1.0,
        checkpoint_dir=str(tmp_path / "w2v-ckpt"),
        release_dir=str(tmp_path / "w2v"),
        metrics_path=str(tmp_path / "w2v.jsonl"),
        **{**common, "local_steps": 1},
    )
    tap = WireTap(tmp_path / "wire")
    simulate(stage, extra_mods=[tap])
    history = rows(tmp_path / "w2v.jsonl")
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert all(r["participants"] == N_DEVICES for r in history[1:])
    assert all(0.0 <= r["recall@20"] <= 1.0 for r in history)  # the Word2vec baseline on held-out sessions
    final = CheckpointStore(stage.checkpoint_dir).load(3).weights
    first = skipgram.initial_weights(final[0].shape[0] - 1, SMALL["item_dim"], stage.seed)
    assert [w.shape for w in final] == [w.shape for w in first] and not np.array_equal(final[1], first[1])
    # Devices sent two float tables of the skip-gram's shapes and nothing else.
    shapes = [[["f", list(w.shape)] for w in first]]
    assert {json.dumps(m["arrays"]) for m in tap.sent() if not m["error"]} == {json.dumps(s) for s in shapes}
    # The stage's product: a RIB checkpoint whose item embeddings are the final W_in, rescaled.
    init = tmp_path / "w2v" / INIT_CHECKPOINT
    table = load_checkpoint(init, device="cpu").model.item_emb.weight.detach().numpy()
    ratio = table[1:] / final[0][1:]
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-3)
    # ... which a RIB run takes as its starting point (round 0 is evaluated on exactly those weights).
    rib = FederationConfig(
        num_server_rounds=1,
        initial_checkpoint=str(init),
        checkpoint_dir=str(tmp_path / "rib-ckpt"),
        metrics_path=str(tmp_path / "rib.jsonl"),
        **common,
    )
    simulate(rib)
    start = CheckpointStore(rib.checkpoint_dir).load(0).weights
    np.testing.assert_array_equal(start[0], table)
    assert rows(tmp_path / "rib.jsonl")[-1]["round"] == 1


def test_item_catalog_sets_the_starting_item_embeddings(population, tmp_path):
    from aggregator.server_app import initial_weights
    from federation.config import ConfigError
    from federation.task import federated_rib_config
    from model.catalog import catalog_from_rows
    from model.data.dataset import SplitData

    vocab = SplitData.load(population / "server" / "split.npz").vocab
    items = [str(i) for i in vocab.item_ids]
    catalog = catalog_from_rows([[item, f"brand{k % 3}"] for k, item in enumerate(items)], ("brand",))
    path = catalog.write_csv(tmp_path / "catalog.csv")
    base = FederationConfig(population_dir=str(population), **SMALL)
    rib_config = federated_rib_config(vocab, base.data_type, base.item_dim, base.hidden_dim, base.max_len)
    random_start = initial_weights(base, rib_config, vocab)
    catalog_start = initial_weights(replace(base, item_catalog=str(path)), rib_config, vocab)
    changed = [
        i
        for i, (a, b) in enumerate(zip(random_start, catalog_start, strict=True))
        if not np.array_equal(a, b)
    ]
    assert len(changed) == 1  # only the item embedding table
    table = catalog_start[changed[0]]
    assert table.shape == (vocab.n_items + 1, SMALL["item_dim"])
    unit = table[1:] / np.linalg.norm(table[1:], axis=1, keepdims=True)
    cosine = unit @ unit.T
    brand = np.arange(len(items)) % 3
    same = brand[:, None] == brand[None, :]
    off_diagonal = ~np.eye(len(items), dtype=bool)
    assert cosine[same & off_diagonal].mean() > cosine[~same].mean() + 0.3
    (tmp_path / "unrelated.csv").write_text("item_id,brand\nnot-an-item,b\n")
    with pytest.raises(ConfigError, match="describes none"):
        initial_weights(replace(base, item_catalog=str(tmp_path / "unrelated.csv")), rib_config, vocab)
    with pytest.raises(ConfigError, match="not found"):
        initial_weights(replace(base, item_catalog=str(tmp_path / "missing.csv")), rib_config, vocab)


def test_a_frozen_public_item_table_stays_fixed_through_dp_rounds_and_ships(population, tmp_path):
    """item-catalog + tie-output + freeze-item-embeddings under user-level DP with FedAdam: the catalog table
    reaches the release unchanged, the rest of the model trains, devices send zero change for the table."""
    from model.catalog import catalog_from_rows
    from model.data.dataset import SplitData

    vocab = SplitData.load(population / "server" / "split.npz").vocab
    items = [str(i) for i in vocab.item_ids]
    catalog = catalog_from_rows([[item, f"b{k % 4}"] for k, item in enumerate(items)], ("brand",))
    private, public = generate_keypair(tmp_path / "keys")
    fed = FederationConfig(
        population_dir=str(population),
        num_server_rounds=2,
        fraction_fit=1.0,
        min_fit_clients=N_DEVICES,
        min_available_clients=N_DEVICES,
        strategy="fedadam",
        dp="user",
        dp_noise_multiplier=0.8,
        item_catalog=str(catalog.write_csv(tmp_path / "catalog.csv")),
        tie_output=True,
        freeze_item_embeddings=True,
        checkpoint_dir=str(tmp_path / "ckpt"),
        release_dir=str(tmp_path / "releases"),
        signing_key=str(private),
        metrics_path=str(tmp_path / "metrics.jsonl"),
        **{**SMALL, "local_steps": 1},
    )
    simulate(fed)
    store = CheckpointStore(fed.checkpoint_dir)
    first, last = store.load(0).weights, store.load(2).weights
    from aggregator.server_app import initial_weights
    from federation.task import run_rib_config
    from model.local import frozen_indices
    from model.rib import RIB

    rib_config = run_rib_config(vocab, fed)
    frozen = frozen_indices(RIB(rib_config))
    assert len(frozen) == 2  # the item table and its tied copy in the output
    start = initial_weights(fed, rib_config, vocab)
    for i in frozen:
        np.testing.assert_array_equal(first[i], start[i])
        np.testing.assert_array_equal(last[i], start[i])
    assert any(
        not np.array_equal(a, b) for i, (a, b) in enumerate(zip(first, last, strict=True)) if i not in frozen
    )
    history = rows(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in history] == [0, 1, 2] and history[2]["epsilon"] > 0
    manifest = verify_package(Path(history[-1]["release"]), public)
    assert manifest.model_version == 2


def test_fingerprint_tells_model_layouts_apart_and_ignores_the_round_count():
    from aggregator.server_app import fingerprint

    base = FederationConfig()
    assert fingerprint(base, 10) == fingerprint(replace(base, num_server_rounds=9), 10)
    layouts = [
        base,
        replace(base, tie_output=True),
        replace(base, item_catalog="c.csv"),
        replace(base, item_catalog="c.csv", tie_output=True, freeze_item_embeddings=True),
    ]
    assert len({fingerprint(f, 10) for f in layouts}) == len(layouts)
