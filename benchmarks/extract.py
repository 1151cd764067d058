"""Extraction and tuple-store throughput on a synthetic population; prints one JSON object.

    .venv/bin/python benchmarks/extract.py [--devices 2000] [--profile]

Figures: batch extraction (``extract_population``) in events/s; streaming ``TupleExtractor.push`` in
us/event without and with the 2 s reorder window and with the micro-intent cue callback; the encrypted
store's append (one fsync per append) and read throughput in records/s. Targets: streaming <= 20 us/event,
batch >= 1M events/s (``--profile`` prints where the time goes).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_client.extract import DEVICE_EXTRACTOR_CONFIG, ExtractorConfig, TupleExtractor, extract_population  # noqa: E402
from edge_client.keys import KeyFileProvider  # noqa: E402
from edge_client.store import TupleStore  # noqa: E402
from model.data.synthetic import SyntheticConfig, generate_population  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def stream(by_device: dict[str, list], config: ExtractorConfig, cues: bool) -> int:
    n = 0
    sink: list = []
    for device_events in by_device.values():
        extractor = TupleExtractor(config, on_visit=sink.append if cues else None)
        push = extractor.push
        for event in device_events:
            n += len(push(event))
        n += len(extractor.flush())
    return n


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    events = list(generate_population(SyntheticConfig(n_devices=args.devices), seed=0))
    by_device: dict[str, list] = {}
    for event in events:
        by_device.setdefault(event.device_id, []).append(event)
    n_events = len(events)

    batch_s = best_of(args.repeats, lambda: extract_population(events))
    population = extract_population(events)
    records = [r for recs in population.values() for r in recs]
    result: dict[str, object] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "events": n_events,
        "tuples": len(records),
        "batch_events_per_s": round(n_events / batch_s),
    }
    for name, config, cues in (
        ("stream", ExtractorConfig(), False),
        ("stream_window2s", DEVICE_EXTRACTOR_CONFIG, False),
        ("stream_window2s_cues", DEVICE_EXTRACTOR_CONFIG, True),
    ):
        seconds = best_of(args.repeats, lambda c=config, q=cues: stream(by_device, c, q))
        result[f"{name}_us_per_event"] = round(seconds / n_events * 1e6, 3)
    store_records = records[:20_000]
    result["store_records"] = len(store_records)
    result.update(bench_store(store_records, batch=1))
    result.update(bench_store(store_records, batch=100))
    print(json.dumps(result, indent=1))

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        stream(by_device, DEVICE_EXTRACTOR_CONFIG, True)
        extract_population(events)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
