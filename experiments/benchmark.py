"""Benchmarks that compare recommenders through the one evaluator and write JSON + markdown."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from model.data.dataset import SplitData
from model.evaluate import EvalResult, evaluate
from model.recommender import SessionRecommender

Progress = Callable[[str], None]
# Below this many test examples, or with a wider Recall@20 95 % interval, a bench's figures are mostly noise.
SMALL_TEST_EXAMPLES = 1000
SMALL_TEST_HALF_WIDTH = 0.05


def small_test(n_examples: int | None, rows: Sequence[dict] = ()) -> list[str]:
    """Why a test set is too small for its intervals to mean much (empty when it is not): fewer than
    ``SMALL_TEST_EXAMPLES`` examples, or some row's Recall@20 95 % interval wider than +-``SMALL_TEST_HALF_WIDTH``.
    Benches record ``"small_test"`` and these reasons in their JSON."""
    reasons = []
    if n_examples is not None and n_examples < SMALL_TEST_EXAMPLES:
        reasons.append(f"{n_examples} test examples (< {SMALL_TEST_EXAMPLES:,})")
    widths = [
        (float(row["recall@20_ci95"][1]) - float(row["recall@20_ci95"][0])) / 2
        for row in rows
        if row.get("recall@20_ci95")
    ]
    if widths and max(widths) > SMALL_TEST_HALF_WIDTH:
        reasons.append(f"a Recall@20 95% interval of +-{max(widths):.3f} (> +-{SMALL_TEST_HALF_WIDTH})")
    return reasons


def mark_small_test(payload: dict, n_examples: int | None, rows: Sequence[dict] = ()) -> list[str]:
    """Record ``small_test`` (and its reasons) in a bench's JSON object; returns the reasons."""
    reasons = small_test(n_examples, rows)
    payload["small_test"] = bool(reasons)
    payload["small_test_reasons"] = reasons
    return reasons


def run_models(
    split: SplitData,
    factories: dict[str, Callable[[], SessionRecommender]],
    progress: Progress | None = None,
    n_boot: int = 500,
    fitted: dict[str, SessionRecommender] | None = None,
) -> tuple[list[dict], dict[str, EvalResult]]:
    """Fit each model on train, evaluate on test, return result rows and the raw results.

    Keys of ``factories`` are labels; rows carry the model's own ``name`` and ``data_type`` (item-only
    models have none: the paper's 'SKU'). Fitted models are kept in ``fitted`` when it is given.
    """
    rows: list[dict] = []
    results: dict[str, EvalResult] = {}
    for name, factory in factories.items():
        if progress:
            progress(f"{name}: fitting on {split.train.n_sessions} sessions")
        started = time.perf_counter()
        model = factory().fit(split.train)
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result = evaluate(model, split.test)
        eval_seconds = time.perf_counter() - started
        results[name] = result
        if fitted is not None:
            fitted[name] = model
        row = {
            "model": model.name,
            "data_type": getattr(model, "data_type", "SKU"),
            **{k: round(v, 4) for k, v in result.metrics.items()},
        }
        for metric in ("recall@20", "mrr@20"):
            low, high = result.bootstrap_ci(metric, n_boot=n_boot)
            row[f"{metric}_ci95"] = [round(low, 4), round(high, 4)]
        row.update(
            train_seconds=round(fit_seconds, 2),
            eval_seconds=round(eval_seconds, 2),
            n_examples=result.n_examples,
        )
        rows.append(row)
        if progress:
            progress(
                f"{row['model']} ({row['data_type']}): recall@20 {row['recall@20']:.4f}  mrr@20 {row['mrr@20']:.4f}  ({fit_seconds:.1f}s fit, {eval_seconds:.1f}s eval)"
            )
    return rows, results


def markdown_table(
    rows: Sequence[dict],
    columns: Sequence[str] = (
        "model",
        "data_type",
        "recall@20",
        "mrr@20",
        "recall@10",
        "mrr@10",
        "coverage@20",
        "train_seconds",
    ),
) -> str:
    """A markdown table of result rows; 95% bootstrap intervals shown beside Recall/MRR@20."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            if isinstance(value, float):
                cell = f"{value:.4f}"
                ci = row.get(f"{column}_ci95")
                if ci:
                    cell += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
            else:
                cell = str(value)
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> dict[str, object]:
    """Where the numbers came from."""
    import os

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
    }


def write_bench(
    out_dir: Path, bench: str, dataset: str, split: SplitData, rows: list[dict], extra: dict | None = None
) -> tuple[Path, Path]:
    """Write ``DIR/<bench>.json`` (a ``rows`` list) and ``DIR/<bench>.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "bench": bench,
        "dataset": dataset,
        "protocol": split.info.get("protocol"),
        "train": split.info.get("train"),
        "test": split.info.get("test"),
        "environment": environment(),
        "rows": rows,
        **(extra or {}),
    }
    mark_small_test(payload, (split.info.get("test") or {}).get("examples"), rows)
    json_path = out_dir / f"{bench}.json"
    json_path.write_text(json.dumps(payload, indent=2))
    md_path = out_dir / f"{bench}.md"
    test = split.info.get("test") or {}
    header = f"# {bench}: {dataset}\n\nTest examples: {test.get('examples', '?')} (every prefix -> next item). Values: metric [95% bootstrap interval].\n\n"
    md_path.write_text(header + markdown_table(rows) + "\n")
    return json_path, md_path
