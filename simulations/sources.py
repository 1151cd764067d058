"""Where a population's devices come from: a shared interaction log, the synthetic generator, or a
directory of per-device raw event logs. Each source builds the server split and hands out one device's
raw events at a time (bounded memory), in replay order.

Partitioning (``partition="auto"``): by user where every row of the source has a user id (JData, Taobao,
OTTO), else by session (YOOCHOOSE, the DIGINETICA sample): each session is then its own device, as a
shopper who is never recognised across visits would look. A session is never split between devices; with
both ids given (JData 2018), a session belongs to the user of its first row.

Only the training period reaches a device: the sessions the protocol puts on the test side (those ending
at or after the split time) are the server's evaluation set and are never replayed. Devices whose every
session is a test session (users seen only later) are left out and counted (``excluded.test_only``).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from edge_client.extract import DEVICE_EXTRACTOR_CONFIG, TupleExtractor
from edge_client.schema import (
    RIB_ACTIVITY_VOCAB,
    ActivityVocabulary,
    MicroBehavior,
    RawEvent,
    SchemaError,
    SkipReport,
    read_event_lines,
)
from model.data.dataset import SplitData
from model.data.mapping import ActivityMapping
from model.data.protocol import ProtocolConfig, build_split, sessionize, to_visit_tuples
from model.data.synthetic import DAY_MS, SyntheticConfig, _category_chains, _session_events
from simulations.heterogeneity import Heterogeneity
from simulations.replay import rows_to_events

SYNTHETIC = "synthetic"
PARTITIONS = ("auto", "user", "session")
EVENT_LOG_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
# Per-device log files larger than this are refused (a device log is small; a huge one is damage).
MAX_EVENT_LOG_BYTES = 64 * 1024 * 1024
# Sessions ending in the last 10 % of the time span are test, for event logs as for generic files.
EVENT_LOG_PROTOCOL = ProtocolConfig()


class DeviceLogError(Exception):
    """One device's log cannot be used; ``reason`` is the short code counted in ``skipped``."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class DeviceLog:
    """One device's raw events in replay order; sessions ending at/after ``split_ms`` are held out."""

    device_id: str
    events: list[RawEvent]
    split_ms: int | None = None  # None: every event belongs to a training session already
    parse_skips: SkipReport | None = None
    unreplayable_dwell: int = 0


def extract(events: list[RawEvent], report: SkipReport | None = None) -> list[MicroBehavior]:
    """The device's path: every event through one ``TupleExtractor`` with the device config, then flush."""
    extractor = TupleExtractor(DEVICE_EXTRACTOR_CONFIG, report)
    push = extractor.push
    records: list[MicroBehavior] = []
    for event in events:
        records += push(event)
    records += extractor.flush()
    return records


def event_log_activities(activities: pd.Series) -> ActivityVocabulary:
    """The activity vocabulary of extracted device events: RIB's (Table 1) when every activity is one of
    its names (a JD-style kiosk), else the app's own action names, most frequent first, conversions by name
    (as for an interactions file without a mapping)."""
    if set(activities.unique()) <= set(RIB_ACTIVITY_VOCAB.names):
        return RIB_ACTIVITY_VOCAB
    return ActivityMapping.infer(activities).vocabulary()


def _sample_sorted(keys: list[str], max_devices: int | None, seed: int) -> list[str]:
    """All keys sorted, or a seeded sample of ``max_devices`` of them (kept in sorted order)."""
    keys = sorted(keys)
    if max_devices is None or max_devices >= len(keys):
        return keys
    chosen = np.random.default_rng(seed).choice(len(keys), size=max_devices, replace=False)
    return [keys[i] for i in np.sort(chosen)]


