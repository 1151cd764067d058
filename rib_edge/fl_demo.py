"""``rib-edge fl demo``: a whole federated deployment on this machine, from nothing to a signed release.

1. artifacts that match: a synthetic population of kiosks (each device's encrypted store, written by the
   device's own extractor; the server's held-out split and vocabulary), a release signing key pair, and the
   first package every device installs, built from the same vocabulary as the server's split;
2. a SuperLink and one SuperNode per device on free loopback ports (``aggregator.deploy.Deployment``);
3. the run submitted with ``flwr run`` and its log streamed, one line per round;
4. every process stopped, also on Ctrl-C, SIGTERM or failure; exit 0 only if every round trained, the final
   model differs from the first and the final release verifies with the public key.

``--prepare-only`` stops after step 1 and prints the commands that run the same deployment by hand (the
deployment section of docs/federation.md).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MARKER = "demo.json"  # a directory holding this file was written by the demo and may be rewritten by it
RUN_OUTPUTS = ("checkpoints", "releases", "metrics.jsonl", "logs", "flwr-home")
KIOSK_SESSIONS = (150, 250)  # shoppers' sessions per kiosk: a kiosk serves many shoppers


@dataclass(frozen=True)
class DemoArtifacts:
    """Where the demo put what a deployment needs (every path absolute)."""

    root: Path
    population: Path
    eval_split: Path
    devices: tuple[Path, ...]
    installed: Path
    private_key: Path
    public_key: Path

    def run_config(
        self, rounds: int, seed: int = 0, extra: dict[str, object] | None = None
    ) -> dict[str, object]:
        """The run config of the demo run (every device takes part in every round)."""
        n = len(self.devices)
        return {
            "seed": seed,
            "eval-split": str(self.eval_split),
            "num-server-rounds": rounds,
            "fraction-fit": 1.0,
            "min-fit-clients": n,
            "min-available-clients": n,
            "local-steps": 10,
            "checkpoint-dir": str(self.root / "checkpoints"),
            "release-dir": str(self.root / "releases"),
            "signing-key": str(self.private_key),
            "metrics-path": str(self.root / "metrics.jsonl"),
            **(extra or {}),
        }


def _relative(path: Path, cwd: Path) -> str:
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


def manual_commands(
    artifacts: DemoArtifacts, rounds: int, seed: int = 0, cwd: Path | None = None
) -> list[str]:
    """The same deployment by hand: a SuperLink, one ``fl join`` per device (each its own --port), ``fl run``."""
    cwd = cwd or Path.cwd()
    rel = lambda p: _relative(p, cwd)  # noqa: E731
    lines = ["rib-edge fl serve --insecure --port 9092 &"]
    for index, device in enumerate(artifacts.devices):
        lines.append(
            f"rib-edge fl join --superlink 127.0.0.1:9092 --insecure --port {9094 + index} "
            f"--device-dir {rel(device)} --package-dir {rel(artifacts.installed)} "
            f"--public-key {rel(artifacts.public_key)} &"
        )
    config = artifacts.run_config(rounds, seed)
    if not seed:
        del config["seed"]
    options = " ".join(
        f"-c {key}={rel(Path(value)) if isinstance(value, str) else value}" for key, value in config.items()
    )
    lines.append(f"rib-edge fl run --superlink 127.0.0.1:9092 --insecure {options}")
    return lines


def prepare(out: Path, n_devices: int, seed: int = 0, echo: Callable[[str], None] = print) -> DemoArtifacts:
    """Build (or reuse) the population, keys and installed package under ``out``; clear earlier run outputs."""
    from aggregator.release import publish_release
    from aggregator.server_app import initial_weights
    from edge_client.package import generate_keypair
    from federation.config import FederationConfig
    from federation.task import run_rib_config
    from model.data.synthetic import SyntheticConfig
    from simulations.population import build_population, open_population

    out = out.resolve()
    settings = {"devices": n_devices, "seed": seed}
    marker = out / MARKER
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise FileExistsError(
                f"{out} is not empty and was not written by `rib-edge fl demo`: pick a new --out"
            )
        if json.loads(marker.read_text()) != settings:
            raise FileExistsError(
                f"{out} holds a demo with other settings ({marker.read_text()}): pick a new --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings))
    for name in RUN_OUTPUTS:  # the demo's own outputs of an earlier run: each run starts from round 0
        target = out / name
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)

    started = time.perf_counter()
    info = build_population(
        "synthetic",
        out / "population",
        max_devices=n_devices,
        seed=seed,
        synthetic=SyntheticConfig(sessions_per_device=KIOSK_SESSIONS),
    )
    population = open_population(out / "population")
    split = population.split()
    echo(
        f"population: {n_devices} kiosks, {info.raw['sessions']} sessions in their encrypted stores, "
        f"{split.vocab.n_items} items, {split.test.n_sessions} held-out sessions for the server "
        f"({time.perf_counter() - started:.1f} s)"
    )
    keys = out / "keys"
    private = keys / "edge_signing_key.pem"
    public = keys / "edge_signing_key.pub.pem"
    if not (private.is_file() and public.is_file()):
        private, public = generate_keypair(keys)
    installed = out / "installed"
    if not installed.is_dir():
        # The first package every device installs: the run's starting model on the server's vocabulary.
        fed = FederationConfig(seed=seed)
        rib_config = run_rib_config(split.vocab, fed)
        weights = initial_weights(fed, rib_config, split.vocab)
        built = publish_release(weights, rib_config, split.vocab, out / "first-release", private, 1)
        built.rename(installed)
        shutil.rmtree(out / "first-release", ignore_errors=True)
    echo(f"keys: {keys}; installed package (version 1, the same vocabulary): {installed}")
    devices = tuple(population.device_dir(int(i)) for i in population.ok_indices())
    return DemoArtifacts(
        out,
        out / "population",
        out / "population" / "server" / "split.npz",
        devices,
        installed,
        private,
        public,
    )


def _trained(artifacts: DemoArtifacts, run_config: dict[str, object]) -> str | None:
    """Why the finished run did not train the model (None when it did)."""
    from aggregator.checkpoint import CheckpointStore
    from aggregator.server_app import initial_weights
    from edge_client.package import PackageError, verify_package
    from federation.config import FederationConfig
    from federation.task import run_rib_config
    from model.data.dataset import SplitData

    fed = FederationConfig.from_run_config(run_config)
    rounds = fed.num_server_rounds
    store = CheckpointStore(artifacts.root / "checkpoints")
    if not store.rounds() or store.rounds()[-1] != rounds:
        return f"no checkpoint of round {rounds}"
    split = SplitData.load(artifacts.eval_split)
    start = initial_weights(fed, run_rib_config(split.vocab, fed), split.vocab)
    final = store.load(rounds).weights
    if all(np.array_equal(a, b) for a, b in zip(start, final, strict=True)):
        return "the final model equals the starting model"
    release = artifacts.root / "releases" / f"v{rounds:06d}"
    try:
        verify_package(release, artifacts.public_key)
    except PackageError as err:
        return f"the final release does not verify: {err}"
    return None


def run_demo(
    out: Path,
    n_devices: int,
    rounds: int,
    seed: int = 0,
    extra_config: dict[str, object] | None = None,
    timeout_s: float = 600.0,
    echo: Callable[[str], None] = print,
) -> int:
    """The whole demo; returns the exit status (0 only if the model trained)."""
    from aggregator.deploy import Deployment, stop_run, stream_run

    artifacts = prepare(out, n_devices, seed, echo)
    run_config = artifacts.run_config(rounds, seed, extra_config)
    logs = artifacts.root / "logs"
    stop = threading.Event()
    state: dict[str, object] = {}

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # leave through the same path as Ctrl-C: processes stopped, run stopped

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with Deployment(logs, flwr_home=artifacts.root / "flwr-home") as deployment:
            deployment.start_superlink()
            echo(f"SuperLink on {deployment.superlink} (log: {logs / 'superlink.log'})")
            nodes = []
            for index, device in enumerate(artifacts.devices):
                node = {
                    "device-dir": str(device),
                    "package-dir": str(artifacts.installed),
                    "public-key": str(artifacts.public_key),
                }
                nodes.append((f"device{index}", deployment.start_supernode(node, f"device{index}")))
            echo(f"{len(nodes)} SuperNodes started (logs: {logs}/supernode-device*.log)")

            def watch() -> None:
                # A SuperNode that dies would leave the server waiting for it: stop the run instead.
                while not stop.wait(1.0):
                    dead = [name for name, process in nodes if process.poll() is not None]
                    late = time.monotonic() - started > timeout_s
                    if dead or late:
                        state["problem"] = (
                            f"SuperNode {dead[0]} exited (see {logs}/supernode-{dead[0]}.log)"
                            if dead
                            else f"the run took longer than {timeout_s:.0f} s"
                        )
                        if "run_id" in state:
                            stop_run(int(state["run_id"]), artifacts.root / "flwr-home")  # type: ignore[arg-type]
                        return

            def on_line(line: str) -> None:
                if "Successfully started run" in line:
                    state["run_id"] = int(line.rsplit(" ", 1)[-1])
                echo(line)

            started = time.monotonic()
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            outcome = stream_run(deployment.superlink, run_config, artifacts.root / "flwr-home", on_line)
            stop.set()
    except KeyboardInterrupt:
        echo("interrupted: the run and every process the demo started are stopped")
        return 130
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, previous)
    if "problem" in state:
        echo(f"demo failed: {state['problem']}")
        return 1
    if not outcome.completed:
        echo(f"demo failed: run {outcome.run_id} {outcome.status}: {outcome.details or 'no details'}")
        return 1
    problem = _trained(artifacts, run_config)
    if problem is not None:
        echo(f"demo failed: {problem}")
        return 1
    echo(
        f"done in {time.monotonic() - started:.0f} s: {rounds} rounds trained on {len(artifacts.devices)} devices; "
        f"signed release {artifacts.root / 'releases' / f'v{rounds:06d}'} verifies with {artifacts.public_key}; "
        f"metrics {artifacts.root / 'metrics.jsonl'}"
    )
    return 0
