"""Do the devices hold the tuples the centralized protocol makes of the same data? Measure it.

For each compared device, its stored records (through ``protocol_tuples``) are matched session by session
with the centralized tuples of the same sessions (``to_visit_tuples`` on the whole log, the population's
activity mapping and protocol), and its training dataset (``device_dataset``) with the server split's
``train`` restricted to its sessions. ``replay.py`` explains the two expected differences.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from edge_client.extract import DEVICE_EXTRACTOR_CONFIG
from model.data.dataset import SessionDataset
from model.data.mapping import ActivityMapping
from model.data.protocol import ProtocolConfig, to_visit_tuples
from simulations.population import Population
from simulations.replay import DeviceTuples, protocol_tuples


def _central_tuples(pop: Population, data_dir: Path | None) -> pd.DataFrame:
    """The protocol's steps 1-3 on the population's source log, with the population's mapping."""
    from model.data.loaders import DATASETS, default_data_dir, load_interactions_file

    details = pop.info.raw["source_details"]
    name = details["dataset"]
    if name in DATASETS:
        built_with = pop.info.raw["build"].get("data_dir")
        root = Path(data_dir or built_with or default_data_dir())
        loaded = DATASETS[name].load(root)
    else:
        loaded = load_interactions_file(Path(pop.info.raw["build"]["source"]).expanduser())
    mapping = ActivityMapping.from_dict(details["mapping"])
    config = ProtocolConfig(**details["protocol"])
    mapped, _ = mapping.apply(loaded.frame)
    return to_visit_tuples(mapped.drop(columns="action").reset_index(drop=True), config)


def _session_rows(tuples: DeviceTuples) -> dict[str, list[tuple[int, str, str, float, bool]]]:
    out: dict[str, list[tuple[int, str, str, float, bool]]] = {}
    for s, ts, item, act, dwell, start in zip(
        tuples.session_ids,
        tuples.timestamps_ms.tolist(),
        tuples.items,
        tuples.activities,
        tuples.dwell_seconds.tolist(),
        tuples.visit_starts.tolist(),
        strict=True,
    ):
        out.setdefault(s, []).append((ts, item, act, dwell, start))
    return out


def _same_dwell(a: float, b: float) -> bool:
    return (a != a and b != b) or a == b


def _compare_session(device: list, central: list) -> str:
    """``exact``; ``last_visit_dwell`` (all equal but the dwell of the session's last visit);
    ``session_gap`` (different, and the session goes quiet for longer than the device's session gap
    inside, where the device closes its open visit); ``different`` (anything else: unexplained)."""
    last_visit = max(i for i, r in enumerate(central) if r[4])
    if [r[:3] + r[4:] for r in device] == [r[:3] + r[4:] for r in central]:
        if all(_same_dwell(d[3], c[3]) for d, c in zip(device, central, strict=True)):
            return "exact"
        if all(
            _same_dwell(d[3], c[3]) for d, c in zip(device[:last_visit], central[:last_visit], strict=True)
        ):
            return "last_visit_dwell"
    times = np.array([r[0] for r in central], dtype=np.int64)
    if times.size > 1 and int(np.diff(times).max()) > DEVICE_EXTRACTOR_CONFIG.session_gap_s * 1000:
        return "session_gap"
    return "different"


def _last_visit_mask(ds: SessionDataset) -> np.ndarray:
    """True on the tuples of each session's last visit (never part of a prefix)."""
    mask = np.zeros(ds.n_tuples, dtype=bool)
    for s in range(ds.n_sessions):
        sl = ds.session(s)
        starts = np.flatnonzero(ds.visit_starts[sl])
        if starts.size:
            mask[sl.start + starts[-1] : sl.stop] = True
    return mask


def _same_examples(device: SessionDataset, central: SessionDataset) -> bool:
    """Same sessions, tuples and visits, and the same dwell bucket on every tuple a prefix can hold."""
    if list(device.session_ids) != list(central.session_ids) or device.n_tuples != central.n_tuples:
        return False
    if not (np.array_equal(device.offsets, central.offsets) and np.array_equal(device.items, central.items)):
        return False
    if not (
        np.array_equal(device.activities, central.activities)
        and np.array_equal(device.visit_starts, central.visit_starts)
    ):
        return False
    in_prefix = ~_last_visit_mask(central)
    return bool(np.array_equal(device.dwell_buckets[in_prefix], central.dwell_buckets[in_prefix]))


def compare_population(
    pop: Population, max_devices: int | None = 200, seed: int = 0, data_dir: Path | None = None
) -> dict[str, object]:
    """Compare a sample of devices with the centralized protocol; returns counts (sessions, tuples, examples).

    ``sessions``/``tuples`` (interaction logs only: event sources have no other tuples than the
    extractor's) count sessions by verdict (``_compare_session``). ``examples`` counts devices whose training data (sessions, tuples,
    visits, and dwell buckets wherever a prefix can see them) is identical to the split's.
    """
    interactions = pop.info.raw.get("source_kind") == "interactions"
    split = pop.split()
    ok = pop.ok_indices()
    if not interactions:
        # Event-native sources: the split was built from the first split_devices devices only.
        ok = ok[ok < int(pop.info.raw["source_details"].get("split_devices") or 0)]
    if max_devices is not None and len(ok) > max_devices:
        ok = np.sort(np.random.default_rng(seed).choice(ok, size=max_devices, replace=False))
    records = {int(i): pop.records(int(i)) for i in ok}
    central: dict[str, list] = {}
    if interactions:
        wanted = {r.session_id for recs in records.values() for r in recs}
        frame = _central_tuples(pop, data_dir)
        for row in frame.loc[frame["session_id"].isin(wanted)].itertuples(index=False):
            central.setdefault(row.session_id, []).append(
                (
                    int(row.timestamp_ms),
                    str(row.item_id),
                    str(row.activity),
                    float(row.dwell_seconds),
                    bool(row.visit_start),
                )
            )
    train_index = {s: i for i, s in enumerate(split.train.session_ids)}
    sessions: Counter = Counter()
    tuples: Counter = Counter()
    examples: Counter = Counter()
    for index, recs in records.items():
        if interactions:
            for session, rows in _session_rows(protocol_tuples(recs)).items():
                expected = central.get(session)
                verdict = "not_in_central" if expected is None else _compare_session(rows, expected)
                sessions[verdict] += 1
                tuples["device"] += len(rows)
                tuples["central"] += len(expected or ())
                tuples[f"in_{verdict}_sessions"] += len(rows)
        # Training examples: device_dataset vs the split's train restricted to the same sessions.
        prefix = "" if interactions else f"{pop.device_id(index)}/"
        ds = pop.device_dataset(index)
        device_sessions = {prefix + r.session_id for r in recs}
        chosen = sorted(train_index[s] for s in device_sessions if s in train_index)
        central_ds = split.train.select_sessions(np.asarray(chosen, dtype=np.int64))
        if prefix:
            central_ds.session_ids = np.asarray(
                [s.removeprefix(prefix) for s in central_ds.session_ids], dtype=str
            )
        same = _same_examples(ds, central_ds)
        examples["devices_identical" if same else "devices_different"] += 1
        examples["device"] += len(ds.examples())
        examples["central"] += len(central_ds.examples())
    return {
        "devices": int(len(ok)),
        "sessions": dict(sessions),
        "tuples": dict(tuples),
        "examples": dict(examples),
    }
