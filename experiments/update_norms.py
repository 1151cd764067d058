"""How far an honest device's update moves the model: the evidence behind ``max-update-norm``'s default.

    python -m experiments.update_norms [--datasets synthetic,jdata2016_sample] [--devices 40]

For each dataset a population is built (``simulations.population``; by user for real logs), and every device
with data trains one round from the run's starting model (``federation.training.DeviceTrainer``, exactly
what a sampled device does) under each local-training setting this project uses: the run config's default
(Adam, 20 steps, lr 1e-3), the FedSGD recipe (SGD, 1 step, lr 1.0), the federated skip-gram stage (SGD, 5
steps, lr 1.0) and an aggressive Adam (50 steps, lr 1e-2). The L2 distance of each update from the starting
model is recorded (median, 90th percentile, max over devices).

Writes ``update_norms.json``, ``update_norms.md`` and ``update_norms.png`` under ``--out``.
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

OUT = RESULTS / "fl_validation"
LOCAL_SETTINGS = {
    "default (adam, 20 steps, lr 1e-3)": {},
    "FedSGD recipe (sgd, 1 step, lr 1.0)": {"local_steps": 1, "local_optimizer": "sgd", "local_lr": 1.0},
    "skip-gram stage (sgd, 5 steps, lr 1.0)": {"task": "word2vec", "local_steps": 5, "local_lr": 1.0},
    "aggressive adam (50 steps, lr 1e-2)": {"local_steps": 50, "local_lr": 1e-2},
}


def measure(dataset: str, devices: int, seed: int, work: Path) -> list[dict]:
    """One row per local setting: update norms over the population's devices."""
    import torch

    from aggregator.server_app import initial_weights
    from aggregator.validation import update_norm
    from federation.client_app import training_config
    from federation.config import FederationConfig
    from federation.task import run_rib_config
    from federation.training import DeviceTrainer, TrainingRefused, set_torch_threads
    from model import skipgram
    from simulations.population import build_population, open_population

    set_torch_threads(1)
    partition = "auto" if dataset == "synthetic" else "user"
    build_population(
        dataset, work / dataset, partition=partition, max_devices=devices, seed=seed, min_examples=1
    )
    population = open_population(work / dataset)
    vocab = population.split().vocab
    rows = []
    for label, local in LOCAL_SETTINGS.items():
        fed = FederationConfig(population_dir=str(work / dataset), seed=seed, **local)
        rib_config = run_rib_config(vocab, fed)
        torch.manual_seed(seed)
        start = (
            skipgram.initial_weights(vocab.n_items, fed.item_dim, seed)
            if fed.task == "word2vec"
            else initial_weights(fed, rib_config, vocab)
        )
        norms, started = [], time.perf_counter()
        for index in population.ok_indices():
            directory = population.device_dir(int(index))
            trainer = DeviceTrainer(directory, vocab, rib_config)
            try:
                update = trainer.train([w.copy() for w in start], training_config(fed, 1, directory.name))
            except TrainingRefused:
                continue
            finally:
                trainer.close()
            norms.append(update_norm(update.weights, start))
        rows.append(
            {
                "dataset": dataset,
                "items": vocab.n_items,
                "local_training": label,
                "devices": len(norms),
                "median": float(np.median(norms)),
                "p90": float(np.percentile(norms, 90)),
                "max": float(np.max(norms)),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(f"  {dataset} {label}: median {rows[-1]['median']:.3g}, max {rows[-1]['max']:.3g}", flush=True)
    return rows


def plot(rows: list[dict], path: Path, bound: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    labels = [f"{r['dataset']}: {r['local_training']}" for r in rows]
    y = np.arange(len(rows))
    ax.barh(y, [r["max"] for r in rows], color="tab:orange", label="max over devices")
    ax.barh(y, [r["median"] for r in rows], color="tab:blue", label="median")
    ax.axvline(bound, color="tab:red", linestyle="--", label=f"max-update-norm default ({bound:g})")
    ax.set_xscale("log")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("L2 distance of an honest update from the global model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from federation.config import FederationConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="synthetic,jdata2016_sample")
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="update-norms-") as tmp:
        for dataset in args.datasets.split(","):
            print(f"{dataset}: {args.devices} devices", flush=True)
            rows += measure(dataset, args.devices, args.seed, Path(tmp))
    bound = FederationConfig().max_update_norm
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "max_update_norm_default": bound,
        "largest_honest_norm": max(r["max"] for r in rows),
        "seed": args.seed,
        "rows": rows,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    (out / "update_norms.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Honest update norms, one round from the starting model, seed {args.seed} "
        f"(`python -m experiments.update_norms`). The largest is {result['largest_honest_norm']:.3g}; "
        f"`max-update-norm` defaults to {bound:g}.",
        "",
        "| dataset (items) | local training | devices | median | p90 | max |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['dataset']} ({r['items']}) | {r['local_training']} | {r['devices']} | {r['median']:.3g} | "
        f"{r['p90']:.3g} | {r['max']:.3g} |"
        for r in rows
    ]
    (out / "update_norms.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "update_norms.png", bound)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
