"""Pieces every rib-edge command group shares: progress lines, --dataset resolution, common options."""

from __future__ import annotations

import time
from pathlib import Path

import click

from edge_client.schema import SchemaError

DATASET_HELP = (
    "'synthetic', a shared dataset name (see `rib-edge data list`), a generic interactions CSV/Parquet "
    "file, or a directory in SR-GNN format."
)

mapping_option = click.option(
    "--mapping",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TOML mapping actions to activities (generic files).",
)
support_option = click.option(
    "--min-item-support",
    type=click.IntRange(min=1),
    default=None,
    help="Override the protocol's item-support filter (default 5).",
)


def echo_step(message: str) -> None:
    """One timestamped progress line."""
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}")


def open_or_fail(
    dataset: str, mapping: Path | None = None, refresh: bool = False, min_item_support: int | None = None
):
    """Resolve --dataset to a SplitData, turning data errors into a clean CLI error (no traceback)."""
    from model.data.open import open_dataset

    try:
        return open_dataset(dataset, mapping=mapping, refresh=refresh, min_item_support=min_item_support)
    except (SchemaError, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
