"""``rib-edge fl``: Flower's deployment engine for rib-edge (SuperLink, SuperNodes, runs, a local demo)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import click

from rib_edge.cli_common import BadInput, FiniteFloatRange, check_port_free

_existing = click.Path(exists=True, dir_okay=False, path_type=Path)

# Run-config keys that name files or directories: on a loopback SuperLink ``fl run`` makes them absolute (the
# ServerApp does not run in this directory) and checks the inputs exist before submitting.
PATH_KEYS = (
    "population-dir",
    "eval-split",
    "initial-checkpoint",
    "item-catalog",
    "checkpoint-dir",
    "release-dir",
    "signing-key",
    "metrics-path",
)


def _tls(ca: Path | None, cert: Path | None = None, key: Path | None = None, insecure: bool = False):
    from aggregator.deploy import TLSFiles

    if insecure:
        if ca or cert or key:
            raise click.UsageError("--insecure and certificate files exclude each other")
        return None
    if ca is None:
        raise click.UsageError(
            "give TLS certificates (see docs/federation.md 'TLS'), or --insecure for loopback tests"
        )
    return TLSFiles(ca_cert=ca, server_cert=cert, server_key=key)


def _exec(command: list[str], env_extra: dict[str, str] | None = None) -> None:
    """Replace this process with a Flower executable (signals go straight to it)."""
    from aggregator.deploy import tool_env

    click.echo("$ " + " ".join(command), err=True)
    os.execvpe(command[0], command, tool_env(env_extra))


def parse_run_config(items: tuple[str, ...] | list[str]) -> dict[str, object]:
    """``-c key=value`` items as TOML values (strings may be bare); exit 2 on a malformed item."""
    import tomllib

    overrides: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--run-config expects key=value, got {item!r}")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = raw
    return overrides


def checked_run_config(overrides: dict[str, object], local: bool) -> dict[str, object]:
    """The run config checked key by key (and, for a local SuperLink, its files); paths made absolute."""
    from aggregator.server_app import check_run_files
    from federation.config import ConfigError, FederationConfig

    if local:
        overrides = {
            k: str(Path(str(v)).expanduser().resolve()) if k in PATH_KEYS and v else v
            for k, v in overrides.items()
        }
    try:
        fed = FederationConfig.from_run_config(overrides)  # fail here, not inside the SuperLink
        if local:
            check_run_files(fed)
    except ConfigError as err:
        raise BadInput(str(err)) from None
    return overrides


def _wait_for_superlink(address: str, seconds: float = 30.0) -> bool:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            time.sleep(0.5)
    return False


@click.group("fl")
def fl_group() -> None:
    """Federated training: run a SuperLink, join devices, submit runs, or all of it locally (demo)."""


@fl_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=9092, show_default=True)
@click.option(
    "--database",
    type=click.Path(dir_okay=False),
    default=None,
    help="SuperLink state file (default: in memory).",
)
@click.option("--ssl-ca-certfile", type=_existing, default=None)
@click.option("--ssl-certfile", type=_existing, default=None)
@click.option("--ssl-keyfile", type=_existing, default=None)
@click.option("--insecure", is_flag=True, help="No TLS (loopback tests only).")
def fl_serve(
    host: str, port: int, database: str | None, ssl_ca_certfile, ssl_certfile, ssl_keyfile, insecure: bool
) -> None:
    """Start a Flower SuperLink (the federation's server side)."""
    from aggregator.deploy import superlink_command

    tls = _tls(ssl_ca_certfile, ssl_certfile, ssl_keyfile, insecure)
    if tls is not None and (ssl_certfile is None or ssl_keyfile is None):
        raise click.UsageError("TLS needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
    check_port_free(host, port)
    _exec(superlink_command(port, host=host, database=database, tls=tls))


@fl_group.command("join")
@click.option("--superlink", required=True, help="SuperLink address host:port.")
@click.option(
    "--device-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="The device's encrypted store (the directory `rib-edge edge serve --store` writes).",
)
@click.option(
    "--package-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="The signed package the device has installed (its vocabulary is the one it trains with).",
)
@click.option("--public-key", type=_existing, required=True, help="Release signing public key (PEM).")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=9094,
    show_default=True,
    help="Local port of this SuperNode's runtime API: every SuperNode on one machine needs its own.",
)
@click.option("--root-certificates", type=_existing, default=None, help="CA certificate of the SuperLink.")
@click.option("--insecure", is_flag=True, help="No TLS (loopback tests only).")
def fl_join(
    superlink: str,
    device_dir: Path,
    package_dir: Path,
    public_key: Path,
    port: int,
    root_certificates,
    insecure: bool,
) -> None:
    """Start a Flower SuperNode for this device: it trains on the device's store when sampled."""
    from aggregator.deploy import supernode_command
    from federation.client_app import JoinRefused, check_device

    try:
        found = check_device(device_dir, package_dir, public_key)
    except JoinRefused as err:
        raise BadInput(f"refusing to join ({err.reason}): {err}") from None
    unknown = found["unknown_activities"]
    click.echo(
        f"device store: {found['records']} records in {found['sessions']} sessions; installed package: "
        f"{found['items']} items, vocabulary {found['vocab_hash']}"
        + (f"; activities the model does not know (not trained on): {unknown}" if unknown else ""),
        err=True,
    )
    node = {
        "device-dir": str(device_dir.resolve()),
        "package-dir": str(package_dir.resolve()),
        "public-key": str(public_key.resolve()),
    }
    try:
        command = supernode_command(superlink, node, port, _tls(root_certificates, insecure=insecure))
    except ValueError as err:
        raise BadInput(str(err)) from err
    check_port_free("127.0.0.1", port)
    _exec(command)


@fl_group.command("run")
@click.option("--superlink", required=True, help="SuperLink address host:port.")
@click.option(
    "--run-config", "-c", multiple=True, help="key=value overriding [tool.flwr.app.config] (repeatable)."
)
@click.option("--root-certificates", type=_existing, default=None)
@click.option("--insecure", is_flag=True)
@click.option(
    "--flwr-home",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".rib-edge/flwr"),
    show_default=True,
)
@click.option(
    "--wait-s",
    type=FiniteFloatRange(min=0),
    default=30,
    show_default=True,
    help="How long to wait for a SuperLink on this machine to answer (one started just before).",
)
def fl_run(
    superlink: str,
    run_config: tuple[str, ...],
    root_certificates,
    insecure: bool,
    flwr_home: Path,
    wait_s: float,
) -> None:
    """Submit the rib-edge Flower app to a SuperLink, stream its rounds, exit 0 only if every round trained.

    Exit status: 0 every round trained; 1 the run failed (the reason is the last line); 2 a bad run config or
    a file it names is missing; 130 interrupted (the run is stopped)."""
    from aggregator.deploy import REPO_ROOT, is_loopback, stream_run

    local = is_loopback(superlink)
    overrides = checked_run_config(parse_run_config(run_config), local)
    tls = _tls(root_certificates, insecure=insecure)
    if local and not _wait_for_superlink(superlink, wait_s):
        raise click.ClickException(f"no SuperLink answers on {superlink}: start one with `rib-edge fl serve`")
    try:
        outcome = stream_run(superlink, overrides, flwr_home.resolve(), click.echo, REPO_ROOT, tls)
    except KeyboardInterrupt:
        click.echo("interrupted: the run was stopped", err=True)
        raise SystemExit(130) from None
    if outcome.run_id is None:
        raise click.ClickException(f"the run did not start on {superlink} ({outcome.details})")
    if not outcome.completed:
        raise click.ClickException(
            f"run {outcome.run_id} {outcome.status}: {outcome.details or 'no details'}"
        )
    click.echo(f"run {outcome.run_id} {outcome.status}")


