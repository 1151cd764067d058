"""``rib-edge simulate``: replay a population of virtual devices through federated rounds (Flower simulation)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from edge_client.schema import SchemaError
from rib_edge.cli_common import BadInput, DatasetChoice, FiniteFloatRange, dataset_options

# Flags that override a preset's settings (None = keep the preset's value): option name -> preset key.
_OVERRIDES = {
    "devices": "devices",
    "rounds": "num-server-rounds",
    "fraction": "fraction-fit",
    "local_steps": "local-steps",
    "dp_epsilon": "dp-epsilon",
    "dropout": "dropout",
    "availability": "availability",
    "straggler_fraction": "straggler-fraction",
    "deadline_s": "deadline-s",
    "strategy": "strategy",
    "seed": "seed",
}


@click.command("simulate")
@click.option("--preset", default="smoke", show_default=True, help="Scenario from simulations/presets.toml.")
@dataset_options(
    required=False,
    help="'synthetic', a shared dataset name, an interactions file or a directory of device event logs "
    "(overrides the preset's; --mapping and the split settings apply to either).",
)
@click.option(
    "--devices",
    type=click.IntRange(min=2),
    default=None,
    help="Virtual devices (synthetic) or a sample of users.",
)
@click.option("--rounds", type=click.IntRange(min=1), default=None)
@click.option(
    "--fraction",
    type=FiniteFloatRange(0, 1, min_open=True),
    default=None,
    help="Share of devices sampled per round.",
)
@click.option("--local-steps", type=click.IntRange(min=1), default=None)
@click.option(
    "--dp-epsilon",
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    help="User-level DP target epsilon.",
)
@click.option("--dropout", type=FiniteFloatRange(0, 1), default=None)
@click.option("--availability", type=click.Choice(["always", "diurnal"]), default=None)
@click.option("--straggler-fraction", type=FiniteFloatRange(0, 1), default=None)
@click.option("--deadline-s", type=FiniteFloatRange(min=0, min_open=True), default=None)
@click.option("--strategy", type=click.Choice(["fedavg", "fedadam"]), default=None)
@click.option("--seed", type=click.IntRange(min=0), default=None)
@click.option(
    "--population",
    "population_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Reuse a built population (default: OUT/population).",
)
@click.option(
    "--ray-address",
    default=None,
    help="Join an existing Ray cluster (ray start --head ...) instead of a local one.",
)
@click.option(
    "--num-cpus",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="CPUs for the local Ray backend.",
)
@click.option(
    "--run-config",
    "-c",
    multiple=True,
    help="key=value of the run config overriding the preset (repeatable).",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
def simulate_command(
    preset: str,
    data: DatasetChoice,
    population_dir: Path | None,
    ray_address: str | None,
    num_cpus: int,
    run_config: tuple[str, ...],
    out_dir: Path,
    **flags,
) -> None:
    """Simulate federated RIB over many virtual devices; re-running the same command resumes a killed run."""
    from aggregator.workflow import describe_round
    from rib_edge.cli_fl import parse_run_config
    from simulations.engine import simulate
    from simulations.presets import PresetError, check_settings, load_preset

    try:
        settings = load_preset(preset)
        settings.update({_OVERRIDES[k]: v for k, v in flags.items() if v is not None})
        if data.name is not None:
            settings["dataset"] = data.name
        options = data.options
        if options.mapping is not None:
            settings["mapping"] = str(options.mapping)
        if options.min_item_support is not None:
            settings["min-item-support"] = options.min_item_support
        if options.test_fraction is not None or options.test_days is not None:  # one replaces the other
            settings["test-fraction"], settings["test-days"] = options.test_fraction, options.test_days
        settings.update(parse_run_config(run_config))
        check_settings(preset, settings)
    except PresetError as err:
        raise BadInput(str(err)) from err
    started = time.perf_counter()
    click.echo(
        f"preset {preset}: {json.dumps({k: v for k, v in settings.items() if k != 'description'}, default=str)}"
    )

    def on_round(row: dict) -> None:
        if row["round"] == 0:
            shown = (
                f"recall@20 {row['recall@20']:.4f} mrr@20 {row['mrr@20']:.4f}" if "recall@20" in row else ""
            )
            line = f"the starting model: {shown}"
        else:
            line = describe_round(row)
        click.echo(f"[{time.perf_counter() - started:7.1f}s] round {row['round']:>3}: {line}")

    def on_build(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            click.echo(f"  population: {done}/{total} devices")

    try:
        summary = simulate(settings, out_dir, population_dir, ray_address, num_cpus, on_round, on_build)
    except SchemaError as err:  # the dataset, its mapping or its settings: the user's input
        raise BadInput(str(err)) from err
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    keys = (
        "devices",
        "rounds",
        "recall@20",
        "mrr@20",
        "epsilon",
        "participants_total",
        "dropouts_total",
        "round_seconds_median",
    )
    click.echo("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    click.echo(
        "| "
        + " | ".join(
            f"{summary.get(k):.4g}" if isinstance(summary.get(k), float) else str(summary.get(k))
            for k in keys
        )
        + " |"
    )
    click.echo(
        f"metrics: {out_dir / 'metrics.jsonl'}  summary: {out_dir / 'summary.json'}  plots: {', '.join(summary.get('plots', []))}"
    )
