"""The hardware floor of the incremental step: the output projection alone, fp32 vs int8 vs int4, in onnxruntime.

Run by path (opacus ships a top-level ``benchmarks`` package that shadows this directory)::

    python -m experiments.output_matmul [--items 100000] [--hidden 100] [--runs 3] [--out DIR]

The step graph's cost is dominated by one (1 x hidden) @ (hidden x items) MatMul (issue 5: ~10M MACs at
100k items). This times that MatMul on its own, as one-node graphs at 1 intra-op thread: fp32; int8 from
``quantize_dynamic`` (per-tensor and per-channel 7-bit weights, ``reduce_range`` as in the exporter); int4 from onnxruntime's ``MatMulNBitsQuantizer``
(block 32, accuracy level 0 = fp32 compute and 4 = int8 compute). No step of the real model can be faster than
its output MatMul, so the int8 figure here is a floor for ``step_p50_ms`` on this machine. Top-20 agreement
is against fp32 on random hidden states (random N(0, 0.1) weights). Writes ``output_matmul.json`` and
``output_matmul.md`` to ``--out`` (default ``benchmarks/results/edge``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.paths import RESULTS

OUT = RESULTS / "edge"
VARIANTS = ("fp32", "int8 per-tensor", "int8 per-channel", "int4 (fp32 compute)", "int4 (int8 compute)")


def build_graphs(folder: Path, items: int, hidden: int, seed: int) -> dict[str, Path]:
    """One-node MatMul graph in every precision; returns {variant: path}."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    weights = (np.random.default_rng(seed).standard_normal((hidden, items)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["hidden_state", "W"], ["scores"])],
        "output_projection",
        [helper.make_tensor_value_info("hidden_state", TensorProto.FLOAT, [1, hidden])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, items])],
        [numpy_helper.from_array(weights, "W")],
    )
    paths = {name: folder / f"{i}.onnx" for i, name in enumerate(VARIANTS)}
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), paths["fp32"])
    for name, per_channel in (("int8 per-tensor", False), ("int8 per-channel", True)):
        # 7-bit weights, as the exporter's: full-range int8 saturates the AVX2 kernel's int16 pair sums
        quantize_dynamic(
            paths["fp32"],
            paths[name],
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=True,
        )
    for name, level in (("int4 (fp32 compute)", 0), ("int4 (int8 compute)", 4)):
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=level)
        quantizer = MatMulNBitsQuantizer(onnx.load(paths["fp32"]), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(paths[name]))
    return paths


def time_variants(
    paths: dict[str, Path], hidden: int, calls: int, runs: int, seed: int
) -> dict[str, dict[str, float]]:
    """p50 / p95 latency (median over ``runs`` interleaved runs), size and top-20 agreement with fp32."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {
        n: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for n, p in paths.items()
    }
    rng = np.random.default_rng(seed + 1)
    states = rng.standard_normal((64, 1, hidden)).astype(np.float32)
    top = {
        n: [np.argsort(-s.run(None, {"hidden_state": x})[0][0])[:20] for x in states]
        for n, s in sessions.items()
    }
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in sessions}
    for _ in range(runs):
        for name, session in sessions.items():  # interleaved: a noisy neighbour hits every variant alike
            feed = {"hidden_state": states[0]}
            for _ in range(50):
                session.run(None, feed)
            times = []
            for i in range(calls):
                feed = {"hidden_state": states[i % len(states)]}
                t0 = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - t0)
            samples[name].append(
                (float(np.percentile(times, 50)) * 1e3, float(np.percentile(times, 95)) * 1e3)
            )
    fp32_size = paths["fp32"].stat().st_size
    return {
        name: {
            "p50_ms": float(np.median([s[0] for s in samples[name]])),
            "p95_ms": float(np.median([s[1] for s in samples[name]])),
            "size_ratio": paths[name].stat().st_size / fp32_size,
            "top20_agreement": float(
                np.mean([len(set(a) & set(b)) / 20 for a, b in zip(top[name], top["fp32"], strict=True)])
            ),
        }
        for name in sessions
    }


def markdown(result: dict[str, object]) -> str:
    """The table, with the fp32 / variant speed-up."""
    rows = result["variants"]  # type: ignore[assignment]
    fp32 = rows["fp32"]["p50_ms"]  # type: ignore[index]
    lines = [
        f"# Output projection alone: (1 x {result['hidden']}) @ ({result['hidden']} x {result['items']:,}), 1 thread",
        "",
        "| variant | p50 ms | p95 ms | speed-up vs fp32 | size ratio | top-20 agreement vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():  # type: ignore[union-attr]
        lines.append(
            f"| {name} | {row['p50_ms']:.3f} | {row['p95_ms']:.3f} | {fp32 / row['p50_ms']:.1f}x | "
            f"{row['size_ratio']:.3f} | {row['top20_agreement']:.3f} |"
        )
    lines += [
        "",
        f"{result['calls']} timed calls per variant and run, {result['runs']} interleaved runs, median of the runs' "
        f"percentiles; onnxruntime {result['onnxruntime']}, {result['machine']}. The step graph cannot beat its "
        "own output MatMul: the int8 p50 here is this machine's floor for `step_p50_ms` (issue 5 target 0.15 ms). "
        "\"int8 per-channel\" is `quantize_dynamic`'s own per-channel mode; the exporter's int8 graph instead "
        "runs the per-tensor fused MatMul and applies one scale per item after it (`edge.md`).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Build, time, write JSON + markdown, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.items < 20 or args.hidden < 1 or args.calls < 1 or args.runs < 1:
        parser.error("--items must be >= 20 and --hidden, --calls, --runs >= 1")
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        paths = build_graphs(Path(folder), args.items, args.hidden, args.seed)
        variants = time_variants(paths, args.hidden, args.calls, args.runs, args.seed)
    result: dict[str, object] = {
        "items": args.items,
        "hidden": args.hidden,
        "calls": args.calls,
        "runs": args.runs,
        "variants": variants,
        "onnxruntime": ort.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "output_matmul.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / "output_matmul.md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
