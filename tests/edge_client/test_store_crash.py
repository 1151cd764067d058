"""Crash test of the tuple store: SIGKILL a writer at random points, then check what reads back.

A child process appends deterministic records in batches and prints the running total after each
``append`` returns (that is the acknowledgement: the data was fsynced). The parent kills it with SIGKILL
after a random number of acknowledgements plus a random sub-millisecond delay, so kills land anywhere:
inside a frame write, between write and fsync, inside a segment rollover or manifest replace. After each
kill a fresh reader must return exactly records 0..n-1 with n >= every count acknowledged so far
(nothing acknowledged lost, nothing corrupt, no gaps or duplicates; a torn tail is ignored and counted),
and the next child carries on from there.

CI runs ``CRASH_KILLS`` (default 20) kills; for a longer campaign:
``python -m tests.edge_client.test_store_crash --kills 200``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_client.keys import KeyFileProvider
from edge_client.schema import RIB_ACTIVITIES, MicroBehavior
from edge_client.store import TupleStore

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000
SEGMENT_BYTES = 2048  # small, so kills also land in segment rollovers

CHILD = r"""
import random, sys
from pathlib import Path
from tests.edge_client.test_store_crash import open_store, record
directory, seed = Path(sys.argv[1]), int(sys.argv[2])
store = open_store(directory)
n = store.count()
print("start", n, flush=True)
rng = random.Random(seed)
while True:
    k = rng.randint(1, 12)
    store.append([record(i) for i in range(n, n + k)])
    n += k
    print(n, flush=True)
"""


def record(i: int) -> MicroBehavior:
    """The i-th record every child writes (deterministic, so the parent knows what must read back)."""
    return MicroBehavior(f"s{i // 25}", T0 + i * 250, f"item-{i % 53}", RIB_ACTIVITIES[i % 10], i / 7)


def open_store(directory: Path) -> TupleStore:
    return TupleStore(directory / "store", key_provider=KeyFileProvider(directory / "store.key"), segment_bytes=SEGMENT_BYTES)


def run_crash_campaign(directory: Path, kills: int, seed: int = 0) -> dict[str, object]:
    """Kill a writer ``kills`` times; verify after each kill; return the campaign's figures."""
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    acknowledged = 0
    torn_tails = 0
    unacknowledged_kept = 0
    started = time.perf_counter()
    for round_no in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), str(seed * 1_000_003 + round_no)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            text=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline().split()
            assert first and first[0] == "start", f"child did not start: {first}"
            assert int(first[1]) >= acknowledged
            for _ in range(rng.randint(0, 25)):
                line = proc.stdout.readline()
                if not line:
                    break
                acknowledged = max(acknowledged, int(line))
            time.sleep(rng.random() * 0.002)
        finally:
            proc.send_signal(signal.SIGKILL)
            tail = proc.stdout.read() if proc.stdout else ""
            proc.wait()
        acks = [int(line) for line in tail.splitlines() if line.strip().isdigit()]
        if acks:  # every line printed before the kill is an acknowledgement
            acknowledged = max(acknowledged, acks[-1])
        reader = open_store(directory)
        records = reader.read()
        n = len(records)
        assert n >= acknowledged, f"kill {round_no}: {acknowledged} acknowledged, only {n} read back"
        assert records == [record(i) for i in range(n)], f"kill {round_no}: wrong records read back"
        torn_tails += reader.last_read.torn_tails
        unacknowledged_kept = n - acknowledged
    return {
        "kills": kills,
        "acknowledged": acknowledged,
        "read_back": n if kills else 0,
        "lost_acknowledged": 0,  # asserted after every kill
        "torn_tails_seen": torn_tails,
        "unacknowledged_kept_last": unacknowledged_kept,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _kills() -> int:
    return int(os.environ.get("CRASH_KILLS", "20"))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_never_loses_acknowledged_records_nor_corrupts(tmp_path):
    result = run_crash_campaign(tmp_path, _kills(), seed=1)
    assert result["acknowledged"] > 0
    # the store is still writable and consistent after all the kills
    store = open_store(tmp_path)
    n = store.count()
    store.append([record(n)])
    assert store.read() == [record(i) for i in range(n + 1)]
    store.compact()
    assert store.read() == [record(i) for i in range(n + 1)]


if __name__ == "__main__":  # pragma: no cover
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run_crash_campaign(Path(tmp), args.kills, args.seed)))
