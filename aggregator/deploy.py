"""Flower's deployment engine for rib-edge: a real SuperLink, real SuperNodes, runs submitted with ``flwr run``.

- ``superlink_command``: ``flower-superlink`` with TLS when certificates are given (else ``--insecure``,
  for loopback tests only) and WITHOUT runtime dependency installation: by default the SuperLink would
  ``uv sync`` the app's dependencies, which resolves a CUDA torch from PyPI; the app runs in the
  environment rib-edge is installed in.
- ``supernode_command``: ``flower-supernode`` for one device; its node config names the device's store
  (``device-dir``) and its installed signed package (``package-dir`` + ``public-key``) — the ClientApp
  reads nothing else.
- ``submit_run``: ``flwr run <app> <connection>`` with a private ``FLWR_HOME`` whose ``config.toml`` names
  the SuperLink, so nothing is written to the user's ``~/.flwr``. ``stream_run`` does the same, hands every
  output line to a callback as it comes and then asks the SuperLink how the run ended (``flwr ls``): Flower's
  ``flwr run --stream`` exits 0 whether the ServerApp finished or failed.
- ``Deployment``: starts and stops those processes (a context manager; every process it starts is
  terminated on exit, SIGKILL after a grace period).

TLS (see README "Federated deployment"): make a CA and a server certificate whose SAN covers the
SuperLink's address; give the SuperLink ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` and every
SuperNode and ``flwr run`` the CA as root certificate.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for TLS between SuperLink, SuperNodes and the CLI."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None

    def check(self, server: bool) -> None:
        """Fail early with the missing file's name."""
        needed = [self.ca_cert] + ([self.server_cert, self.server_key] if server else [])
        for path in needed:
            if path is None or not Path(path).is_file():
                raise FileNotFoundError(f"TLS file not found: {path}")


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's executables: this interpreter's bin dir first on PATH (the SuperLink and
    SuperNodes start ``flower-superexec`` and the apps by name)."""
    bin_dir = str(Path(sys.executable).parent)
    path = bin_dir + os.pathsep + os.environ.get("PATH", "")
    telemetry = os.environ.get("FLWR_TELEMETRY_ENABLED", "0")  # no usage telemetry unless asked for
    return {**os.environ, "PATH": path, "FLWR_TELEMETRY_ENABLED": telemetry, **(extra or {})}


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_loopback(address: str) -> bool:
    """Whether a ``host:port`` address names this machine (then the run config's paths are local paths)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def superlink_command(
    port: int, host: str = "127.0.0.1", database: str | None = None, tls: TLSFiles | None = None
) -> list[str]:
    """Command line of a SuperLink serving Fleet, Control and Runtime APIs on ``host:port``."""
    command = [
        _bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if database:
        command += ["--database", database]
    if tls is None:
        command.append("--insecure")
    else:
        tls.check(server=True)
        command += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
    return command


def key_value_arg(values: dict[str, object]) -> str:
    """Flower's ``key=value`` list syntax (``--node-config``, ``--run-config``): TOML values, space-separated.

    Flower splits the list on spaces, so a string holding a space or a quote cannot be passed; refused here.
    """
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value}")
        else:
            text = str(value)
            if '"' in text or " " in text:
                raise ValueError(f"value {text!r} of {key!r} may not contain spaces or quotes")
            parts.append(f'{key}="{text}"')
    return " ".join(parts)


def supernode_command(
    superlink: str,
    node_config: dict[str, object],
    port: int,
    tls: TLSFiles | None = None,
    max_wait_s: float = 120.0,
) -> list[str]:
    """Command line of a SuperNode for one device."""
    command = [
        _bin("flower-supernode"),
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        key_value_arg(node_config),
        "--max-wait-time",
        str(max_wait_s),
    ]
    if tls is None:
        command.append("--insecure")
    else:
        tls.check(server=False)
        command += ["--root-certificates", str(tls.ca_cert)]
    return command


