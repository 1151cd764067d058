"""Edge benchmark: int8 vs fp32 ONNX latency, size, top-20 agreement and Recall@20; extraction throughput;
device RSS and cold start.

``run_edge_bench(out_dir)`` (the ``rib-edge bench edge`` command) measures, with onnxruntime at
``intra_op_num_threads=1``, the graph the device runs (``full.onnx``: one session advances a state by L
tuples; see ``model.export``):

- full-session latency: ``seq_len`` tuples from the initial state, batch 1 (p50/p95 ms);
- incremental step latency: one tuple on the state after ``seq_len - 1`` (p50/p95 ms);
  for fp32, int8 (one scale per item column, the package default) and int8 with one per-tensor scale.
  Calls are repeated back to back (weights cache-hot), interleaved in rounds so background load hits every
  variant alike; ``speedup_*`` is the median over rounds of fp32 / int8 round medians;
- size ratio int8/fp32 (full + step graphs; step.onnx keeps its weights inside full.onnx);
- top-20 agreement int8 vs fp32 (mean overlap of the top-20 sets; the padding column is never ranked), and
  with known next items Recall@20 / MRR@20 of both;
on two models: a 100k-item RIB with random weights (device-scale sizes) and RIB trained on the synthetic
population (agreement and recall on its real test prefixes). Plus the device extractor's throughput
(``edge_client.extract.extract_population`` on a synthetic population, events/s) and a fresh process that
verifies and loads a signed 100k-item package and recommends: peak RSS, cold start (import, verify + load,
first recommendation) and the runtime's end-to-end latencies (``Recommender.recommend`` over 50 tuples and
``IncrementalSession.step``, top-20 and explanations included, the graph no longer cache-hot between calls).

``DIR/edge.json``: top-level ``int8`` and ``fp32`` (``full_p50_ms, full_p95_ms, step_p50_ms,
step_p95_ms``), ``speedup_full``/``speedup_step`` and ``size_ratio`` are the 100k-item model's;
``top20_agreement`` and ``recall@20`` are the trained model's (real prefixes); ``models`` holds every figure of
both; ``load_average`` the machine's 1/5/15-minute load before and after. ``DIR/edge.md`` is the markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUANTILES = (50, 95)
VARIANTS = ("fp32", "int8", "int8_per_tensor")


def _session(path: Path, threads: int = 1):
    from model.export import session_for

    return session_for(path, threads)


def _random_session(
    config, length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        rng.integers(1, config.n_items + 1, length).astype(np.int64),
        rng.integers(0, config.n_activities, length).astype(np.int64),
        rng.integers(0, config.n_dwell, length).astype(np.int64),
    )


def _graph_runners(full_path: Path, config, seq_len: int, threads: int, seed: int):
    """(full-session call, one-step call) closures on fixed inputs of one full graph: seq_len tuples from the
    initial state, and one tuple on the state after seq_len - 1 (what the runtime feeds)."""
    from model.export import feed_for, full_advance, initial_step_state

    rng = np.random.default_rng(seed)
    full = _session(full_path, threads)
    items, acts, dwell = _random_session(config, seq_len, rng)
    full_feed = feed_for(
        full,
        {
            "items": items[None],
            "activities": acts[None],
            "dwell": dwell[None],
            "lengths": np.array([seq_len], np.int64),
        },
    )
    state, _ = full_advance(full, initial_step_state(config.hidden_dim), items[:-1], acts[:-1], dwell[:-1])
    step_feed = feed_for(
        full,
        {
            "items": items[None, -1:],
            "activities": acts[None, -1:],
            "dwell": dwell[None, -1:],
            "lengths": np.array([1], np.int64),
            **state,
        },
    )
    return (lambda: full.run(None, full_feed)), (lambda: full.run(None, step_feed))


def latency(
    graphs: dict[str, Path],
    config,
    seq_len: int,
    repeats: int,
    threads: int = 1,
    seed: int = 0,
    rounds: int = 10,
) -> dict[str, object]:
    """Full-session (seq_len tuples, batch 1) and one-step latencies of several full graphs (e.g. fp32, int8).

    The runs are interleaved in ``rounds`` (each round times every graph for repeats/rounds calls, in a
    rotating order), so background load on a shared machine hits every variant alike. Besides p50/p95 per
    graph, ``speedup_full``/``speedup_step`` (with an ``fp32`` and an ``int8`` graph): the median over rounds
    of fp32 / int8 round medians.
    """
    runners = {}
    for name, full_path in graphs.items():
        full_call, step_call = _graph_runners(full_path, config, seq_len, threads, seed)
        runners[f"{name}/full"], runners[f"{name}/step"] = full_call, step_call
    times: dict[str, list[list[float]]] = {key: [] for key in runners}
    for fn in runners.values():
        for _ in range(5):
            fn()
    keys = list(runners)
    per_round = max(1, repeats // rounds)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            fn = runners[key]
            samples = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1000.0)
            times[key].append(samples)
    out: dict[str, object] = {}
    for name in graphs:
        figures = {}
        for part in ("full", "step"):
            flat = [t for samples in times[f"{name}/{part}"] for t in samples]
            p50, p95 = np.percentile(flat, QUANTILES)
            figures[f"{part}_p50_ms"], figures[f"{part}_p95_ms"] = float(p50), float(p95)
        out[name] = figures
    if "fp32" in graphs and "int8" in graphs:
        for part in ("full", "step"):
            ratios = [
                np.median(a) / np.median(b)
                for a, b in zip(times[f"fp32/{part}"], times[f"int8/{part}"], strict=True)
            ]
            out[f"speedup_{part}"] = float(np.median(ratios))
    return out


def _graph_bytes(directory: Path) -> int:
    return (directory / "full.onnx").stat().st_size + (directory / "step.onnx").stat().st_size


def repeated_latency(
    graphs: dict[str, Path], config, seq_len: int, repeats: int, threads: int = 1, runs: int = 3
) -> dict[str, object]:
    """``latency`` ``runs`` times (``repeats`` calls per figure each): every figure is the median over the runs,
    ``runs`` keeps each run's figures."""
    each = [latency(graphs, config, seq_len, repeats, threads, seed=run) for run in range(runs)]
    out: dict[str, object] = {}
    for key, value in each[0].items():
        if isinstance(value, dict):
            out[key] = {figure: float(np.median([run[key][figure] for run in each])) for figure in value}
        else:
            out[key] = float(np.median([run[key] for run in each]))
    out["latency_runs"] = each
    return out


