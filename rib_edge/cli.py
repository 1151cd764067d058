"""The ``rib-edge`` command line. Thin: it parses options and calls the packages that do the work.

Heavy imports (pandas, torch, flwr) happen inside commands, so ``rib-edge --help`` is instant and the
device-side commands never load training libraries.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from edge_client.schema import SchemaError
from rib_edge.cli_common import (
    BadInput,
    DatasetChoice,
    OneLineErrors,
    dataset_options,
    echo_step,
    seed_option,
    warn_small_test,
)


@click.group(cls=OneLineErrors)
@click.version_option(package_name="rib-edge")
def main() -> None:
    """rib-edge: on-device next-product recommendation from micro behaviors (RIB)."""


# ------------------------------------------------------------------------------------------------
@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("quickstart_out"),
    show_default=True,
)
@click.option(
    "--devices",
    type=click.IntRange(min=20),
    default=300,
    show_default=True,
    help="Synthetic devices (shoppers; >= 20, enough for a test period).",
)
@seed_option
def quickstart(out_dir: Path, devices: int, seed: int) -> None:
    """End to end on the built-in synthetic population: raw events -> tuples -> models -> recommendations."""
    from rib_edge.quickstart import run_quickstart

    try:
        summary = run_quickstart(out_dir, n_devices=devices, seed=seed, progress=echo_step)
    except SchemaError as err:
        raise BadInput(str(err)) from err
    click.echo(summary)


# ------------------------------------------------------------------------------------------------
@main.group()
def data() -> None:
    """Datasets: list, prepare (cache), Section-3 statistics, synthetic events, extraction."""


@data.command("list")
def data_list() -> None:
    """List the shared datasets this install knows."""
    from model.data.loaders import DATASETS, SRGNN_DATASETS, default_data_dir
    from model.data.open import ALIASES

    root = default_data_dir()
    click.echo(f"data directory: {root}{'' if root.is_dir() else '  (missing: only synthetic is available)'}")
    click.echo(f"  {'synthetic':32s} built-in synthetic population (always available)")
    for name, source in DATASETS.items():
        click.echo(f"  {name:32s} {source.description}")
    aliases = {target: alias for alias, target in ALIASES.items()}
    for name in SRGNN_DATASETS:
        click.echo(
            f"  {name:32s} SR-GNN benchmark split (item ids only){'; alias ' + aliases[name] if name in aliases else ''}"
        )


@data.command("prepare")
@dataset_options(argument=True)
@click.option("--refresh", is_flag=True, help="Rebuild the cached arrays.")
def data_prepare(data: DatasetChoice, refresh: bool) -> None:
    """Load DATASET through the protocol (cached) and print its counts."""
    started = time.perf_counter()
    split = data.open(refresh)
    click.echo(
        json.dumps(
            {
                "train": split.info.get("train"),
                "test": split.info.get("test"),
                "seconds": round(time.perf_counter() - started, 2),
            },
            indent=2,
        )
    )


@data.command("stats")
@dataset_options(argument=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Default: benchmarks/results/stats/<dataset>.",
)
def data_stats(data: DatasetChoice, out_dir: Path | None) -> None:
    """The paper's Section-3 views of DATASET: counts, activity and dwell distributions, conversion rates."""
    from model.analysis import format_stats, write_stats

    split = data.open()
    out_dir = out_dir or Path("benchmarks/results/stats") / data.label
    stats = write_stats(split, out_dir, data.label)
    click.echo(format_stats(stats))
    click.echo(f"wrote {out_dir}/stats.json and plots")


@data.command("synth")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="JSON-lines file of raw UI events.",
)
@click.option("--devices", type=click.IntRange(min=1), default=300, show_default=True)
@seed_option
def data_synth(out_path: Path, devices: int, seed: int) -> None:
    """Write a synthetic population's raw UI events (JSON lines)."""
    from model.data.events import write_events_file
    from model.data.synthetic import SyntheticConfig, generate_population

    count = write_events_file(generate_population(SyntheticConfig(n_devices=devices), seed), out_path)
    click.echo(f"wrote {count} events from {devices} devices to {out_path}")