def write_flwr_home(
    flwr_home: Path, superlink: str, tls: TLSFiles | None = None, name: str = "rib-edge"
) -> Path:
    """A private FLWR_HOME whose config.toml names the SuperLink connection ``name``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{superlink}"']
    lines.append("insecure = true" if tls is None else f'root-certificates = "{tls.ca_cert}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_app(app_dir: Path, target: Path) -> Path:
    """A copy of the app holding only what its FAB includes (``fab-include`` in pyproject.toml).

    ``flwr run`` walks every file under the app directory to build the FAB; in a checkout that holds a
    virtual environment that is tens of thousands of files and seconds per run. Returns ``target``.
    """
    import tomllib

    app_dir = Path(app_dir)
    patterns = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    shutil.rmtree(target, ignore_errors=True)
    for pattern in patterns:
        for source in app_dir.glob(pattern):
            if source.is_file() and "__pycache__" not in source.parts:
                destination = target / source.relative_to(app_dir)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination)
    return target


def submit_run(
    superlink: str,
    run_config: dict[str, object],
    flwr_home: Path,
    app_dir: Path = REPO_ROOT,
    tls: TLSFiles | None = None,
    stream: bool = True,
    timeout_s: float | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess:
    """``flwr run`` the rib-edge app on a SuperLink (with ``stream``, returns when the run ends)."""
    write_flwr_home(flwr_home, superlink, tls)
    command = [_bin("flwr"), "run", str(stage_app(app_dir, flwr_home / "app")), "rib-edge"]
    if run_config:
        command += ["--run-config", key_value_arg(run_config)]
    if stream:
        command.append("--stream")
    env = tool_env({"FLWR_HOME": str(flwr_home)})
    return subprocess.run(command, env=env, capture_output=capture, text=True, timeout=timeout_s, check=False)


@dataclass
class RunOutcome:
    """How a submitted run ended: Flower's status (``finished:completed``, ``finished:failed``, ...) and details."""

    run_id: int | None
    status: str
    details: str = ""
    returncode: int = 0

    @property
    def completed(self) -> bool:
        """The ServerApp returned normally (for rib-edge: every round trained)."""
        return self.status == "finished:completed"


_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")


def _flwr(args: list[str], flwr_home: Path, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    env = tool_env({"FLWR_HOME": str(flwr_home)})
    return subprocess.run(
        [_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def run_status(run_id: int, flwr_home: Path, wait_s: float = 30.0) -> tuple[str, str]:
    """(status, details) of a run from the SuperLink, waiting up to ``wait_s`` for it to be finished."""
    deadline = time.monotonic() + wait_s
    status, details = "unknown", ""
    while True:
        result = _flwr(["ls", "--run-id", str(run_id), "--format", "json"], flwr_home)
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            run = json.loads(result.stdout)["runs"][0]
            status, details = str(run["status"]), str(run.get("status-details") or "")
        if status.startswith("finished") or time.monotonic() >= deadline:
            return status, details
        time.sleep(0.5)


def stop_run(run_id: int, flwr_home: Path) -> None:
    """Ask the SuperLink to stop a run (``flwr stop``)."""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        _flwr(["stop", str(run_id)], flwr_home, timeout_s=30)


def stream_run(
    superlink: str,
    run_config: dict[str, object],
    flwr_home: Path,
    on_line,
    app_dir: Path = REPO_ROOT,
    tls: TLSFiles | None = None,
) -> RunOutcome:
    """``flwr run --stream`` the rib-edge app; every output line goes to ``on_line`` as it arrives.

    Returns how the run ended according to the SuperLink. On KeyboardInterrupt the run is stopped
    (``flwr stop``) before the interrupt propagates.
    """
    write_flwr_home(flwr_home, superlink, tls)
    command = [_bin("flwr"), "run", str(stage_app(app_dir, flwr_home / "app")), "rib-edge", "--stream"]
    if run_config:
        command += ["--run-config", key_value_arg(run_config)]
    env = tool_env({"FLWR_HOME": str(flwr_home)})
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    run_id: int | None = None
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            match = _RUN_ID_RE.search(line)
            if match and run_id is None:
                run_id = int(match.group(1))
            on_line(line.rstrip("\n"))
        process.wait()
    except KeyboardInterrupt:
        if run_id is not None:
            stop_run(run_id, flwr_home)
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        raise
    if run_id is None:
        return RunOutcome(
            None, "not started", f"flwr run exited with {process.returncode}", process.returncode
        )
    status, details = run_status(run_id, flwr_home)
    return RunOutcome(run_id, status, details, process.returncode)


@dataclass
class Deployment:
    """A SuperLink and SuperNodes as child processes; ``stop()`` (or leaving the ``with``) ends them all."""

    work_dir: Path
    tls: TLSFiles | None = None
    flwr_home: Path | None = (
        None  # FLWR_HOME of the processes (installed app bundles); default work_dir/flwr-home
    )
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def superlink(self) -> str:
        """host:port of the SuperLink."""
        return f"127.0.0.1:{self.port}"

    def _spawn(
        self, command: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        home = self.flwr_home or self.work_dir / "flwr-home"
        env = {"FLWR_HOME": str(home), **(env or {})}
        log = (self.work_dir / log_name).open("ab")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=tool_env(env), start_new_session=True
        )
        log.close()
        self.processes.append(process)
        return process

    def start_superlink(self, database: str | None = None) -> subprocess.Popen:
        """Start the SuperLink and wait until its port accepts connections."""
        process = self._spawn(superlink_command(self.port, database=database, tls=self.tls), "superlink.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with {process.returncode}; see {self.work_dir / 'superlink.log'}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return process
            time.sleep(0.2)
        raise TimeoutError("flower-superlink did not open its port within 60 s")

    def start_supernode(self, node_config: dict[str, object], name: str) -> subprocess.Popen:
        """Start one device's SuperNode."""
        return self._spawn(
            supernode_command(self.superlink, node_config, free_port(), self.tls), f"supernode-{name}.log"
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate every process started here (process groups: the apps they spawned go too)."""
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
