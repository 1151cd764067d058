"""Run a federated RIB simulation over a population with Flower's simulation engine (Ray backend).

The apps are the real ones (``aggregator.server_app``, ``federation.client_app``); every virtual device is a
Flower SuperNode whose ClientApp opens its own encrypted store from the population directory when sampled,
so no device holds a model in memory between rounds. Heterogeneity enters as one outermost client mod,
``heterogeneity_mod``: when a training message reaches a device it asks the population's ``Heterogeneity``
(pure functions of seed, device and round) whether the device is offline this round, drops out, or would
miss the deadline (measured compute time plus its straggler delay); it then answers with an error reply,
which the server counts as a failure, exactly as it would a real device that vanished. The server samples
among all devices: it does not know who is online until it asks, as in a real deployment.

Outputs in ``out_dir``: ``metrics.jsonl`` (one object per round), ``summary.json``, PNG plots, and
``checkpoints/`` — running the same command again after a kill resumes from the last round's checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from federation.config import FederationConfig
from federation.task import SIMULATED_PREFIX as FAILURE_PREFIX
from simulations.heterogeneity import Heterogeneity

log = logging.getLogger(__name__)


@dataclass
class SimulationPlan:
    """Everything one simulation needs, resolved from a preset and command-line overrides."""

    population_dir: Path
    out_dir: Path
    federation: FederationConfig
    heterogeneity: Heterogeneity = field(default_factory=Heterogeneity)
    n_devices: int = 0
    num_cpus: int = 2
    cpus_per_device: float = 1.0
    ray_address: str | None = None


def heterogeneity_mod(het: Heterogeneity) -> Callable:
    """A client mod that makes a simulated device offline, drop out, or late, as ``het`` decides."""
    from flwr.app import Error, Message
    from flwr.app.message_type import MessageType

    def mod(msg: Message, ctxt, call_next):
        if msg.metadata.message_type != MessageType.TRAIN or "partition-id" not in ctxt.node_config:
            return call_next(msg, ctxt)
        device = int(ctxt.node_config["partition-id"])
        server_round = _server_round(msg)
        if not het.is_online(device, server_round):
            return Message(Error(code=0, reason=f"{FAILURE_PREFIX}offline"), reply_to=msg)
        if het.drops_out(device, server_round):
            return Message(Error(code=0, reason=f"{FAILURE_PREFIX}dropout"), reply_to=msg)
        started = time.perf_counter()
        out = call_next(msg, ctxt)
        if het.misses_deadline(device, server_round, time.perf_counter() - started):
            return Message(Error(code=0, reason=f"{FAILURE_PREFIX}late"), reply_to=msg)
        return out

    return mod


def _server_round(msg) -> int:
    """The round a training message belongs to (legacy fit messages carry it as their group id)."""
    try:
        return int(msg.metadata.group_id)
    except (TypeError, ValueError):
        return 0


def run_simulation_plan(
    plan: SimulationPlan, progress: Callable[[dict], None] | None = None
) -> dict[str, object]:
    """Run (or resume) the simulation; returns the summary also written to ``summary.json``."""
    from flwr.simulation import run_simulation

    from aggregator.server_app import make_server_app
    from federation.client_app import make_client_app

    plan.out_dir.mkdir(parents=True, exist_ok=True)
    backend: dict[str, Mapping] = {
        "client_resources": {"num_cpus": plan.cpus_per_device, "num_gpus": 0.0},
        "init_args": {"num_cpus": plan.num_cpus}
        if plan.ray_address is None
        else {"address": plan.ray_address},
    }
    started = time.perf_counter()
    server_app = make_server_app(plan.federation, on_round=progress)
    client_app = make_client_app(extra_mods=[heterogeneity_mod(plan.heterogeneity)], fed=plan.federation)
    run_simulation(server_app, client_app, num_supernodes=plan.n_devices, backend_config=backend)
    rows = read_metrics(Path(plan.federation.metrics_path))
    summary = summarize(rows, plan, time.perf_counter() - started)
    (plan.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def read_metrics(path: Path) -> list[dict]:
    """The per-round rows written so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(rows: list[dict], plan: SimulationPlan, wall_s: float) -> dict[str, object]:
    """Final numbers of a run."""
    rounds = [r for r in rows if r.get("round", 0) > 0]
    last = rows[-1] if rows else {}
    return {
        "population_dir": str(plan.population_dir),
        "devices": plan.n_devices,
        "rounds": len(rounds),
        "wall_seconds_this_invocation": wall_s,
        "round_seconds_median": _median([r.get("seconds", 0.0) for r in rounds]),
        "recall@20": last.get("recall@20"),
        "mrr@20": last.get("mrr@20"),
        "initial_recall@20": rows[0].get("recall@20") if rows else None,
        "epsilon": last.get("epsilon"),
        "participants_total": sum(int(r.get("participants", 0)) for r in rounds),
        "dropouts_total": sum(int(r.get("dropouts", 0)) for r in rounds),
        "failures_by_reason": _sum_dicts([r.get("failure_reasons", {}) for r in rounds]),
        "bytes_up_total": sum(int(r.get("bytes_up", 0)) for r in rounds),
        "bytes_down_total": sum(int(r.get("bytes_down", 0)) for r in rounds),
        "federation": plan.federation.to_run_config(),
        "heterogeneity": plan.heterogeneity.to_dict(),
    }


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _sum_dicts(dicts: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


# ---- from settings (a preset plus overrides) to a finished run --------------------------------------------

DATASET_CATALOG = "dataset"  # item-catalog = "dataset": the dataset's own catalog, written by the simulation


def heterogeneity_from(settings: Mapping[str, object]) -> Heterogeneity:
    """The Heterogeneity knobs named in a preset's settings."""
    from simulations.presets import heterogeneity_settings

    return Heterogeneity(**heterogeneity_settings(dict(settings)))


def federation_from(
    settings: Mapping[str, object], population_dir: Path, out_dir: Path, n_devices: int
) -> FederationConfig:
    """The FederationConfig of a simulation: the preset's run-config keys, plus where this run's files go."""
    from simulations.presets import run_config_of

    run_config = run_config_of(dict(settings))
    if run_config.get("dp-epsilon") and "dp" not in run_config:
        run_config["dp"] = "user"  # a target epsilon means user-level DP
    min_fit = int(run_config.get("min-fit-clients", FederationConfig.min_fit_clients))  # type: ignore[call-overload]
    run_config.update(
        {
            "population-dir": str(population_dir),
            "min-available-clients": max(min_fit, n_devices),
            "checkpoint-dir": str(out_dir / "checkpoints"),
            "metrics-path": str(out_dir / "metrics.jsonl"),
        }
    )
    return FederationConfig.from_run_config(run_config)


def simulate(
    settings: Mapping[str, object],
    out_dir: str | Path,
    population_dir: str | Path | None = None,
    ray_address: str | None = None,
    num_cpus: int = 2,
    progress: Callable[[dict], None] | None = None,
    build_progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Build (or reuse) the population, run the federation, write metrics, summary and plots."""
    from model.data.open import DataOptions, protocol_for
    from simulations.population import build_population, open_population

    out = Path(out_dir)
    settings = dict(settings)
    het = heterogeneity_from(settings)
    dataset = str(settings["dataset"])
    options = DataOptions(
        settings.get("mapping") or None,  # type: ignore[arg-type]
        settings.get("min-item-support"),  # type: ignore[arg-type]
        settings.get("test-fraction"),  # type: ignore[arg-type]
        settings.get("test-days"),  # type: ignore[arg-type]
    )
    # An explicitly given population is used as it is; the run's own is built, resumed, or (when built
    # with these settings) reused, and refused when it was built with others.
    pop_dir = Path(population_dir) if population_dir else out / "population"
    if population_dir is None or not (pop_dir / "population.json").exists():
        build_population(
            dataset,
            pop_dir,
            partition=str(settings.get("partition", "auto")),
            max_devices=settings.get("devices"),  # type: ignore[arg-type]
            seed=int(settings.get("seed", 0)),  # type: ignore[call-overload]
            mapping=options.mapping,
            heterogeneity=het,
            min_examples=int(settings.get("min-examples", 0)),  # type: ignore[call-overload]
            protocol=protocol_for(dataset, options),
            progress=build_progress,
        )
    population = open_population(pop_dir)
    n_devices = population.n_devices
    if settings.get("item-catalog") == DATASET_CATALOG:
        from model.catalog import dataset_catalog

        out.mkdir(parents=True, exist_ok=True)
        catalog = dataset_catalog(str(settings["dataset"]), seed=int(settings.get("seed", 0)))  # type: ignore[call-overload]
        settings["item-catalog"] = str(catalog.write_csv(out / "item-catalog.csv"))
    fed = federation_from(settings, pop_dir, out, n_devices)
    plan = SimulationPlan(pop_dir, out, fed, het, n_devices, num_cpus=num_cpus, ray_address=ray_address)
    (out / "settings.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    summary = run_simulation_plan(plan, progress)
    summary["population"] = population.info.raw
    summary["plots"] = plot_metrics(read_metrics(out / "metrics.jsonl"), out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def plot_metrics(rows: list[dict], out_dir: Path) -> list[str]:
    """metric_and_epsilon.png (Recall@20, MRR@20 and epsilon vs round) and participation.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return []
    rounds = [r["round"] for r in rows]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("recall@20", "mrr@20"):
        ax.plot(rounds, [r.get(key) for r in rows], marker="o", label=key)
    ax.set_xlabel("round")
    ax.set_ylabel("metric on held-out sessions")
    if any(r.get("epsilon") is not None for r in rows):
        twin = ax.twinx()
        twin.plot(rounds, [r.get("epsilon") for r in rows], color="tab:red", linestyle="--", label="epsilon")
        twin.set_ylabel("epsilon (user-level)", color="tab:red")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = out_dir / "metric_and_epsilon.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(str(path))
    fit_rows = [r for r in rows if r["round"] > 0]
    if fit_rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [r["round"] for r in fit_rows]
        ax.bar(xs, [r.get("participants", 0) for r in fit_rows], label="participants")
        ax.bar(
            xs,
            [r.get("dropouts", 0) for r in fit_rows],
            bottom=[r.get("participants", 0) for r in fit_rows],
            label="failed (offline/dropout/late)",
        )
        ax.set_xlabel("round")
        ax.set_ylabel("sampled devices")
        ax.legend()
        fig.tight_layout()
        path = out_dir / "participation.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(str(path))
    return paths
