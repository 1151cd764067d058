"""``rib-edge edge ...`` (device-side packages and recommendations) and ``rib-edge bench edge``.

The lead registers them: ``main.add_command(edge_group)`` and ``bench.add_command(bench_edge_command)``.
``edge verify`` / ``edge recommend`` / ``edge keygen`` import only the device modules (numpy, onnxruntime,
cryptography); ``edge package`` and ``bench edge`` import torch inside the command.
"""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import click

from rib_edge.cli_common import (
    BadInput,
    DatasetChoice,
    FiniteFloatRange,
    check_checkpoint_data,
    dataset_options,
    echo_step,
    load_checkpoint_or_fail,
)


def _package_error(err) -> click.ClickException:
    return BadInput(f"package refused ({err.reason}): {err}")


public_key_option = click.option(
    "--public-key",
    "public_key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Ed25519 public key (PEM) the package must be signed with.",
)


@click.group("edge")
def edge_group() -> None:
    """On-device model packages: keys, packaging (export + int8 + sign), verification, recommendations."""


@edge_group.command("keygen")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the key pair.",
)
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def keygen(out_dir: Path, force: bool) -> None:
    """Write an Ed25519 signing key (0600) and its public key, both PEM."""
    from edge_client.package import generate_keypair

    try:
        private, public = generate_keypair(out_dir, overwrite=force)
    except FileExistsError as err:
        raise BadInput(f"{out_dir} already holds a key pair; add --force to replace it") from err
    except OSError as err:
        raise BadInput(f"cannot write keys to {out_dir}: {err.strerror or err}") from err
    click.echo(f"private key: {private} (keep it off devices)\npublic key:  {public} (ship it with the app)")


@edge_group.command("package")
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="RIB checkpoint (rib.pt).",
)
@dataset_options(help="The dataset the checkpoint was trained on (vocabulary and popularity).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New package directory.",
)
@click.option(
    "--key",
    "key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Ed25519 private key (PEM).",
)
@click.option(
    "--model-version",
    type=click.IntRange(min=1),
    default=None,
    help="Monotonic model version (default: Unix time).",
)
@click.option("--fp32", is_flag=True, help="Ship fp32 graphs instead of int8.")
@click.option("--per-tensor", is_flag=True, help="Per-tensor int8 weights instead of per-channel.")
def package(
    checkpoint: Path,
    data: DatasetChoice,
    out_dir: Path,
    key: Path,
    model_version: int | None,
    fp32: bool,
    per_tensor: bool,
) -> None:
    """Export a checkpoint to ONNX (parity-checked), quantize to int8 and sign it as a device package."""
    from edge_client.package import PackageError, load_private_key
    from model.export import ExportError, build_package, popularity_from

    try:
        load_private_key(key)  # a bad key fails now, not after the export
    except PackageError as err:
        raise BadInput(f"--key {key}: {err}") from err
    rec = load_checkpoint_or_fail(checkpoint, device="cpu")
    split = data.open()
    check_checkpoint_data(rec, split, data.name)
    version = model_version or int(time.time())
    echo_step(
        f"exporting {checkpoint} ({rec.rib_config.data_type}, {rec.rib_config.n_items} items) as version {version}"
    )
    try:
        manifest = build_package(
            rec.model,
            split.vocab,
            out_dir,
            key,
            version,
            popularity_from(split.train),
            int8=not fp32,
            per_channel=not per_tensor,
            extra={"checkpoint": checkpoint.name, "dataset": data.name},
        )
    except FileExistsError as err:
        raise BadInput(f"{out_dir} already exists; choose a new --out directory") from err
    except ExportError as err:
        raise click.ClickException(str(err)) from err
    except PackageError as err:
        raise _package_error(err) from err
    export = manifest.extra["export"]
    click.echo(
        f"wrote {out_dir}: model_version {manifest.model_version}, {manifest.precision}, "
        f"{export['bytes'] / 2**20:.2f} MB graphs (fp32 {export['fp32_bytes'] / 2**20:.2f} MB); "
        f"fp32 parity max abs diff full {export['full_max_abs_diff']:.2e}, step {export['step_max_abs_diff']:.2e}"
    )


