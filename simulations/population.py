"""A population of virtual devices on disk: each device's encrypted tuple store, plus the server's split.

Layout of a population directory ``POP/``::

    population.json      summary (format 1): source, partition, n_devices, seed, created, vocab_items,
                         skipped {reason: count}, events, records, ... (written last: its presence means
                         the build completed)
    devices.jsonl        one line per device slot, in index order: {"index", "device_id", "events",
                         "records", "sessions", "status": "ok" | "skipped:<reason>"}
    devices/000000/      the store directory a real device uses: TupleStore(dir,
                         key_provider=KeyFileProvider(dir / KEY_FILE_NAME)) (absent for skipped slots)
    server/split.npz     SplitData: vocabulary the federation trains on; ``test`` = held-out later sessions
                         (the server's evaluation set, in no device store); ``train`` = the same training
                         sessions the devices hold, kept only for the centralized baseline. A real
                         deployment has no ``train``: nobody holds the devices' data centrally.
    build.json           while building only: the build's arguments, for resuming

A device's training-period raw events are replayed in timestamp order through the device's own
``TupleExtractor`` (``DEVICE_EXTRACTOR_CONFIG``) and appended to its store, one device at a time: memory is
bounded by one device plus the source's index, whatever the population size. A build that stops (killed,
power loss) resumes where ``devices.jsonl`` ends when called again with the same arguments.

Skipped devices (a missing or corrupt log, no training records) keep their slot and index, have no
directory, and are counted in ``population.json["skipped"]``; ``Population.ok_indices()`` lists the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

try:  # POSIX: serialise builds of one directory
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from edge_client.extract import DEVICE_EXTRACTOR_CONFIG
from edge_client.keys import KEY_FILE_NAME, KeyFileProvider
from edge_client.schema import MicroBehavior, SchemaError, SkipReport
from edge_client.store import TupleStore
from model.data.dataset import SessionDataset, SplitData
from model.data.mapping import ActivityMapping
from model.data.protocol import ProtocolConfig
from model.data.synthetic import SyntheticConfig
from simulations.heterogeneity import Heterogeneity
from simulations.replay import device_dataset, protocol_tuples
from simulations.sources import (
    SYNTHETIC,
    DeviceLog,
    DeviceLogError,
    EventLogSource,
    InteractionSource,
    PopulationSource,
    SyntheticSource,
    extract,
)

FORMAT = 1
POPULATION_FILE = "population.json"
DEVICES_FILE = "devices.jsonl"
BUILD_FILE = "build.json"
DEVICES_DIR = "devices"
SPLIT_FILE = Path("server") / "split.npz"
STATUS_OK = "ok"
REPLAY = "action-events"
_REQUIRED_KEYS = (
    "format",
    "source",
    "partition",
    "n_devices",
    "seed",
    "created",
    "vocab_items",
    "skipped",
    "events",
    "records",
)


class PopulationError(RuntimeError):
    """A population directory is missing, incomplete, corrupt, or does not match the build asked for."""


@dataclass(frozen=True)
class PopulationInfo:
    """The summary in ``population.json`` (``raw`` keeps every field, including source details)."""

    path: Path
    format: int
    source: str
    partition: str
    n_devices: int
    n_ok: int
    seed: int
    created: str
    vocab_items: int
    skipped: dict[str, int]
    events: int
    records: int
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_dict(cls, path: Path, data: dict) -> PopulationInfo:
        """Validate the JSON object; PopulationError names what is wrong."""
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise PopulationError(f"{path / POPULATION_FILE}: missing field(s) {missing}")
        if data["format"] != FORMAT:
            raise PopulationError(
                f"{path / POPULATION_FILE}: format {data['format']!r} is not supported (expected {FORMAT})"
            )
        try:
            skipped = {str(k): int(v) for k, v in dict(data["skipped"]).items()}
            n_devices = int(data["n_devices"])
            return cls(
                path=path,
                format=FORMAT,
                source=str(data["source"]),
                partition=str(data["partition"]),
                n_devices=n_devices,
                n_ok=int(data.get("n_ok", n_devices - sum(skipped.values()))),
                seed=int(data["seed"]),
                created=str(data["created"]),
                vocab_items=int(data["vocab_items"]),
                skipped=skipped,
                events=int(data["events"]),
                records=int(data["records"]),
                raw=data,
            )
        except (TypeError, ValueError) as err:
            raise PopulationError(f"{path / POPULATION_FILE}: bad field value ({err})") from None


class Population:
    """An opened population: device store directories, the server split, per-device summaries."""

    def __init__(self, root: Path, info: PopulationInfo):
        self.root = root
        self.info = info
        self._split: SplitData | None = None
        self._index: tuple[np.ndarray, list[str]] | None = None

    @property
    def n_devices(self) -> int:
        """Device slots (indices ``0 .. n_devices - 1``), skipped ones included."""
        return self.info.n_devices

    def device_dir(self, index: int) -> Path:
        """The store directory of device ``index`` (absent when the device was skipped)."""
        if not isinstance(index, (int, np.integer)) or not 0 <= index < self.n_devices:
            raise IndexError(f"device index {index} out of range 0..{self.n_devices - 1}")
        return self.root / DEVICES_DIR / f"{int(index):06d}"

    def store(self, index: int) -> TupleStore:
        """The device's store, opened the way the device opens it (its key file next to it)."""
        directory = self.device_dir(index)
        if not directory.is_dir():
            raise PopulationError(f"device {index} has no store ({self.status(index)})")
        return TupleStore(directory, key_provider=KeyFileProvider(directory / KEY_FILE_NAME))

    def records(self, index: int) -> list[MicroBehavior]:
        """Every record in the device's store (StoreError when it is damaged)."""
        with self.store(index) as store:
            return store.read()

    def device_dataset(self, index: int, min_session_visits: int = 2) -> SessionDataset:
        """The device's records as training data in the shared vocabulary (the protocol's train filters)."""
        split = self.split()
        return device_dataset(
            self.records(index),
            split.vocab,
            name=f"device-{index}",
            user_id=self.device_id(index),
            min_session_visits=min_session_visits,
            has_activity=split.train.has_activity,
            has_dwell=split.train.has_dwell,
        )

    def split(self) -> SplitData:
        """The server's SplitData (loaded once per Population)."""
        if self._split is None:
            path = self.root / SPLIT_FILE
            try:
                self._split = SplitData.load(path)
            except FileNotFoundError:
                raise PopulationError(f"{path} is missing") from None
            except Exception as err:  # noqa: BLE001 - any damage to the file is a corrupt population
                raise PopulationError(f"{path} is corrupt ({type(err).__name__}: {err})") from None
        return self._split

    def devices(self) -> Iterator[dict]:
        """Stream the per-device lines of ``devices.jsonl``."""
        yield from _read_device_lines(self.root / DEVICES_FILE)

    def _load_index(self) -> tuple[np.ndarray, list[str]]:
        if self._index is None:
            ok = np.zeros(self.n_devices, dtype=bool)
            ids = [""] * self.n_devices
            for line in self.devices():
                i = int(line["index"])
                if 0 <= i < self.n_devices:
                    ok[i] = line["status"] == STATUS_OK
                    ids[i] = str(line["device_id"])
            self._index = (ok, ids)
        return self._index

    def ok_indices(self) -> np.ndarray:
        """Indices of the devices that have a store (not skipped)."""
        return np.flatnonzero(self._load_index()[0])

    def device_id(self, index: int) -> str:
        """The device's id (user id, session id, or synthetic device name)."""
        self.device_dir(index)
        return self._load_index()[1][index]

    def status(self, index: int) -> str:
        """``ok`` or ``skipped:<reason>``."""
        self.device_dir(index)
        if self._load_index()[0][index]:
            return STATUS_OK
        for line in self.devices():
            if int(line["index"]) == index:
                return str(line["status"])
        return "missing"