class PopulationSource:
    """Common interface: ``split`` (the server's SplitData), ``n_devices``, ``device(index)``, ``describe()``."""

    kind = ""
    name = ""
    partition = ""
    split: SplitData

    @property
    def n_devices(self) -> int:
        """Number of device slots (indices 0..n-1)."""
        raise NotImplementedError

    def device_id(self, index: int) -> str:
        """The id of device ``index`` (known even when its log turns out unusable)."""
        raise NotImplementedError

    def device(self, index: int) -> DeviceLog:
        """One device's raw events; DeviceLogError when its log is missing or unusable."""
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        """What population.json records about the source."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Shared interaction logs (registered datasets and generic files)
# --------------------------------------------------------------------------------------------------


class InteractionSource(PopulationSource):
    """A shared dataset (or a generic interactions file) partitioned into devices by user or session."""

    kind = "interactions"

    def __init__(
        self,
        name_or_path: str,
        *,
        data_dir: Path | None = None,
        mapping: ActivityMapping | str | Path | None = None,
        partition: str = "auto",
        max_devices: int | None = None,
        seed: int = 0,
        min_examples: int = 0,
        protocol: ProtocolConfig | None = None,
    ):
        from model.data.loaders import (
            DATASETS,
            SRGNN_DATASETS,
            build_from_source,
            default_data_dir,
            load_interactions_file,
        )
        from model.data.open import ALIASES

        if partition not in PARTITIONS:
            raise SchemaError("bad_argument", f"partition must be one of {PARTITIONS}, got {partition!r}")
        name = ALIASES.get(name_or_path, name_or_path)
        if name in SRGNN_DATASETS:
            raise SchemaError(
                "no_interactions",
                f"{name}: SR-GNN splits hold item sequences only (no users, no time, no actions); "
                "a population needs an interaction log",
            )
        data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        if isinstance(mapping, (str, Path)):
            mapping = ActivityMapping.from_toml(mapping)
        if name in DATASETS:
            if not data_dir.is_dir():
                raise SchemaError(
                    "missing_data", f"{name}: data dir {data_dir} does not exist (set RIB_EDGE_DATA)"
                )
            loaded = DATASETS[name].load(data_dir)
        elif Path(name).expanduser().is_file():
            loaded = load_interactions_file(Path(name).expanduser())
        else:
            raise SchemaError(
                "unknown_dataset",
                f"{name_or_path!r} is neither a dataset name ({', '.join(DATASETS)}), {SYNTHETIC!r}, "
                "an interactions file nor a directory of device event logs",
            )
        # The centralized run's mapping: devices record its activity names as ``action`` events, however many.
        self.mapping = mapping or loaded.mapping
        self.config = protocol or loaded.config
        self.name = loaded.name
        self.loaded_notes = loaded.notes
        self.files = [p.name for p in loaded.files]
        # The server split: the centralized protocol on the whole log, activities under device names.
        self.split = build_from_source(loaded, self.mapping, self.config)
        split_ms = int(self.split.info["split_time_ms"])

        mapped, _ = self.mapping.apply(loaded.frame)
        frame = sessionize(mapped.drop(columns="action").reset_index(drop=True), self.config.session_gap_s)
        has_user = "user_id" in frame and frame["user_id"].notna().all()
        if partition == "user" and not has_user:
            raise SchemaError("missing_field", f"{self.name}: devices by user need a user_id on every row")
        self.partition = ("user" if has_user else "session") if partition == "auto" else partition

        # Train/test side of every session exactly as build_split decides it (session end over tuples).
        tuples = to_visit_tuples(frame, self.config)
        session_end = tuples.groupby("session_id", sort=False)["timestamp_ms"].max()
        train_sessions = set(session_end.index[session_end.to_numpy() < split_ms])
        frame["_order"] = np.arange(len(frame))
        frame = frame.sort_values(["timestamp_ms", "_order"], kind="stable")
        if self.partition == "user":
            owner = frame.groupby("session_id", sort=False)["user_id"].first().astype(str)
        else:
            owner = pd.Series(session_end.index.astype(str), index=session_end.index)
        frame["device"] = frame["session_id"].map(owner)
        device_train = frame.loc[frame["session_id"].isin(train_sessions), "device"].unique()
        all_devices = frame["device"].unique()
        excluded: dict[str, int] = {"test_only": int(len(all_devices) - len(device_train))}
        keys = [str(k) for k in device_train]
        if min_examples > 0:
            examples = self._examples_per_device(owner)
            kept = [k for k in keys if examples.get(k, 0) >= min_examples]
            excluded["too_few_examples"] = len(keys) - len(kept)
            keys = kept
        chosen = _sample_sorted(keys, max_devices, seed)
        excluded["not_sampled"] = len(keys) - len(chosen)
        self.excluded = excluded
        self.keys = chosen

        # Replay rows: training sessions of chosen devices, grouped by device, in (time, log order).
        position = {k: i for i, k in enumerate(chosen)}
        rows = frame.loc[frame["session_id"].isin(train_sessions) & frame["device"].isin(position)]
        code = rows["device"].map(position).to_numpy(np.int64)
        order = np.lexsort((rows["_order"].to_numpy(), rows["timestamp_ms"].to_numpy(), code))
        self._code = code[order]
        self._ts = rows["timestamp_ms"].to_numpy(np.int64)[order]
        self._items = rows["item_id"].astype(str).to_numpy(object)[order]
        self._sessions = rows["session_id"].astype(str).to_numpy(object)[order]
        self._activities = rows["activity"].astype(str).to_numpy(object)[order]
        self._dwell = (
            pd.to_numeric(rows["dwell_seconds"], errors="coerce").to_numpy(np.float64)[order]
            if "dwell_seconds" in rows
            else None
        )
        self._bounds = np.searchsorted(self._code, np.arange(len(chosen) + 1))
        self.train_sessions = len(train_sessions)
        self.test_sessions = int(len(session_end) - len(train_sessions))

    def _examples_per_device(self, owner: pd.Series) -> dict[str, int]:
        """Next-item examples each device has in the protocol's (filtered) training set."""
        train = self.split.train
        per_session = np.maximum(train.visits_per_session() - 1, 0)
        devices = owner.reindex(train.session_ids).to_numpy()
        out: dict[str, int] = {}
        for device, count in zip(devices, per_session.tolist(), strict=True):
            if isinstance(device, str):
                out[device] = out.get(device, 0) + count
        return out

    @property
    def n_devices(self) -> int:
        return len(self.keys)

    def device_id(self, index: int) -> str:
        return self.keys[index]

    def device(self, index: int) -> DeviceLog:
        lo, hi = int(self._bounds[index]), int(self._bounds[index + 1])
        dwell = None if self._dwell is None else self._dwell[lo:hi]
        events, unreplayable = rows_to_events(
            self.keys[index],
            self._sessions[lo:hi],
            self._ts[lo:hi],
            self._items[lo:hi],
            self._activities[lo:hi],
            dwell,
        )
        return DeviceLog(self.keys[index], events, None, unreplayable_dwell=unreplayable)

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "dataset": self.name,
            "files": self.files,
            "notes": self.loaded_notes,
            "protocol": self.config.to_dict(),
            "mapping": self.mapping.to_dict(),
            "source_skips": self.split.info.get("skips", {}),
            "excluded": self.excluded,
            "train_sessions": self.train_sessions,
            "test_sessions": self.test_sessions,
        }


