"""Extraction and tuple-store throughput on a synthetic population; writes extract.json and extract.md.

    python -m experiments.extract [--devices 2000] [--repeats 7]
                                           [--out benchmarks/results/edge] [--profile]

What the figures count (one thread; events pre-generated, never part of a timing):
- ``batch``: ``extract_population`` (the training loaders' path) from parsed ``RawEvent`` objects in memory:
  grouping, sorting, the state machine, building the ``MicroBehavior`` records. Target >= 1M events/s.
- ``batch_json``: from JSON lines in memory (bytes, as a raw event log file holds them): ``read_event_lines``
  (``json.loads`` + ``RawEvent.from_dict`` validation) feeding ``extract_population``, the path of
  ``model.data.events`` / ``rib-edge``'s CLI on a log file. ``parse_json``: the parsing alone.
- ``batch_push``: the sorted events pushed one at a time through ``TupleExtractor.push`` (how the batch path
  drove the extractor before it fed whole sessions; the same state machine, one call per event).
- ``stream*``: ``TupleExtractor.push`` per device in us/event: no window, the device's 2 s reorder window, and
  with the micro-intent cue callback. Target <= 20 us/event.
- the encrypted store's append (one fsync per append) and read throughput in records/s.
Each extraction figure is the median (and best) of ``--repeats`` interleaved runs in wall-clock time and in
process CPU time; on a shared box, CPU time is the steadier of the two. Each run starts after a full garbage
collection and runs with the collector on (``extract_population`` pauses it itself; streaming does not).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edge_client.extract import DEVICE_EXTRACTOR_CONFIG, ExtractorConfig, TupleExtractor, extract_population
from edge_client.keys import KeyFileProvider
from edge_client.schema import SkipReport, read_event_lines
from edge_client.store import TupleStore
from experiments.paths import RESULTS
from model.data.synthetic import SyntheticConfig, generate_population

OUT = RESULTS / "edge"
BATCH_TARGET_EVENTS_PER_S = 1_000_000
STREAM_TARGET_US_PER_EVENT = 20.0


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(repeats: int, cases: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
    """Run every case once per round, ``repeats`` rounds; seconds per run: median / best, wall and CPU."""
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            gc.collect()  # every run starts with the collector's counts at zero: its passes land on who allocates
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return {
        name: {
            "wall_median_s": statistics.median(wall[name]),
            "wall_best_s": min(wall[name]),
            "cpu_median_s": statistics.median(cpu[name]),
        }
        for name in cases
    }


def stream(
    by_device: dict[str, list], config: ExtractorConfig, cues: bool, extractor_cls=TupleExtractor
) -> int:
    n = 0
    sink: list = []
    for device_events in by_device.values():
        extractor = extractor_cls(config, on_visit=sink.append if cues else None)
        push = extractor.push
        for event in device_events:
            n += len(push(event))
        n += len(extractor.flush())
    return n


def push_batch(by_device_sorted: dict[str, list]) -> dict[str, list]:
    """The sorted events through ``push`` one at a time (what ``extract_population`` did before)."""
    out = {}
    for device_id, device_events in by_device_sorted.items():
        extractor = TupleExtractor()
        records = []
        for event in device_events:
            records += extractor.push(event)
        out[device_id] = records + extractor.flush()
    return out


def from_json(lines: list[bytes]) -> dict[str, list]:
    report = SkipReport()
    return extract_population(read_event_lines(lines, report), report=report)


def bench_store(records: list, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = TupleStore(Path(tmp) / "store", key_provider=KeyFileProvider(Path(tmp) / "store.key"))
        start = time.perf_counter()
        for i in range(0, len(records), batch):
            store.append(records[i : i + batch])
        append_s = time.perf_counter() - start
        read_s = best_of(3, store.read)
        assert store.read() == records
        compact_s = best_of(1, store.compact)
        return {
            f"append_batch{batch}_records_per_s": round(len(records) / append_s),
            f"append_batch{batch}_ms_per_append": round(append_s / -(-len(records) // batch) * 1000, 3),
            "read_records_per_s": round(len(records) / read_s),
            "compact_records_per_s": round(len(records) / compact_s),
        }


def markdown(result: dict[str, object]) -> str:
    n = result["events"]
    timings = result["timings"]
    rows = []

    def rate_row(name: str, what: str, target: str) -> None:
        t = timings[name]
        rows.append(
            f"| {what} | {n / t['wall_median_s']:,.0f} | {n / t['wall_best_s']:,.0f} | {n / t['cpu_median_s']:,.0f} | {target} |"
        )

    rate_row(
        "batch", "batch `extract_population`, parsed events (events/s)", f">= {BATCH_TARGET_EVENTS_PER_S:,}"
    )
    rate_row("batch_push", "batch, sorted events through `push` one at a time (events/s)", "")
    rate_row("batch_json", "batch from JSON lines: parse + validate + extract (events/s)", "")
    rate_row("parse_json", "JSON lines -> `RawEvent` only (events/s)", "")
    for name, what in (
        ("stream", "streaming `push`, no window"),
        ("stream_window2s", "streaming `push`, 2 s reorder window (device)"),
        ("stream_window2s_cues", "streaming `push`, 2 s window + micro-intent cues"),
    ):
        if name in timings:
            t = timings[name]
            target = f"<= {STREAM_TARGET_US_PER_EVENT:g}" if name.startswith("stream") else ""
            rows.append(
                f"| {what} (us/event) | {t['wall_median_s'] / n * 1e6:.3f} | {t['wall_best_s'] / n * 1e6:.3f} "
                f"| {t['cpu_median_s'] / n * 1e6:.3f} | {target} |"
            )
    lines = [
        "| figure | median (wall) | best (wall) | median (CPU) | target |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Synthetic population: {result['devices']:,} devices, {n:,} events -> {result['tuples']:,} tuples; "
        f"{result['repeats']} interleaved runs per figure, one thread, each after a full gc.collect(); CPU = process "
        "CPU time. Parsed events: "
        "`RawEvent` objects already in memory (generation and parsing not timed). JSON lines: the events' "
        "JSON lines as bytes in memory, through `read_event_lines` (json.loads + schema validation) into "
        "`extract_population`, the path of a raw event log file; its rate is bounded by the parsing.",
        f"- batch == streaming: the batch path feeds whole sessions to the same state machine `push` feeds one "
        f"event at a time; identical records checked here: {result['batch_equals_push']}.",
        f"- store ({result['store_records']:,} records): append, 1 record per append (fsync each) "
        f"{result['append_batch1_records_per_s']:,} records/s; 100 per append {result['append_batch100_records_per_s']:,} "
        f"records/s; read {result['read_records_per_s']:,} records/s; compact {result['compact_records_per_s']:,} records/s.",
        f"- machine: python {result['python']}, {result['machine']}, {result['cpus']} CPUs, shared: wall-clock "
        "figures move with the other load on the box, CPU-time figures much less.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    events = list(generate_population(SyntheticConfig(n_devices=args.devices), seed=0))
    by_device: dict[str, list] = {}
    for event in events:
        by_device.setdefault(event.device_id, []).append(event)
    by_device_sorted = {
        device_id: sorted(by_device[device_id], key=lambda e: (e.session_id, e.timestamp_ms))
        for device_id in sorted(by_device)
    }
    lines = [event.to_json().encode() + b"\n" for event in events]
    n_events = len(events)

    population = extract_population(events)
    records = [r for recs in population.values() for r in recs]
    batch_equals_push = push_batch(by_device_sorted) == population and from_json(lines) == population

    cases: dict[str, Callable[[], object]] = {
        "batch": lambda: extract_population(events),
        "batch_push": lambda: push_batch(by_device_sorted),
        "batch_json": lambda: from_json(lines),
        "parse_json": lambda: list(read_event_lines(lines)),
        "stream": lambda: stream(by_device, ExtractorConfig(), False),
        "stream_window2s": lambda: stream(by_device, DEVICE_EXTRACTOR_CONFIG, False),
        "stream_window2s_cues": lambda: stream(by_device, DEVICE_EXTRACTOR_CONFIG, True),
    }
    timings = interleaved(args.repeats, cases)

    def per_s(name: str, key: str = "wall_median_s") -> int:
        return round(n_events / timings[name][key])

    result: dict[str, object] = {
        "bench": "extract",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "devices": args.devices,
        "events": n_events,
        "tuples": len(records),
        "repeats": args.repeats,
        "batch_equals_push": batch_equals_push,
        "batch_events_per_s": per_s("batch"),
        "batch_events_per_s_cpu": per_s("batch", "cpu_median_s"),
        "batch_events_per_s_best": per_s("batch", "wall_best_s"),
        "batch_push_events_per_s": per_s("batch_push"),
        "batch_json_events_per_s": per_s("batch_json"),
        "batch_json_events_per_s_cpu": per_s("batch_json", "cpu_median_s"),
        "parse_json_events_per_s": per_s("parse_json"),
    }
    for name in ("stream", "stream_window2s", "stream_window2s_cues"):
        result[f"{name}_us_per_event"] = round(timings[name]["wall_median_s"] / n_events * 1e6, 3)
        result[f"{name}_us_per_event_cpu"] = round(timings[name]["cpu_median_s"] / n_events * 1e6, 3)
    store_records = records[:20_000]
    result["store_records"] = len(store_records)
    result.update(bench_store(store_records, batch=1))
    result.update(bench_store(store_records, batch=100))
    result["timings"] = timings

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "extract.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "extract.md").write_text("# bench extract\n\n" + markdown(result))
    print(json.dumps({k: v for k, v in result.items() if k != "timings"}, indent=1))

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        stream(by_device, DEVICE_EXTRACTOR_CONFIG, True)
        extract_population(events)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
