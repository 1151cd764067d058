"""Collect every benchmarks/results/*/baselines.json into one table (markdown + JSON) and one plot (PNG)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(results: Path = RESULTS) -> None:
    """Write baselines_summary.{md,json,png} under ``results``."""
    runs = {}
    for path in sorted(results.glob("*/baselines.json")):
        payload = json.loads(path.read_text())
        runs[path.parent.name] = payload
    if not runs:
        sys.exit(f"no baselines.json under {results}")
    models = list(dict.fromkeys(row["model"] for payload in runs.values() for row in payload["rows"]))
    lines = [
        "# Baselines on every dataset: Recall@20 / MRR@20",
        "",
        "Each cell: Recall@20 / MRR@20 over every test prefix (95% bootstrap intervals in each dataset's baselines.md).",
        "",
        "| dataset | test examples | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    summary = {}
    for name, payload in runs.items():
        by_model = {row["model"]: row for row in payload["rows"]}
        best = max(by_model.values(), key=lambda r: r["recall@20"])["model"]
        cells = []
        for model in models:
            row = by_model.get(model)
            if row is None:
                cells.append("")
                continue
            cell = f"{row['recall@20']:.3f} / {row['mrr@20']:.3f}"
            cells.append(f"**{cell}**" if model == best else cell)
        examples = (payload.get("test") or {}).get("examples", "?")
        lines.append(f"| {name} | {examples} | " + " | ".join(cells) + " |")
        summary[name] = {m: {"recall@20": r["recall@20"], "mrr@20": r["mrr@20"]} for m, r in by_model.items()}
    (results / "baselines_summary.md").write_text("\n".join(lines) + "\n")
    (results / "baselines_summary.json").write_text(json.dumps(summary, indent=2))
    _plot(summary, models, results / "baselines_summary.png")
    print("\n".join(lines))


def stats_summary(results: Path = RESULTS) -> str:
    """One markdown table of every stats/*/stats.json: counts, dwell edges and conversion by dwell."""
    lines = [
        "# Section-3 statistics on every dataset",
        "",
        "Counts after the protocol (train + test). Conversion: share of tuples whose item converts (cart/order)",
        "later in the session, by dwell bucket (lowest bucket -> highest, then unknown).",
        "",
        "| dataset | sessions | visits | tuples | items | activities | dwell edges (s) | conversion by dwell bucket |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted((results / "stats").glob("*/stats.json")):
        stats = json.loads(path.read_text())
        counts = stats["counts"]
        total = {k: counts["train"][k] + counts["test"][k] for k in ("sessions", "visits", "tuples")}
        items = counts.get("n_items_vocab", counts["train"]["items"])
        activities = (
            len(stats["activity"]["by_activity"]) if isinstance(stats.get("activity"), dict) else "n/a"
        )
        dwell = stats.get("dwell") or {}
        edges = ", ".join(f"{e:g}" for e in dwell.get("edges_s", [])) or "n/a"
        by_dwell = ((stats.get("conversion") or {}).get("by_dwell")) or {}
        rates = (
            " / ".join("-" if v["rate"] is None else f"{100 * v['rate']:.1f}%" for v in by_dwell.values())
            or "n/a"
        )
        lines.append(
            f"| {path.parent.name} | {total['sessions']:,} | {total['visits']:,} | {total['tuples']:,} | {items:,} | {activities} | {edges} | {rates} |"
        )
    text = "\n".join(lines) + "\n"
    (results / "stats" / "summary.md").write_text(text)
    return text


def _plot(summary: dict, models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(names) + 2.5), sharey=True)
    y = np.arange(len(names))
    height = 0.8 / len(models)
    for axis, metric in zip(axes, ("recall@20", "mrr@20"), strict=True):
        for i, model in enumerate(models):
            values = [summary[n].get(model, {}).get(metric, np.nan) for n in names]
            axis.barh(y + i * height, values, height, label=model)
        axis.set_title(metric)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y + 0.4 - height / 2, names)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Session baselines through the one evaluator (every test prefix -> next item)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
    print(stats_summary())