def measure_model(
    name: str,
    model,
    prefixes,
    work: Path,
    seq_len: int,
    repeats: int,
    threads: int,
    targets=None,
    runs: int = 3,
) -> dict[str, object]:
    """Export fp32 + int8 (per-channel output scales, the package default, and per-tensor) and measure one model."""
    from model.export import export_onnx, link_to_full, quantize_int8, recall_mrr, topk_agreement

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fp32 = export_onnx(model, work / "fp32")
    export_s = time.perf_counter() - t0
    dirs = {"fp32": work / "fp32"}
    quant_s = 0.0
    for variant, per_channel in (("int8", True), ("int8_per_tensor", False)):
        t0 = time.perf_counter()
        out = work / variant
        quantize_int8(fp32.full, out / "full.onnx", per_channel=per_channel)
        link_to_full(
            quantize_int8(fp32.step, work / f"{variant}_step_inline.onnx", per_channel=per_channel),
            out / "full.onnx",
            out / "step.onnx",
        )
        quant_s = quant_s or time.perf_counter() - t0
        dirs[variant] = out
    sizes = {variant: _graph_bytes(d) for variant, d in dirs.items()}
    result: dict[str, object] = {
        "model": name,
        "config": model.config.to_dict(),
        "parity_fp32_full_max_abs_diff": fp32.full_max_abs_diff,
        "parity_fp32_step_max_abs_diff": fp32.step_max_abs_diff,
        "fp32_mb": sizes["fp32"] / 2**20,
        "int8_mb": sizes["int8"] / 2**20,
        "int8_per_tensor_mb": sizes["int8_per_tensor"] / 2**20,
        "step_graph_kb": (dirs["int8"] / "step.onnx").stat().st_size / 1024,
        "size_ratio": sizes["int8"] / sizes["fp32"],
        "top20_agreement": topk_agreement(fp32.full, dirs["int8"] / "full.onnx", prefixes, k=20),
        "top20_agreement_per_tensor": topk_agreement(
            fp32.full, dirs["int8_per_tensor"] / "full.onnx", prefixes, k=20
        ),
        "top20_agreement_step_int8_vs_full_fp32": _step_agreement(
            fp32.full, dirs["int8"] / "step.onnx", model.config.hidden_dim, prefixes[:50]
        ),
        "n_prefixes": len(prefixes),
        "export_s": export_s,
        "quantize_s": quant_s,
    }
    if targets is not None:
        for variant in VARIANTS:
            recall, mrr = recall_mrr(_session(dirs[variant] / "full.onnx"), prefixes, targets, k=20)
            result[f"{variant}_recall@20"], result[f"{variant}_mrr@20"] = recall, mrr
        result["recall@20_rel_change"] = (
            result["int8_recall@20"] / result["fp32_recall@20"] - 1.0
            if result["fp32_recall@20"]
            else float("nan")
        )
    timing = repeated_latency(
        {variant: d / "full.onnx" for variant, d in dirs.items()},
        model.config,
        seq_len,
        repeats,
        threads,
        runs,
    )
    result.update(timing)
    return result


