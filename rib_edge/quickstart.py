"""`rib-edge quickstart`: the whole pipeline on the built-in synthetic population, end to end.

raw UI events (per device) -> the device's extractor -> micro-behavior tuples -> the session protocol
-> Section-3 statistics and plots -> recommenders fitted and evaluated by the one evaluator ->
RIB trained and exported to a signed int8 ONNX package -> the on-device runtime (numpy + onnxruntime)
recommends for one shopper's live session from the tuples its own extractor built. Federated rounds
join this command as they land.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from edge_client.schema import RIB_ACTIVITY_VOCAB, SkipReport
from model.data.events import events_to_frame, read_events_file, write_events_file
from model.data.open import SYNTHETIC_PROTOCOL
from model.data.protocol import build_split
from model.data.synthetic import SyntheticConfig, generate_population

# Baselines fast enough for a first run on 2 cores (BPR-MF is in `rib-edge bench baselines`).
QUICKSTART_MODELS = ("POP", "Item-KNN", "SR", "S-KNN", "V-SKNN", "STAN")


def run_quickstart(
    out_dir: Path,
    n_devices: int = 300,
    seed: int = 0,
    rib_epochs: int = 10,
    progress: Callable[[str], None] = print,
) -> str:
    """Run every stage, write artifacts under ``out_dir``, return a printable summary."""
    from experiments.benchmark import markdown_table, run_models, write_bench
    from model.analysis import write_stats
    from model.baselines import BASELINES
    from model.train import RIBRecommender, TrainConfig

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    events_path = out_dir / "events.jsonl"
    count = write_events_file(generate_population(SyntheticConfig(n_devices=n_devices), seed), events_path)
    progress(f"1/8 raw UI events: {count} events from {n_devices} simulated devices -> {events_path}")

    parsed, extracted = SkipReport(), SkipReport()
    events = read_events_file(events_path, parsed)
    frame = events_to_frame(events, report=extracted)
    progress(
        f"2/8 device extraction: {len(frame)} micro-behavior tuples (parse: {parsed.summary()}; extract: {extracted.summary()})"
    )

    split = build_split(frame, "synthetic", RIB_ACTIVITY_VOCAB, SYNTHETIC_PROTOCOL)
    split.save(out_dir / "split.npz")
    train, test = split.info["train"], split.info["test"]
    progress(
        f"3/8 protocol: {train['sessions']} train / {test['sessions']} test sessions, "
        f"{split.vocab.n_items} items, dwell edges {split.vocab.dwell.edges_s} s"
    )

    stats = write_stats(split, out_dir / "stats", "synthetic")
    progress(f"4/8 Section-3 statistics and plots -> {out_dir / 'stats'}")

    factories = {name: BASELINES[name] for name in QUICKSTART_MODELS}
    rib_train = TrainConfig(epochs=rib_epochs, seed=seed, checkpoint_dir=str(out_dir / "rib"))
    factories["RIB (SKU)"] = lambda: RIBRecommender(
        data_type="SKU", train_config=TrainConfig(epochs=rib_epochs, seed=seed)
    )
    factories["RIB (SKU+Micro)"] = lambda: RIBRecommender(data_type="SKU+Micro", train_config=rib_train)
    fitted: dict = {}
    rows, _ = run_models(split, factories, progress=lambda m: progress("    " + m), fitted=fitted)
    write_bench(out_dir, "baselines", "synthetic", split, rows)
    best_row = max(rows, key=lambda r: r["recall@20"])
    progress(
        f"5/8 recommenders evaluated; best: {best_row['model']} ({best_row['data_type']}) recall@20 {best_row['recall@20']:.4f}"
    )

    # Export the trained RIB to a signed int8 ONNX package, as a release would.
    from edge_client.package import generate_keypair
    from model.export import build_package, popularity_from

    rib = fitted["RIB (SKU+Micro)"]
    private_key, public_key = generate_keypair(out_dir / "keys", overwrite=True)
    package_dir = out_dir / "package"
    if package_dir.exists():
        shutil.rmtree(package_dir)
    manifest = build_package(
        rib.model, split.vocab, package_dir, private_key, 1, popularity_from(split.train)
    )
    export = manifest.extra["export"]
    progress(
        f"6/8 signed int8 package -> {package_dir} ({export['bytes'] / 2**20:.2f} MB, fp32 {export['fp32_bytes'] / 2**20:.2f} MB; "
        f"fp32 parity {export['full_max_abs_diff']:.1e})"
    )

    # On the device: the shopper's own raw events -> extractor -> tuples -> verified package -> recommendations.
    from edge_client.extract import extract_population
    from edge_client.runtime import Recommender

    session_key = str(split.test.session_ids[0])
    device_id, session_id = session_key.split("/", 1)
    device_events = [e for e in events if e.device_id == device_id]
    session = [mb for mb in extract_population(device_events)[device_id] if mb.session_id == session_id]
    last_visit_start = max(
        i for i in range(len(session)) if i == 0 or session[i].item_id != session[i - 1].item_id
    )
    history, actual_next = session[:last_visit_start], session[last_visit_start].item_id
    recommender = Recommender(package_dir, public_key)
    recommendations = recommender.recommend(history, k=20)
    item_ids = [r.item_id for r in recommendations[:5]]
    hit = next((rank for rank, r in enumerate(recommendations, start=1) if r.item_id == actual_next), None)
    seen = list(dict.fromkeys(mb.item_id for mb in history))
    attention = (
        [(t.item_id, t.activity, round(t.weight, 3)) for t in recommendations[0].explanation]
        if recommendations
        else []
    )
    progress(f"7/8 on-device runtime (onnxruntime, int8) verified package v{recommender.model_version}")
    summary = {
        "events": count,
        "tuples": int(len(frame)),
        "train": train,
        "test": test,
        "stats": {
            "conversion_by_activity": {a: v["rate"] for a, v in stats["conversion"]["by_activity"].items()}
        },
        "models": rows,
        "example_recommendation": {
            "session": session_key,
            "seen": seen,
            "actual_next": actual_next,
            "actual_next_rank_in_top20": hit,
            "model": "RIB (SKU+Micro), int8 ONNX on the device runtime",
            "top5": item_ids,
            "attention": attention,
        },
        "package": {
            "dir": str(package_dir),
            "public_key": str(public_key),
            "model_version": manifest.model_version,
        },
        "seconds": round(time.perf_counter() - started, 1),
        "rib_checkpoint": str(out_dir / "rib" / "rib.pt"),
        "not_yet": "federated rounds with differential privacy join this command as they land.",
    }
    progress(f"8/8 recommendations for shopper session {session_key}: top-5 {item_ids}")
    (out_dir / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    return (
        markdown_table(rows)
        + f"\n\non-device RIB (int8 ONNX), shopper session {session_key}: saw {seen} -> recommend {item_ids}"
        + f" (actual next: {actual_next}, rank {hit if hit else '>20'})"
        + f"\nartifacts in {out_dir} ({summary['seconds']} s)"
    )
