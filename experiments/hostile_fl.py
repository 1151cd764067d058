"""One hostile device among ten: every malformed reply type, with and without DP and SecAgg+.

    python -m experiments.hostile_fl [--devices 10] [--out benchmarks/results/fl_validation]

For each setting (plain FedAvg, FedAvg + user-level DP, SecAgg+, SecAgg+ + DP) a federation of ``--devices``
synthetic devices runs one round per malformed reply type, device 0 sending that type
(``tests/aggregator/hostile.py``; under SecAgg+ the types a device controls there: its masked vectors and
metrics). The apps are the real ones (``aggregator.server_app.make_run``, ``federation.client_app``) in one
process (``tests/aggregator/loopback.py``: Flower's own fit and SecAgg+ workflows, no Ray). Figures per
(setting, type): did the run complete, was the reply counted under its expected reason, and, for plain
FedAvg, is the final model bit for bit the model of the same run without device 0 (FedAvg keeps no state
between rounds, so that holds only if every round's model did). DP noise and SecAgg+'s stochastic rounding
make any two runs differ, so those settings are not compared; under SecAgg+ a reply dropped for its metrics
alone still has its masked vector in the sum (the server cannot take one device out of it).

Writes ``hostile.json``, ``hostile.md`` and ``hostile.png`` (a grid of types x settings).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.paths import RESULTS

OUT = RESULTS / "fl_validation"
SETTINGS = {
    "fedavg": {},
    "fedavg+dp": {"dp": "user", "dp_noise_multiplier": 0.5},
    "secagg": {"secagg": True, "secagg_num_shares": 5, "secagg_reconstruction_threshold": 3},
    "secagg+dp": {
        "secagg": True,
        "secagg_num_shares": 5,
        "secagg_reconstruction_threshold": 3,
        "dp": "user",
        "dp_noise_multiplier": 0.5,
    },
}
SMALL = {"item_dim": 16, "hidden_dim": 16, "local_steps": 2, "local_batch_size": 8, "eval_max_examples": 200}


def run_setting(name: str, extra: dict, population: Path, devices: int, work: Path) -> list[dict]:
    """Every malformed type of the setting, one round each; one row per type."""
    from aggregator.checkpoint import CheckpointStore
    from federation.config import FederationConfig
    from tests.aggregator.hostile import EXPECTED, HOSTILE, SECAGG_HOSTILE, hostile_mod
    from tests.aggregator.loopback import run_federation

    secagg = bool(extra.get("secagg"))
    kinds = list(SECAGG_HOSTILE if secagg else HOSTILE)
    expected = {k: "bad_metric" if k == "metric_string" else "malformed_reply" for k in SECAGG_HOSTILE}
    expected = expected if secagg else EXPECTED

    def fed(tag: str) -> FederationConfig:
        return FederationConfig(
            population_dir=str(population),
            num_server_rounds=len(kinds),
            fraction_fit=1.0,
            min_fit_clients=devices - 1,
            min_available_clients=devices - 1,
            checkpoint_dir=str(work / f"{name}-{tag}"),
            eval_every=len(kinds),
            **{**SMALL, **extra},
        )

    mods = lambda p: [hostile_mod(lambda r: kinds[r - 1], secagg=secagg)] if p == 0 else []  # noqa: E731
    started = time.perf_counter()
    strategy, _, error = run_federation(fed("with"), range(devices), mods)
    seconds = time.perf_counter() - started
    same: bool | None = None
    # DP noise and SecAgg+'s stochastic rounding (Flower quantises with unseeded np.random) make two runs
    # differ anyway: the comparison holds for plain FedAvg only.
    if "dp" not in extra and not secagg and error is None:
        # FedAvg keeps no state between rounds: the final models are equal only if every round's was.
        _, _, error_without = run_federation(fed("without"), range(1, devices))
        if error_without is None:
            last = len(kinds)
            with_it = CheckpointStore(work / f"{name}-with").load(last).weights
            without = CheckpointStore(work / f"{name}-without").load(last).weights
            same = all(np.array_equal(x, y) for x, y in zip(with_it, without, strict=True))
    rows = []
    for server_round, kind in enumerate(kinds, start=1):
        record = strategy.rounds.get(server_round, {})
        rows.append(
            {
                "setting": name,
                "kind": kind,
                "completed": error is None and bool(record.get("trained")),
                "reasons": record.get("failure_reasons", {}),
                "expected_reason": expected[kind],
                "reason_ok": record.get("failure_reasons") == {expected[kind]: 1},
                "accepted": record.get("accepted"),
                "model_equals_run_without_it": same,
                "run_seconds": round(seconds, 2),
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    grid = np.full((len(kinds), len(settings)), np.nan)
    for r in rows:
        ok = r["completed"] and r["reason_ok"] and r["model_equals_run_without_it"] is not False
        grid[kinds.index(r["kind"]), settings.index(r["setting"])] = 1.0 if ok else 0.0
    fig, ax = plt.subplots(figsize=(1.6 * len(settings) + 2, 0.32 * len(kinds) + 1.5))
    ax.imshow(np.nan_to_num(grid, nan=0.5), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_yticks(range(len(kinds)), kinds)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(
            j,
            i,
            "-" if np.isnan(value) else ("ok" if value else "FAIL"),
            ha="center",
            va="center",
            fontsize=8,
        )
    ax.set_title("1 hostile device of N: run completes, reason counted, model = run without it")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    from tests.aggregator.conftest import write_population

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hostile-fl-") as tmp:
        population = write_population(Path(tmp) / "population", n_devices=args.devices)
        for name in args.settings.split(","):
            print(
                f"{name}: one round per malformed reply type, device 0 of {args.devices} hostile", flush=True
            )
            setting_rows = run_setting(name, SETTINGS[name], population, args.devices, Path(tmp) / "runs")
            for row in setting_rows:
                print(
                    f"  {row['kind']:>20}: completed={row['completed']} reasons={row['reasons']} "
                    f"model=without-it: {row['model_equals_run_without_it']}",
                    flush=True,
                )
            rows += setting_rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = len(rows)
    completed = sum(r["completed"] for r in rows)
    compared = [r for r in rows if r["model_equals_run_without_it"] is not None]
    result = {
        "devices": args.devices,
        "hostile_devices": 1,
        "cases": runs,
        "completed": completed,
        "completed_pct": round(100 * completed / max(runs, 1), 1),
        "reason_as_expected": sum(r["reason_ok"] for r in rows),
        "model_equal_to_run_without_it": f"{sum(r['model_equals_run_without_it'] for r in compared)} / {len(compared)}",
        "rows": rows,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    (out / "hostile.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"One hostile device of {args.devices}, each malformed reply type, one round each "
        f"(`python -m experiments.hostile_fl`). Runs completed: **{completed} / {runs}**; reason counted as "
        f"expected: {result['reason_as_expected']} / {runs}; model bit-equal to the run without the hostile "
        f"device (plain FedAvg; DP noise and SecAgg+ rounding are random): {result['model_equal_to_run_without_it']}.",
        "",
        "| setting | reply type | completed | counted as | model = run without it |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        equal = {None: "n/a (random noise / rounding)", True: "yes", False: "NO"}[
            r["model_equals_run_without_it"]
        ]
        counted = ", ".join(f"{k} {v}" for k, v in r["reasons"].items())
        lines.append(
            f"| {r['setting']} | `{r['kind']}` | {'yes' if r['completed'] else 'NO'} | {counted} | {equal} |"
        )
    (out / "hostile.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "hostile.png")
    print("\n".join(lines[:1]))
    return 0 if completed == runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