# --------------------------------------------------------------------------------------------------
# Event-native sources: the synthetic generator and directories of device event logs
# --------------------------------------------------------------------------------------------------


class _EventSource(PopulationSource):
    """Sources whose devices already speak raw events; the split is the protocol on extracted tuples of
    the first ``split_devices`` devices (bounded memory for any population size)."""

    protocol: ProtocolConfig = EVENT_LOG_PROTOCOL
    split_devices: int = 2000

    def _events(self, index: int) -> DeviceLog:
        raise NotImplementedError

    def device(self, index: int) -> DeviceLog:
        log = self._events(index)
        log.split_ms = self.split_ms
        return log

    def _build_split(self) -> None:
        rows: list[tuple[str, str, int, str, str, float]] = []
        used = 0
        for index in range(min(self.split_devices, self.n_devices)):
            try:
                log = self._events(index)
            except DeviceLogError:
                continue  # counted when the device itself is built
            used += 1
            for rec in extract(log.events):
                rows.append(
                    (
                        f"{log.device_id}/{rec.session_id}",
                        log.device_id,
                        rec.timestamp_ms,
                        rec.item_id,
                        rec.activity,
                        rec.dwell_seconds,
                    )
                )
        if not rows:
            raise SchemaError(
                "empty", f"{self.name}: none of the first {self.split_devices} devices has usable events"
            )
        frame = pd.DataFrame(
            rows, columns=["session_id", "user_id", "timestamp_ms", "item_id", "activity", "dwell_seconds"]
        )
        self.split = build_split(frame, self.name, event_log_activities(frame["activity"]), self.protocol)
        self.split.info.update(source=self.name, split_devices=used)
        self.split_ms = int(self.split.info["split_time_ms"])


