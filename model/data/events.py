"""Raw UI event logs (the device's own format) -> a tuple frame, through the device's extractor.

Training on raw events goes through ``edge_client.extract`` - the exact code a device runs - so the
tuples a model learns from and the tuples a device builds are the same. ``write_interactions`` writes
those tuples in the generic interactions format (docs/datasets.md), so ``rib-edge data extract`` output
is a ``--dataset`` every command reads as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from edge_client.extract import ExtractorConfig, extract_population
from edge_client.schema import RawEvent, SchemaError, SkipReport, read_event_lines


def events_to_frame(
    events: Iterable[RawEvent], config: ExtractorConfig | None = None, report: SkipReport | None = None
) -> pd.DataFrame:
    """Extract micro behaviors per device and lay them out as the protocol's tuple frame."""
    population = extract_population(events, config, report)
    rows = [
        (
            f"{device_id}/{mb.session_id}",
            device_id,
            mb.timestamp_ms,
            mb.item_id,
            mb.activity,
            mb.dwell_seconds,
        )
        for device_id, records in population.items()
        for mb in records
    ]
    frame = pd.DataFrame(
        rows, columns=["session_id", "user_id", "timestamp_ms", "item_id", "activity", "dwell_seconds"]
    )
    frame["timestamp_ms"] = frame["timestamp_ms"].astype(np.int64)
    return frame


def read_events_file(path: str | Path, report: SkipReport | None = None) -> list[RawEvent]:
    """Read a JSON-lines raw event file; bad lines are counted in ``report``, never raised."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError("missing_file", f"no event file at {path}")
    with path.open("rb") as handle:
        events = list(read_event_lines(handle, report))
    if not events:
        raise SchemaError("empty", f"{path}: no valid events")
    return events


def write_events_file(events: Iterable[RawEvent], path: str | Path) -> int:
    """Write events as JSON lines; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for event in events:
            handle.write(event.to_json() + "\n")
            count += 1
    return count


# The generic interactions format's columns (model.data.loaders), in the order they are written.
INTERACTION_COLUMNS = ("session_id", "user_id", "timestamp", "item_id", "action", "dwell_seconds")


def write_interactions(frame: pd.DataFrame, path: str | Path) -> int:
    """Write ``events_to_frame`` output as a generic interactions CSV; returns the row count.

    Timestamps are ISO 8601 UTC with milliseconds (exact, and never mistaken for epoch seconds, as a small
    epoch-ms number would be); the action is the device's activity name; dwell_seconds is the visit's
    dwell as the device measured it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamps = pd.to_datetime(frame["timestamp_ms"].to_numpy(np.int64), unit="ms", utc=True)
    out = pd.DataFrame(
        {
            "session_id": frame["session_id"].to_numpy(),
            "user_id": frame["user_id"].to_numpy(),
            "timestamp": stamps.strftime("%Y-%m-%dT%H:%M:%S.%f").str[:-3] + "Z",
            "item_id": frame["item_id"].to_numpy(),
            "action": frame["activity"].to_numpy(),
            "dwell_seconds": frame["dwell_seconds"].to_numpy(np.float64),
        },
        columns=list(INTERACTION_COLUMNS),
    )
    out.to_csv(path, index=False)
    return len(out)
