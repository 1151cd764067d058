"""``rib-edge bench fl``: centralized vs FedAvg vs FedAvg + user-level DP on one population (issue 6 targets)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

from edge_client.schema import SchemaError
from rib_edge.cli_common import (
    BadInput,
    DatasetChoice,
    FiniteFloatRange,
    dataset_options,
    seed_option,
    warn_small_test,
)


def _epsilons(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[float, ...]:
    """Parse a comma list of positive epsilons ('' = no DP rows)."""
    try:
        values = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma list of numbers, got {value!r}") from None
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        raise click.BadParameter("every epsilon must be a finite number > 0")
    return values


def _seeds(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    """Parse --spread-seeds: a comma list of integers (empty: none)."""
    try:
        seeds = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if any(seed < 0 for seed in seeds):
        raise click.BadParameter("seeds must be >= 0")
    return seeds


def _variants(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[dict]:
    """Parse --variants: a JSON list of {"name", run-config keys..., optional "init" and "w2v"}."""
    if not value:
        return []
    try:
        data = json.loads(value)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not JSON: {err}") from None
    if not isinstance(data, list) or not all(isinstance(v, dict) and "name" in v for v in data):
        raise click.BadParameter('expected a JSON list of objects, each with a "name"')
    return data


@click.command("fl")
@dataset_options(
    default="jdata2016_sample",
    help="'synthetic', a shared dataset or an interactions file with user ids (devices are users).",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--work",
    "work_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Population, checkpoints and run directories (default: OUT). Finished runs there are reused.",
)
@click.option("--rounds", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--fraction", type=FiniteFloatRange(0, 1, min_open=True), default=0.2, show_default=True)
@click.option("--local-steps", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--local-lr", type=FiniteFloatRange(min=0, min_open=True), default=5e-3, show_default=True)
@click.option(
    "--epsilons",
    default="1,4,8",
    show_default=True,
    callback=_epsilons,
    help="User-level DP target epsilons (comma list), delta = 1/N.",
)
@click.option("--item-dim", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--hidden-dim", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--devices",
    type=click.IntRange(min=2),
    default=None,
    help="Synthetic: how many devices; real data: a seeded sample of users.",
)
@seed_option
@click.option(
    "--variants",
    default=None,
    callback=_variants,
    help='Extra federated runs as JSON tables of run-config keys, e.g. \'[{"name": "fedadam", "strategy": "fedadam", "server-lr": 0.02}]\'.',
)
@click.option("--num-cpus", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--spread-seeds",
    default="",
    callback=_seeds,
    help="Also train the centralized references with these seeds (comma list) to show the seed spread.",
)
def bench_fl_command(
    data: DatasetChoice,
    out_dir: Path,
    work_dir: Path | None,
    rounds: int,
    fraction: float,
    local_steps: int,
    local_lr: float,
    epsilons: tuple[float, ...],
    item_dim: int,
    hidden_dim: int,
    devices: int | None,
    seed: int,
    variants: list[dict],
    num_cpus: int,
    spread_seeds: tuple[int, ...],
) -> None:
    """Centralized RIB vs federated RIB vs user-level DP: writes OUT/fl.json, OUT/fl.md and PNG plots."""
    from experiments.bench_fl import bench_fl

    started = time.perf_counter()

    def progress(message: str) -> None:
        click.echo(f"[{time.perf_counter() - started:7.1f}s] {message}")

    try:
        result = bench_fl(
            data.name,
            out_dir,
            rounds=rounds,
            fraction=fraction,
            local_steps=local_steps,
            epsilons=epsilons,
            item_dim=item_dim,
            hidden_dim=hidden_dim,
            seed=seed,
            progress=progress,
            work_dir=work_dir,
            devices=devices,
            learning_rate=local_lr,
            variants=variants,
            num_cpus=num_cpus,
            spread_seeds=spread_seeds,
            mapping=data.options.mapping,
            protocol=data.protocol(),
        )
    except SchemaError as err:  # the dataset, its mapping or its settings: the user's input
        raise BadInput(str(err)) from err
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    click.echo("")
    click.echo((out_dir / "fl.md").read_text())
    click.echo(
        f"written: {out_dir / 'fl.json'}, {out_dir / 'fl.md'}, {out_dir / 'fl_recall_vs_round.png'}, "
        f"{out_dir / 'fl_epsilon_vs_round.png'}"
    )
    warn_small_test(result.get("small_test_reasons", []))
