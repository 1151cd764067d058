"""Security benchmarks: fuzzing, SIGKILL crash safety and tamper resistance, at full budgets.

Run by path (opacus ships a top-level ``benchmarks`` package that shadows this directory)::

    python -m experiments.security fuzz   [--examples 10000] [--surfaces a,b] [--jobs 1]
    python -m experiments.security crash  [--kills 200]
    python -m experiments.security tamper [--graph-offsets 512]

- ``fuzz`` runs every ``FuzzSurface`` of the ``test_fuzz_*`` modules (the very ``check`` functions the
  tests run) on ``--examples`` generated cases each, one child process per surface, counting cases, crashes
  (any case whose property failed) and outcomes, with the child's peak RSS. Results are merged by surface
  into ``fuzz.json``, so surfaces may be run in separate invocations.
- ``crash`` runs ``tests.edge_client.test_store_crash.run_crash_campaign`` with ``--kills`` kills, counting
  lost acknowledged records and corrupt reads instead of stopping at the first (both must be 0).
- ``tamper`` runs the cases of ``tests.edge_client.test_tamper`` with a flipped bit at every offset of every
  small package file and ``--graph-offsets`` offsets per graph, plus every store case exhaustively.

Results go to ``--out`` (default ``benchmarks/results/security``): ``fuzz.json``, ``crash.json``,
``tamper.json`` and a markdown table each; the table is also printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from experiments.paths import REPO_ROOT as ROOT
from experiments.paths import RESULTS

OUT = RESULTS / "security"
FUZZ_MODULES = (
    "tests.edge_client.test_fuzz_events",
    "tests.edge_client.test_fuzz_server",
    "tests.edge_client.test_fuzz_store",
    "tests.edge_client.test_fuzz_package",
    "tests.model.data.test_fuzz_loaders",
    "tests.aggregator.test_fuzz_replies",
)


def _machine() -> dict[str, object]:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _write(out: Path, name: str, result: dict[str, object], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    (out / f"{name}.md").write_text(table + "\n")
    print(table)


def _table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- fuzz ----------------------------------------------------------------------------------------------


def all_surfaces() -> dict[str, object]:
    """Every FuzzSurface of the fuzz test modules, by name."""
    import importlib

    surfaces = {}
    for module in FUZZ_MODULES:
        for surface in importlib.import_module(module).SURFACES:
            surfaces[surface.name] = surface
    return surfaces


def fuzz_one(name: str, examples: int, seed: int, null: bool = False) -> dict[str, object]:
    """Run one surface's property on ``examples`` generated cases in this process; its figures.

    ``null`` generates the same cases but checks nothing: the RSS hypothesis itself needs for them. (RSS
    growth over a run also holds tracemalloc's residue: starting and stopping it around each case, as the
    bounded-memory check does, leaves some 20 KB per case that a run without it does not show.)
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from tests.fuzzing import MAX_TRACED_PEAK

    surface = all_surfaces()[name]
    check = (lambda ctx, example: "generated") if null else surface.check
    cases = crashes = 0
    outcomes: Counter = Counter()
    samples: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp, surface.setup(Path(tmp)) as ctx:
        rss_after_setup = _peak_rss_mib()

        @hypothesis_seed(seed)
        @settings(
            max_examples=examples,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(surface.strategy)
        def run(example: object) -> None:
            nonlocal cases, crashes
            cases += 1
            try:
                outcomes[check(ctx, example)] += 1
            except Exception as err:  # noqa: BLE001 - a failed property is what we count
                crashes += 1
                outcomes["CRASH"] += 1
                if len(samples) < 5:
                    samples.append(
                        {
                            "error": f"{type(err).__name__}: {str(err)[:300]}",
                            "example": repr(example)[:300],
                            "where": "".join(traceback.format_tb(err.__traceback__)[-2:])[-600:],
                        }
                    )

        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
    return {
        "name": name,
        "description": surface.description,
        "cases": cases,
        "crashes": crashes,
        "seconds": round(seconds, 1),
        "ms_per_case": round(1000 * seconds / max(cases, 1), 2),
        "rss_after_setup_mib": rss_after_setup,
        "peak_rss_mib": _peak_rss_mib(),
        "max_traced_peak_per_case_mib": round(MAX_TRACED_PEAK[0] / 2**20, 2) if MAX_TRACED_PEAK[0] else None,
        "outcomes": dict(outcomes.most_common()),
        "crash_samples": samples,
    }


def _fuzz_command(run: str, args: argparse.Namespace, target: Path) -> list[str]:
    surface, _, mode = run.partition(":")
    command = [
        sys.executable,
        "-m",  # as a module from the repository root (cwd): the test modules import as ``tests.*``
        "experiments.security",
        "fuzz-one",
        surface,
        "--examples",
        str(args.examples),
        "--seed",
        str(args.seed),
    ]
    return [*command, "--result", str(target), *(["--null"] if mode == "null" else [])]


def _merge_run(results: dict[str, dict], run: str, figures: dict | None, error: str) -> None:
    """Fold one child's figures into the per-surface results (extra runs add one figure to their surface)."""
    surface, _, mode = run.partition(":")
    if not mode:
        results[surface] = figures or {"name": surface, "cases": 0, "crashes": 1, "error": error}
        return
    entry = results.setdefault(surface, {"name": surface})
    if figures is None:
        entry[f"{mode}_error"] = error
        return
    growth = round(figures["peak_rss_mib"] - figures["rss_after_setup_mib"], 1)
    entry["rss_growth_hypothesis_only_mib" if mode == "null" else "rss_growth_untraced_mib"] = growth
    if mode == "untraced" and figures["crashes"]:
        entry["crashes"] = int(entry.get("crashes", 0)) + figures["crashes"]


def fuzz(args: argparse.Namespace) -> dict[str, object]:
    """Every (or the chosen) surface in its own child process; results merged into fuzz.json.

    Each surface also gets a ``:null`` run (same cases, no check: hypothesis' own RSS) and, with
    ``--leak-check``, an ``:untraced`` run (the check without tracemalloc: the code's own RSS growth). A name
    given as ``surface:null`` or ``surface:untraced`` runs just that.
    """
    names = list(all_surfaces()) if not args.surfaces else args.surfaces.split(",")
    out = Path(args.out)
    path = out / "fuzz.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results = {s["name"]: s for s in previous.get("surfaces", [])}
    modes = ("", ":null", ":untraced") if args.leak_check else ("", ":null")
    pending = [
        name if ":" in name else f"{name}{mode}"
        for name in names
        for mode in (("",) if ":" in name else modes)
    ]
    running: list[tuple[str, subprocess.Popen, Path, object]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            run = pending.pop(0)
            target = Path(tempfile.mkstemp(prefix=f"fuzz-{run.replace(':', '-')}-", suffix=".json")[1])
            env = {**os.environ, "RIB_EDGE_FUZZ_TRACE": "0"} if run.endswith(":untraced") else None
            log = target.with_suffix(".log").open("w+")  # a file, not a pipe: a chatty child never blocks
            proc = subprocess.Popen(
                _fuzz_command(run, args, target),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
                env=env,
            )
            running.append((run, proc, target, log))
            print(f"fuzzing {run} ({args.examples} cases)...", flush=True)
        time.sleep(0.5)
        for item in list(running):
            run, proc, target, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.seek(0)
            stderr = log.read()
            log.close()
            Path(log.name).unlink(missing_ok=True)
            ok = proc.returncode == 0 and target.stat().st_size > 0
            # a child that died (a crash below Python, e.g. in onnxruntime) counts as a crash of its surface
            _merge_run(
                results,
                run,
                json.loads(target.read_text()) if ok else None,
                f"exit {proc.returncode}: {stderr[-800:]}",
            )
            target.unlink(missing_ok=True)
            if ":" not in run:
                print(
                    f"  {run}: {results[run].get('cases')} cases, {results[run].get('crashes')} crashes",
                    flush=True,
                )
    surfaces = [results[name] for name in sorted(results)]
    result = {
        "examples_per_surface": args.examples,
        "seed": args.seed,
        "total_cases": sum(int(s.get("cases", 0)) for s in surfaces),
        "total_crashes": sum(int(s.get("crashes", 0)) for s in surfaces),
        "machine": _machine(),
        "surfaces": surfaces,
    }
    rows = [
        [
            s["name"],
            s.get("cases"),
            s.get("crashes"),
            s.get("peak_rss_mib"),
            round(float(s.get("peak_rss_mib", 0)) - float(s.get("rss_after_setup_mib", 0)), 1),
            s.get("rss_growth_hypothesis_only_mib"),
            s.get("rss_growth_untraced_mib"),
            s.get("max_traced_peak_per_case_mib"),
            s.get("ms_per_case"),
            ", ".join(f"{k} {v}" for k, v in list(s.get("outcomes", {}).items())[:4]),
        ]
        for s in surfaces
    ]
    table = _table(
        [
            "surface",
            "cases",
            "crashes",
            "peak RSS MiB",
            "RSS growth MiB",
            "of which hypothesis MiB",
            "growth without tracemalloc MiB",
            "max traced per case MiB",
            "ms/case",
            "top outcomes",
        ],
        rows,
    )
    _write(out, "fuzz", result, table)
    return result


# ---- crash ---------------------------------------------------------------------------------------------


def crash(args: argparse.Namespace) -> dict[str, object]:
    """The SIGKILL campaign at ``--kills`` kills, counting rather than stopping."""
    from tests.edge_client.test_store_crash import run_crash_campaign

    with tempfile.TemporaryDirectory(prefix="crash-") as tmp:
        figures = run_crash_campaign(Path(tmp), args.kills, seed=args.seed, strict=False)
    result = {**figures, "seed": args.seed, "machine": _machine()}
    table = _table(
        [
            "kills",
            "acknowledged records",
            "lost acknowledged",
            "corrupt reads",
            "torn-tail recoveries",
            "seconds",
        ],
        [
            [
                figures["kills"],
                figures["acknowledged_records"],
                figures["lost_acknowledged"],
                figures["corrupt_reads"],
                figures["torn_tail_recoveries"],
                figures["seconds"],
            ]
        ],
    )
    _write(Path(args.out), "crash", result, table)
    return result


# ---- tamper --------------------------------------------------------------------------------------------


def _offsets(size: int, graph_offsets: int) -> list[int]:
    if size <= 4096:
        return list(range(size))
    step = size / graph_offsets
    return sorted({min(size - 1, int(i * step)) for i in range(graph_offsets)} | {size - 1})


def tamper(args: argparse.Namespace) -> dict[str, object]:
    """Every package and store tamper case; refusal and detection rates."""
    from tests.edge_client.test_tamper import (
        ALL_FILES,
        DOCUMENTED,
        attempt_install,
        build_package_case,
        build_stores,
        make_device,
        package_specs,
        run_store_case,
        store_cases,
    )
    from tests.edge_client.worlds import shared_packages, shared_world

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tamper-") as tmp_name:
        tmp = Path(tmp_name)
        world = shared_world(tmp / "world")
        packages = shared_packages(world, tmp / "packages")
        device = make_device(packages, world["public"])
        specs = [s for s in package_specs(positions=()) if s[0] != "flip"]
        for name in ALL_FILES:
            size = (packages["v3"] / name).stat().st_size
            specs += [("flip", name, offset) for offset in _offsets(size, args.graph_offsets)]
        by_kind: dict[str, Counter] = {}
        package_cases = []
        for spec in specs:
            expected = build_package_case(spec, packages, tmp / "candidate")
            reason, still_serving = attempt_install(device, tmp / "candidate")
            label = f"{spec[0]}:{spec[1]}" if spec[0] == "flip" else spec[0]
            counts = by_kind.setdefault(label, Counter())
            counts["cases"] += 1
            counts["refused"] += reason is not None
            counts["expected_reason"] += reason == expected
            counts["still_serving"] += still_serving
            if reason != expected or not still_serving:
                package_cases.append(
                    {"spec": list(spec), "expected": expected, "got": reason, "still_serving": still_serving}
                )
        control = make_device(packages, world["public"])
        control_installs = control.recommender.swap(packages["v3"]).model_version == 3

        stores = build_stores(tmp / "stores")
        store_counts: dict[str, Counter] = {}
        store_failures = []
        for case in store_cases(stores, exhaustive=True):
            outcome = run_store_case(stores, case)
            counts = store_counts.setdefault(str(outcome["category"]), Counter())
            counts["cases"] += 1
            counts[str(outcome["outcome"])] += 1
            if outcome["outcome"] in ("missed", "corrupt"):
                store_failures.append(outcome)
    n = sum(c["cases"] for c in by_kind.values())
    refused = sum(c["refused"] for c in by_kind.values())
    store_n = sum(c["cases"] for c in store_counts.values())
    tampered_store = {k: c for k, c in store_counts.items() if k not in DOCUMENTED}
    result = {
        "packages": {
            "cases": n,
            "refused": refused,
            "refused_pct": round(100 * refused / n, 2),
            "expected_reason_pct": round(100 * sum(c["expected_reason"] for c in by_kind.values()) / n, 2),
            "old_model_kept_serving_pct": round(
                100 * sum(c["still_serving"] for c in by_kind.values()) / n, 2
            ),
            "genuine_newer_package_installs": control_installs,
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "failures": package_cases[:20],
        },
        "store": {
            "cases": store_n,
            "tamper_cases": sum(c["cases"] for c in tampered_store.values()),
            "tamper_detected": sum(c["detected"] for c in tampered_store.values()),
            "documented_undetectable_cases": {
                k: dict(store_counts[k]) for k in DOCUMENTED if k in store_counts
            },
            "documented_behaviour": DOCUMENTED,
            "missed": sum(c["missed"] for c in store_counts.values()),
            "corrupt_reads": sum(c["corrupt"] for c in store_counts.values()),
            "by_category": {k: dict(v) for k, v in sorted(store_counts.items())},
            "failures": store_failures[:20],
        },
        "seconds": round(time.perf_counter() - started, 1),
        "machine": _machine(),
    }
    p, s = result["packages"], result["store"]
    table = _table(
        ["target", "cases", "refused / detected", "rate", "right reason", "old model kept serving"],
        [
            [
                "model packages",
                p["cases"],
                p["refused"],
                f"{p['refused_pct']} %",
                f"{p['expected_reason_pct']} %",
                f"{p['old_model_kept_serving_pct']} %",
            ],
            [
                "store (tamper)",
                s["tamper_cases"],
                s["tamper_detected"],
                f"{round(100 * s['tamper_detected'] / max(s['tamper_cases'], 1), 2)} %",
                "",
                "",
            ],
            [
                "store (rollback/truncation, documented)",
                sum(v["cases"] for v in s["documented_undetectable_cases"].values()),
                sum(v.get("detected", 0) for v in s["documented_undetectable_cases"].values()),
                "",
                "",
                f"corrupt reads: {s['corrupt_reads']}",
            ],
        ],
    )
    _write(Path(args.out), "tamper", result, table)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fuzz = sub.add_parser("fuzz", help="every fuzz surface, one child process each")
    p_fuzz.add_argument("--examples", type=int, default=10_000)
    p_fuzz.add_argument("--surfaces", default="", help="comma-separated names (default: all)")
    p_fuzz.add_argument("--jobs", type=int, default=1)
    p_fuzz.add_argument("--leak-check", action="store_true", help="also run each check without tracemalloc")
    p_one = sub.add_parser("fuzz-one", help=argparse.SUPPRESS)
    p_one.add_argument("surface")
    p_one.add_argument("--examples", type=int, default=10_000)
    p_one.add_argument("--result", required=True)
    p_one.add_argument("--null", action="store_true")
    p_crash = sub.add_parser("crash", help="SIGKILL campaign on the tuple store")
    p_crash.add_argument("--kills", type=int, default=200)
    p_tamper = sub.add_parser("tamper", help="tampered packages and stores")
    p_tamper.add_argument("--graph-offsets", type=int, default=512)
    p_list = sub.add_parser("list", help="the fuzz surfaces")
    for p in (p_fuzz, p_one, p_crash, p_tamper, p_list):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if args.command == "fuzz-one":
        Path(args.result).write_text(json.dumps(fuzz_one(args.surface, args.examples, args.seed, args.null)))
        return 0
    if args.command == "list":
        for name, surface in all_surfaces().items():
            print(f"{name}: {surface.description}")
        return 0
    result = {"fuzz": fuzz, "crash": crash, "tamper": tamper}[args.command](args)
    failed = {
        "fuzz": result.get("total_crashes", 0),
        "crash": result.get("lost_acknowledged", 0) or result.get("corrupt_reads", 0),
        "tamper": (result.get("packages", {}).get("refused_pct", 0) < 100)
        or result.get("store", {}).get("missed", 0),
    }[args.command]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