@fl_group.command("demo")
@click.option(
    "--devices", type=click.IntRange(1, 16), default=3, show_default=True, help="Kiosks (SuperNodes)."
)
@click.option("--rounds", type=click.IntRange(1, 100), default=2, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the population, keys, packages, checkpoints, releases and logs.",
)
@click.option(
    "--run-config", "-c", multiple=True, help="key=value added to the demo's run config (e.g. secagg=true)."
)
@click.option(
    "--prepare-only",
    is_flag=True,
    help="Build the artifacts and print the commands that run the same deployment by hand.",
)
@click.option(
    "--timeout-s", type=FiniteFloatRange(min=1), default=600, show_default=True, help="Stop a run that hangs."
)
def fl_demo(
    devices: int,
    rounds: int,
    seed: int,
    out_dir: Path,
    run_config: tuple[str, ...],
    prepare_only: bool,
    timeout_s: float,
) -> None:
    """A local federated deployment, end to end: artifacts that match, a SuperLink, one SuperNode per device,
    the run streamed round by round; every process stopped at the end. Exit 0 only if the model trained."""
    from federation.config import ConfigError, FederationConfig
    from rib_edge.fl_demo import manual_commands, prepare, run_demo

    extra = parse_run_config(run_config)
    try:
        FederationConfig.from_run_config(extra)
    except ConfigError as err:
        raise BadInput(str(err)) from None
    try:
        if prepare_only:
            artifacts = prepare(out_dir, devices, seed, click.echo)
            click.echo("run the same deployment by hand (from this directory):")
            for line in manual_commands(artifacts, rounds, seed):
                click.echo(f"  {line}")
            return
        code = run_demo(out_dir, devices, rounds, seed, extra, timeout_s, click.echo)
    except FileExistsError as err:
        raise BadInput(str(err)) from None
    raise SystemExit(code)
