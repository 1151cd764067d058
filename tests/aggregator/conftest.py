"""A tiny federation on disk: device stores written from synthetic sessions, and the server's split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_client.keys import KeyFileProvider
from edge_client.schema import MicroBehavior
from edge_client.store import TupleStore
from model.data.dataset import SessionDataset
from model.data.open import synthetic_split
from model.data.synthetic import SyntheticConfig

KEY_FILE = "store.key"


def dataset_records(data: SessionDataset) -> dict[str, list[MicroBehavior]]:
    """Every session's tuples as device records, grouped by user (device)."""
    by_user: dict[str, list[MicroBehavior]] = {}
    activities = data.vocab.activities.names
    for s in range(data.n_sessions):
        user = str(data.user_ids[s]) if data.user_ids is not None else str(data.session_ids[s])
        span = data.session(s)
        for t in range(span.start, span.stop):
            by_user.setdefault(user, []).append(
                MicroBehavior(
                    session_id=str(data.session_ids[s]),
                    timestamp_ms=int(data.timestamps_ms[t]),
                    item_id=str(data.vocab.item_ids[data.items[t] - 1]),
                    activity=activities[data.activities[t]],
                    dwell_seconds=float(data.dwell_seconds[t]),
                )
            )
    return by_user


def write_population(root: Path, n_devices: int = 6, seed: int = 0) -> Path:
    """Population dir (contract of simulations.population): devices/<i>/ stores + server/split.npz."""
    split = synthetic_split(SyntheticConfig(n_devices=60, n_items=80, n_categories=6, days=10), seed=seed)
    by_user = dataset_records(split.train)
    users = sorted(by_user)
    groups = np.array_split(np.arange(len(users)), n_devices)
    for index, members in enumerate(groups):
        device_dir = root / "devices" / f"{index:06d}"
        store = TupleStore(device_dir, key_provider=KeyFileProvider(device_dir / KEY_FILE))
        store.append([r for m in members for r in by_user[users[m]]])
        store.close()
    (root / "server").mkdir(parents=True, exist_ok=True)
    split.save(root / "server" / "split.npz")
    (root / "population.json").write_text(
        json.dumps({"format": 1, "source": "synthetic", "n_devices": n_devices})
    )
    return root


@pytest.fixture(scope="session")
def population(tmp_path_factory) -> Path:
    """A 6-device synthetic population (built once per test session; tests must not write into it)."""
    return write_population(tmp_path_factory.mktemp("population"))