def _read_device_lines(path: Path) -> Iterator[dict]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise PopulationError(f"{path} is missing") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                return  # a torn last line (interrupted build); the build resumes from it
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                raise PopulationError(f"{path}: line {number} is not valid JSON") from None


def open_population(directory: str | os.PathLike[str]) -> Population:
    """Open a completed population; PopulationError says what is missing, incomplete or corrupt."""
    root = Path(directory)
    if not root.is_dir():
        raise PopulationError(f"no population at {root} (not a directory)")
    summary = root / POPULATION_FILE
    if not summary.is_file():
        if (root / BUILD_FILE).is_file():
            done = (
                sum(1 for _ in _read_device_lines(root / DEVICES_FILE))
                if (root / DEVICES_FILE).is_file()
                else 0
            )
            raise PopulationError(
                f"population at {root} is incomplete ({done} devices built); run build_population again with the "
                "same arguments to resume it"
            )
        raise PopulationError(f"{root} is not a population directory (no {POPULATION_FILE})")
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PopulationError(f"{summary} is corrupt ({err})") from None
    if not isinstance(data, dict):
        raise PopulationError(f"{summary} is corrupt (not a JSON object)")
    info = PopulationInfo.from_dict(root, data)
    for needed in (root / SPLIT_FILE, root / DEVICES_FILE):
        if not needed.is_file():
            raise PopulationError(f"population at {root} is corrupt: {needed.relative_to(root)} is missing")
    return Population(root, info)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _open_source(
    source: str,
    partition: str,
    max_devices: int | None,
    seed: int,
    data_dir: Path | None,
    mapping: ActivityMapping | str | Path | None,
    heterogeneity: Heterogeneity,
    synthetic: SyntheticConfig | None,
    split_devices: int,
    min_examples: int,
    protocol: ProtocolConfig | None,
) -> PopulationSource:
    if mapping is not None and (source == SYNTHETIC or Path(source).expanduser().is_dir()):
        raise SchemaError(
            "bad_argument",
            f"{source}: an activity mapping applies to interaction logs; device events name their activities",
        )
    if source == SYNTHETIC:
        n = max_devices if max_devices is not None else (synthetic or SyntheticConfig()).n_devices
        return SyntheticSource(n, seed, synthetic, heterogeneity, split_devices, protocol)
    path = Path(source).expanduser()
    if path.is_dir():
        return EventLogSource(path, max_devices, seed, split_devices, protocol)
    return InteractionSource(
        source,
        data_dir=data_dir,
        mapping=mapping,
        partition=partition,
        max_devices=max_devices,
        seed=seed,
        min_examples=min_examples,
        protocol=protocol,
    )