def _step_agreement(full_path: Path, step_path: Path, hidden_dim: int, prefixes, k: int = 20) -> float:
    """Top-k overlap of the int8 one-tuple step graph (after the whole prefix) with the fp32 full graph."""
    from model.export import feed_for, run_steps

    full, step = _session(full_path), _session(step_path)
    overlaps = []
    for items, acts, dwell in prefixes:
        ref = full.run(
            None,
            feed_for(
                full,
                {
                    "items": items[None],
                    "activities": acts[None],
                    "dwell": dwell[None],
                    "lengths": np.array([len(items)]),
                },
            ),
        )[0][0]
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
import numpy as np
t_import = time.perf_counter()
rec = Recommender(sys.argv[1], sys.argv[2], strict_load=sys.argv[3] == "strict")
t_load = time.perf_counter()
items = rec.vocab.item_ids
history = [MicroBehavior("s", i, items[(i * 7919) % len(items)], rec.vocab.activities.names[i % len(rec.vocab.activities)], 30.0) for i in range(50)]
out = rec.recommend(history, k=20)
t_first = time.perf_counter()
# VmHWM: this process's own peak (ru_maxrss would include the parent's RSS at fork time: Linux carries it over exec).
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
peak = float(status["VmHWM"].split()[0]) / 1024.0 if "VmHWM" in status else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
now = float(status["VmRSS"].split()[0]) / 1024.0 if "VmRSS" in status else None
# End-to-end runtime latencies (top-20 and explanations included): whole-session recommend() calls, and the
# steps of 5 live 50-tuple sessions (between steps the runtime's own work evicts part of the weights from cache).
recommend_ms, step_ms = [], []
for _ in int(sys.argv[4]) * [0]:
    t = time.perf_counter(); rec.recommend(history, k=20); recommend_ms.append((time.perf_counter() - t) * 1000.0)
for _ in range(5):
    live = rec.start_session()
    for b in history:
        t = time.perf_counter(); live.step(b, k=20); step_ms.append((time.perf_counter() - t) * 1000.0)
print(json.dumps({"rss_mb": peak, "rss_now_mb": now, "n_recs": len(out),
                  "import_s": t_import - t0, "verify_load_s": t_load - t_import, "first_recommend_s": t_first - t_load,
                  "cold_start_s": t_first - t0, "load_and_recommend_s": t_first - t0,
                  "e2e_recommend_p50_ms": float(np.median(recommend_ms)), "e2e_recommend_p95_ms": float(np.percentile(recommend_ms, 95)),
                  "e2e_step_p50_ms": float(np.median(step_ms)), "e2e_step_p95_ms": float(np.percentile(step_ms, 95)),
                  "torch_loaded": "torch" in sys.modules}))
