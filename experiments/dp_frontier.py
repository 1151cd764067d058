"""Utility vs membership leakage across DP-SGD settings: Recall@20 against attack AUC, from dp_audit runs.

Run by path (opacus ships a top-level ``benchmarks`` package that shadows this directory)::

    python -m experiments.dp_frontier AUDIT_JSON [AUDIT_JSON ...] [--out DIR]

Each input is a ``dp_audit.json`` written by ``experiments/dp_audit.py`` (any epsilons, any clip norm). Every
row of every input becomes one point (epsilon, clip C, test Recall@20, loss-attack AUC, LiRA-offline AUC).
Writes ``frontier.md`` and ``frontier.png`` (Recall@20 on x, AUC on y: down and right is better) to ``--out``
(default ``benchmarks/results/security/clip_sweep``). Why it exists: at a fixed epsilon the clip norm C still
moves a model along the utility / leakage curve (the epsilon bounds the worst case, not what a real
session's gradient reveals), so the target "AUC <= 0.55 at epsilon <= 8" is a point to look for on this curve.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from experiments.paths import RESULTS

OUT = RESULTS / "security" / "clip_sweep"


def _epsilon(value: object) -> float:
    return math.inf if value in ("inf", math.inf) else float(value)  # type: ignore[arg-type]


def _fmt_eps(epsilon: float) -> str:
    return "∞" if math.isinf(epsilon) else f"{epsilon:g}"


def frontier_rows(audits: list[dict[str, object]]) -> list[dict[str, object]]:
    """One point per audited (epsilon, clip) pair, ordered by Recall@20."""
    points = []
    for result in audits:
        clip = float(result["config"]["max_grad_norm"])  # type: ignore[index]
        for row in result["rows"]:  # type: ignore[union-attr]
            epsilon = _epsilon(row["epsilon"])
            points.append(
                {
                    "dataset": result["dataset"],
                    "epsilon": epsilon,
                    "max_grad_norm": None if math.isinf(epsilon) else clip,
                    "test_recall@20": float(row["test_recall@20"]),
                    "auc_loss": float(row["auc_loss"]),
                    "auc_loss_ci": row["auc_loss_ci"],
                    "auc_shadow": float(row["auc_shadow"]),
                    "auc_shadow_ci": row["auc_shadow_ci"],
                    "n_boot": int(result["config"]["n_boot"]),  # type: ignore[index]
                }
            )
    if len({p["dataset"] for p in points}) > 1:
        raise ValueError(f"one dataset per frontier, got {sorted({str(p['dataset']) for p in points})}")
    return sorted(points, key=lambda p: (p["test_recall@20"], p["epsilon"]))


def markdown(points: list[dict[str, object]], target: float = 0.55) -> str:
    """The points as a table; a point meets the target when both attacks stay at or under it."""
    lines = [
        "| ε | clip C | Recall@20 | AUC loss [95% CI] | AUC shadow (LiRA offline) [95% CI] | both ≤ target |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        eps = _fmt_eps(p["epsilon"])  # type: ignore[arg-type]
        clip = "-" if p["max_grad_norm"] is None else f"{p['max_grad_norm']:g}"
        lo, hi = p["auc_loss_ci"]  # type: ignore[misc]
        slo, shi = p["auc_shadow_ci"]  # type: ignore[misc]
        ok = max(p["auc_loss"], p["auc_shadow"]) <= target  # type: ignore[type-var]
        lines.append(
            f"| {eps} | {clip} | {p['test_recall@20']:.4f} | {p['auc_loss']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{p['auc_shadow']:.3f} [{slo:.3f}, {shi:.3f}] | {'yes' if ok else 'no'} |"
        )
    return "\n".join(lines)


def plot(points: list[dict[str, object]], path: Path, target: float = 0.55) -> None:
    """Recall@20 vs AUC of both attacks, each point labelled with its (epsilon, C)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    xs = [p["test_recall@20"] for p in points]
    for key, label, marker in (
        ("auc_loss", "loss threshold", "o"),
        ("auc_shadow", "shadow (LiRA offline)", "s"),
    ):
        ax.scatter(xs, [p[key] for p in points], marker=marker, label=label)
    for i, p in enumerate(points):
        text = f"ε={_fmt_eps(p['epsilon'])}"  # type: ignore[arg-type]
        text += "" if p["max_grad_norm"] is None else f", C={p['max_grad_norm']:g}"
        # neighbours in recall (e.g. C = 1 and 5 at one epsilon) alternate above / below their point
        offset = (3, 4) if i % 2 == 0 else (3, -11)
        ax.annotate(
            text,
            (p["test_recall@20"], p["auc_shadow"]),
            fontsize=7,
            xytext=offset,
            textcoords="offset points",
        )
    ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target AUC {target}")
    ax.axhline(0.5, color="black", linewidth=0.6)
    ax.set_xlabel("test Recall@20 (higher is better)")
    ax.set_ylabel("membership attack AUC (lower is better)")
    ax.set_title(f"DP-SGD utility vs leakage: {points[0]['dataset']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Read the audits, write frontier.md / frontier.json / frontier.png, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("audits", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    audits = []
    for path in args.audits:
        try:
            audits.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            sys.exit(f"cannot read audit {path}: {exc}")
    points = frontier_rows(audits)
    args.out.mkdir(parents=True, exist_ok=True)
    boots = sorted({int(p["n_boot"]) for p in points})  # type: ignore[call-overload]
    text = (
        f"# DP-SGD utility vs membership leakage: {points[0]['dataset']}\n\n"
        "One point per audited (ε, clip C), from `experiments/dp_audit.py` runs (`--max-grad-norm C`), ordered "
        f"by test Recall@20; intervals are percentile bootstraps ({'/'.join(map(str, boots))} resamples). "
        "Target: both attacks' AUC ≤ 0.55.\n\n" + markdown(points)
    )
    (args.out / "frontier.md").write_text(text + "\n")
    serial = [{**p, "epsilon": "inf" if math.isinf(p["epsilon"]) else p["epsilon"]} for p in points]  # type: ignore[arg-type]
    (args.out / "frontier.json").write_text(json.dumps(serial, indent=1) + "\n")
    plot(points, args.out / "frontier.png")
    print(text)
    return points


if __name__ == "__main__":
    main()
