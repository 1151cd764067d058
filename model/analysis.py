"""Dataset statistics in the spirit of RIB Section 3: what the micro behaviors look like and how they convert.

``dataset_stats`` summarises a SplitData (counts, activity and dwell distributions, conversion rate by
activity and by dwell bucket, dwell-by-activity cross-tab); ``plot_stats`` draws the paper's Fig 2/4/5/6
analogues; ``write_stats`` does both into a folder; ``format_stats`` prints a compact text table.

Conversion follows the paper's Eq. (1): a tuple *converts* when its (session, item) pair has a conversion
activity (``vocab.activities.conversions``) at that tuple or later in the same session. The rate of an
activity (or dwell bucket) is converted tuples / all tuples of it. "Ends with ordering" is the same with
only order-like activities (Order/buy/purchase) counting, which is the paper's literal definition.
Everything is computed on the protocol's output (train + test), i.e. after rare-item and short-session
filters and after consecutive repeats of one activity within a visit were collapsed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from model.data.dataset import SessionDataset, SplitData

# Activity names that mean "ordered the product" (compared lower-case): RIB's Order, Taobao's buy, ...
ORDER_LIKE_NAMES = frozenset({"order", "orders", "buy", "purchase", "purchases"})
DWELL_QUANTILES = (0.1, 0.5, 0.9)


def order_activities(names: tuple[str, ...] | list[str]) -> list[str]:
    """Activities of a vocabulary that mean ordering (named like Order/buy/purchase)."""
    return [name for name in names if name.lower() in ORDER_LIKE_NAMES]


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def _rate(numerator: int, denominator: int) -> float | None:
    return float(numerator / denominator) if denominator else None


def _split_counts(dataset: SessionDataset) -> dict[str, int]:
    return {
        "sessions": dataset.n_sessions,
        "visits": dataset.n_visits,
        "tuples": dataset.n_tuples,
        "items": int(len(np.unique(dataset.items))),
        "examples": int(len(dataset.examples())),
    }


def converted_tuples(dataset: SessionDataset, target_activities: np.ndarray) -> np.ndarray:
    """Per tuple: does its (session, item) pair have one of ``target_activities`` at or after it?"""
    n = dataset.n_tuples
    if n == 0 or len(target_activities) == 0:
        return np.zeros(n, dtype=bool)
    position = np.arange(n, dtype=np.int64)
    key = dataset.session_of_tuple().astype(np.int64) * (dataset.n_items + 1) + dataset.items.astype(np.int64)
    is_target = np.isin(dataset.activities, target_activities)
    if not is_target.any():
        return np.zeros(n, dtype=bool)
    # Last target position per (session, item): unique on the reversed arrays keeps the last occurrence.
    target_keys, target_pos = key[is_target][::-1], position[is_target][::-1]
    keys, first = np.unique(target_keys, return_index=True)
    last_target = target_pos[first]
    slot = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
    return (keys[slot] == key) & (last_target[slot] >= position)


def _conversion_block(
    split: SplitData, targets: list[str], dwell_labels: list[str] | None
) -> dict[str, object]:
    """Conversion rate (Eq. 1) by activity and by dwell bucket, counting ``targets`` as conversion."""
    vocab = split.vocab.activities
    target_index = np.array([vocab.index(name) for name in targets], dtype=np.int16)
    parts = (split.train, split.test)
    converted = np.concatenate([converted_tuples(ds, target_index) for ds in parts])
    activities = np.concatenate([ds.activities for ds in parts]).astype(np.int64)
    n_act = len(vocab)
    tuples_by_act = np.bincount(activities, minlength=n_act)
    conv_by_act = np.bincount(activities, weights=converted, minlength=n_act).astype(np.int64)
    by_activity = {
        name: {
            "tuples": int(tuples_by_act[a]),
            "converted": int(conv_by_act[a]),
            "rate": _rate(conv_by_act[a], tuples_by_act[a]),
        }
        for a, name in enumerate(vocab.names)
    }
    block: dict[str, object] = {
        "targets": list(targets),
        "overall": {
            "tuples": int(len(converted)),
            "converted": int(converted.sum()),
            "rate": _rate(converted.sum(), len(converted)),
        },
        "by_activity": by_activity,
        "by_dwell": None,
    }
    if dwell_labels is not None:
        buckets = np.concatenate([ds.dwell_buckets for ds in parts]).astype(np.int64)
        starts = np.concatenate([ds.visit_starts for ds in parts])
        k = len(dwell_labels)
        tuples_b = np.bincount(buckets, minlength=k)
        conv_b = np.bincount(buckets, weights=converted, minlength=k).astype(np.int64)
        # Visit-level view as well: a visit with many tuples (e.g. view + cart) otherwise weighs more.
        visits_b = np.bincount(buckets[starts], minlength=k)
        vconv_b = np.bincount(buckets[starts], weights=converted[starts], minlength=k).astype(np.int64)
        block["by_dwell"] = {
            label: {
                "bucket": b,
                "tuples": int(tuples_b[b]),
                "converted": int(conv_b[b]),
                "rate": _rate(conv_b[b], tuples_b[b]),
                "visits": int(visits_b[b]),
                "visits_converted": int(vconv_b[b]),
                "visit_rate": _rate(vconv_b[b], visits_b[b]),
            }
            for b, label in enumerate(dwell_labels)
        }
    return block


def _activity_block(split: SplitData) -> dict[str, object]:
    names = split.vocab.activities.names
    train = np.bincount(split.train.activities.astype(np.int64), minlength=len(names))
    test = np.bincount(split.test.activities.astype(np.int64), minlength=len(names))
    total = int((train + test).sum())
    return {
        "unit": "tuples (train + test)",
        "total": total,
        "conversions": sorted(split.vocab.activities.conversions),
        "by_activity": {
            name: {
                "count": int(train[a] + test[a]),
                "share": _rate(train[a] + test[a], total),
                "train": int(train[a]),
                "test": int(test[a]),
            }
            for a, name in enumerate(names)
        },
    }


def _dwell_block(split: SplitData) -> dict[str, object]:
    dwell = split.vocab.dwell
    labels = dwell.labels()
    parts = (split.train, split.test)
    buckets = np.concatenate([ds.dwell_buckets for ds in parts]).astype(np.int64)
    starts = np.concatenate([ds.visit_starts for ds in parts])
    seconds = np.concatenate([ds.dwell_seconds for ds in parts]).astype(np.float64)[starts]
    known = seconds[np.isfinite(seconds)]
    tuples_b = np.bincount(buckets, minlength=len(labels))
    visits_b = np.bincount(buckets[starts], minlength=len(labels))
    n_tuples, n_visits = int(len(buckets)), int(starts.sum())
    quantiles = (
        {
            f"p{round(q * 100)}": float(v)
            for q, v in zip(DWELL_QUANTILES, np.quantile(known, DWELL_QUANTILES), strict=True)
        }
        if known.size
        else None
    )
    return {
        "edges_s": list(dwell.edges_s),
        "labels": labels,
        "buckets": [
            {
                "bucket": b,
                "label": label,
                "tuples": int(tuples_b[b]),
                "share": _rate(tuples_b[b], n_tuples),
                "visits": int(visits_b[b]),
                "visit_share": _rate(visits_b[b], n_visits),
            }
            for b, label in enumerate(labels)
        ],
        # Dwell belongs to a visit, so the seconds quantiles count each visit once.
        "seconds_quantiles": quantiles,
        "seconds_quantiles_unit": "visits with known dwell",
        "share_unknown": _rate(tuples_b[dwell.unknown], n_tuples),
        "share_unknown_visits": _rate(visits_b[dwell.unknown], n_visits),
        "max_dwell_s": split.info.get("protocol", {}).get("max_dwell_s"),
    }


def _dwell_by_activity_block(split: SplitData) -> dict[str, object]:
    """Fig 5/6 analogue: for each activity, how its tuples spread over the known dwell buckets."""
    dwell = split.vocab.dwell
    labels = dwell.labels()
    parts = (split.train, split.test)
    activities = np.concatenate([ds.activities for ds in parts]).astype(np.int64)
    buckets = np.concatenate([ds.dwell_buckets for ds in parts]).astype(np.int64)
    counts = np.zeros((len(split.vocab.activities), len(labels)), dtype=np.int64)
    np.add.at(counts, (activities, buckets), 1)
    known = counts[:, : dwell.n_buckets]
    rows: dict[str, object] = {}
    for a, name in enumerate(split.vocab.activities.names):
        n_known, n_all = int(known[a].sum()), int(counts[a].sum())
        rows[name] = {
            "tuples": n_all,
            "known": n_known,
            "counts": [int(c) for c in known[a]],
            "shares": [float(c / n_known) for c in known[a]] if n_known else None,
            "unknown_share": _rate(n_all - n_known, n_all),
        }
    return {
        "labels": labels[: dwell.n_buckets],
        "shares_over": "known dwell buckets of each activity",
        "rows": rows,
    }


def dataset_stats(split: SplitData) -> dict:
    """JSON-ready statistics of a split (RIB Section 3 analogue); missing fields are null with a note."""
    name = split.train.name.rsplit("/", 1)[0]
    has_activity, has_dwell = bool(split.train.has_activity), bool(split.train.has_dwell)
    conversions = [a for a in split.vocab.activities.names if split.vocab.activities.is_conversion(a)]
    orders = order_activities(split.vocab.activities.names)
    notes: dict[str, str] = {}
    stats: dict[str, object] = {
        "name": name,
        "has_activity": has_activity,
        "has_dwell": has_dwell,
        "has_time": bool(split.train.has_time),
        "counts": {
            "train": _split_counts(split.train),
            "test": _split_counts(split.test),
            "n_items_vocab": split.vocab.n_items,
        },
        "definitions": {
            "conversion": "share of tuples whose (session, item) pair has a conversion activity at or after that tuple "
            "in the same session (RIB Eq. 1); computed on train + test after the protocol's filters",
            "ordering": "the same, counting only order-like activities ("
            + ", ".join(sorted(ORDER_LIKE_NAMES))
            + ")",
            "visit_rate": "the same per product visit (macro interaction), judged from its first tuple",
        },
        "protocol": split.info.get("protocol"),
        "raw": split.info.get("raw"),
    }
    dwell_labels = split.vocab.dwell.labels() if has_dwell else None

    if has_activity:
        stats["activity"] = _activity_block(split)
    else:
        stats["activity"] = None
        notes["activity"] = "the dataset has no activity field (one activity only): no activity distribution"

    if has_dwell:
        stats["dwell"] = _dwell_block(split)
    else:
        stats["dwell"] = None
        notes["dwell"] = "the dataset has no dwell (no timestamps and no dwell column): no dwell distribution"

    if not has_activity:
        stats["conversion"] = stats["ordering"] = None
        notes["conversion"] = notes["ordering"] = "conversion needs activities; the dataset has none"
    elif not conversions:
        stats["conversion"] = None
        notes["conversion"] = "the activity vocabulary declares no conversion activities"
    else:
        stats["conversion"] = _conversion_block(split, conversions, dwell_labels)
    if has_activity:
        if orders:
            stats["ordering"] = _conversion_block(split, orders, dwell_labels)
        else:
            stats["ordering"] = None
            notes["ordering"] = "no activity named like Order/buy/purchase: 'ends with ordering' is undefined"

    if has_activity and has_dwell:
        stats["dwell_by_activity"] = _dwell_by_activity_block(split)
    else:
        stats["dwell_by_activity"] = None
        notes["dwell_by_activity"] = "needs both activities and dwell"
    stats["notes"] = notes
    return _jsonable(stats)


def _jsonable(value: object) -> object:
    """Plain Python types only, NaN/inf -> None, so json.dumps(allow_nan=False) always works."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    # A bare Figure with an Agg canvas: no pyplot, so no global backend switch and no leaked figures.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _short(count: int) -> str:
    if count >= 1_000_000:
        return f"{count / 1e6:.1f}M"
    if count >= 100_000:
        return f"{count / 1e3:.0f}k"
    return str(count)


