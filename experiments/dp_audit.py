"""Membership-inference audit of RIB with and without DP-SGD (issue 8, item 6): attack AUC at each epsilon.

Run by path (opacus ships a top-level ``benchmarks`` package that shadows this directory)::

    python -m experiments.dp_audit [--dataset jdata2016_sample] [--epsilons 1,4,8,inf]
        [--shadows 4] [--epochs 15] [--lr 0.003] [--batch-size 32] [--max-grad-norm 1.0] [--seed 0]

The protocol is ``experiments.audit.audit`` (loss-threshold and offline-LiRA shadow attacks on sessions; epsilon
cross-checked with dp_accounting). Without ../shared/data the dataset falls back to "synthetic". Writes
``dp_audit.json``, ``dp_audit.md`` (the table, also printed) and ``dp_audit.png`` (AUC vs epsilon with
95% intervals) to ``--out`` (default ``benchmarks/results/security``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

from experiments.paths import RESULTS

OUT = RESULTS / "security"
DEFAULT_DATASET = "jdata2016_sample"


def _shared_data_available() -> bool:
    from model.data.loaders import default_data_dir

    return (default_data_dir() / "README.md").exists()


def _jsonable(value: object) -> object:
    """Non-finite floats as the strings "inf" / "-inf" / "nan" (strict JSON has no Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fmt_eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:g}"


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return "∞" if math.isinf(value) else f"{value:.{digits}f}"