"""


def _probe(package: Path, public: Path, mode: str, calls: int = 200) -> dict[str, object]:
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", RSS_SCRIPT, str(package), str(public), mode, str(calls)]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"RSS probe failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def device_rss(model, work: Path, runs: int = 3) -> dict[str, object]:
    """A fresh process that verifies and loads a signed package of ``model`` and recommends: int8 (graph from
    verified bytes, the default, and from the path) and fp32; medians of ``runs`` processes each."""
    from edge_client.package import generate_keypair
    from edge_client.schema import RIB_ACTIVITY_VOCAB, DwellBuckets
    from model.data.dataset import Vocabulary
    from model.export import build_package

    config = model.config
    vocab = Vocabulary(
        np.array([f"item{i}" for i in range(1, config.n_items + 1)]), RIB_ACTIVITY_VOCAB, DwellBuckets()
    )
    private, public = generate_keypair(work / "keys")
    popular = ([f"item{i}" for i in range(1, 101)], [float(100 - i) for i in range(100)])
    packages = {"int8": work / "package", "fp32": work / "package_fp32"}
    build_package(model, vocab, packages["int8"], private, 1, popular)
    build_package(model, vocab, packages["fp32"], private, 1, popular, int8=False)
    probes: dict[str, list[dict[str, object]]] = {"strict": [], "path": [], "fp32": []}
    for _ in range(runs):  # interleaved, so load drifts hit every mode alike
        probes["strict"].append(_probe(packages["int8"], public, "strict"))
        probes["path"].append(_probe(packages["int8"], public, "path", calls=20))
        probes["fp32"].append(_probe(packages["fp32"], public, "strict", calls=50))

    def med(mode: str, key: str) -> float:
        return float(np.median([p[key] for p in probes[mode]]))

    info: dict[str, object] = {
        key: med("strict", key) for key, value in probes["strict"][0].items() if isinstance(value, float)
    }
    info["n_recs"] = probes["strict"][0]["n_recs"]
    info["torch_loaded"] = any(p["torch_loaded"] for ps in probes.values() for p in ps)
    info["rss_mb_path_load"] = med("path", "rss_mb")
    info["cold_start_s_path_load"] = med("path", "cold_start_s")
    info["fp32_rss_mb"] = med("fp32", "rss_mb")
    info["fp32_cold_start_s"] = med("fp32", "cold_start_s")
    info["fp32_e2e_recommend_p50_ms"] = med("fp32", "e2e_recommend_p50_ms")
    info["fp32_e2e_step_p50_ms"] = med("fp32", "e2e_step_p50_ms")
    info["package_mb"] = sum(p.stat().st_size for p in packages["int8"].iterdir()) / 2**20
    info["fp32_package_mb"] = sum(p.stat().st_size for p in packages["fp32"].iterdir()) / 2**20
    info["n_items"] = config.n_items
    info["runs"] = runs
    return info


def _trained_synthetic(epochs: int):
    from model.data.open import open_dataset
    from model.export import real_examples
    from model.train import TrainConfig, rib_config_for, train_rib

    split = open_dataset("synthetic")
    tc = TrainConfig(epochs=epochs, min_steps=0, patience=epochs, w2v_init=False)
    rec, history = train_rib(split.train, rib_config_for(split.train), tc, progress=False)
    prefixes, targets = real_examples(
        split.test, rec.model.config.max_len, n=5000
    )  # every test example (822)
    return rec.model.eval(), prefixes, targets, history


def _trained_shared(dataset: str, train_seconds: float):
    """RIB trained on a shared dataset for at most ``train_seconds`` (sampled softmax, the on-device
    config: untied output, no Word2vec), with up to 2,000 real test prefixes; None without shared data."""
    from edge_client.schema import SchemaError
    from model.data.loaders import load_dataset
    from model.export import real_examples
    from model.train import TrainConfig, rib_config_for, train_rib

    try:
        split = load_dataset(dataset)
    except (SchemaError, FileNotFoundError):
        return None
    config = rib_config_for(
        split.train,
        "SKU+Micro" if split.train.has_activity and split.train.has_dwell else "SKU",
        loss="sampled",
    )
    tc = TrainConfig(
        epochs=20,
        batch_size=256,
        lr=3e-3,
        min_steps=0,
        patience=2,
        w2v_init=False,
        max_train_seconds=train_seconds,
        val_max_examples=5000,
    )
    rec, history = train_rib(split.train, config, tc, progress=False)
    prefixes, targets = real_examples(split.test, rec.model.config.max_len, n=2000)
    return rec.model.eval(), prefixes, targets, history


def load_average() -> list[float]:
    """The machine's 1/5/15-minute load average (empty where unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_features() -> dict[str, object]:
    """The CPU model and the SIMD features onnxruntime's int8 GEMM picks its kernel by (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"model": fields.get("model name", ""), "int8_features": [f for f in wanted if f in flags]}


def markdown(result: dict[str, object]) -> str:
    """The benchmark as a markdown table (one row per model x precision)."""
    lines = [
        "| model | precision | full p50 ms | full p95 ms | step p50 ms | step p95 ms | size MB | size ratio | top-20 agreement | Recall@20 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"].values():
        for precision in VARIANTS:
            if precision not in m:
                continue
            t = m[precision]
            size = m[f"{precision}_mb"]
            ratio = f"{size / m['fp32_mb']:.3f}" if precision != "fp32" else "1"
            agree = {
                "fp32": "-",
                "int8": f"{m['top20_agreement']:.4f}",
                "int8_per_tensor": f"{m.get('top20_agreement_per_tensor', float('nan')):.4f}",
            }[precision]
            recall = m.get(f"{precision}_recall@20")
            label = {"int8": "int8 (per-channel, default)", "int8_per_tensor": "int8 per-tensor"}.get(
                precision, precision
            )
            lines.append(
                f"| {m['model']} | {label} | {t['full_p50_ms']:.3f} | {t['full_p95_ms']:.3f} | {t['step_p50_ms']:.3f} | "
                f"{t['step_p95_ms']:.3f} | {size:.2f} | {ratio} | {agree} | {'-' if recall is None else f'{recall:.4f}'} |"
            )
    seq, threads = result["seq_len"], result["threads"]
    notes = [
        "",
        f"Full session: {seq} tuples from the initial state, batch 1; step: one tuple on the state after {seq - 1} (the same graph: "
        f"one onnxruntime session serves both); onnxruntime CPU, intra_op_num_threads={threads}; {result['repeats']} timed calls per "
        f"figure and run, back to back (weights cache-hot), variants interleaved in rounds; every figure is the median of "
        f"{result['latency_runs']} runs; speed-up = median over rounds of fp32/int8 round medians. "
        "Sizes: full + step graphs (step.onnx holds no weights of its own: they are external data inside full.onnx). "
        "Agreement: mean |top-20 int8 & top-20 fp32| / 20 (full graph; random-weight model on random sessions, trained model on "
        "real test prefixes); Recall@20 on the same prefixes' next items.",
    ]
    for m in result["models"].values():
        line = (
            f"- {m['model']}: int8 speed-up full {m['speedup_full']:.1f}x, step {m['speedup_step']:.1f}x; int8 one-tuple step graph vs fp32 "
            f"full {m['top20_agreement_step_int8_vs_full_fp32']:.4f}; fp32 parity max abs diff full {m['parity_fp32_full_max_abs_diff']:.2e}, "
            f"step {m['parity_fp32_step_max_abs_diff']:.2e}"
        )
        if "int8_recall@20" in m:
            line += (
                f"; on {m['n_prefixes']} test prefixes Recall@20 fp32 {m['fp32_recall@20']:.4f}, int8 {m['int8_recall@20']:.4f} "
                f"({100 * m['recall@20_rel_change']:+.2f}%; per-tensor {m['int8_per_tensor_recall@20']:.4f}), "
                f"MRR@20 fp32 {m['fp32_mrr@20']:.4f}, int8 {m['int8_mrr@20']:.4f}"
            )
        notes.append(line + ".")
    ext, rss = result.get("extract"), result.get("rss")
    if ext:
        notes.append(
            f"- extraction: {result['extract_events_per_s']:,.0f} events/s ({ext['events']} events -> {ext['tuples']} tuples)."
        )
    if rss:
        notes.append(
            f"- device process ({rss['n_items']:,}-item int8 package of {rss['package_mb']:.1f} MB; fp32 {rss['fp32_package_mb']:.1f} MB), "
            f"median of {rss['runs']} fresh processes: peak RSS {result['rss_mb']:.1f} MB with the graph loaded from verified bytes "
            f"({rss['rss_mb_path_load']:.1f} MB from the path; fp32 package {rss['fp32_rss_mb']:.1f} MB); cold start to the first "
            f"recommendation {1000 * rss['cold_start_s']:.0f} ms (import {1000 * rss['import_s']:.0f}, verify + load "
            f"{1000 * rss['verify_load_s']:.0f}, first recommend {1000 * rss['first_recommend_s']:.1f}; fp32 {1000 * rss['fp32_cold_start_s']:.0f} ms); "
            f"end to end (top-20 + explanations): recommend(50 tuples) p50 {rss['e2e_recommend_p50_ms']:.3f} ms "
            f"(fp32 {rss['fp32_e2e_recommend_p50_ms']:.3f}), live step p50 {rss['e2e_step_p50_ms']:.3f} ms (fp32 {rss['fp32_e2e_step_p50_ms']:.3f}); "
            f"torch loaded: {rss['torch_loaded']}."
        )
    notes.append(
        f"- load average (1/5/15 min) before {result['load_average']['before']}, after {result['load_average']['after']}; "
        f"machine: {result['environment']}; timings on shared CPUs are noisy, compare ratios within one run."
    )
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
    latency_runs: int = 3,
    shared_dataset: str | None = "srgnn_nowplaying",
    shared_train_seconds: float = 300.0,
) -> dict[str, object]:
    """Run everything and write ``out_dir/edge.json`` and ``out_dir/edge.md``; returns the result dict.
    Latencies are medians of ``latency_runs`` runs of ``repeats`` calls per figure."""
    import torch

    from model.rib import RIB, RIBConfig

    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    models: dict[str, dict[str, object]] = {}
    rss = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        big = RIB(RIBConfig(n_items=n_items)).eval()
        rng = np.random.default_rng(1)
        random_prefixes = [
            _random_session(big.config, int(rng.integers(1, seq_len + 1)), rng) for _ in range(200)
        ]
        progress(f"random-weight model, {n_items} items")
        models["random_100k"] = measure_model(
            f"random {n_items // 1000}k items",
            big,
            random_prefixes,
            work / "big",
            seq_len,
            repeats,
            threads,
            runs=latency_runs,
        )
        progress("device RSS / cold start probe")
        rss = device_rss(big, work / "rss")
        if trained:
            progress("training RIB on the synthetic population")
            model, prefixes, targets, history = _trained_synthetic(epochs)
            models["synthetic_trained"] = measure_model(
                "trained synthetic",
                model,
                prefixes,
                work / "synthetic",
                seq_len,
                repeats,
                threads,
                targets,
                runs=latency_runs,
            )
            models["synthetic_trained"]["val_recall@20"] = history.get("best_val_recall@20")
        if shared_dataset:
            # The largest shared vocabulary (SR-GNN nowplaying, 60k items), trained weights, real prefixes.
            progress(f"training RIB on {shared_dataset} ({shared_train_seconds:.0f} s budget)")
            shared = _trained_shared(shared_dataset, shared_train_seconds)
            if shared is None:
                progress(f"{shared_dataset}: not available (no shared data), skipped")
            else:
                model, prefixes, targets, history = shared
                label = f"trained {shared_dataset} ({model.config.n_items // 1000}k items)"
                models["shared_trained"] = measure_model(
                    label,
                    model,
                    prefixes,
                    work / "shared",
                    seq_len,
                    repeats,
                    threads,
                    targets,
                    runs=latency_runs,
                )
                models["shared_trained"]["val_recall@20"] = history.get("best_val_recall@20")
    progress("extraction throughput")
    extract = extraction_throughput()
    headline = models["random_100k"]
    agreement_source = models.get("synthetic_trained", headline)
    result: dict[str, object] = {
        "bench": "edge",
        "int8": headline["int8"],
        "fp32": headline["fp32"],
        "int8_per_tensor": headline["int8_per_tensor"],
        "speedup_full": headline["speedup_full"],
        "speedup_step": headline["speedup_step"],
        "size_ratio": headline["size_ratio"],
        "top20_agreement": agreement_source["top20_agreement"],
        "top20_agreement_source": agreement_source["model"],
        "recall@20": {k: agreement_source.get(f"{k}_recall@20") for k in VARIANTS},
        "extract_events_per_s": extract["events_per_s"],
        "rss_mb": rss["rss_mb"] if rss else None,
        "cold_start_s": rss["cold_start_s"] if rss else None,
        "extract": extract,
        "rss": rss,
        "seq_len": seq_len,
        "threads": threads,
        "repeats": repeats,
        "latency_runs": latency_runs,
        "models": models,
        "load_average": {"before": load_before, "after": load_average(), "cpus": os.cpu_count()},
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "onnxruntime": __import__("onnxruntime").__version__,
            "torch": torch.__version__,
            "cpu": cpu_features(),
        },
    }
    (out_dir / "edge.json").write_text(json.dumps(result, indent=2))
    (out_dir / "edge.md").write_text("# bench edge\n\n" + markdown(result))
    return result


if __name__ == "__main__":  # pragma: no cover
    run_edge_bench(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/edge")
