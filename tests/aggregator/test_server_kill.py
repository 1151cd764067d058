"""Kill a running federated server process in the middle of a round, re-run the same command, get the same model.

``rib-edge simulate`` runs the real ServerApp and ClientApps (Flower simulation, Ray backend) in one process
group. The test waits until round ``KILL_AFTER``'s checkpoint is written and round ``KILL_AFTER + 1`` has
started (the server sampled its devices), SIGKILLs the whole group (CLI, Ray's GCS, raylet and workers), checks
nothing of it is left, and re-runs the same command. That run must resume at the next round (it reports only
the rounds after the checkpoint, never round 0), finish every round, and end with the global model of an
uninterrupted run with the same seed, bit for bit (full participation: a resumed simulation with
fraction < 1 resamples, see README).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from aggregator.checkpoint import CheckpointStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 4
KILL_AFTER = 2
DEADLINE_S = 120.0  # per process: a hang fails the test instead of blocking it
# The CLI's progress line of a finished round, and Flower's line of a round's start (devices sampled).
ROUND_DONE = re.compile(r"\]\s+round\s+(\d+):")
ROUND_STARTED = "configure_fit: strategy sampled"


def simulate_args(out: Path, population: Path) -> list[str]:
    """One small simulation: 24 synthetic devices, full participation (resume is then bit-exact)."""
    cli = [sys.executable, "-c", "from rib_edge.cli import main; main()", "simulate", "--preset", "smoke"]
    options = {
        "--devices": 24,
        "--rounds": ROUNDS,
        "--fraction": 1.0,
        "--local-steps": 20,
        "--seed": 3,
        "--num-cpus": 2,
        "--population": population,
        "--out": out,
    }
    return cli + [str(x) for pair in options.items() for x in pair]


class Server:
    """``rib-edge simulate`` in its own session (process group); its output lines arrive on a queue."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,  # FLWR_HOME (tests/conftest.py) goes with it: nothing under ~/.flwr
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.pgid = self.proc.pid
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def next_line(self, deadline: float) -> str | None:
        """The next output line; None at the end of the output. Fails past the deadline."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            pytest.fail("the simulation took too long:\n" + self.output())
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail("the simulation took too long:\n" + self.output())
        if line is not None:
            self.lines.append(line)
        return line

    def finish(self) -> int:
        """Read the output to its end and wait for the exit status."""
        deadline = time.monotonic() + DEADLINE_S
        while self.next_line(deadline) is not None:
            pass
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def rounds_reported(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := ROUND_DONE.search(line))]

    def output(self) -> str:
        return "".join(self.lines[-60:])

    def kill_group(self) -> None:
        """SIGKILL every process of the group (no-op when it is gone already)."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def live_members(pgid: int) -> list[str]:
    """Processes of a group that still run (zombies awaiting a reaper excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name_end = text.rfind(")")
        fields = text[name_end + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            found.append(text[: name_end + 1])
    return found


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_server_killed_mid_round_resumes_at_the_next_round_with_the_same_model(tmp_path):
    population = tmp_path / "population"  # built by the first run, shared by both (same devices)
    servers: list[Server] = []
    try:
        # 1. The uninterrupted reference run.
        straight = Server(simulate_args(tmp_path / "straight", population))
        servers.append(straight)
        assert straight.finish() == 0, straight.output()
        assert straight.rounds_reported() == list(range(ROUNDS + 1))

        # 2. The same run in another directory, killed once round KILL_AFTER + 1 is under way.
        out = tmp_path / "killed"
        args = simulate_args(out, population)
        victim = Server(args)
        servers.append(victim)
        deadline = time.monotonic() + DEADLINE_S
        checkpointed = False
        while True:
            line = victim.next_line(deadline)
            assert line is not None, "the run ended before it could be killed:\n" + victim.output()
            done = ROUND_DONE.search(line)
            if done and int(done.group(1)) == KILL_AFTER:
                checkpointed = True  # the progress line comes after the round's checkpoint
            elif checkpointed and ROUND_STARTED in line:
                break  # round KILL_AFTER + 1 has sampled its devices: they are training now
        victim.kill_group()
        assert victim.proc.returncode == -signal.SIGKILL
        gone_by = time.monotonic() + 15
        while live_members(victim.pgid) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not live_members(victim.pgid), f"left running after the kill: {live_members(victim.pgid)}"
        store = CheckpointStore(out / "checkpoints")
        assert store.rounds()[-1] == KILL_AFTER, "the kill did not land inside the next round"
        assert [r["round"] for r in rows(out / "metrics.jsonl")] == list(range(KILL_AFTER + 1))

        # 3. The same command again: it resumes at the next round and finishes the run.
        resumed = Server(args)
        servers.append(resumed)
        assert resumed.finish() == 0, resumed.output()
        assert resumed.rounds_reported() == list(range(KILL_AFTER + 1, ROUNDS + 1)), resumed.output()
        history = rows(out / "metrics.jsonl")
        assert [r["round"] for r in history] == list(range(ROUNDS + 1))  # rounds before the kill kept, once
        assert all(r["participants"] > 0 for r in history[1:])

        final = CheckpointStore(out / "checkpoints").load(ROUNDS)
        reference = CheckpointStore(tmp_path / "straight" / "checkpoints").load(ROUNDS)
        for got, want in zip(final.weights, reference.weights, strict=True):
            np.testing.assert_array_equal(got, want)  # bit for bit
        assert final.history[-1]["recall@20"] == reference.history[-1]["recall@20"]
        assert final.history[-1]["mrr@20"] == reference.history[-1]["mrr@20"]
    finally:
        for server in servers:
            server.kill_group()