@edge_group.command("verify")
@click.argument("package_dir", type=click.Path(path_type=Path))
@public_key_option
@click.option(
    "--installed-version",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse unless the package is newer than this.",
)
def verify(package_dir: Path, public_key: Path, installed_version: int | None) -> None:
    """Check a package's signature, manifest, files and version; prints the manifest (exit 2 if refused)."""
    from edge_client.package import PackageError, verify_package

    try:
        manifest = verify_package(package_dir, public_key, installed_version)
    except PackageError as err:
        raise _package_error(err) from err
    click.echo(json.dumps({"ok": True, **manifest.to_dict()}, indent=2))


@edge_group.command("recommend")
@click.option(
    "--package", "package_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True
)
@click.option(
    "--events",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Raw UI events, JSON lines.",
)
@public_key_option
@click.option("-k", "k", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option(
    "--device",
    "device_id",
    default=None,
    help="Device whose latest session to use (default: the device with the latest session).",
)
@click.option("--keep-seen", is_flag=True, help="Do not exclude items already in the session.")
@click.option("--json", "as_json", is_flag=True, help="JSON output with explanations.")
def recommend(
    package_dir: Path,
    events: Path,
    public_key: Path,
    k: int,
    device_id: str | None,
    keep_seen: bool,
    as_json: bool,
) -> None:
    """Run the device extractor on raw events and recommend for the latest session of one device.

    Sessions are a device's own: two devices' sessions that share an id stay apart.
    """
    from edge_client.extract import extract_population
    from edge_client.package import PackageError
    from edge_client.runtime import Recommender, format_recommendations, latest_session
    from edge_client.schema import SkipReport, read_event_lines

    try:
        rec = Recommender(package_dir, public_key)
    except PackageError as err:
        raise _package_error(err) from err
    parsed, extracted = SkipReport(), SkipReport()
    try:
        with open(events, "rb") as handle:
            population = extract_population(read_event_lines(handle, parsed), report=extracted)
    except OSError as err:
        raise BadInput(f"cannot read {events}: {err.strerror or err}") from err
    if not parsed.kept:
        raise BadInput(f"{events}: no valid events ({parsed.summary()})")
    if device_id is not None:
        if device_id not in population:
            raise BadInput(f"{events} holds no micro behaviors of device {device_id!r}")
        population = {device_id: population[device_id]}
    # The device with the latest session; ties go to the larger (device, session) id, deterministically.
    latest = {device: latest_session(records) for device, records in population.items()}
    latest = {device: session for device, session in latest.items() if session}
    chosen = max(
        latest, key=lambda d: (latest[d][-1].timestamp_ms, d, latest[d][-1].session_id), default=None
    )
    session = latest[chosen] if chosen is not None else []
    recs = rec.recommend(session, k=k, exclude_seen=not keep_seen)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "model_version": rec.model_version,
                    "device_id": chosen,
                    "session_id": session[0].session_id if session else None,
                    "session_tuples": len(session),
                    "skipped": dict(rec.stats),
                    "events": parsed.to_dict(),
                    "extraction": extracted.to_dict(),
                    "recommendations": format_recommendations(recs),
                },
                indent=2,
            )
        )
        return
    where = f"device {chosen}, session {session[0].session_id}" if session else "no session"
    click.echo(
        f"model v{rec.model_version}; {where}: {len(session)} tuples; "
        f"events: {parsed.summary()}; extraction: {extracted.summary()}"
    )
    if rec.stats:
        click.echo(f"skipped tuples: {dict(rec.stats)}")
    if recs and recs[0].explanation:
        click.echo("attention over the session:")
        for t in recs[0].explanation:
            click.echo(
                f"  {t.weight:6.3f}  {t.item_id:>20s}  {t.activity:22s} dwell bucket {t.dwell_bucket}{'' if t.used else '  (skipped)'}"
            )
    for rank, r in enumerate(recs, start=1):
        click.echo(f"{rank:3d}. {r.item_id:>20s}  {r.score:10.4f}  ({r.source})")


class _Stop(Exception):
    """Raised in the main thread by the SIGTERM / SIGINT handler of ``edge serve``."""