class SyntheticSource(_EventSource):
    """The synthetic generator, one independent RNG stream per device (so any device can be rebuilt alone)."""

    kind = "synthetic"
    name = SYNTHETIC
    partition = "device"

    def __init__(
        self,
        n_devices: int,
        seed: int = 0,
        config: SyntheticConfig | None = None,
        heterogeneity: Heterogeneity | None = None,
        split_devices: int = 2000,
        protocol: ProtocolConfig | None = None,
    ):
        from model.data.open import SYNTHETIC_PROTOCOL

        if n_devices < 1:
            raise SchemaError("bad_argument", "a synthetic population needs at least one device")
        self.config = config or SyntheticConfig()
        self.seed = seed
        self.heterogeneity = heterogeneity or Heterogeneity()
        self.protocol = protocol or SYNTHETIC_PROTOCOL
        self.split_devices = split_devices
        self._n = n_devices
        # The item world (category chains, popularity) is shared by all devices, as in generate_population.
        self._chains = _category_chains(self.config, np.random.default_rng(seed))
        popularity = 1.0 / np.arange(1, self.config.n_items + 1) ** 0.8
        self._popularity = popularity / popularity.sum()
        self._build_split()

    @property
    def n_devices(self) -> int:
        return self._n

    def device_id(self, index: int) -> str:
        return f"device-{index:06d}"

    def _events(self, index: int) -> DeviceLog:
        config = self.config
        rng = np.random.default_rng([self.seed, 1, index])
        budget = self.heterogeneity.session_budget(index)
        lo, hi = config.sessions_per_device
        n_sessions = budget if budget is not None else int(rng.integers(lo, hi + 1))
        starts = np.sort(rng.integers(0, config.days * DAY_MS, n_sessions))
        device_id = self.device_id(index)
        events: list[RawEvent] = []
        for number, offset in enumerate(starts):
            events += _session_events(
                device_id,
                f"s{number}",
                config.start_ms + int(offset),
                config,
                self._chains,
                self._popularity,
                rng,
            )
        events.sort(key=lambda e: e.timestamp_ms)  # stable: sessions that overlap in time interleave
        return DeviceLog(device_id, events)

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "synthetic": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self.config).items()},
            "protocol": self.protocol.to_dict(),
            "split_devices": self.split.info.get("split_devices"),
            "volume_skew": self.heterogeneity.volume_skew,
        }


class EventLogSource(_EventSource):
    """A directory of raw event logs, one JSON-lines file per device (``<device id>.jsonl[.gz]``).

    A log that is missing (dangling link), unreadable, too large, or without one valid event skips its
    device (counted by reason); invalid lines inside a usable log are counted and skipped.
    """

    kind = "events"
    partition = "device"

    def __init__(
        self,
        directory: Path,
        max_devices: int | None = None,
        seed: int = 0,
        split_devices: int = 2000,
        protocol: ProtocolConfig | None = None,
    ):
        self.directory = Path(directory)
        self.protocol = protocol or EVENT_LOG_PROTOCOL
        self.name = self.directory.name
        self.split_devices = split_devices
        names = [
            n for n in os.listdir(self.directory) if n.endswith(EVENT_LOG_SUFFIXES) and not n.startswith(".")
        ]
        if not names:
            raise SchemaError(
                "empty", f"{self.directory}: no device event logs ({', '.join(EVENT_LOG_SUFFIXES)})"
            )
        self.files = _sample_sorted(names, max_devices, seed)
        self.not_sampled = len(names) - len(self.files)
        self._build_split()

    @property
    def n_devices(self) -> int:
        return len(self.files)

    def device_id(self, index: int) -> str:
        name = self.files[index]
        return next(name[: -len(s)] for s in EVENT_LOG_SUFFIXES if name.endswith(s))

    def _events(self, index: int) -> DeviceLog:
        name = self.files[index]
        device_id = self.device_id(index)
        path = self.directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DeviceLogError("missing", f"{path} is gone (dangling link or deleted)") from None
        except OSError as err:
            raise DeviceLogError("unreadable", f"{path}: {err}") from None
        if size > MAX_EVENT_LOG_BYTES:
            raise DeviceLogError("too_large", f"{path} holds {size} bytes (limit {MAX_EVENT_LOG_BYTES})")
        report = SkipReport()
        try:
            if name.endswith(".gz"):
                with gzip.open(path, "rb") as handle:  # read at most the limit: a gzip bomb stays bounded
                    raw = handle.read(MAX_EVENT_LOG_BYTES + 1)
                if len(raw) > MAX_EVENT_LOG_BYTES:
                    raise DeviceLogError("too_large", f"{path} decompresses past {MAX_EVENT_LOG_BYTES} bytes")
            else:
                raw = path.read_bytes()
        except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged gzip stream
            raise DeviceLogError("unreadable", f"{path}: {err}") from None
        events = list(read_event_lines(raw.splitlines(), report))
        if not events:
            raise DeviceLogError("no_valid_events", f"{path}: {report.summary()}")
        events.sort(key=lambda e: e.timestamp_ms)  # replay in timestamp order (stable for ties)
        return DeviceLog(device_id, events, parse_skips=report)

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "directory": str(self.directory),
            "protocol": self.protocol.to_dict(),
            "split_devices": self.split.info.get("split_devices"),
            "excluded": {"not_sampled": self.not_sampled},
        }
