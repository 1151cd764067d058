"""Case study like the paper's Figure 8: RIB's attention over the tuples of one test session.

For one test session, the prefix before its last product visit is fed to each given RIB checkpoint (one
per data type: SKU, SKU+Activity, SKU+Dwell, SKU+Micro); the attention weight of every
(item, activity, dwell bucket) tuple is written as text/JSON and drawn as a heat map (rows = data types,
columns = tuples), together with the rank the model gives the true next item (1 = first of the catalogue).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.data.dataset import SessionDataset

DATA_TYPE_ORDER = ("SKU", "SKU+Activity", "SKU+Dwell", "SKU+Micro")
ROW_LABELS = {"SKU": "SKU", "SKU+Activity": "+Activity", "SKU+Dwell": "+Dwell", "SKU+Micro": "+Micro"}


def session_prefix(test: SessionDataset, session: int) -> tuple[int, int, int]:
    """(start, end, target) of the session's last example: tuples [start, end) predict item ``target``."""
    if not 0 <= session < test.n_sessions:
        raise ValueError(f"session {session} out of range: the test split has {test.n_sessions} sessions")
    examples = test.examples()
    mine = np.flatnonzero(examples.session_index == session)
    if len(mine) == 0:
        raise ValueError(f"test session {session} has a single product visit: nothing to predict")
    k = int(mine[-1])
    return int(examples.starts[k]), int(examples.ends[k]), int(examples.targets[k])


def pick_session(test: SessionDataset, min_tuples: int = 6, max_tuples: int = 14) -> int:
    """A readable example: a test session whose last prefix has min..max tuples, several products (up to 5
    count), then the most distinct activities and dwell buckets."""
    examples = test.examples()
    best, best_key = -1, None
    last = {}
    for k, s in enumerate(examples.session_index):
        last[int(s)] = k
    for s, k in last.items():
        n = int(examples.ends[k] - examples.starts[k])
        if not min_tuples <= n <= max_tuples:
            continue
        window = slice(int(examples.starts[k]), int(examples.ends[k]))
        key = (
            min(len(set(test.items[window].tolist())), 5),  # several products first
            len(set(test.activities[window].tolist())),
            len(set(test.dwell_buckets[window].tolist())),
            -s,
        )
        if best_key is None or key > best_key:
            best, best_key = s, key
    if best < 0:
        raise ValueError(f"no test session with a last prefix of {min_tuples}-{max_tuples} tuples")
    return best


def tuple_labels(test: SessionDataset, start: int, end: int) -> list[dict[str, object]]:
    """(item id, activity name, dwell bucket label) of tuples [start, end)."""
    vocab = test.vocab
    dwell_labels = vocab.dwell.labels()
    out = []
    for t in range(start, end):
        item = int(test.items[t])
        bucket = int(test.dwell_buckets[t])
        out.append(
            {
                "item": str(vocab.item_ids[item - 1]),
                "item_index": item,
                "activity": vocab.activities.names[int(test.activities[t])] if test.has_activity else "-",
                "dwell": (dwell_labels[bucket] if bucket < len(dwell_labels) else str(bucket))
                if test.has_dwell
                else "-",
            }
        )
    return out


def case_study(
    test: SessionDataset, checkpoints: Sequence[str | Path], session: int | None = None
) -> dict[str, object]:
    """Attention weights and target ranks of each checkpoint on one test session's last prefix."""
    import torch

    from model.evaluate import target_ranks
    from model.train import load_checkpoint

    session = pick_session(test) if session is None else session
    start, end, target = session_prefix(test, session)
    rows = []
    for path in checkpoints:
        rec = load_checkpoint(path, device="cpu")
        config = rec.rib_config
        if config.n_items != test.n_items:
            raise ValueError(f"{path}: checkpoint has {config.n_items} items, the data {test.n_items}")
        if not config.use_attention:
            raise ValueError(f"{path}: RIB-Attention (no attention layer) has no weights to show")
        lo = max(start, end - config.max_len)  # what the model looks at
        window = slice(lo, end)
        tensors = [
            torch.from_numpy(np.asarray(a[window], dtype=np.int64))[None, :]
            for a in (test.items, test.activities, test.dwell_buckets)
        ]
        mask = torch.ones(1, end - lo, dtype=torch.bool)
        rec.model.eval()
        with torch.no_grad():
            weights = rec.model.attention_weights(*tensors, mask)[0].numpy().astype(float)
            scores = rec.model(*tensors, mask).numpy()
        rank = int(target_ranks(scores, np.array([target]))[0])
        full = np.zeros(end - start)
        full[lo - start :] = weights
        rows.append(
            {
                "data_type": config.data_type,
                "checkpoint": str(path),
                "weights": [round(float(w), 6) for w in full],
                "target_rank": rank,
            }
        )
    rows.sort(key=lambda r: DATA_TYPE_ORDER.index(r["data_type"]))
    return {
        "session": int(session),
        "session_id": str(test.session_ids[session]),
        "tuples": tuple_labels(test, start, end),
        "target": {"item": str(test.vocab.item_ids[target - 1]), "item_index": target},
        "rows": rows,
    }


def case_study_text(study: dict[str, object]) -> str:
    """One block per data type: every tuple with its attention weight, and the target's rank."""
    lines = [
        f"test session {study['session']} (id {study['session_id']}), true next item {study['target']['item']}",
        "",
    ]
    for row in study["rows"]:
        lines.append(f"{row['data_type']}: rank of the true next item = {row['target_rank']}")
        for t, (tup, w) in enumerate(zip(study["tuples"], row["weights"], strict=True)):
            lines.append(
                f"  {t + 1:2d}. item {tup['item']:>10s}  {tup['activity']:<16s} dwell {tup['dwell']:<12s} {w:.3f} {'#' * int(round(w * 40))}"
            )
        lines.append("")
    return "\n".join(lines)


def plot_case_study(study: dict[str, object], path: Path) -> Path:
    """Heat map like Figure 8: rows = data types, columns = tuples; weights annotated in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study["rows"]
    tuples = study["tuples"]
    weights = np.array([r["weights"] for r in rows])
    n_cols = len(tuples)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.05 * n_cols + 2.5), 1.0 * len(rows) + 2.6))
    image = ax.imshow(weights, cmap="Reds", vmin=0.0, vmax=max(0.05, float(weights.max())), aspect="auto")
    ax.set_yticks(
        range(len(rows)),
        [f"{ROW_LABELS[r['data_type']]}\n(rank {r['target_rank']})" for r in rows],
        fontsize=10,
    )
    column_labels = [f"{t['item']}\n{t['activity']}\n{t['dwell']}" for t in tuples]
    ax.set_xticks(range(n_cols), column_labels, fontsize=8)
    ax.xaxis.tick_top()
    for i in range(weights.shape[0]):
        for j in range(n_cols):
            value = weights[i, j]
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if value > 0.6 * weights.max() else "black",
            )
    ax.set_xlabel(
        f"tuples of test session {study['session']} (item / activity / dwell bucket), oldest first; true next item {study['target']['item']}",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01, label="attention weight")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_case_study(study: dict[str, object], out_dir: Path) -> dict[str, Path]:
    """``case_study.json``, ``case_study.txt`` and ``case_study.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "case_study.json",
        "text": out_dir / "case_study.txt",
        "png": out_dir / "case_study.png",
    }
    paths["json"].write_text(json.dumps(study, indent=2))
    paths["text"].write_text(case_study_text(study))
    plot_case_study(study, paths["png"])
    return paths