@edge_group.command("serve")
@click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Encrypted tuple store directory.",
)
@click.option(
    "--package", "package_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True
)
@public_key_option
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless --allow-remote)."
)
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--device", "device_id", default="local", show_default=True, help="This device's id.")
@click.option(
    "--pages",
    "pages_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Directory of pages to serve at / (e.g. examples/kiosk).",
)
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback bind (exposes the device's events).")
@click.option(
    "--idle-check-s",
    default=30.0,
    show_default=True,
    type=FiniteFloatRange(min=0),
    help="Seconds between checks that store the open pages of sessions idle past the session gap (0: off).",
)
def serve(
    store_dir: Path,
    package_dir: Path,
    public_key: Path,
    host: str,
    port: int,
    device_id: str,
    pages_dir: Path | None,
    allow_remote: bool,
    idle_check_s: float,
) -> None:
    """Serve the local HTTP endpoints (/events, /recommendations, /tracker.js) until SIGTERM or Ctrl-C.

    On either signal: stop the HTTP server, store the visits still open (their dwell so far), release the
    store and exit 0. The package must not be older than the newest version this store has installed.
    """
    import signal
    import threading

    from edge_client.client import EdgeClient
    from edge_client.package import PackageError
    from edge_client.server import is_loopback
    from edge_client.server import serve as start_server
    from edge_client.store import StoreError

    if not allow_remote and not is_loopback(host):
        raise BadInput(
            f"refusing to bind non-loopback host {host!r}; add --allow-remote to expose the device"
        )
    try:
        client = EdgeClient(
            store_dir, package_dir, public_key, device_id=device_id, idle_check_s=idle_check_s or None
        )
    except PackageError as err:
        raise _package_error(err) from err
    except StoreError as err:
        raise BadInput(f"store refused: {err}") from err
    try:
        server = start_server(client, host=host, port=port, allow_remote=allow_remote, pages_dir=pages_dir)
    except OSError as err:
        client.close()
        if err.errno == errno.EADDRINUSE:
            raise BadInput(f"port {port} on {host} is busy; choose another with --port") from err
        raise BadInput(f"cannot serve on {host}:{port}: {err.strerror or err}") from err
    except ValueError as err:
        client.close()
        raise BadInput(str(err)) from err

    # The handler raises in the main thread (wherever it is: here, time.sleep) once; a second signal while
    # the server stops and open visits are stored is ignored, so it cannot cut the flush short.
    stopping: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            raise _Stop

    # signal.signal works in the main thread only (elsewhere, e.g. a test runner's thread, Ctrl-C still works).
    watched = [signal.SIGTERM, signal.SIGINT] if threading.current_thread() is threading.main_thread() else []
    previous: dict[int, object] = {}
    try:
        for signum in watched:
            previous[signum] = signal.signal(signum, on_signal)
        click.echo(
            f"serving {server.url} (model v{client.recommender.model_version}); SIGTERM or Ctrl-C stops"
        )
        while True:
            time.sleep(3600)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        stopping.append(0)  # from here on a signal is a no-op
        try:
            server.stop()
            client.close()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    name = signal.Signals(stopping[0]).name if stopping[0] else "interrupt"
    click.echo(f"stopped ({name}); {client.stats['stored_records']} tuples stored this run")


@click.command("edge")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("benchmarks/results/edge"),
    show_default=True,
)
@click.option(
    "--items",
    "n_items",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Catalogue size of the random-weight model.",
)
@click.option("--seq-len", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Timed runs per latency figure.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="onnxruntime intra-op threads.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Training epochs of the synthetic model.",
)
@click.option("--skip-trained", is_flag=True, help="Only the random-weight model.")
@click.option(
    "--shared-dataset",
    default="srgnn_nowplaying",
    show_default=True,
    help="Also a model trained on this shared dataset (the largest shared vocabulary); '' to skip.",
)
@click.option(
    "--shared-train-seconds",
    type=FiniteFloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Training budget of that model.",
)
def bench_edge_command(
    out_dir: Path,
    n_items: int,
    seq_len: int,
    repeats: int,
    threads: int,
    epochs: int,
    skip_trained: bool,
    shared_dataset: str,
    shared_train_seconds: float,
) -> None:
    """int8 vs fp32 ONNX: latency (full session, incremental step), size, top-20 agreement; extraction, RSS."""
    from experiments import edge as bench

    result = bench.run_edge_bench(
        out_dir,
        n_items=n_items,
        seq_len=seq_len,
        repeats=repeats,
        threads=threads,
        trained=not skip_trained,
        epochs=epochs,
        progress=echo_step,
        shared_dataset=(shared_dataset or None) if not skip_trained else None,
        shared_train_seconds=shared_train_seconds,
    )
    click.echo(bench.markdown(result))
    click.echo(f"wrote {out_dir / 'edge.json'} and {out_dir / 'edge.md'}")
