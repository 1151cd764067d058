"""`rib-edge quickstart`: the whole pipeline on the built-in synthetic population, end to end.

raw UI events (per device) -> the device's extractor -> micro-behavior tuples -> the session protocol
-> Section-3 statistics and plots -> recommenders fitted and evaluated by the one evaluator ->
recommendations for one shopper's live session from RIB. Later stages (int8 ONNX export, the on-device
runtime, federated rounds) join this command as they land.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_client.schema import RIB_ACTIVITY_VOCAB, SkipReport
from model.data.events import events_to_frame, read_events_file, write_events_file
from model.data.protocol import ProtocolConfig, build_split
from model.data.synthetic import SyntheticConfig, generate_population
from model.recommender import PrefixBatch

# Baselines fast enough for a first run on 2 cores (BPR-MF is in `rib-edge bench baselines`).
QUICKSTART_MODELS = ("POP", "Item-KNN", "SR", "S-KNN", "V-SKNN", "STAN")


def run_quickstart(
    out_dir: Path, n_devices: int = 300, seed: int = 0, rib_epochs: int = 10, progress: Callable[[str], None] = print
) -> str:
    """Run every stage, write artifacts under ``out_dir``, return a printable summary."""
    from model.analysis import write_stats
    from model.baselines import BASELINES
    from model.benchmark import markdown_table, run_models, write_bench
    from model.train import RIBRecommender, TrainConfig

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    events_path = out_dir / "events.jsonl"
    count = write_events_file(generate_population(SyntheticConfig(n_devices=n_devices), seed), events_path)
    progress(f"1/6 raw UI events: {count} events from {n_devices} simulated devices -> {events_path}")

    parsed, extracted = SkipReport(), SkipReport()
    frame = events_to_frame(read_events_file(events_path, parsed), report=extracted)
    progress(f"2/6 device extraction: {len(frame)} micro-behavior tuples (parse: {parsed.summary()}; extract: {extracted.summary()})")

    split = build_split(frame, "synthetic", RIB_ACTIVITY_VOCAB, ProtocolConfig(test_fraction=0.2))
    split.save(out_dir / "split.npz")
    train, test = split.info["train"], split.info["test"]
    progress(
        f"3/6 protocol: {train['sessions']} train / {test['sessions']} test sessions, "
        f"{split.vocab.n_items} items, dwell edges {split.vocab.dwell.edges_s} s"
    )

    stats = write_stats(split, out_dir / "stats", "synthetic")
    progress(f"4/6 Section-3 statistics and plots -> {out_dir / 'stats'}")

    factories = {name: BASELINES[name] for name in QUICKSTART_MODELS}
    rib_train = TrainConfig(epochs=rib_epochs, seed=seed, checkpoint_dir=str(out_dir / "rib"))
    factories["RIB (SKU)"] = lambda: RIBRecommender(data_type="SKU", train_config=TrainConfig(epochs=rib_epochs, seed=seed))
    factories["RIB (SKU+Micro)"] = lambda: RIBRecommender(data_type="SKU+Micro", train_config=rib_train)
    fitted: dict = {}
    rows, _ = run_models(split, factories, progress=lambda m: progress("    " + m), fitted=fitted)
    write_bench(out_dir, "baselines", "synthetic", split, rows)
    best_row = max(rows, key=lambda r: r["recall@20"])
    progress(f"5/6 recommenders evaluated; best: {best_row['model']} ({best_row['data_type']}) recall@20 {best_row['recall@20']:.4f}")

    # A recommendation for one shopper from RIB, on the longest prefix of a held-out session.
    model = fitted["RIB (SKU+Micro)"]
    examples = split.test.examples()
    last = int(np.flatnonzero(examples.session_index == 0)[-1])
    prefix = PrefixBatch(split.test, examples.starts[last : last + 1], examples.ends[last : last + 1])
    actual_next = str(split.vocab.item_ids[examples.targets[last] - 1])
    scores = model.score(prefix)[0]
    scores[0] = -np.inf
    top = np.argsort(-scores, kind="stable")[:5]
    item_ids = [str(split.vocab.item_ids[i - 1]) for i in top]
    seen = [str(split.vocab.item_ids[i - 1]) for i in prefix.visit_items(0)]
    summary = {
        "events": count,
        "tuples": int(len(frame)),
        "train": train,
        "test": test,
        "stats": {"conversion_by_activity": stats.get("conversion_by_activity")},
        "models": rows,
        "example_recommendation": {"session": str(split.test.session_ids[0]), "seen": seen, "actual_next": actual_next, "model": "RIB (SKU+Micro)", "top5": item_ids},
        "seconds": round(time.perf_counter() - started, 1),
        "rib_checkpoint": str(out_dir / "rib" / "rib.pt"),
        "not_yet": "int8 ONNX export and the on-device runtime join this command as they land.",
    }
    progress(f"6/6 RIB (SKU+Micro) recommends for shopper session {summary['example_recommendation']['session']}")
    (out_dir / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    return (
        markdown_table(rows)
        + f"\n\nRIB (SKU+Micro), shopper session {summary['example_recommendation']['session']}: saw {seen} -> recommend {item_ids} (actual next: {actual_next})"
        + f"\nartifacts in {out_dir} ({summary['seconds']} s)"
    )
