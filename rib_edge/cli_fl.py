"""``rib-edge fl``: Flower's deployment engine for rib-edge (SuperLink, SuperNodes, runs)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rib_edge.cli_common import BadInput, check_port_free

_existing = click.Path(exists=True, dir_okay=False, path_type=Path)


def _tls(ca: Path | None, cert: Path | None = None, key: Path | None = None, insecure: bool = False):
    from aggregator.deploy import TLSFiles

    if insecure:
        if ca or cert or key:
            raise click.UsageError("--insecure and certificate files exclude each other")
        return None
    if ca is None:
        raise click.UsageError(
            "give TLS certificates (see README 'Federated deployment'), or --insecure for loopback tests"
        )
    return TLSFiles(ca_cert=ca, server_cert=cert, server_key=key)


def _exec(command: list[str], env_extra: dict[str, str] | None = None) -> None:
    """Replace this process with a Flower executable (signals go straight to it)."""
    from aggregator.deploy import tool_env

    click.echo("$ " + " ".join(command), err=True)
    os.execvpe(command[0], command, tool_env(env_extra))


@click.group("fl")
def fl_group() -> None:
    """Federated training: run a SuperLink, join devices, submit runs."""


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
    help="The device's store.",
)
@click.option(
    "--package-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Installed signed package.",
)
@click.option("--public-key", type=_existing, required=True, help="Release signing public key (PEM).")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=9094,
    show_default=True,
    help="Local port of the SuperNode's runtime API.",
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
    from edge_client.package import PackageError, verify_package

    try:
        verify_package(package_dir, public_key)
    except PackageError as err:
        raise BadInput(f"refusing to join with an unverified package ({err.reason}): {err}") from err
    node = {
        "device-dir": str(device_dir.resolve()),
        "package-dir": str(package_dir.resolve()),
        "public-key": str(public_key.resolve()),
    }
    try:
        command = supernode_command(superlink, node, port, _tls(root_certificates, insecure=insecure))
    except ValueError as err:
        raise click.ClickException(str(err)) from err
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
def fl_run(
    superlink: str, run_config: tuple[str, ...], root_certificates, insecure: bool, flwr_home: Path
) -> None:
    """Submit the rib-edge Flower app to a SuperLink and stream its log until it ends."""
    import tomllib

    from aggregator.deploy import REPO_ROOT, submit_run
    from federation.config import ConfigError, FederationConfig

    overrides: dict[str, object] = {}
    for item in run_config:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.UsageError(f"--run-config expects key=value, got {item!r}")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = raw
    try:
        FederationConfig.from_run_config(overrides)  # fail here, not inside the SuperLink
    except ConfigError as err:
        raise click.ClickException(str(err)) from err
    result = submit_run(
        superlink, overrides, flwr_home, REPO_ROOT, _tls(root_certificates, insecure=insecure), capture=False
    )
    raise SystemExit(result.returncode)
