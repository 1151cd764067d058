"""Server checkpoints: atomic, verified, fall back past damage, refuse another run's directory."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.checkpoint import CheckpointError, CheckpointStore, ServerState


def _state(server_round: int, value: float = 1.0) -> ServerState:
    return ServerState(
        round=server_round,
        weights=[np.full((3, 2), value, np.float32), np.arange(4, dtype=np.float32)],
        fingerprint="abc",
        optimizer={"m_t": [np.ones(2)]},
        accountant={"rounds": server_round},
        history=[{"round": r} for r in range(server_round + 1)],
    )


def test_round_trip_and_pruning(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for r in range(4):
        store.save(_state(r, float(r)))
    assert store.rounds() == [2, 3]
    latest = store.latest("abc")
    assert latest.round == 3 and latest.accountant == {"rounds": 3}
    np.testing.assert_array_equal(latest.weights[0], np.full((3, 2), 3.0, np.float32))
    np.testing.assert_array_equal(latest.optimizer["m_t"][0], np.ones(2))
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_round(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    store.save(_state(1, 1.0))
    path = store.save(_state(2, 2.0))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(b"not a checkpoint")
    path.write_bytes(bytes(data))
    assert store.latest("abc").round == 1


def test_another_runs_directory_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    with pytest.raises(CheckpointError, match="other settings"):
        store.latest("different")


def test_empty_directory_means_a_fresh_start(tmp_path):
    assert CheckpointStore(tmp_path / "none").latest("abc") is None