def table(result: dict[str, object]) -> str:
    """The markdown table of the audit's rows."""
    headers = [
        "ε (target)", "σ", "steps", "q", "δ", "ε reported (Opacus RDP)", "ε dp_accounting RDP",
        "ε dp_accounting PLD", "Recall@20", "loss members / non-members", "AUC loss [95% CI]",
        "AUC shadow (LiRA offline) [95% CI]", "AUC bound from (ε, δ)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in result["rows"]:  # type: ignore[union-attr]
        lo, hi = r["auc_loss_ci"]
        slo, shi = r["auc_shadow_ci"]
        cells = [
            _fmt_eps(r["epsilon"]),
            _fmt(r["noise_multiplier"]),
            str(r["steps"]),
            _fmt(r["sample_rate"]),
            "-" if r["delta"] is None else f"{r['delta']:.2e}",
            _fmt(r["epsilon_reported"], 2),
            _fmt(r["epsilon_dp_accounting"], 2),
            _fmt(r["epsilon_pld"], 2),
            _fmt(r["test_recall@20"], 4),
            f"{r['loss_members']:.2f} / {r['loss_nonmembers']:.2f}",
            f"{r['auc_loss']:.3f} [{lo:.3f}, {hi:.3f}]",
            f"{r['auc_shadow']:.3f} [{slo:.3f}, {shi:.3f}]",
            _fmt(r["auc_bound"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    s = result["sessions"]
    verdict = "met" if result["target_met"] else "NOT met"
    lo, hi = result["null_control_auc_loss_one_split_ci"]  # type: ignore[misc]
    lines += [
        "",
        "Per target (A trains on half A, B on half B; the table reports their mean): AUC loss / AUC shadow "
        + "; ".join(
            f"ε={_fmt_eps(r['epsilon'])}: "
            + ", ".join(f"{t['auc_loss']:.3f} / {t['auc_shadow']:.3f}" for t in r["per_target"])
            for r in result["rows"]  # type: ignore[union-attr]
        )
        + f". Null control (untrained model, one split): AUC loss {result['null_control_auc_loss_one_split']:.3f} "
        f"[{lo:.3f}, {hi:.3f}].",
        "",
        f"Dataset {result['dataset']}: {s['members']} member / {s['nonmembers']} non-member sessions "  # type: ignore[index]
        f"per target, {s['targets']} targets with roles swapped (shadow pool {s['shadow_pool']}, "
        f"{result['config']['n_shadows']} shadows on "  # type: ignore[index]
        f"{s['shadow_train']} each); one session = one window = one DP record (first "  # type: ignore[index]
        f"{result['config']['max_len']} tuples). Target: attack AUC ≤ {result['auc_target']} at ε ≤ 8: "  # type: ignore[index]
        f"**{verdict}**. Wall time {result['seconds']:.0f} s.",
    ]
    if result["config"].get("item_catalog"):  # type: ignore[union-attr]
        lines.append(
            "\nModel: item embeddings are the dataset's public catalog vectors (`model/catalog.py`), kept "
            "fixed, and items are scored against them (tied output); only the rest of RIB trains (`--catalog`)."
        )
    return "\n".join(lines)


def plot(result: dict[str, object], path: Path) -> None:
    """AUC of both attacks vs epsilon with 95% intervals; inf drawn at the right edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]  # type: ignore[assignment]
    finite = [r["epsilon"] for r in rows if not math.isinf(r["epsilon"])]
    inf_x = 2 * max(finite) if finite else 1.0
    xs = [inf_x if math.isinf(r["epsilon"]) else r["epsilon"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, shift, marker in (
        ("auc_loss", "loss threshold", 0.97, "o"),
        ("auc_shadow", "shadow (LiRA offline)", 1.03, "s"),
    ):
        ys = [r[key] for r in rows]
        lo = [r[key] - r[f"{key}_ci"][0] for r in rows]
        hi = [r[f"{key}_ci"][1] - r[key] for r in rows]
        ax.errorbar([x * shift for x in xs], ys, yerr=[lo, hi], marker=marker, capsize=3, label=label)
    bound_x = [x for x, r in zip(xs, rows, strict=True) if not math.isinf(r["epsilon"])]
    bound_y = [min(1.0, r["auc_bound"]) for r in rows if not math.isinf(r["epsilon"])]
    ax.plot(bound_x, bound_y, ":", color="grey", label="max AUC allowed by (ε, δ)")
    ax.axhline(
        result["auc_target"], color="red", linestyle="--", linewidth=1, label=f"target {result['auc_target']}"
    )
    ax.axhline(0.5, color="black", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xticks(xs, [_fmt_eps(r["epsilon"]) for r in rows])
    ax.minorticks_off()
    ax.set_xlabel("ε (record = one session)")
    ax.set_ylabel("membership attack AUC")
    ax.set_ylim(0.4, 1.02)
    ax.set_title(f"RIB membership inference, {result['dataset']}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Parse arguments, run the audit, write json / md / png."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--epsilons", default="1,4,8,inf")
    parser.add_argument("--shadows", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=15.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD per-window clip C")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--catalog",
        action="store_true",
        help="Item embeddings from the dataset's public catalog (model/catalog.py), kept fixed, output tied to them.",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # shared cores; every timing in the result is single-threaded
    import warnings

    warnings.filterwarnings("ignore", message="Optimal order")  # valid, looser bound at the order grid's edge
    warnings.filterwarnings("ignore", message="Secure RNG")
    warnings.filterwarnings("ignore", message="Full backward hook")

    from experiments.audit import AuditConfig, audit, target_met
    from model.data.open import SYNTHETIC, open_dataset

    dataset = args.dataset
    if dataset != SYNTHETIC and not _shared_data_available():
        print(f"shared data not found: falling back from {dataset} to {SYNTHETIC}")
        dataset = SYNTHETIC
    epsilons = [math.inf if e.strip() in ("inf", "∞") else float(e) for e in args.epsilons.split(",")]
    config = AuditConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_grad_norm=args.max_grad_norm,
        n_shadows=args.shadows,
        n_boot=args.n_boot,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.catalog:
        from model.catalog import dataset_catalog

        # Outside --out: the catalog is the dataset's own data, which the repository never copies.
        catalog_path = dataset_catalog(dataset, seed=args.seed).write_csv(
            Path(tempfile.mkdtemp(prefix="rib-edge-audit-")) / "item-catalog.csv"
        )
        config = dataclasses.replace(
            config, item_catalog=str(catalog_path), tie_output=True, freeze_items=True
        )
    started = time.perf_counter()
    split = open_dataset(dataset)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {}
    # One epsilon at a time (the split, shadows' halves and seeds do not depend on it), written after each,
    # so an interrupted run keeps what it finished.
    for i, epsilon in enumerate(epsilons):
        part = audit(split, [epsilon], config, progress=lambda msg: print(msg, flush=True))
        if not result:
            result = part
        else:
            result["rows"] = [*result["rows"], *part["rows"]]  # type: ignore[misc]
            # Over all rows so far: a part holding only eps = inf audits nothing and must not decide it.
            result["target_met"] = target_met(result["rows"])  # type: ignore[arg-type]
        result["dataset"] = dataset
        result["complete"] = i + 1 == len(epsilons)
        result["seconds"] = result["wall_seconds"] = time.perf_counter() - started
        result["machine"] = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),  # the cores are shared: wall times depend on it
        }
        (args.out / "dp_audit.json").write_text(
            json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n"
        )
        text = table(result)
        (args.out / "dp_audit.md").write_text(text + "\n")
        plot(result, args.out / "dp_audit.png")
    print(text)
    return result


if __name__ == "__main__":
    main()