@data.command("extract")
@click.argument("events", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Interactions CSV (the generic format: --dataset of every command reads it as it is).",
)
def data_extract(events: Path, out_path: Path) -> None:
    """Turn a raw-event JSON-lines file into micro-behavior tuples with the device's extractor.

    The CSV is in the generic interactions format (session_id, user_id, timestamp, item_id, action =
    the activity, dwell_seconds), so `data prepare`, `train` and every bench take it as --dataset.
    """
    from edge_client.schema import SkipReport
    from model.data.events import events_to_frame, read_events_file, write_interactions

    parsed, extracted = SkipReport(), SkipReport()
    try:
        frame = events_to_frame(read_events_file(events, parsed), report=extracted)
    except SchemaError as err:
        raise BadInput(str(err)) from err
    if frame.empty:
        raise BadInput(f"{events}: no micro behaviors in it ({extracted.summary()})")
    count = write_interactions(frame, out_path)
    click.echo(
        f"parse: {parsed.summary()}\nextract: {extracted.summary()}\nwrote {count} tuples to {out_path}"
    )
    for example in parsed.examples + extracted.examples:
        click.echo(f"  skipped: {example}", err=True)


@data.command("catalog")
@click.argument("dataset")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Catalog CSV (item_id + attribute columns).",
)
def data_catalog(dataset: str, out_path: Path) -> None:
    """Write a shared dataset's item catalog (category, brand, ...) as CSV, for `fl run -c item-catalog=...`."""
    from model.catalog import CatalogError, dataset_catalog

    try:
        catalog = dataset_catalog(dataset)
    except CatalogError as err:
        raise BadInput(str(err)) from err
    catalog.write_csv(out_path)
    click.echo(f"wrote {len(catalog)} items ({', '.join(catalog.fields)}) to {out_path}")


# ------------------------------------------------------------------------------------------------
@main.group()
def bench() -> None:
    """Benchmarks: each writes DIR/<bench>.json (a `rows` list) and a markdown table."""


@bench.command("baselines")
@dataset_options()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Default: benchmarks/results/<dataset>.",
)
@click.option("--models", default=None, help="Comma-separated subset, e.g. POP,SR,S-KNN (default: all).")
def bench_baselines(data: DatasetChoice, out_dir: Path | None, models: str | None) -> None:
    """POP, Item-KNN, BPR-MF, SR, S-KNN, V-SKNN, STAN through the one evaluator."""
    from experiments.benchmark import markdown_table, run_models, small_test, write_bench
    from model.baselines import BASELINES

    names = [m.strip() for m in models.split(",")] if models else list(BASELINES)
    unknown = [m for m in names if m not in BASELINES]
    if unknown:
        raise click.BadParameter(
            f"unknown model(s) {unknown}; choose from {list(BASELINES)}", param_hint="--models"
        )
    split = data.open()
    echo_step(
        f"{data.name}: {split.train.n_sessions} train / {split.test.n_sessions} test sessions, {split.vocab.n_items} items"
    )
    rows, _ = run_models(split, {name: BASELINES[name] for name in names}, progress=echo_step)
    out_dir = out_dir or Path("benchmarks/results") / data.label
    json_path, md_path = write_bench(
        out_dir, "baselines", data.name, split, rows, {"data_options": data.options.to_dict()}
    )
    click.echo(markdown_table(rows))
    click.echo(f"wrote {json_path} and {md_path}")
    warn_small_test(small_test(split.info["test"]["examples"], rows))


# ------------------------------------------------------------------------------------------------
# Model and device commands live beside this file; each imports torch / onnxruntime only when run.
from rib_edge.cli_bench_fl import bench_fl_command  # noqa: E402
from rib_edge.cli_edge import bench_edge_command, edge_group  # noqa: E402
from rib_edge.cli_fl import fl_group  # noqa: E402
from rib_edge.cli_model import bench_accuracy_command, case_study_command, eval_command, train_command  # noqa: E402
from rib_edge.cli_sim import simulate_command  # noqa: E402

main.add_command(train_command)
main.add_command(eval_command)
main.add_command(case_study_command)
main.add_command(edge_group)
main.add_command(fl_group)
main.add_command(simulate_command)
bench.add_command(bench_accuracy_command)
bench.add_command(bench_edge_command)
bench.add_command(bench_fl_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
