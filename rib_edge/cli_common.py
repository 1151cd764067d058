"""Pieces every rib-edge command group shares: one-line errors, progress lines, the dataset options, and
loading the files users hand in (checkpoints) with a reason instead of a traceback."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from edge_client.schema import SchemaError

DATASET_HELP = (
    "'synthetic', a shared dataset name (see `rib-edge data list`), a generic interactions CSV/Parquet "
    "file, or a directory in SR-GNN format."
)
# Set to see the traceback of an unexpected error instead of its one-line summary.
TRACEBACK_ENV = "RIB_EDGE_TRACEBACK"


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses nan (which passes any bound) and inf (which passes an open one)."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


seed_option = click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed (>= 0)."
)


class BadInput(click.ClickException):
    """A file or value the user gave cannot be used: one line with the reason, exit 2."""

    exit_code = 2


def one_line(text: str) -> str:
    """Messages end up on one terminal line: inner newlines become spaces."""
    return " ".join(str(text).split())


class OneLineErrors(click.Group):
    """The root group: every error a command raises is one line on stderr and a non-zero exit.

    Click's own usage errors print the usage and a hint over four lines; here they become one line that
    names the command and where its help is. An unexpected exception (a bug) is one line too, exit 1,
    unless ``RIB_EDGE_TRACEBACK`` is set.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx is not None else "rib-edge"
            _fail(f"{where}: {err.format_message()} (see '{where} --help')", err.exit_code)
        except click.ClickException as err:
            _fail(err.format_message(), err.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        except Exception as err:  # noqa: BLE001 - the last line of defence: a summary, not a traceback
            if os.environ.get(TRACEBACK_ENV):
                raise
            _fail(f"internal error ({type(err).__name__}: {err}); set {TRACEBACK_ENV}=1 for the traceback", 1)
        sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {one_line(message)}", err=True)
    sys.exit(code)


def echo_step(message: str) -> None:
    """One timestamped progress line."""
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}")


def warn(message: str) -> None:
    """One warning line on stderr."""
    click.echo(f"warning: {one_line(message)}", err=True)


# ------------------------------------------------------------------------------------------------
# --dataset and what every command that takes it may change about it
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetChoice:
    """The ``--dataset`` a command was given, with its ``--mapping``, support and test-split settings."""

    name: str | None
    options: object  # model.data.open.DataOptions (imported lazily: --help stays instant)

    @property
    def label(self) -> str:
        """A short name for output directories."""
        return Path(self.name or "").name

    def open(self, refresh: bool = False):
        """The SplitData, or one line saying why not (exit 2)."""
        from model.data.open import open_dataset

        o = self.options
        try:
            return open_dataset(
                self.name,
                mapping=o.mapping,
                refresh=refresh,
                min_item_support=o.min_item_support,
                test_fraction=o.test_fraction,
                test_days=o.test_days,
            )
        except (SchemaError, FileNotFoundError, ValueError) as err:
            raise BadInput(str(err)) from err

    def protocol(self):
        """The protocol settings asked for (None: the dataset's default); exit 2 where none applies."""
        from model.data.open import protocol_for

        try:
            return protocol_for(self.name, self.options)
        except SchemaError as err:
            raise BadInput(str(err)) from err


_DATA_OPTIONS = (
    click.option(
        "--mapping",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="TOML mapping actions to activities (interaction logs; see docs/datasets.md).",
    ),
    click.option(
        "--min-item-support",
        type=click.IntRange(min=1),
        default=None,
        help="Keep items with at least this many training visits [default: the dataset's, 5 mostly].",
    ),
    click.option(
        "--test-fraction",
        type=FiniteFloatRange(0, 1, min_open=True, max_open=True),
        default=None,
        help="Sessions ending in this last fraction of the time span are test [default: the dataset's].",
    ),
    click.option(
        "--test-days",
        type=FiniteFloatRange(min=0, min_open=True),
        default=None,
        help="Sessions ending in the last this-many days are test (instead of --test-fraction).",
    ),
)


def dataset_options(
    *, argument: bool = False, required: bool = True, default: str | None = None, help: str = DATASET_HELP
):
    """``--dataset`` (or a ``DATASET`` argument) plus ``--mapping``, ``--min-item-support``,
    ``--test-fraction`` and ``--test-days``; the command receives one ``data: DatasetChoice`` (its
    ``name`` is None when an optional ``--dataset`` was not given: the options then apply to the
    dataset the command takes from elsewhere, e.g. a simulation preset)."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, dataset, mapping, min_item_support, test_fraction, test_days, **kwargs):
            from model.data.open import DataOptions

            if test_fraction is not None and test_days is not None:
                raise click.UsageError("give --test-fraction or --test-days, not both")
            try:
                options = DataOptions(mapping, min_item_support, test_fraction, test_days)
            except SchemaError as err:
                raise click.UsageError(str(err)) from err
            if mapping is not None:  # a broken mapping file fails here, before any work, whatever the command
                from model.data.mapping import ActivityMapping

                try:
                    ActivityMapping.from_toml(mapping)
                except SchemaError as err:
                    raise BadInput(f"--mapping: {err}") from err
            return command(*args, data=DatasetChoice(dataset, options), **kwargs)

        for option in reversed(_DATA_OPTIONS):
            wrapper = option(wrapper)
        if argument:
            return click.argument("dataset")(wrapper)
        return click.option(
            "--dataset",
            "dataset",
            required=required,
            default=default,
            show_default=default is not None,
            help=help,
        )(wrapper)

    return decorate


def warn_small_test(reasons: list[str]) -> None:
    """The warning for a test set too small for its figures to mean much (``experiments.benchmark.small_test``)."""
    if reasons:
        warn(
            f"small test set: {' and '.join(reasons)}; its figures are mostly noise "
            "(--min-item-support, --test-fraction or --test-days keep more)"
        )


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse (exit 2) a port another process already listens on, naming the flag that changes it.

    Checked just before a server starts, so a busy port is one clear line instead of a server's traceback.
    """
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise BadInput(f"port {port} on {host} is busy; choose another with {flag}") from err
            raise BadInput(
                f"cannot listen on {host}:{port} ({err.strerror or err}); check --host and {flag}"
            ) from err


# ------------------------------------------------------------------------------------------------
# Files users hand in
# ------------------------------------------------------------------------------------------------


def load_checkpoint_or_fail(path: Path, device: str | None = None):
    """A RIB checkpoint, or one line saying why the file is not one (exit 2)."""
    from model.train import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, device=device)
    except CheckpointError as err:
        raise BadInput(str(err)) from err


def check_checkpoint_data(rec, split, dataset: str) -> None:
    """Refuse (exit 2) a dataset whose vocabularies differ from those the checkpoint was trained with."""
    from model.train import CheckpointError

    try:
        rec.check_vocabulary(split.vocab)
    except CheckpointError as err:
        raise BadInput(f"{dataset}: {err}") from err