def _jsonable(value: object) -> object:
    if isinstance(value, ActivityMapping):
        return value.to_dict()
    if isinstance(value, (Path, ProtocolConfig, SyntheticConfig)):
        return str(value)
    return value


def _prepare_dir(out: Path, params: dict, overwrite: bool) -> bool:
    """Make ``out`` ready; returns True when a completed population with these arguments is already there."""
    summary, build = out / POPULATION_FILE, out / BUILD_FILE
    if not any(out.iterdir()):
        return False
    previous: dict | None = None
    for candidate in (summary, build):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
                previous = data.get("build") if candidate == summary else data
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                previous = {"unreadable": str(candidate)}
            break
    if previous is None:
        raise PopulationError(f"{out} is not empty and is not a population directory; refusing to touch it")
    if previous == params and not overwrite:
        return summary.is_file()
    if not overwrite:
        changed = sorted(k for k in set(params) | set(previous) if params.get(k) != previous.get(k))
        raise PopulationError(
            f"{out} holds a population built with other settings ({', '.join(changed) or 'unreadable'}); "
            "delete it or use another directory"
        )
    for entry in (summary, build, out / DEVICES_FILE, out / "server", out / DEVICES_DIR):
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()
    return False


def _resume_point(out: Path) -> tuple[int, Counter, dict[str, int]]:
    """Devices already built (complete lines of devices.jsonl) and their totals; a torn line is cut off."""
    path = out / DEVICES_FILE
    totals: Counter = Counter()
    skipped: dict[str, int] = {}
    done = 0
    if not path.is_file():
        return 0, totals, skipped
    good_bytes = 0
    with path.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            if entry.get("index") != done:
                break
            good_bytes += len(line)
            done += 1
            status = str(entry.get("status", ""))
            if status == STATUS_OK:
                totals["n_ok"] += 1
                for key in ("events", "records", "sessions", "store_bytes"):
                    totals[key] += int(entry.get(key, 0))
            else:
                reason = status.removeprefix("skipped:")
                skipped[reason] = skipped.get(reason, 0) + 1
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    return done, totals, skipped


def _dir_bytes(directory: Path) -> int:
    return sum(
        entry.stat().st_size for entry in os.scandir(directory) if entry.is_file(follow_symlinks=False)
    )


def _build_device(
    log: DeviceLog,
    directory: Path,
    heterogeneity: Heterogeneity,
    index: int,
    cap_sessions: bool,
    report: SkipReport,
) -> dict[str, object]:
    """Replay one device's events into its store; returns its devices.jsonl fields."""
    records = extract(log.events, report)
    if log.split_ms is not None:
        ends = protocol_tuples(records).session_ends()
        keep = {s for s, end in ends.items() if end < log.split_ms}
        records = [r for r in records if r.session_id in keep]
    budget = heterogeneity.session_budget(index) if cap_sessions else None
    if budget is not None:
        ends = protocol_tuples(records).session_ends()
        if len(ends) > budget:  # keep the most recent sessions: what a device with less history holds
            keep = set(sorted(ends, key=lambda s: (ends[s], s))[-budget:])
            records = [r for r in records if r.session_id in keep]
    if not records:
        raise DeviceLogError("no_training_sessions", "no micro behavior of a training session")
    store = TupleStore(directory, key_provider=KeyFileProvider(directory / KEY_FILE_NAME))
    try:
        store.append(records)
    finally:
        store.close()
    sessions = {r.session_id for r in records}
    return {
        "events": sum(1 for e in log.events if e.session_id in sessions),  # the training-period events
        "records": len(records),
        "sessions": len(sessions),
        "store_bytes": _dir_bytes(directory),
    }


