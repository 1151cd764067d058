"""Edge benchmark: int8 vs fp32 ONNX latency, size and top-20 agreement; extraction throughput; device RSS.

``run_edge_bench(out_dir)`` (the ``rib-edge bench edge`` command) measures, with onnxruntime at
``intra_op_num_threads=1``:

- full-session latency at ``seq_len`` tuples (p50/p95 ms), and incremental step latency (p50/p95 ms),
  for fp32 and int8 graphs (dynamic quantization: embedding Gathers + MatMuls, per-channel);
- size ratio int8/fp32 (full + step graphs);
- top-20 agreement int8 vs fp32 (mean overlap of the top-20 sets; the padding column is never ranked);
on two models: a 100k-item RIB with random weights (device-scale sizes) and RIB trained on the synthetic
population (agreement on its real test prefixes). Plus the device extractor's throughput
(``edge_client.extract.extract_population`` on a synthetic population, events/s) and the peak RSS of a
fresh process that loads a signed 100k-item int8 package and recommends once.

``DIR/edge.json``: top-level ``int8`` and ``fp32`` (``full_p50_ms, full_p95_ms, step_p50_ms,
step_p95_ms``) and ``size_ratio`` are the 100k-item model's; ``top20_agreement`` is the trained model's
(real prefixes); ``models`` holds every figure of both. ``DIR/edge.md`` is the markdown table.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUANTILES = (50, 95)


def _session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _random_session(config, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        rng.integers(1, config.n_items + 1, length).astype(np.int64),
        rng.integers(0, config.n_activities, length).astype(np.int64),
        rng.integers(0, config.n_dwell, length).astype(np.int64),
    )


def _graph_runners(full_path: Path, step_path: Path, config, seq_len: int, threads: int, seed: int):
    """(full-session call, one-step call) closures on fixed inputs: seq_len tuples, and a state after seq_len - 1."""
    from model.export import feed_for, initial_step_state, step_advance

    rng = np.random.default_rng(seed)
    full, step = _session(full_path, threads), _session(step_path, threads)
    items, acts, dwell = _random_session(config, seq_len, rng)
    full_feed = feed_for(full, {"items": items[None], "activities": acts[None], "dwell": dwell[None], "lengths": np.array([seq_len], np.int64)})
    state = initial_step_state(config.hidden_dim)
    for t in range(seq_len - 1):
        state, _ = step_advance(step, state, int(items[t]), int(acts[t]), int(dwell[t]))
    step_feed = feed_for(step, {"item": items[-1:], "activity": acts[-1:], "dwell": dwell[-1:], **state})
    return (lambda: full.run(None, full_feed)), (lambda: step.run(None, step_feed))


def latency(graphs: dict[str, tuple[Path, Path]], config, seq_len: int, repeats: int, threads: int = 1, seed: int = 0, rounds: int = 10) -> dict[str, dict[str, float]]:
    """Full-session (seq_len tuples, batch 1) and one-step latencies of several graph pairs (e.g. fp32, int8).

    The runs are interleaved in ``rounds`` (each round times every graph for repeats/rounds calls, in a
    rotating order), so background load on a shared machine hits every variant alike.
    """
    runners = {}
    for name, (full_path, step_path) in graphs.items():
        full_call, step_call = _graph_runners(full_path, step_path, config, seq_len, threads, seed)
        runners[f"{name}/full"], runners[f"{name}/step"] = full_call, step_call
    times: dict[str, list[float]] = {key: [] for key in runners}
    for fn in runners.values():
        for _ in range(5):
            fn()
    keys = list(runners)
    per_round = max(1, repeats // rounds)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            fn = runners[key]
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1000.0)
    out: dict[str, dict[str, float]] = {}
    for name in graphs:
        full_p50, full_p95 = np.percentile(times[f"{name}/full"], QUANTILES)
        step_p50, step_p95 = np.percentile(times[f"{name}/step"], QUANTILES)
        out[name] = {"full_p50_ms": float(full_p50), "full_p95_ms": float(full_p95), "step_p50_ms": float(step_p50), "step_p95_ms": float(step_p95)}
    return out


def measure_model(name: str, model, prefixes, work: Path, seq_len: int, repeats: int, threads: int) -> dict[str, object]:
    """Export fp32 + int8 (per-channel and per-tensor) and measure one model."""
    from model.export import export_onnx, quantize_int8, topk_agreement

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fp32 = export_onnx(model, work / "fp32")
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    int8_full = quantize_int8(fp32.full, work / "int8_full.onnx", per_channel=True)
    int8_step = quantize_int8(fp32.step, work / "int8_step.onnx", per_channel=True)
    quant_s = time.perf_counter() - t0
    tensor_full = quantize_int8(fp32.full, work / "int8_tensor_full.onnx", per_channel=False)
    fp32_bytes = fp32.full.stat().st_size + fp32.step.stat().st_size
    int8_bytes = int8_full.stat().st_size + int8_step.stat().st_size
    result: dict[str, object] = {
        "model": name,
        "config": model.config.to_dict(),
        "parity_fp32_full_max_abs_diff": fp32.full_max_abs_diff,
        "parity_fp32_step_max_abs_diff": fp32.step_max_abs_diff,
        "fp32_mb": fp32_bytes / 2**20,
        "int8_mb": int8_bytes / 2**20,
        "size_ratio": int8_bytes / fp32_bytes,
        "top20_agreement": topk_agreement(fp32.full, int8_full, prefixes, k=20),
        "top20_agreement_per_tensor": topk_agreement(fp32.full, tensor_full, prefixes, k=20),
        "top20_agreement_step_int8_vs_full_fp32": _step_agreement(fp32.full, int8_step, model.config.hidden_dim, prefixes[:50]),
        "n_prefixes": len(prefixes),
        "export_s": export_s,
        "quantize_s": quant_s,
    }
    result.update(latency({"fp32": (fp32.full, fp32.step), "int8": (int8_full, int8_step)}, model.config, seq_len, repeats, threads))
    return result


def _step_agreement(full_path: Path, step_path: Path, hidden_dim: int, prefixes, k: int = 20) -> float:
    """Top-k overlap of the int8 step graph (after the whole prefix) with the fp32 full graph."""
    from model.export import feed_for, run_steps

    full, step = _session(full_path), _session(step_path)
    overlaps = []
    for items, acts, dwell in prefixes:
        ref = full.run(None, feed_for(full, {"items": items[None], "activities": acts[None], "dwell": dwell[None], "lengths": np.array([len(items)])}))[0][0]
        got = run_steps(step, hidden_dim, items, acts, dwell)[0][-1]
        tops = []
        for scores in (ref.copy(), got.copy()):
            scores[0] = -np.inf
            tops.append(set(np.argpartition(-scores, k - 1)[:k].tolist()))
        overlaps.append(len(tops[0] & tops[1]) / k)
    return float(np.mean(overlaps)) if overlaps else float("nan")


def extraction_throughput(n_devices: int = 300, seed: int = 0) -> dict[str, float]:
    """events/s of the device extractor's batch path on a synthetic population (events pre-generated)."""
    from edge_client.extract import extract_population
    from model.data.synthetic import SyntheticConfig, generate_population

    events = list(generate_population(SyntheticConfig(n_devices=n_devices), seed))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        records = extract_population(events)
        best = min(best, time.perf_counter() - t0)
    n_tuples = sum(len(r) for r in records.values())
    return {"events": len(events), "tuples": n_tuples, "seconds": best, "events_per_s": len(events) / best}


