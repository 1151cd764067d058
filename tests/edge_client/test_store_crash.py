"""Crash test of the tuple store: SIGKILL a writer at random points, then check what reads back.

A child process appends deterministic records in batches and prints the running total after each
``append`` returns (that is the acknowledgement: the data was fsynced). The parent kills it with SIGKILL
after a random number of acknowledgements plus a random delay of up to 2 ms, so kills land anywhere:
between write and fsync, inside a segment rollover or manifest replace, and (every other child writes its
frames 4 bytes per ``write()``, since SIGKILL never splits one system call) inside a frame. After each
kill a fresh reader must return exactly records 0..n-1 with n >= every count acknowledged so far
(nothing acknowledged lost, nothing corrupt, no gaps or duplicates; a torn tail is ignored and counted),
and the next child carries on from there (so every kill is also followed by appends to the recovered store).

CI runs ``CRASH_KILLS`` (default 20) kills; ``experiments/security.py crash`` runs the same campaign with 200 or more
and writes ``benchmarks/results/security/crash.json``.
"""

from __future__ import annotations

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
from edge_client.store import StoreError, TupleStore

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000
SEGMENT_BYTES = 2048  # small, so kills also land in segment rollovers

CHILD = r"""
import os, random, sys
from pathlib import Path
import edge_client.store
from tests.edge_client.test_store_crash import open_store, record
directory, seed, chunk = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if chunk:  # a SIGKILL never splits one write(); many small writes let it land inside a frame (a torn tail)
    def _write_all(fd, data):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:chunk]):]
    edge_client.store._write_all = _write_all
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
    return TupleStore(
        directory / "store",
        key_provider=KeyFileProvider(directory / "store.key"),
        segment_bytes=SEGMENT_BYTES,
    )


def run_crash_campaign(directory: Path, kills: int, seed: int = 0, strict: bool = True) -> dict[str, object]:
    """Kill a writer ``kills`` times and read the store back after each kill; return the campaign's figures.

    ``strict`` (the test) fails at the first kill that lost an acknowledged record or read back anything
    but records 0..n-1; otherwise (the benchmark) such kills are counted.
    """
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    acknowledged = 0
    read_back = 0
    lost = corrupt = torn_recoveries = torn_bytes = unacknowledged_kept = 0
    started = time.perf_counter()
    for round_no in range(kills):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(directory),
                str(seed * 1_000_003 + round_no),
                str(4 * (round_no % 2)),
            ],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            text=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline().split()
            assert first and first[0] == "start", f"child did not start: {first}"
            # the writer sees exactly what the last reader saw (it recovers the torn tail on its first append)
            assert int(first[1]) == read_back, (
                f"kill {round_no}: writer opened {first[1]} records, reader saw {read_back}"
            )
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
        try:
            records = reader.read()
        except StoreError as err:
            if strict:
                raise AssertionError(f"kill {round_no}: the store no longer reads: {err}") from err
            corrupt += 1
            continue
        read_back = len(records)
        kill_lost = max(0, acknowledged - read_back)
        kill_corrupt = records != [record(i) for i in range(read_back)]
        if strict:
            assert not kill_lost, f"kill {round_no}: {acknowledged} acknowledged, only {read_back} read back"
            assert not kill_corrupt, f"kill {round_no}: wrong records read back"
        lost += kill_lost
        corrupt += kill_corrupt
        torn_recoveries += reader.last_read.torn_tails > 0
        torn_bytes += reader.last_read.torn_bytes
        unacknowledged_kept += read_back - acknowledged if read_back > acknowledged else 0
    return {
        "kills": kills,
        "acknowledged_records": acknowledged,
        "read_back": read_back,
        "lost_acknowledged": lost,
        "corrupt_reads": corrupt,
        "torn_tail_recoveries": torn_recoveries,
        "torn_tail_bytes": torn_bytes,
        "unacknowledged_records_kept": unacknowledged_kept,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _kills() -> int:
    return int(os.environ.get("CRASH_KILLS", "20"))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_never_loses_acknowledged_records_nor_corrupts(tmp_path):
    result = run_crash_campaign(tmp_path, _kills(), seed=1)
    assert result["acknowledged_records"] > 0 and result["lost_acknowledged"] == result["corrupt_reads"] == 0
    # the store is still writable and consistent after all the kills
    store = open_store(tmp_path)
    n = store.count()
    store.append([record(n)])
    assert store.read() == [record(i) for i in range(n + 1)]
    store.compact()
    assert store.read() == [record(i) for i in range(n + 1)]