def _percent_formatter():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=None)


def _fmt_rate(rate: float) -> str:
    # Rates of a few percent or less need a decimal, or everything small reads "0%".
    return f"{rate:.1%}" if 0 < rate < 0.1 else f"{rate:.0%}"


def _set_title(ax, title: str) -> None:
    # "dataset: what" -> two lines, so long dataset names never push the title off the canvas.
    head, _, what = title.partition(": ")
    ax.set_title(f"{head}\n{what}" if what else head, fontsize=10)


def _set_category_ticks(ax, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)))
    long = max((len(label) for label in labels), default=0) > 8 or len(labels) > 6
    ax.set_xticklabels(labels, rotation=35 if long else 0, ha="right" if long else "center")


def _bar_chart(
    path: Path,
    title: str,
    labels: list[str],
    values: list[float],
    notes: list[str],
    ylabel: str,
    percent: bool,
    colors: list[str] | None = None,
) -> Path:
    fig = _new_figure(max(5.5, 0.8 * len(labels) + 2.5), 4.2)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(labels)), values, color=colors or "tab:blue")
    top = max(values, default=0.0) or 1.0
    ax.set_ylim(0, top * 1.22)
    for bar, note in zip(bars, notes, strict=True):
        ax.annotate(
            note,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    _set_category_ticks(ax, labels)
    ax.set_ylabel(ylabel)
    if percent:
        ax.yaxis.set_major_formatter(_percent_formatter())
    _set_title(ax, title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(path)
    return path


def _grouped_rate_chart(
    path: Path, title: str, labels: list[str], series: list[tuple[str, list, list]], xlabel: str
) -> Path:
    """Bars of rates per category; ``series`` = (legend, rates, (numerator, denominator) pairs)."""
    fig = _new_figure(max(6.0, (0.55 + 0.45 * len(series)) * len(labels) + 2.5), 4.4)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    colors = ["tab:orange", "tab:red", "tab:purple"]
    for s, (legend, rates, fractions) in enumerate(series):
        xs = np.arange(len(labels)) + (s - (len(series) - 1) / 2) * width
        heights = [r if r is not None else 0.0 for r in rates]
        bars = ax.bar(xs, heights, width=width * 0.95, color=colors[s % len(colors)], label=legend)
        for bar, rate, (num, den) in zip(bars, rates, fractions, strict=True):
            text = "n/a" if rate is None else f"{_fmt_rate(rate)}\n{_short(num)}/{_short(den)}"
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                linespacing=0.95,
            )
    # Scale to the data (small rates stay visible), with headroom for annotations and legend.
    top = max((r for _, rates, _ in series for r in rates if r is not None), default=0.0) or 0.01
    ax.set_ylim(0, min(top, 1.0) * 1.32)
    ax.yaxis.set_major_formatter(_percent_formatter())
    if top >= 0.99:
        ax.set_yticks(np.linspace(0, 1, 6))
    _set_category_ticks(ax, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("conversion rate")
    _set_title(ax, title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper center", ncol=len(series), frameon=False)
    fig.savefig(path)
    return path


def _conversion_series(stats: dict, key: str, names: list[str]) -> list[tuple[str, list, list]]:
    """The conversion and (when it differs) ordering series for a by_activity / by_dwell table."""
    series = []
    blocks = [("conversion", stats.get("conversion")), ("ordering", stats.get("ordering"))]
    seen_targets: list[list[str]] = []
    for label, block in blocks:
        if not block or not block.get(key) or block["targets"] in seen_targets:
            continue
        seen_targets.append(block["targets"])
        rows = [block[key][n] for n in names]
        legend = ("ends with " if label == "ordering" else "converts to ") + "/".join(block["targets"])
        series.append((legend, [r["rate"] for r in rows], [(r["converted"], r["tuples"]) for r in rows]))
    return series


def plot_stats(stats: dict, out_dir: Path, title: str) -> list[Path]:
    """Draw the Section-3 style PNGs into ``out_dir``; plots whose field is missing are skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    activity, dwell = stats.get("activity"), stats.get("dwell")

    if activity:
        rows = activity["by_activity"]
        names = list(rows)
        paths.append(
            _bar_chart(
                out_dir / "activity_distribution.png",
                f"{title}: micro behaviors by activity (n={_short(activity['total'])})",
                names,
                [rows[n]["share"] or 0.0 for n in names],
                [f"{_short(rows[n]['count'])}\n{(rows[n]['share'] or 0):.1%}" for n in names],
                "share of tuples",
                percent=True,
                colors=["tab:red" if n in activity["conversions"] else "tab:blue" for n in names],
            )
        )

    if dwell:
        buckets = dwell["buckets"]
        q = dwell["seconds_quantiles"]
        qtext = f" (visit dwell p10/p50/p90 = {q['p10']:.0f}/{q['p50']:.0f}/{q['p90']:.0f}s)" if q else ""
        paths.append(
            _bar_chart(
                out_dir / "dwell_distribution.png",
                f"{title}: tuples by dwell bucket{qtext}",
                [b["label"] for b in buckets],
                [b["share"] or 0.0 for b in buckets],
                [f"{_short(b['tuples'])}\n{(b['share'] or 0):.1%}" for b in buckets],
                "share of tuples",
                percent=True,
                colors=["tab:blue"] * (len(buckets) - 1) + ["tab:gray"],
            )
        )

    conversion = stats.get("conversion") or stats.get("ordering")
    if conversion:
        present = [n for n, r in conversion["by_activity"].items() if r["tuples"] > 0]
        present.sort(key=lambda n: -(conversion["by_activity"][n]["rate"] or 0.0))
        series = _conversion_series(stats, "by_activity", present)
        paths.append(
            _grouped_rate_chart(
                out_dir / "conversion_by_activity.png",
                f"{title}: conversion rate by activity (Eq. 1, per tuple)",
                present,
                series,
                "activity",
            )
        )
        if conversion.get("by_dwell"):
            labels = [lab for lab, r in conversion["by_dwell"].items() if r["tuples"] > 0]
            series = _conversion_series(stats, "by_dwell", labels)
            paths.append(
                _grouped_rate_chart(
                    out_dir / "conversion_by_dwell.png",
                    f"{title}: conversion rate by dwell bucket (per tuple)",
                    labels,
                    series,
                    "dwell bucket of the visit",
                )
            )

    cross = stats.get("dwell_by_activity")
    if cross and any(row["shares"] is not None for row in cross["rows"].values()):
        paths.append(
            _heatmap(
                out_dir / "dwell_by_activity.png", f"{title}: dwell bucket by activity (row shares)", cross
            )
        )
    return paths


def _heatmap(path: Path, title: str, cross: dict) -> Path:
    rows = {name: row for name, row in cross["rows"].items() if row["shares"] is not None}
    labels = cross["labels"]
    names = list(rows)
    matrix = np.array([rows[n]["shares"] for n in names], dtype=float).reshape(len(names), len(labels))
    fig = _new_figure(max(6.0, 1.0 * len(labels) + 4.0), max(2.8, 0.5 * len(names) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(
        matrix, cmap="Blues", vmin=0.0, vmax=max(float(matrix.max(initial=0.0)), 1e-9), aspect="auto"
    )
    for i in range(len(names)):
        for j in range(len(labels)):
            value = matrix[i, j]
            dark = value > 0.6 * matrix.max(initial=0.0)
            ax.text(
                j, i, f"{value:.0%}", ha="center", va="center", fontsize=8, color="white" if dark else "black"
            )
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(
        [f"{n} (n={_short(rows[n]['known'])}, {rows[n]['unknown_share'] or 0:.0%} unknown)" for n in names],
        fontsize=8,
    )
    ax.set_xlabel("dwell bucket (known dwells only)")
    _set_title(ax, title)
    fig.colorbar(image, ax=ax, format=lambda y, _: f"{y:.0%}", shrink=0.9)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def write_stats(split: SplitData, out_dir: Path, name: str) -> dict:
    """Compute the stats, write ``out_dir/stats.json`` and the PNGs; return the stats."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = dataset_stats(split)
    stats["name"] = name
    stats["plots"] = [p.name for p in plot_stats(stats, out_dir, name)]
    tmp = out_dir / "stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2, allow_nan=False) + "\n")
    tmp.replace(out_dir / "stats.json")
    return stats


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.1%}"


def format_stats(stats: dict) -> str:
    """A compact human-readable text table of the stats (for the CLI)."""
    lines = [f"== {stats['name']} =="]
    header = f"{'split':<6}" + "".join(
        f"{k:>10}" for k in ("sessions", "visits", "tuples", "items", "examples")
    )
    lines.append(header)
    for split in ("train", "test"):
        c = stats["counts"][split]
        lines.append(
            f"{split:<6}"
            + "".join(f"{c[k]:>10}" for k in ("sessions", "visits", "tuples", "items", "examples"))
        )

    activity, conversion, ordering = stats.get("activity"), stats.get("conversion"), stats.get("ordering")
    if activity:
        width = max(12, *(len(n) for n in activity["by_activity"]))
        lines.append("")
        title = f"{'activity':<{width}} {'count':>9} {'share':>7}"
        if conversion:
            title += f" {'conv':>7} {'conv n/N':>15}"
        if ordering and (not conversion or ordering["targets"] != conversion["targets"]):
            title += f" {'order':>7}"
        lines.append(title)
        for name, row in activity["by_activity"].items():
            line = f"{name:<{width}} {row['count']:>9} {_pct(row['share']):>7}"
            if conversion:
                c = conversion["by_activity"][name]
                line += f" {_pct(c['rate']):>7} {str(c['converted']) + '/' + str(c['tuples']):>15}"
            if ordering and (not conversion or ordering["targets"] != conversion["targets"]):
                line += f" {_pct(ordering['by_activity'][name]['rate']):>7}"
            lines.append(line)
        if conversion:
            o = conversion["overall"]
            lines.append(
                f"conversion = {'/'.join(conversion['targets'])} on the same item later in the session; "
                f"overall {_pct(o['rate']).strip()} ({o['converted']}/{o['tuples']})"
            )

    dwell = stats.get("dwell")
    if dwell:
        lines.append("")
        lines.append(
            f"{'dwell':<12} {'tuples':>9} {'share':>7}"
            + (f" {'conv':>7} {'visit conv':>10}" if conversion else "")
        )
        for b in dwell["buckets"]:
            line = f"{b['label']:<12} {b['tuples']:>9} {_pct(b['share']):>7}"
            if conversion and conversion.get("by_dwell"):
                c = conversion["by_dwell"][b["label"]]
                line += f" {_pct(c['rate']):>7} {_pct(c['visit_rate']):>10}"
            lines.append(line)
        q = dwell["seconds_quantiles"]
        if q:
            lines.append(
                f"visit dwell seconds p10/p50/p90: {q['p10']:g} / {q['p50']:g} / {q['p90']:g}; "
                f"unknown {_pct(dwell['share_unknown_visits']).strip()} of visits"
            )
    for field_name, note in stats.get("notes", {}).items():
        lines.append(f"note [{field_name}]: {note}")
    return "\n".join(lines)