RSS_SCRIPT = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from edge_client.runtime import Recommender
from edge_client.schema import MicroBehavior
rec = Recommender(sys.argv[1], sys.argv[2], strict_load=sys.argv[3] == "strict")
items = rec.vocab.item_ids
history = [MicroBehavior("s", i, items[(i * 7919) % len(items)], rec.vocab.activities.names[i % len(rec.vocab.activities)], 30.0) for i in range(50)]
out = rec.recommend(history, k=20)
# VmHWM: this process's own peak (ru_maxrss would include the parent's RSS at fork time: Linux carries it over exec).
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
peak = float(status["VmHWM"].split()[0]) / 1024.0 if "VmHWM" in status else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
now = float(status["VmRSS"].split()[0]) / 1024.0 if "VmRSS" in status else None
print(json.dumps({"rss_mb": peak, "rss_now_mb": now, "n_recs": len(out),
                  "load_and_recommend_s": time.perf_counter() - t0, "torch_loaded": "torch" in sys.modules}))
"""


def device_rss(model, work: Path) -> dict[str, object]:
    """Peak RSS of a fresh process that loads a signed int8 package of ``model`` and recommends once."""
    from edge_client.package import generate_keypair
    from edge_client.schema import RIB_ACTIVITY_VOCAB, DwellBuckets
    from model.data.dataset import Vocabulary
    from model.export import build_package

    config = model.config
    vocab = Vocabulary(np.array([f"item{i}" for i in range(1, config.n_items + 1)]), RIB_ACTIVITY_VOCAB, DwellBuckets())
    private, public = generate_keypair(work / "keys")
    package = work / "package"
    build_package(model, vocab, package, private, 1, ([f"item{i}" for i in range(1, 101)], [float(100 - i) for i in range(100)]))
    repo = Path(__file__).resolve().parents[1]
    runs = {}
    for mode in ("strict", "path"):
        command = [sys.executable, "-c", RSS_SCRIPT, str(package), str(public), mode]
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"RSS probe failed: {result.stderr[-2000:]}")
        runs[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    info = dict(runs["strict"])
    info["rss_mb_path_load"] = runs["path"]["rss_mb"]
    info["package_mb"] = sum(p.stat().st_size for p in package.iterdir()) / 2**20
    info["n_items"] = config.n_items
    return info


def _trained_synthetic(epochs: int):
    from model.data.open import open_dataset
    from model.export import real_prefixes
    from model.train import TrainConfig, rib_config_for, train_rib

    split = open_dataset("synthetic")
    tc = TrainConfig(epochs=epochs, min_steps=0, patience=epochs, w2v_init=False)
    rec, history = train_rib(split.train, rib_config_for(split.train), tc, progress=False)
    return rec.model.eval(), real_prefixes(split.test, rec.model.config.max_len, n=500), history


def markdown(result: dict[str, object]) -> str:
    """The benchmark as a markdown table (one row per model x precision)."""
    lines = [
        "| model | precision | full p50 ms | full p95 ms | step p50 ms | step p95 ms | size MB | size ratio | top-20 agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"].values():
        for precision in ("fp32", "int8"):
            t = m[precision]
            size = m[f"{precision}_mb"]
            ratio = f"{m['size_ratio']:.3f}" if precision == "int8" else "1"
            agree = f"{m['top20_agreement']:.4f}" if precision == "int8" else "-"
            lines.append(
                f"| {m['model']} | {precision} | {t['full_p50_ms']:.3f} | {t['full_p95_ms']:.3f} | {t['step_p50_ms']:.3f} | "
                f"{t['step_p95_ms']:.3f} | {size:.2f} | {ratio} | {agree} |"
            )
    seq, threads = result["seq_len"], result["threads"]
    notes = [
        "",
        f"Full session: {seq} tuples, batch 1; step: one tuple after {seq - 1}; onnxruntime CPU, intra_op_num_threads={threads}; "
        f"{result['repeats']} timed calls per figure, fp32/int8 interleaved in rounds. "
        "Sizes: full + step graphs. Agreement: mean |top-20 int8 & top-20 fp32| / 20 (full graph; "
        "random-weight model on random sessions, trained model on real test prefixes).",
    ]
    for m in result["models"].values():
        notes.append(
            f"- {m['model']}: per-tensor int8 agreement {m['top20_agreement_per_tensor']:.4f}; int8 step graph vs fp32 full "
            f"{m['top20_agreement_step_int8_vs_full_fp32']:.4f}; fp32 parity max abs diff full {m['parity_fp32_full_max_abs_diff']:.2e}, "
            f"step {m['parity_fp32_step_max_abs_diff']:.2e}."
        )
    ext, rss = result.get("extract"), result.get("rss")
    if ext:
        notes.append(f"- extraction: {result['extract_events_per_s']:,.0f} events/s ({ext['events']} events -> {ext['tuples']} tuples).")
    if rss:
        notes.append(f"- device process ({rss['n_items']:,}-item int8 package of {rss['package_mb']:.1f} MB, loaded + one recommendation): peak RSS {result['rss_mb']:.1f} MB "
                     f"(graphs loaded from verified bytes; {rss['rss_mb_path_load']:.1f} MB loading from paths), torch loaded: {rss['torch_loaded']}.")
    notes.append(f"- machine: {result['environment']}; timings on shared CPUs are noisy, compare ratios within one run.")
    return "\n".join(lines + notes) + "\n"


def run_edge_bench(
    out_dir: str | Path,
    n_items: int = 100_000,
    seq_len: int = 50,
    repeats: int = 500,
    threads: int = 1,
    trained: bool = True,
    epochs: int = 10,
    progress=print,
) -> dict[str, object]:
    """Run everything and write ``out_dir/edge.json`` and ``out_dir/edge.md``; returns the result dict."""
    import torch

    from model.rib import RIB, RIBConfig

    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict[str, object]] = {}
    rss = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        big = RIB(RIBConfig(n_items=n_items)).eval()
        rng = np.random.default_rng(1)
        random_prefixes = [_random_session(big.config, int(rng.integers(1, seq_len + 1)), rng) for _ in range(200)]
        progress(f"random-weight model, {n_items} items")
        models["random_100k"] = measure_model(f"random {n_items // 1000}k items", big, random_prefixes, work / "big", seq_len, repeats, threads)
        progress("device RSS probe")
        rss = device_rss(big, work / "rss")
        if trained:
            progress("training RIB on the synthetic population")
            model, prefixes, history = _trained_synthetic(epochs)
            models["synthetic_trained"] = measure_model("trained synthetic", model, prefixes, work / "synthetic", seq_len, repeats, threads)
            models["synthetic_trained"]["val_recall@20"] = history.get("best_val_recall@20")
    progress("extraction throughput")
    extract = extraction_throughput()
    headline = models["random_100k"]
    agreement_source = models.get("synthetic_trained", headline)
    result: dict[str, object] = {
        "bench": "edge",
        "int8": headline["int8"],
        "fp32": headline["fp32"],
        "size_ratio": headline["size_ratio"],
        "top20_agreement": agreement_source["top20_agreement"],
        "top20_agreement_source": agreement_source["model"],
        "extract_events_per_s": extract["events_per_s"],
        "rss_mb": rss["rss_mb"] if rss else None,
        "extract": extract,
        "rss": rss,
        "seq_len": seq_len,
        "threads": threads,
        "repeats": repeats,
        "models": models,
        "environment": {"python": platform.python_version(), "machine": platform.machine(), "platform": platform.platform(),
                        "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__},
    }
    (out_dir / "edge.json").write_text(json.dumps(result, indent=2))
    (out_dir / "edge.md").write_text("# bench edge\n\n" + markdown(result))
    return result


if __name__ == "__main__":  # pragma: no cover
    run_edge_bench(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/edge")
