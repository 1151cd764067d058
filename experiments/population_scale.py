"""Population set-up at scale: time, peak RSS and disk of building virtual-device populations.

    python -m experiments.population_scale [--sizes 10000,100000] [--real] [--work DIR]

(Run it by path: opacus installs a top-level ``benchmarks`` package that shadows this directory.)

Every build runs in its own process, so each peak RSS (``ru_maxrss``) is that build's alone. Synthetic
populations of each size, and, when ``../shared/data`` exists and ``--real`` is given, the shared logs
partitioned by user (by session for YOOCHOOSE) with the tuple-equivalence report on a device sample.
Per build: wall time, time to the first device (source + server split), devices per second, peak RSS,
disk (allocated blocks and apparent bytes, per device), and the cost of loading one sampled device's
training data (what a simulated client does each round). Writes ``benchmarks/results/simulation/
population.json`` and ``population.md``; the populations themselves go to ``--work`` and are deleted
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.paths import RESULTS as _RESULTS

RESULTS = _RESULTS / "simulation"
REAL_SOURCES = ("jdata2016_sample", "jdata2018_mkmsr_demo", "taobao_userbehavior_timeslice", "yoochoose_100k")


def disk_usage(root: Path) -> tuple[int, int, int]:
    """(allocated bytes, apparent bytes, files) under ``root``."""
    allocated = apparent = files = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                allocated += info.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    apparent += info.st_size
                    files += 1
    return allocated, apparent, files


def one_build(source: str, devices: int | None, out: Path, compare: bool) -> dict[str, object]:
    """Build one population in this process; report timings and this process's peak RSS."""
    import numpy as np

    from simulations.population import build_population, open_population

    first: list[float] = []
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    info = build_population(source, out, max_devices=devices, overwrite=True, progress=progress)
    build_s = time.perf_counter() - start
    pop = open_population(out)
    rng = np.random.default_rng(0)
    sample = rng.choice(pop.ok_indices(), size=min(50, info.n_ok), replace=False)
    pop.split()
    t0 = time.perf_counter()
    examples = sum(len(pop.device_dataset(int(i)).examples()) for i in sample)
    load_ms = (time.perf_counter() - t0) / len(sample) * 1000
    row: dict[str, object] = {
        "source": info.source,
        "partition": info.partition,
        "devices": info.n_devices,
        "devices_ok": info.n_ok,
        "skipped": info.skipped,
        "events": info.events,
        "records": info.records,
        "vocab_items": info.vocab_items,
        "test_examples": info.raw["split"]["test_examples"],
        "build_s": round(build_s, 1),
        "first_device_s": round(first[0], 2) if first else None,
        "devices_per_s": round(info.n_devices / max(build_s - (first[0] if first else 0), 1e-9), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_device_ms": round(load_ms, 2),
        "examples_per_sampled_device": round(examples / len(sample), 2),
    }
    if compare:
        from simulations.equivalence import compare_population

        row["equivalence"] = compare_population(pop, max_devices=2000)
    return row


def run_child(source: str, devices: int | None, out: Path, compare: bool) -> dict[str, object]:
    """One build in a fresh interpreter (its own peak RSS), then its disk use measured from outside."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", source, str(devices or 0), str(out)]
    if compare:
        command.append("--compare")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"build of {source} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    allocated, apparent, files = disk_usage(out)
    row.update(
        disk_mib=round(allocated / 2**20, 1),
        apparent_mib=round(apparent / 2**20, 1),
        disk_kib_per_device=round(allocated / 1024 / max(1, int(row["devices"])), 1),
        files=files,
    )
    return row


def table(rows: list[dict[str, object]]) -> str:
    """Markdown table of the builds."""
    head = (
        "| source | partition | devices (ok) | records | build s | split s | devices/s | peak RSS MiB | "
        "disk MiB (KiB/device) | load device ms |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['partition']} | {r['devices']:,} ({r['devices_ok']:,}) | {r['records']:,} | "
            f"{r['build_s']} | {r['first_device_s']} | {r['devices_per_s']} | {r['peak_rss_mib']} | "
            f"{r['disk_mib']} ({r['disk_kib_per_device']}) | {r['load_device_ms']} |"
        )
    return "\n".join(lines)


def equivalence_table(rows: list[dict[str, object]]) -> str:
    """Markdown table of the tuple-equivalence reports (interaction logs only)."""
    head = (
        "| source | devices compared | sessions: all but last-visit dwell equal | sessions: inner > 30 min pause | "
        "other | tuples device = central | devices with identical training data | examples device / central |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        eq = r.get("equivalence")
        if not eq:
            continue
        s, t, e = eq["sessions"], eq["tuples"], eq["examples"]
        total = sum(s.values())
        other = total - s.get("last_visit_dwell", 0) - s.get("session_gap", 0) - s.get("exact", 0)
        lines.append(
            f"| {r['source']} | {eq['devices']:,} | {s.get('last_visit_dwell', 0) + s.get('exact', 0):,} of {total:,} | "
            f"{s.get('session_gap', 0):,} | {other} | {t['device'] == t['central']} ({t['device']:,}) | "
            f"{e.get('devices_identical', 0):,} of {eq['devices']:,} | {e['device']:,} / {e['central']:,} |"
        )
    return "\n".join(lines)


def render(result: dict[str, object]) -> str:
    """The markdown report."""
    rows = result["rows"]
    return (
        "# Population set-up\n\n"
        + table(rows)
        + "\n\n`split s`: source + server split, before the first device. `devices/s`: after it. "
        "`load device ms`: read + decrypt one sampled device's store and build its training data (what a "
        "simulated client does each round). Disk: allocated blocks (a device store is 3 small files, "
        "~2 KiB apparent, one 4 KiB block each plus the directory).\n\n"
        + (f"{result['note']}\n\n" if result.get("note") else "")
        + "## Device tuples vs the centralized protocol\n\n"
        + equivalence_table(rows)
        + "\n\nThe last visit of a session has the unknown dwell centrally and a measured lower bound on the "
        "device; it is never inside a prefix. Inside given sessions with a pause over 30 min the device "
        "closes the open visit at the pause (its dwell bucket differs); see docs/simulations.md.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="synthetic population sizes")
    parser.add_argument(
        "--real", action="store_true", help="also the shared real logs (needs ../shared/data)"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="where populations are built (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the built populations")
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "DEVICES", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--render", action="store_true", help="only rewrite population.md from population.json"
    )
    args = parser.parse_args()
    if args.render:
        (RESULTS / "population.md").write_text(render(json.loads((RESULTS / "population.json").read_text())))
        return
    if args.child:
        source, devices, out = args.child
        print(json.dumps(one_build(source, int(devices) or None, Path(out), args.compare)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="rib-pop-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    jobs: list[tuple[str, int | None, bool]] = [
        ("synthetic", int(s), False) for s in args.sizes.split(",") if s
    ]
    if args.real:
        from model.data.loaders import default_data_dir

        if default_data_dir().is_dir():
            jobs += [(name, None, True) for name in REAL_SOURCES]
        else:
            print(f"no shared data at {default_data_dir()}: real sources skipped", file=sys.stderr)
    try:
        for source, devices, compare in jobs:
            out = work / f"{source}-{devices or 'all'}"
            row = run_child(source, devices, out, compare)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "note": args.note,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "population.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "population.md").write_text(
        "# Population set-up\n\n"
        + table(rows)
        + "\n\n`split s`: source + server split, before the first device. "
        "`load device ms`: read + decrypt one device's store and build its training data (what a sampled "
        "client does each round).\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
