"""Flower's deployment engine on loopback: one SuperLink and three SuperNodes as separate processes, a run
submitted with ``flwr run``, two rounds. Every process the test starts is stopped at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from aggregator.deploy import Deployment, key_value_arg, submit_run  # noqa: E402
from aggregator.release import publish_release  # noqa: E402
from aggregator.server_app import initial_weights  # noqa: E402
from edge_client.keys import KeyFileProvider  # noqa: E402
from edge_client.package import generate_keypair  # noqa: E402
from edge_client.store import TupleStore  # noqa: E402
from federation.config import FederationConfig  # noqa: E402
from federation.task import federated_rib_config  # noqa: E402
from model.data.dataset import SplitData  # noqa: E402


def test_config_arguments_are_flower_syntax():
    assert key_value_arg({"device-dir": "/a/b", "partition-id": 3}) == 'device-dir="/a/b" partition-id=3'
    assert (
        key_value_arg({"secagg": True, "local-steps": 3, "dp": "user"})
        == 'secagg=true local-steps=3 dp="user"'
    )
    with pytest.raises(ValueError):
        key_value_arg({"device-dir": "/a b"})


@pytest.mark.slow
def test_superlink_and_three_supernodes_run_two_rounds(population: Path, tmp_path: Path):
    fed = FederationConfig(population_dir=str(population), item_dim=16, hidden_dim=16)
    split = SplitData.load(fed.eval_split_path())
    rib_config = federated_rib_config(split.vocab, fed.data_type, fed.item_dim, fed.hidden_dim, fed.max_len)
    private, public = generate_keypair(tmp_path / "keys")
    # Devices take the shared vocabulary from their installed, signed release (not from the server's files).
    package = publish_release(
        initial_weights(fed, rib_config, split.vocab),
        rib_config,
        split.vocab,
        tmp_path / "releases",
        private,
        1,
    )
    metrics = tmp_path / "metrics.jsonl"
    with Deployment(tmp_path / "deployment") as deployment:
        deployment.start_superlink()
        for i in range(3):
            node = {
                "device-dir": str(population / "devices" / f"{i:06d}"),
                "package-dir": str(package),
                "public-key": str(public),
                "egress-log": str(tmp_path / f"egress-{i}.jsonl"),
            }
            deployment.start_supernode(node, f"device{i}")
        result = submit_run(
            deployment.superlink,
            {
                "eval-split": str(fed.eval_split_path()),
                "num-server-rounds": 2,
                "fraction-fit": 1.0,
                "min-fit-clients": 3,
                "min-available-clients": 3,
                "item-dim": 16,
                "hidden-dim": 16,
                "local-steps": 2,
                "metrics-path": str(metrics),
            },
            tmp_path / "flwr-home",
            timeout_s=400,
        )
        processes = list(deployment.processes)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["participants"] == 3 and r["dropouts"] == 0 for r in rows[1:])
    assert all(p.poll() is not None for p in processes), "a Flower process outlived the test"

    # No raw egress: everything the three devices sent (audited at each SuperNode) holds no event, tuple,
    # timestamp, session id or item id of theirs; arrays are model weights only.
    secrets: set[str] = set()
    timestamps: set[int] = set()
    for i in range(3):
        device = population / "devices" / f"{i:06d}"
        store = TupleStore(device, key_provider=KeyFileProvider(device / "store.key"))
        for record in store.read():
            secrets.update({record.session_id, record.item_id})
            timestamps.add(int(record.timestamp_ms))
        store.close()
    shapes = {tuple(w.shape) for w in initial_weights(fed, rib_config, split.vocab)}
    sent = [
        json.loads(line)
        for i in range(3)
        for line in (tmp_path / f"egress-{i}.jsonl").read_text().splitlines()
    ]
    train_replies = [m for m in sent if m["type"] == "train" and not m["error"]]
    assert len(train_replies) == 3 * 2
    for message in sent:
        assert not set(message["str"]) & secrets
        assert not set(message["int"]) & timestamps
        assert all(kind == "f" and tuple(shape) in shapes for kind, shape in message["arrays"])
