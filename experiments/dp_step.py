"""DP-SGD step time / non-private step time for RIB on one fixed batch, and where the DP time goes.

    python -m experiments.dp_step [--dataset jdata2016_sample] [--reps 15] [--batch-size 32]

(run by path: Opacus ships a top-level ``benchmarks`` package that shadows this directory as a module.)

Every configuration trains its own copy of one RIB (same init) on the SAME batch of ``batch_size``
windows (fixed rows, not Poisson, so all configurations do identical work), Adam, one thread:

- ``non-private``: what ``model.local.train_local`` does (nn.GRU, mean window loss, global grad clip);
  the denominator of every ratio. ``non-private (DPGRU)`` isolates the cost of Opacus' Python GRU.
- ``hooks`` / ``ghost`` / ``bookkeeping`` / ``functorch``: one DP-SGD step exactly as ``privacy.dp_sgd``
  takes it (``PrivateStep``: DPGRU, per-window clipping to 1.0, noise 1.0, padding rows restored), with
  Opacus' stock per-sample samplers (``opacus``) or this project's faster, same-result ones (``fast``).
- every catalogue size in ``--n-items`` (default: the dataset's own, and 20,000 items: a bigger output
  layer and item embedding, rows the batch never uses), since the per-sample cost grows with it.

Rounds are interleaved (each round runs every configuration once) and medians reported, so load from
other processes hits all configurations alike. Each step is split into forward / backward (both passes
for ghost clipping) / optimizer (clip, noise, Adam). A separate, untimed-for-ratio pass attributes the
per-sample hook time to modules (output layer, GRU cells, embeddings, ...). Before timing, the fast
samplers' per-window norms are checked against Opacus' stock ones on this batch.

Writes ``DIR/dp_step.json``, ``DIR/dp_step.md`` and ``DIR/dp_step.png`` (default
``benchmarks/results/dp_step``) and prints the JSON and the markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import opacus
import torch
from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping

from model.local import LocalTrainConfig, WindowDataset, make_optimizer, window_losses
from model.rib import RIB
from model.train import rib_config_for
from privacy.dp_sgd import PrivateStep, attach_grad_sampler, to_dp_gru

RESULTS = Path(__file__).resolve().parent / "results" / "dp_step"
BASELINE = "non-private"
PHASES = ("forward", "backward", "optimizer")
DP_CONFIGS = (  # (name, grad_sample_mode, fast samplers)
    ("hooks (opacus)", "hooks", False),
    ("hooks (fast)", "hooks", True),
    ("ghost (opacus)", "ghost", False),
    ("ghost (fast)", "ghost", True),
    ("bookkeeping (fast)", "bookkeeping", True),
    ("functorch (opacus)", "functorch", False),
)
NOISE, CLIP = 1.0, 1.0


def load_data(name: str, min_item_support: int | None):
    """Training split of ``name`` (a shared dataset when ../shared/data exists, else synthetic)."""
    from model.data.open import open_dataset

    try:
        return open_dataset(name, min_item_support=min_item_support).train, name
    except Exception as err:  # no shared data on a fresh clone: the synthetic population instead
        if name == "synthetic":
            raise
        print(f"dataset {name!r} unavailable ({err!r}); using synthetic", file=sys.stderr)
        return open_dataset("synthetic").train, "synthetic"


Step = Callable[[dict[str, float]], None]


def plain_step(model: RIB, batch, local: LocalTrainConfig) -> Step:
    """One non-private step as model.local.train_local takes it."""
    optimizer = make_optimizer(model, local)

    def step(times: dict[str, float]) -> None:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = window_losses(model, batch).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), local.grad_clip)
        optimizer.step()
        t3 = time.perf_counter()
        times.update(forward=t1 - t0, backward=t2 - t1, optimizer=t3 - t2)

    return step


def dp_step(model: RIB, batch, local: LocalTrainConfig, mode: str, fast: bool) -> tuple[Step, PrivateStep]:
    """One DP-SGD step exactly as privacy.dp_sgd takes it (model must hold a DPGRU)."""
    private = PrivateStep(
        model,
        mode,
        local,
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        expected_batch_size=len(batch[0]),
        noise_generator=torch.Generator().manual_seed(0),
        fast=fast,
    )
    return (lambda times: private(batch, times)), private


def per_window_norms(base: RIB, batch, mode: str, fast: bool) -> torch.Tensor:
    """Per-window gradient norms (no dropout) under one sampler set: the fast/stock equality check."""
    model = to_dp_gru(copy.deepcopy(base)).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    hooks = attach_grad_sampler(model, mode, CLIP, fast=fast)
    window_losses(model, batch).mean().backward()
    if mode in ("ghost", "bookkeeping"):
        norms = hooks.get_norm_sample()
    else:
        norms = torch.cat([p.grad_sample.reshape(len(batch[0]), -1) for p in model.parameters()], 1).norm(
            dim=1
        )
    hooks.cleanup()
    return norms.detach()


def hook_breakdown(
    base: RIB, batch, local: LocalTrainConfig, mode: str, fast: bool, rounds: int
) -> dict[str, float]:
    """Median ms per step spent in the per-sample backward hooks, by module (GRU cells pooled).

    A fresh model and step: Opacus binds ``capture_backprops_hook`` when it attaches, so the timing
    wrapper must be in place before that.
    """
    cls = GradSampleHooksFastGradientClipping if mode in ("ghost", "bookkeeping") else GradSampleHooks
    original = cls.capture_backprops_hook
    spent: dict[str, float] = defaultdict(float)
    names: dict[int, str] = {}

    def timed(self, module, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, module, *args, **kwargs)
        finally:
            spent[names.get(id(module), type(module).__name__)] += time.perf_counter() - t0

    per_step: dict[str, list[float]] = defaultdict(list)
    cls.capture_backprops_hook = timed
    try:
        model = to_dp_gru(copy.deepcopy(base)).train()
        names.update({id(m): ("gru" if n.startswith("gru") else n) for n, m in model.named_modules()})
        step, private = dp_step(model, batch, local, mode, fast)
        step({})  # warm-up
        for _ in range(rounds):
            spent.clear()
            step({})
            for name, seconds in spent.items():
                per_step[name].append(seconds)
        private.close()
    finally:
        cls.capture_backprops_hook = original
    return {
        k: round(statistics.median(v) * 1000, 2)
        for k, v in sorted(per_step.items(), key=lambda kv: -sum(kv[1]))
    }


def run(args: argparse.Namespace, data, dataset_name: str, n_items: int) -> dict[str, object]:
    """One catalogue size: build the model and the batch, check the samplers, time every configuration."""
    local = LocalTrainConfig(batch_size=args.batch_size, max_len=args.max_len, lr=1e-3)
    windows = WindowDataset(data, local.max_len)
    rows = np.random.default_rng(args.seed).permutation(len(windows))[: args.batch_size]
    batch = windows.batch(rows)
    torch.manual_seed(args.seed)
    n_items = max(n_items, data.n_items)  # a bigger catalogue than the data's: rows the batch never uses
    base = RIB(rib_config_for(data, item_dim=args.item_dim, hidden_dim=args.hidden, n_items=n_items))
    n_params = sum(p.numel() for p in base.parameters())

    checks = {}
    for mode in ("hooks", "ghost"):
        stock, fast = per_window_norms(base, batch, mode, False), per_window_norms(base, batch, mode, True)
        checks[mode] = float(((fast - stock).abs() / stock.clamp(min=1e-12)).max())
        if checks[mode] > 1e-4:
            raise AssertionError(
                f"fast {mode} samplers disagree with Opacus' (max rel. diff {checks[mode]:.2e})"
            )

    steps: dict[str, Step] = {}
    steps[BASELINE] = plain_step(copy.deepcopy(base).train(), batch, local)
    steps["non-private (DPGRU)"] = plain_step(to_dp_gru(copy.deepcopy(base)).train(), batch, local)
    for name, mode, fast in DP_CONFIGS:
        steps[name], _ = dp_step(to_dp_gru(copy.deepcopy(base)).train(), batch, local, mode, fast)

    samples: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in steps}
    load_before = os.getloadavg()
    for round_ in range(args.warmup + args.reps):
        for name, step in steps.items():
            times: dict[str, float] = {}
            step(times)
            if round_ >= args.warmup:
                for phase in PHASES:
                    samples[name][phase].append(times[phase])
                samples[name]["total"].append(sum(times[p] for p in PHASES))
    load_after = os.getloadavg()

    base_ms = statistics.median(samples[BASELINE]["total"]) * 1000
    configs = {}
    for name, phases in samples.items():
        total = statistics.median(phases["total"]) * 1000
        configs[name] = {
            "median_ms": round(total, 2),
            "ratio": round(total / base_ms, 3),
            **{f"{p}_ms": round(statistics.median(phases[p]) * 1000, 2) for p in PHASES},
            "iqr_ms": round(float(np.subtract(*np.percentile(phases["total"], [75, 25]))) * 1000, 2),
        }
    breakdown = {
        name: hook_breakdown(base, batch, local, mode, fast, rounds=max(3, args.reps // 3))
        for name, mode, fast in DP_CONFIGS
        if mode != "functorch"
    }
    return {
        "n_items": n_items,
        "batch": {
            "windows": len(rows),
            "width": int(batch[0].shape[1]),
            "examples": int((batch[4] != -100).sum()),
            "max_examples_per_window": int((batch[4] != -100).sum(1).max()),
        },
        "model": {
            "item_dim": args.item_dim,
            "hidden_dim": args.hidden,
            "parameters": n_params,
            "per_sample_grad_mb": round(len(rows) * n_params * 4 / 2**20, 1),  # what "hooks" materialises
            "output_layer": [n_items + 1, args.hidden],
            "copy": base.config.use_copy,
        },
        "baseline_ms": round(base_ms, 2),
        "configs": configs,
        "best": min((n for n, _, _ in DP_CONFIGS), key=lambda n: configs[n]["ratio"]),
        "hook_ms_by_module": breakdown,
        "fast_vs_opacus_max_rel_norm_diff": checks,
        "loadavg_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }


def markdown(result: dict) -> str:
    """One ratio table and one hook breakdown per catalogue size."""
    lines = [
        f"DP-SGD step vs non-private step, RIB on `{result['dataset']}` windows (hidden {result['hidden_dim']}, "
        f"item_dim {result['item_dim']}), fixed batch of {result['batch_size']} windows, {result['threads']} "
        f"thread, median of {result['reps']} interleaved rounds, noise {NOISE}, clip {CLIP}.",
    ]
    for run_ in result["runs"]:
        b = run_["batch"]
        lines += [
            "",
            f"### {run_['n_items']} items ({run_['model']['parameters']:,} parameters; per-sample gradients of a batch: "
            f"{run_['model']['per_sample_grad_mb']} MB; batch width {b['width']}, {b['examples']} examples)",
            "",
            "| config | median ms | ratio | forward ms | backward ms | optimizer ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, c in run_["configs"].items():
            lines.append(
                f"| {name} | {c['median_ms']:.1f} | {c['ratio']:.2f}x | {c['forward_ms']:.1f} "
                f"| {c['backward_ms']:.1f} | {c['optimizer_ms']:.1f} |"
            )
        modules = sorted({m for bd in run_["hook_ms_by_module"].values() for m in bd})
        lines += ["", "Per-sample hook time per step (ms, median), by module:", ""]
        lines.append("| config | " + " | ".join(modules) + " |")
        lines.append("|---|" + "---:|" * len(modules))
        for name, bd in run_["hook_ms_by_module"].items():
            lines.append(f"| {name} | " + " | ".join(f"{bd.get(m, 0.0):.1f}" for m in modules) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Grouped bars: ratio of every configuration, one group per catalogue size, with the 2x target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs[0]["configs"])
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, run_ in enumerate(runs):
        ratios = [run_["configs"][n]["ratio"] for n in names]
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, ratios, width, label=f"{run_['n_items']} items")
        for x, r in zip(xs, ratios, strict=True):
            ax.text(x, r + 0.03, f"{r:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(result["target_ratio"], color="#c0392b", linestyle="--", linewidth=1, label="target 2x")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("step time / non-private step")
    ax.set_title(
        f"RIB DP-SGD step cost ({result['dataset']} windows, {result['threads']} thread)", fontsize=10
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", default="jdata2016_sample", help="open_dataset name; falls back to synthetic"
    )
    parser.add_argument(
        "--min-item-support", type=int, default=1, help="1 keeps every item (a bigger catalogue)"
    )
    parser.add_argument(
        "--n-items",
        type=int,
        nargs="+",
        default=[0, 20000],
        help="model catalogue sizes (0: the dataset's own)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--item-dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and autocast notices
    data, dataset_name = load_data(args.dataset, args.min_item_support)
    result = {
        "benchmark": "dp_step",
        "dataset": dataset_name,
        "windows": len(WindowDataset(data, args.max_len)),
        "batch_size": args.batch_size,
        "item_dim": args.item_dim,
        "hidden_dim": args.hidden,
        "noise_multiplier": NOISE,
        "max_grad_norm": CLIP,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "target_ratio": 2.0,
        "runs": [run(args, data, dataset_name, n) for n in args.n_items],
        "env": {
            "torch": torch.__version__,
            "opacus": opacus.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
    }
    result["summary"] = {
        str(r["n_items"]): {n: c["ratio"] for n, c in r["configs"].items()} for r in result["runs"]
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_step.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "dp_step.md").write_text(table)
    plot(result, args.out / "dp_step.png")
    print(json.dumps(result, indent=2))
    print(table)


if __name__ == "__main__":
    main()
