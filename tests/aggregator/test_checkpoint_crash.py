"""Crash test of the server's checkpoints: SIGKILL a process writing round checkpoints at random points.

The child resumes from the newest verified checkpoint, then writes round after round (weights derived
from the round number) and prints each round once ``save`` returned (the acknowledgement). The parent
kills it at random moments; after every kill, ``latest()`` must return a checkpoint that verifies, holds
exactly the weights of its round, and is no older than the last acknowledged round. ``CHECKPOINT_KILLS``
(default 12) sets how many kills CI makes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from aggregator.checkpoint import CheckpointStore, ServerState

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys
from pathlib import Path
from aggregator.checkpoint import CheckpointStore
from tests.aggregator.test_checkpoint_crash import state_for
store = CheckpointStore(Path(sys.argv[1]), keep=2)
latest = store.latest("crash-test")
r = 0 if latest is None else latest.round
while True:
    r += 1
    store.save(state_for(r))
    print(r, flush=True)
"""


def state_for(server_round: int) -> ServerState:
    """The deterministic state of a round (big enough that a kill can land inside a write)."""
    rng = np.random.default_rng(server_round)
    return ServerState(
        round=server_round,
        weights=[rng.standard_normal((200, 64)).astype(np.float32), np.full(7, server_round, np.float32)],
        fingerprint="crash-test",
        optimizer={"m_t": [rng.standard_normal(50)]},
        accountant={"rounds": server_round},
        history=[{"round": r} for r in range(server_round + 1)],
    )


def test_checkpoints_survive_sigkill_at_random_points(tmp_path):
    kills = int(os.environ.get("CHECKPOINT_KILLS", "12"))
    rng = random.Random(7)
    acknowledged = 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        target = rng.randint(1, 4)
        seen = 0
        while seen < target:
            line = child.stdout.readline()
            if not line:
                break
            acknowledged = max(acknowledged, int(line))
            seen += 1
        time.sleep(rng.uniform(0, 0.02))
        child.send_signal(signal.SIGKILL)
        child.wait()
        for line in child.stdout.read().splitlines():  # acknowledged before the kill landed
            acknowledged = max(acknowledged, int(line))
        child.stdout.close()
        latest = CheckpointStore(tmp_path, keep=2).latest("crash-test")
        assert latest is not None and latest.round >= acknowledged
        expected = state_for(latest.round)
        for got, want in zip(latest.weights, expected.weights, strict=True):
            np.testing.assert_array_equal(got, want)
        assert latest.history == expected.history
    assert acknowledged >= kills  # every child made progress
