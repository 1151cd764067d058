"""Validation-only RIB probe: train for a fixed wall-clock budget, report validation Recall@20 / MRR@20 per epoch.

    python -m experiments.rib_probe --dataset srgnn_diginetica --minutes 10 \
        --rib '{"cosine_scale": 12.0}' [--train '{"lr": 0.003}'] [--out probe.json]

Starts from the settings ``rib-edge bench accuracy`` uses for the dataset (experiments/accuracy.py), without the
Word2vec init and with a 5,000-example validation sample, then applies the overrides. The validation split
is carved from the end of the training period, so probing never looks at the test split. Run probes side by
side (one thread each) so they share the box equally: the budget is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.accuracy import AccuracySettings, rib_settings
from model.data.loaders import load_dataset
from model.train import TrainConfig, rib_config_for, train_rib


def main() -> None:
    """Parse arguments, train, print (and optionally write) the per-epoch validation figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--data-type", default="SKU")
    parser.add_argument("--rib", default="{}", help="RIBConfig overrides (JSON)")
    parser.add_argument("--train", default="{}", help="TrainConfig overrides (JSON)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    split = load_dataset(args.dataset)
    rib, tc = rib_settings(split.train, AccuracySettings())
    tc.update(
        w2v_init=False, val_max_examples=5000, max_train_seconds=args.minutes * 60, epochs=30, patience=3
    )
    tc.update(json.loads(args.train))
    rib.update(json.loads(args.rib))
    config = rib_config_for(split.train, args.data_type, **rib)
    _, history = train_rib(split.train, config, TrainConfig(**tc), progress=False)
    keys = ("epoch", "train_seconds", "train_loss", "val_recall@20", "val_mrr@20")
    result = {
        "dataset": args.dataset,
        "rib": rib,
        "train": tc,
        "best_val_recall@20": history["best_val_recall@20"],
        "best_epoch": history["best_epoch"],
        "epochs": [{k: e.get(k) for k in keys} for e in history["epochs"]],
    }
    print(json.dumps(result, default=float))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