def build_population(
    source: str,
    out_dir: str | os.PathLike[str],
    partition: str = "auto",
    max_devices: int | None = None,
    seed: int = 0,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    mapping: ActivityMapping | str | os.PathLike[str] | None = None,
    heterogeneity: Heterogeneity | None = None,
    synthetic: SyntheticConfig | None = None,
    split_devices: int = 2000,
    min_examples: int = 0,
    protocol: ProtocolConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 8,
) -> PopulationInfo:
    """Build (or resume, or find already built) a population of virtual devices in ``out_dir``.

    ``source``: a shared dataset name (``rib-edge data list``), a generic interactions file, ``"synthetic"``
    (``max_devices`` devices, default the SyntheticConfig's), or a directory of per-device raw event logs.
    ``partition``: ``auto`` (by user where every row has a user id, else by session), ``user`` or
    ``session`` (interaction logs only). ``max_devices``: a seeded sample of that many devices.
    ``mapping``: an activity mapping (object or TOML path) for interaction logs; devices record its
    activities, however many, as ``action`` events under the same names.
    ``protocol``: the session protocol's settings (default: the source's, as a centralized run uses).
    ``heterogeneity.volume_skew``: Zipf-skewed sessions per device (synthetic) or a cap on each device's
    training sessions (real logs). ``split_devices``: event sources build the server split from this many
    devices. ``min_examples``: leave out devices with fewer next-item examples after the protocol's
    filters (interaction logs). ``progress(done, total)`` is called after every device. ``workers``:
    threads writing device stores (they mostly wait on fsync); the result does not depend on it.
    """
    heterogeneity = heterogeneity or Heterogeneity()
    if max_devices is not None and max_devices < 1:
        raise SchemaError("bad_argument", "max_devices must be >= 1")
    out = Path(out_dir)
    params = {
        "source": source,
        "partition": partition,
        "max_devices": max_devices,
        "seed": seed,
        "data_dir": None if data_dir is None else str(data_dir),
        # The mapping's content, not its path: an edited mapping file is another population.
        "mapping": _jsonable(
            ActivityMapping.from_toml(mapping) if isinstance(mapping, (str, os.PathLike)) else mapping
        ),
        "volume": (
            {k: v for k, v in heterogeneity.to_dict().items() if k.startswith("volume") or k == "seed"}
            if heterogeneity.volume_skew > 0
            else None
        ),
        "synthetic": None if synthetic is None else {k: _jsonable(v) for k, v in vars(synthetic).items()},
        "split_devices": split_devices,
        "min_examples": min_examples,
        "protocol": None if protocol is None else protocol.to_dict(),
        # How interaction rows become device events: one ``action`` event each, under the mapping's names (a
        # population built before, under device activity names, is refused rather than silently reused).
        "replay": REPLAY,
    }
    params = json.loads(json.dumps(params))  # the form it has after a round trip through build.json
    if out.exists() and not out.is_dir():
        raise PopulationError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        if _prepare_dir(out, params, overwrite):
            return open_population(out).info
        return _build(
            out,
            params,
            source,
            partition,
            max_devices,
            seed,
            data_dir,
            mapping,
            heterogeneity,
            synthetic,
            split_devices,
            min_examples,
            protocol,
            progress,
            workers,
        )


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the directory: two builds of one population never interleave."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PopulationError(f"another build is writing {directory}") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _build(
    out: Path,
    params: dict,
    source: str,
    partition: str,
    max_devices: int | None,
    seed: int,
    data_dir: str | os.PathLike[str] | None,
    mapping: ActivityMapping | str | os.PathLike[str] | None,
    heterogeneity: Heterogeneity,
    synthetic: SyntheticConfig | None,
    split_devices: int,
    min_examples: int,
    protocol: ProtocolConfig | None,
    progress: Callable[[int, int], None] | None,
    workers: int,
) -> PopulationInfo:
    """The build itself, under the directory lock, after ``_prepare_dir``."""
    started = time.perf_counter()
    src = _open_source(
        source,
        partition,
        max_devices,
        seed,
        None if data_dir is None else Path(data_dir),
        mapping,
        heterogeneity,
        synthetic,
        split_devices,
        min_examples,
        protocol,
    )
    n = src.n_devices
    split_path = out / SPLIT_FILE
    split_path.parent.mkdir(parents=True, exist_ok=True)
    src.split.info["population"] = {
        "note": "train is kept for the centralized baseline only; a real deployment has no central copy of it"
    }
    src.split.save(split_path)
    if not (out / BUILD_FILE).is_file():
        _atomic_json(out / BUILD_FILE, params)

    done, totals, skipped = _resume_point(out)
    report = SkipReport()
    parse_skips: Counter = Counter()
    unreplayable = 0
    cap_sessions = src.kind != "synthetic"  # synthetic devices are generated with their budget already
    devices_root = out / DEVICES_DIR
    devices_root.mkdir(exist_ok=True)

    def build_one(index: int) -> tuple[dict[str, object], SkipReport | None, SkipReport, int]:
        directory = devices_root / f"{index:06d}"
        if directory.exists():  # written before an interruption, never acknowledged in devices.jsonl
            shutil.rmtree(directory)
        entry: dict[str, object] = {
            "index": index,
            "device_id": src.device_id(index),
            "events": 0,
            "records": 0,
            "sessions": 0,
        }
        device_report = SkipReport()
        parsed: SkipReport | None = None
        unreplayable_dwell = 0
        try:
            log = src.device(index)
            parsed, unreplayable_dwell = log.parse_skips, log.unreplayable_dwell
            entry.update(_build_device(log, directory, heterogeneity, index, cap_sessions, device_report))
            entry["status"] = STATUS_OK
        except (DeviceLogError, SchemaError) as err:  # this device's data is unusable; the build goes on
            entry["status"] = f"skipped:{err.reason}"
            entry["error"] = str(err)[:200]
            if directory.exists():
                shutil.rmtree(directory)
        return entry, parsed, device_report, unreplayable_dwell

    # Threads overlap the stores' fsyncs (most of a device's build time); lines are still written in
    # index order, each once its device and every earlier one are on disk, so a resume point is exact.
    with (
        (out / DEVICES_FILE).open("a", encoding="utf-8") as lines,
        ThreadPoolExecutor(max(1, workers)) as pool,
    ):
        pending: deque[Future] = deque()
        next_index = done
        try:
            while next_index < n or pending:
                while next_index < n and len(pending) < 4 * max(1, workers):
                    pending.append(pool.submit(build_one, next_index))
                    next_index += 1
                entry, parsed, device_report, unreplayable_dwell = pending.popleft().result()
                status = str(entry["status"])
                if status == STATUS_OK:
                    totals["n_ok"] += 1
                    for key in ("events", "records", "sessions", "store_bytes"):
                        totals[key] += int(entry[key])
                else:
                    reason = status.removeprefix("skipped:")
                    skipped[reason] = skipped.get(reason, 0) + 1
                if parsed is not None:
                    parse_skips.update(parsed.skipped)
                report.read += device_report.read
                report.kept += device_report.kept
                report.skipped.update(device_report.skipped)
                unreplayable += unreplayable_dwell
                lines.write(json.dumps(entry, separators=(",", ":")) + "\n")
                lines.flush()
                if progress is not None:
                    progress(int(entry["index"]) + 1, n)
        except BaseException:
            for future in pending:  # stop promptly; unacknowledged devices are redone on resume
                future.cancel()
            raise

    split = src.split
    summary = {
        "format": FORMAT,
        "source": src.name,
        "source_kind": src.kind,
        "partition": src.partition,
        "n_devices": n,
        "n_ok": int(totals["n_ok"]),
        "seed": seed,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "vocab_items": split.vocab.n_items,
        "activities": list(split.vocab.activities.names),
        "dwell_edges_s": list(split.vocab.dwell.edges_s),
        "skipped": skipped,
        "events": int(totals["events"]),
        "records": int(totals["records"]),
        "sessions": int(totals["sessions"]),
        "store_bytes": int(totals["store_bytes"]),
        "split": {
            "split_time_ms": split.info.get("split_time_ms"),
            "train_sessions": split.train.n_sessions,
            "test_sessions": split.test.n_sessions,
            "test_examples": len(split.test.examples()),
        },
        "extractor": {"config": vars(DEVICE_EXTRACTOR_CONFIG), "this_run": report.to_dict()},
        "event_log_skips": dict(parse_skips),
        "unreplayable_dwell": unreplayable,
        "source_details": src.describe(),
        "build": params,
        "build_seconds_last_run": round(time.perf_counter() - started, 3),
    }
    _atomic_json(out / POPULATION_FILE, summary)
    (out / BUILD_FILE).unlink(missing_ok=True)
    return PopulationInfo.from_dict(out, summary)
