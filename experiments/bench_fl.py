"""``rib-edge bench fl``: centralized RIB vs federated RIB (FedAvg) vs FedAvg with user-level DP, like for like.

One population (partitioned by user, so the federation is non-IID by user) is built once and serves every
setting:

- ``centralized``: a RIB with exactly the federation's model config (``federated_rib_config``: same sizes,
  full softmax) trained by ``model.train`` on the population's ``split().train`` (the devices' training
  sessions pooled; time-based validation and early stopping as the project trains everywhere);
- ``centralized_random_init`` (beside the rows): the same recipe without the word2vec item init, which needs
  the pooled raw sessions; federated runs start from a random init, so this is their like-for-like reference;
- ``centralized_catalog_init`` (when a variant has ``"init": "catalog"``): the same recipe from the item
  vectors of the dataset's public catalog (``model/catalog.py``), the init those variants start from;
- ``fedavg``: the real Flower apps in the simulation engine (``simulations.engine.simulate``), no DP;
- ``fedavg+dp``: the same with user-level DP (client-side fixed clipping, server Gaussian noise) at every
  target epsilon, delta = 1 / N, the noise multiplier set by the accountant for the planned rounds.

Every model is scored by the SAME ``aggregator.evaluation.CentralEvaluator`` (same held-out examples, same
sample) that the federated server uses each round. Federated runs are evaluated again from their final
checkpoint to get per-example ranks, for a paired bootstrap of (federated - centralized) Recall@20.

Outputs in ``out_dir``: ``fl.json`` (``rows``, ``dp_step_ratio``, ``targets``, ``round_time_breakdown``,
``bootstrap``), ``fl.md``, ``fl_recall_vs_round.png``, ``fl_epsilon_vs_round.png`` and ``runs/<setting>/``
(each run's per-round metrics and settings). The population, checkpoints and Ray logs go to ``work_dir``
(default ``out_dir``); a finished setting found there is reused, a killed one resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments.benchmark import mark_small_test
from experiments.paths import REPO_ROOT
from experiments.paths import RESULTS as RESULTS_ROOT
from model.data.protocol import ProtocolConfig

# A variant is checked as a preset table over the shared settings' population keys.
SIMULATION_DEFAULTS_FOR_CHECK = {
    "dataset": "synthetic",
    "partition": "auto",
    "devices": None,
    "min-examples": 0,
}

FEDAVG_TARGET = 0.95  # issue 6: federated (no DP) Recall@20 >= 0.95 x centralized
DP_TARGET = 0.90  # issue 6: user-level DP at epsilon <= 8 >= 0.90 x centralized non-private
DP_TARGET_MAX_EPSILON = 8.0
DP_STEP_TARGET = 2.0  # issue 6: DP-SGD step time / non-private step time
DATA_TYPE = "SKU+Micro"
MAX_LEN = 50  # FederationConfig's default window, so the centralized model is the federation's model

Progress = Callable[[str], None]


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def setting_dir_name(setting: str, epsilon: float | None) -> str:
    """Directory of one setting's run: ``fedavg``, ``fedavg-dp-eps8`` ... (no '+' or '.' in names)."""
    if epsilon is None:
        return setting.replace("+", "-")
    return f"{setting.replace('+', '-')}-eps{epsilon:g}".replace(".", "p")


# ---- settings -------------------------------------------------------------------------------------------


def base_settings(
    dataset: str,
    rounds: int,
    fraction: float,
    local_steps: int,
    item_dim: int,
    hidden_dim: int,
    seed: int,
    batch_size: int,
    learning_rate: float,
    eval_max_examples: int,
    devices: int | None,
    min_devices: int,
) -> dict[str, object]:
    """The simulation settings every federated row shares (a preset: the run config's keys plus the
    population's), without heterogeneity: this benchmark measures utility, not faults."""
    from simulations.presets import SIMULATION_DEFAULTS, check_settings

    settings = {
        **SIMULATION_DEFAULTS,
        "name": "bench-fl",
        "description": "rib-edge bench fl: centralized vs FedAvg vs FedAvg + user-level DP",
        "dataset": dataset,
        "partition": "user",
        "devices": devices,
        "min-examples": 1,
        "num-server-rounds": int(rounds),
        "fraction-fit": float(fraction),
        "min-fit-clients": int(min_devices),
        "local-steps": int(local_steps),
        "local-batch-size": int(batch_size),
        "local-lr": float(learning_rate),
        "strategy": "fedavg",
        "seed": int(seed),
        "item-dim": int(item_dim),
        "hidden-dim": int(hidden_dim),
        "eval-max-examples": int(eval_max_examples),
    }
    check_settings("bench-fl", settings)
    return settings


def _normalized(data: object) -> object:
    """What ``data`` looks like after a JSON round trip (to compare with a stored settings.json)."""
    return json.loads(json.dumps(data, default=str, sort_keys=True))


# ---- running one federated setting ----------------------------------------------------------------------


def run_federated(
    settings: Mapping[str, object],
    run_dir: Path,
    population_dir: Path,
    num_cpus: int = 2,
    progress: Progress | None = None,
) -> dict[str, object]:
    """Run (resume, or reuse when finished) one federated setting with ``simulations.engine.simulate``;
    ``settings``: a preset's table (run-config keys plus the population's). Returns its summary."""
    from simulations.engine import simulate

    stored = dict(settings)
    summary_path, settings_path = run_dir / "summary.json", run_dir / "settings.json"
    if summary_path.exists() and settings_path.exists():
        done = json.loads(summary_path.read_text())
        same = json.loads(settings_path.read_text()) == _normalized(stored)
        if same and int(done.get("rounds", 0)) >= int(settings["num-server-rounds"]):  # type: ignore[arg-type]
            _say(progress, f"  reusing the finished run in {run_dir}")
            return done
    started = time.perf_counter()

    def on_round(row: dict) -> None:
        eps = row.get("epsilon")
        _say(
            progress,
            f"  [{time.perf_counter() - started:7.1f}s] round {row['round']:>3}: "
            f"recall@20={row.get('recall@20', float('nan')):.4f} mrr@20={row.get('mrr@20', float('nan')):.4f} "
            f"eps={'-' if eps is None else f'{eps:.2f}'} participants={row.get('participants', '-')} "
            f"round_s={row.get('seconds', 0.0):.1f}",
        )

    return simulate(settings, run_dir, population_dir=population_dir, num_cpus=num_cpus, progress=on_round)


# ---- evaluation with per-example ranks --------------------------------------------------------------------


def evaluator_ranks(evaluator, weights: Sequence[np.ndarray]) -> np.ndarray:
    """Per-example target ranks of ``weights`` on the evaluator's own examples (its scoring path, kept ranks)."""
    from model.evaluate import evaluate
    from model.local import set_weights
    from model.rib import RIB
    from model.train import RIBRecommender, TrainConfig

    model = RIB(evaluator.rib_config)
    set_weights(model, list(weights))
    model.to(evaluator.device).eval()
    rec = RIBRecommender(evaluator.rib_config, TrainConfig(device=str(evaluator.device)))
    rec.model = model
    return evaluate(rec, evaluator.test, examples=evaluator.examples).ranks


def recall_hits(ranks: np.ndarray, k: int = 20) -> np.ndarray:
    """Per-example Recall@k (0/1)."""
    return (np.asarray(ranks) <= k).astype(np.float64)


def paired_ratio_ci(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """mean(a) / mean(b) over the same examples, with a paired percentile bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(n_boot):
        idx = rng.integers(0, a.size, a.size)
        denominator = b[idx].mean()
        ratios.append(a[idx].mean() / denominator if denominator > 0 else math.nan)
    alpha = (1 - level) / 2
    point = a.mean() / b.mean() if b.mean() > 0 else math.nan
    return float(point), float(np.nanquantile(ratios, alpha)), float(np.nanquantile(ratios, 1 - alpha))


# ---- centralized baseline ------------------------------------------------------------------------------


def train_centralized(
    population,
    rib_config,
    evaluator,
    run_dir: Path,
    epochs: int,
    seed: int,
    w2v_init: bool,
    progress: Progress | None = None,
    catalog: Path | None = None,
) -> tuple[dict[str, object], np.ndarray]:
    """Train RIB on the pooled training sessions, score it with ``evaluator``; (result, per-example ranks).

    ``catalog``: item embeddings start from that catalog file's vectors (the vectors a federated run with
    ``item-catalog`` starts from, same seed) instead of Word2vec or a random init.
    """
    from model.local import get_weights
    from model.train import TrainConfig, train_rib

    train_config = TrainConfig(epochs=epochs, seed=seed, num_threads=1, w2v_init=w2v_init and catalog is None)
    key = _normalized({"rib_config": rib_config.to_dict(), "train_config": train_config.to_dict()})
    if catalog is not None:
        key["item_catalog"] = hashlib.sha256(Path(catalog).read_bytes()).hexdigest()
    result_path, ranks_path = run_dir / "result.json", run_dir / "ranks.npy"
    if result_path.exists() and ranks_path.exists():
        stored = json.loads(result_path.read_text())
        if stored.get("key") == key and stored.get("eval_examples") == len(evaluator.examples):
            _say(progress, f"  reusing the centralized result in {run_dir}")
            return stored, np.load(ranks_path)
    split = population.split()
    started = time.perf_counter()
    item_vectors = None
    if catalog is not None:
        from model.catalog import catalog_file_vectors

        item_vectors = catalog_file_vectors(catalog, split.vocab.item_ids, rib_config.item_dim, seed)
    rec, history = train_rib(split.train, rib_config, train_config, progress=False, item_vectors=item_vectors)
    train_seconds = time.perf_counter() - started
    weights = get_weights(rec.model)
    loss, metrics = evaluator(0, weights, {})
    ranks = evaluator_ranks(evaluator, weights)
    result = {
        "key": key,
        "recall@20": metrics["recall@20"],
        "mrr@20": metrics["mrr@20"],
        "loss": loss,
        "eval_examples": len(evaluator.examples),
        "train_sessions": split.train.n_sessions,
        "epochs_run": len(history.get("epochs", [])),
        "best_epoch": history.get("best_epoch"),
        "steps": history.get("steps"),
        "best_val_recall@20": history.get("best_val_recall@20"),
        "w2v_init": train_config.w2v_init,
        "item_init": history.get("item_init"),
        "train_seconds": train_seconds,
        "ranks_match_evaluator": bool(abs(recall_hits(ranks).mean() - metrics["recall@20"]) < 1e-9),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(ranks_path, ranks)
    result_path.write_text(json.dumps(result, indent=2, default=float))
    return result, ranks


POOLED_W2V_INIT = "pooled-w2v"  # variant "init": start from Word2vec on the pooled sessions (a diagnostic)


def pooled_w2v_checkpoint(train, rib_config, path: Path, seed: int) -> Path:
    """A RIB checkpoint: seeded random weights, item embeddings from Word2vec on the pooled training sessions.

    A diagnostic, not a deployable setting: no federation holds the pooled raw sessions. It tells how much of
    the federated gap the centralized recipe's Word2vec init would close if devices had it.
    """
    from model.train import TrainConfig, init_word2vec_config, load_checkpoint, save_init_checkpoint
    from model.word2vec import train_item_vectors

    if path.exists():  # reuse only what this run would build (a work dir may outlive a change of settings)
        stored = load_checkpoint(path, device="cpu")
        if stored.rib_config == rib_config and stored.train_config.seed == seed:
            return path
    vectors = train_item_vectors(train, init_word2vec_config(rib_config.item_dim, TrainConfig(seed=seed)))
    return save_init_checkpoint(rib_config, vectors, path, seed, POOLED_W2V_INIT)


CATALOG_INIT = "catalog"  # variant "init": item embeddings from the dataset's public catalog (item-catalog)
FEDERATED_W2V_INIT = "federated-w2v"  # variant "init": start from a federated skip-gram run's item vectors
# The skip-gram stage's defaults (a variant's "w2v" mapping overrides them), chosen by in-process probes on
# jdata2016: 10 % of devices, 30 rounds, 5 local SGD steps at lr 1, FedAdam at 0.1 reach a nearest-item
# Recall@20 of 0.28 (gensim on the pooled sessions: 0.36), enough for the RIB run after it.
W2V_STAGE_DEFAULTS: dict[str, float] = {  # run-config keys
    "num-server-rounds": 30,
    "fraction-fit": 0.1,
    "local-steps": 5,
    "local-lr": 1.0,
    "server-lr": 0.1,
}


def w2v_stage_settings(stage: Mapping[str, object]) -> dict[str, object]:
    """A variant's "w2v" mapping over ``W2V_STAGE_DEFAULTS``; ValueError on a key the stage does not know."""
    unknown = set(stage) - set(W2V_STAGE_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown w2v stage settings {sorted(unknown)} (known: {sorted(W2V_STAGE_DEFAULTS)})"
        )
    return {**W2V_STAGE_DEFAULTS, **stage}


def federated_w2v_checkpoint(
    settings: Mapping[str, object],
    stage: Mapping[str, object],
    run_dir: Path,
    population_dir: Path,
    num_cpus: int = 2,
    progress: Progress | None = None,
) -> tuple[Path, dict[str, object]]:
    """Run (or reuse) the federated skip-gram stage; returns (its rib-init.pt, a summary for the report).

    Deployable, unlike ``pooled_w2v_checkpoint``: devices train Word2vec on their own sessions through the
    same ClientApp, and only averaged weights reach the server.
    """
    from aggregator.server_app import INIT_CHECKPOINT
    from simulations.engine import read_metrics

    chosen = w2v_stage_settings(stage)
    stage_settings = {
        **{k: v for k, v in settings.items() if k not in ("dp", "dp-epsilon")},
        **chosen,
        "strategy": "fedadam",
        "task": "word2vec",
        "server-tau": 1e-8,  # Adam's own epsilon scale: SGNS gradients per row are small
        "release-dir": str(run_dir),
    }
    run_federated(stage_settings, run_dir, population_dir, num_cpus, progress)
    rows = read_metrics(run_dir / "metrics.jsonl")
    last = rows[-1] if rows else {}
    report = {
        **chosen,
        "word2vec_recall@20": last.get("recall@20"),
        "word2vec_mrr@20": last.get("mrr@20"),
        "rounds_seconds_total": sum(float(r.get("seconds", 0.0)) for r in rows),
        "devices_per_round": last.get("participants"),
    }
    path = run_dir / INIT_CHECKPOINT
    if not path.exists():
        raise RuntimeError(f"the skip-gram stage finished without writing {path}")
    return path, report


def pooled_word2vec_recall(split, dim: int, seed: int, max_examples: int) -> float:
    """Recall@20 of the Word2vec baseline with gensim on the pooled training sessions (the centralized
    init's vectors), on the server evaluator's examples: the reference for a federated skip-gram stage."""
    from aggregator.evaluation import held_out_examples
    from model.evaluate import evaluate
    from model.train import TrainConfig, init_word2vec_config
    from model.word2vec import Word2VecRecommender, train_item_vectors

    config = init_word2vec_config(dim, TrainConfig(seed=seed))
    scorer = Word2VecRecommender.from_item_vectors(train_item_vectors(split.train, config))
    examples = held_out_examples(split.test, max_examples, seed)
    return float(evaluate(scorer, split.test, examples=examples).metrics["recall@20"])


# ---- round-time breakdown ------------------------------------------------------------------------------


def aggregation_seconds(fed, population: int, participants: int, reps: int = 3) -> float:
    """Median wall time of the server's aggregate_fit (RoundRecorder over FedAvg, DP wrapper if on) for m updates."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from aggregator.server_app import initial_weights
    from aggregator.strategy import build_strategy
    from federation.task import run_rib_config
    from model.data.dataset import SplitData

    vocab = SplitData.load(fed.eval_split_path()).vocab
    weights = initial_weights(fed, run_rib_config(vocab, fed), vocab)
    rng = np.random.default_rng(0)
    m = max(1, participants)
    results = []
    for _ in range(m):
        update = [(w + rng.normal(0, 1e-3, w.shape)).astype(np.float32) for w in weights]
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 1, {"seconds": 0.0})
        results.append((None, res))
    noise = 1.0 if fed.dp == "user" else 0.0
    times = []
    for _ in range(reps):
        strategy = build_strategy(fed, weights, None, population, noise)
        t0 = time.perf_counter()
        strategy.aggregate_fit(1, results, [])
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def round_time_breakdown(rows: list[dict], num_cpus: int, aggregation_s: float | None) -> dict[str, object]:
    """Medians over a run's rounds: round, fit (device train + transport + aggregation), eval, device train."""
    fit_rows = [r for r in rows if r.get("round", 0) > 0]
    if not fit_rows:
        return {}

    def median(values: list[float]) -> float | None:
        values = [float(v) for v in values if v is not None]
        return float(statistics.median(values)) if values else None

    device_s = [r.get("fit_metrics", {}).get("seconds") for r in fit_rows]
    per_round_compute = [
        float(r["fit_metrics"]["seconds"]) * int(r.get("participants", 0))
        for r in fit_rows
        if r.get("fit_metrics", {}).get("seconds") is not None
    ]
    fit_s = median([r.get("fit_seconds") for r in fit_rows])
    compute_s = median(per_round_compute)
    # Devices train concurrently in num_cpus Ray workers (1 CPU each): the round's critical path of device
    # compute is roughly the summed local training time over the workers; the rest of fit is transport,
    # (de)serialisation, actor scheduling and aggregation.
    critical = None if compute_s is None else compute_s / max(1, num_cpus)
    transport = None
    if fit_s is not None and critical is not None:
        transport = max(0.0, fit_s - critical - (aggregation_s or 0.0))
    return {
        "rounds": len(fit_rows),
        "round_seconds": median([r.get("seconds") for r in fit_rows]),
        "fit_seconds": fit_s,
        "eval_seconds": median([r.get("eval_seconds") for r in fit_rows]),
        "device_train_seconds_per_device": median(device_s),
        "participants_per_round": median([r.get("participants") for r in fit_rows]),
        "device_train_seconds_per_round_summed": compute_s,
        "parallel_device_workers": num_cpus,
        "device_train_seconds_per_round_critical_path": critical,
        "aggregation_seconds": aggregation_s,
        "transport_and_overhead_seconds_estimate": transport,
    }


# ---- DP-SGD step ratio ---------------------------------------------------------------------------------


def dp_step_ratio(
    json_path: Path | None = None, measure: bool = True, dataset: str = "jdata2016_sample", progress=None
) -> dict[str, object]:
    """The DP-SGD / non-private step-time ratio: from ``benchmarks/results/dp_step/dp_step.json``, else measured."""
    path = json_path or RESULTS_ROOT / "dp_step" / "dp_step.json"
    if path.exists():
        data = json.loads(path.read_text())
        if "dp_step_ratio" in data:
            return {"value": data["dp_step_ratio"], "source": _shown(path)}
        runs = data.get("runs") or []
        if runs:
            run = runs[0]  # the dataset's own catalogue
            best = run.get("best") or min(run["configs"], key=lambda n: run["configs"][n]["ratio"])
            return {
                "value": run["configs"][best]["ratio"],
                "config": best,
                "n_items": run.get("n_items"),
                "source": _shown(path),
            }
    if not measure:
        return {"value": None, "source": "not measured"}
    _say(progress, f"no {path}: measuring the DP-SGD step ratio with a small budget")
    return _measure_dp_step(dataset)


def _shown(path: Path) -> str:
    """A path relative to the repository when inside it (results stay portable)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _measure_dp_step(dataset: str) -> dict[str, object]:
    """Run experiments/dp_step.py's measuring function on the dataset's catalogue with few repetitions."""
    import argparse

    from experiments import dp_step

    args = argparse.Namespace(batch_size=32, max_len=50, item_dim=64, hidden=100, reps=5, warmup=1, seed=0)
    data, name = dp_step.load_data(dataset, 1)
    run = dp_step.run(args, data, name, 0)
    best = run["best"]
    return {
        "value": run["configs"][best]["ratio"],
        "config": best,
        "n_items": run["n_items"],
        "source": "measured here (experiments.dp_step run(), 5 reps)",
    }


# ---- the benchmark --------------------------------------------------------------------------------------


def bench_fl(
    dataset: str = "jdata2016_sample",
    out_dir: str | Path = RESULTS_ROOT / "fl",
    rounds: int = 15,
    fraction: float = 0.2,
    local_steps: int = 5,
    epsilons: Sequence[float] = (1.0, 4.0, 8.0),
    item_dim: int = 32,
    hidden_dim: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    work_dir: str | Path | None = None,
    devices: int | None = None,
    min_devices: int = 2,
    batch_size: int = 32,
    learning_rate: float = 5e-3,  # the centralized trainer's lr (the presets' 1e-3 barely moves FedAvg in 15 rounds)
    eval_max_examples: int = 5000,
    centralized_epochs: int = 30,
    w2v_init: bool = True,
    variants: Sequence[Mapping[str, object]] = (),
    num_cpus: int = 2,
    n_boot: int = 1000,
    dp_step_json: str | Path | None = None,
    measure_dp_step: bool = True,
    spread_seeds: Sequence[int] = (),
    mapping: str | Path | None = None,
    protocol: ProtocolConfig | None = None,
) -> dict[str, object]:
    """Run every setting on one population and write fl.json, fl.md and the plots; returns fl.json's object.

    ``mapping`` (an activity mapping TOML) and ``protocol`` (item support, test period) change how the
    dataset becomes the population, as ``--mapping``, ``--min-item-support`` and the split settings do.

    ``variants``: extra federated runs reported beside the table (not in ``rows``), each a mapping with
    ``name`` and run-config keys overriding the shared settings (``strategy``, ``local-steps``, ``local-lr``,
    ``num-server-rounds``, ``fraction-fit``, ``dp-epsilon``, ``server-lr`` ...: a preset's table);
    ``"init": "pooled-w2v"`` starts it from ``pooled_w2v_checkpoint`` (a diagnostic).
    """
    from aggregator.checkpoint import CheckpointStore
    from aggregator.evaluation import CentralEvaluator
    from aggregator.strategy import sampled_per_round
    from federation.task import federated_rib_config, run_rib_config
    from model.evaluate import paired_bootstrap_diff
    from simulations.engine import federation_from, read_metrics
    from simulations.population import build_population, open_population
    from simulations.presets import SIMULATION_DEFAULTS, PresetError, check_settings

    for variant in variants:  # fail before hours of runs, not after
        table = {k: v for k, v in variant.items() if k not in ("name", "init", "w2v")}
        try:
            check_settings(str(variant.get("name")), {**SIMULATION_DEFAULTS, **table})
        except PresetError as err:
            raise ValueError(f"variant {variant.get('name')!r}: {err}") from None
        if variant.get("init") not in (None, POOLED_W2V_INIT, FEDERATED_W2V_INIT, CATALOG_INIT):
            raise ValueError(
                f"variant {variant.get('name')!r}: unknown init {variant['init']!r} "
                f"(known: {POOLED_W2V_INIT!r}, {FEDERATED_W2V_INIT!r}, {CATALOG_INIT!r})"
            )
        try:
            w2v_stage_settings(variant.get("w2v", {}))  # type: ignore[arg-type]
        except ValueError as err:
            raise ValueError(f"variant {variant.get('name')!r}: {err}") from None
        if "w2v" in variant and variant.get("init") != FEDERATED_W2V_INIT:
            raise ValueError(
                f"variant {variant.get('name')!r}: 'w2v' settings need init {FEDERATED_W2V_INIT!r}"
            )
    wall_started = time.perf_counter()
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    pop_dir = work / "population"

    # 1. One population, partitioned by user, for every setting.
    t0 = time.perf_counter()
    _say(progress, f"population: {dataset} by user -> {pop_dir}")
    build_population(
        dataset, pop_dir, partition="user", max_devices=devices, seed=seed, min_examples=1, mapping=mapping,
        protocol=protocol,
    )  # fmt: skip
    population = open_population(pop_dir)
    n = population.n_devices
    split = population.split()
    timings: dict[str, float] = {"population_seconds": time.perf_counter() - t0}
    settings = base_settings(
        dataset, rounds, fraction, local_steps, item_dim, hidden_dim, seed, batch_size, learning_rate,
        eval_max_examples, devices, min_devices,
    )  # fmt: skip
    fed0 = federation_from(settings, pop_dir, work / "fedavg", n)
    rib_config = federated_rib_config(split.vocab, DATA_TYPE, item_dim, hidden_dim, fed0.max_len)
    # The server's evaluator, built exactly as aggregator.server_app.make_run builds it.
    evaluator = CentralEvaluator(split.test, rib_config, fed0.eval_max_examples, fed0.seed)
    _say(
        progress,
        f"  {n} devices ({population.info.n_ok} with data), {split.vocab.n_items} items, "
        f"{split.train.n_sessions} training sessions, {len(evaluator.examples)} evaluation examples",
    )

    # 2. Centralized.
    _say(progress, f"centralized: RIB {DATA_TYPE}, item_dim {item_dim}, hidden {hidden_dim}, full softmax")
    t0 = time.perf_counter()
    central, central_ranks = train_centralized(
        population, rib_config, evaluator, work / "centralized", centralized_epochs, seed, w2v_init, progress
    )
    timings["centralized_seconds"] = time.perf_counter() - t0
    central_hits = recall_hits(central_ranks)
    _say(progress, f"  centralized recall@20={central['recall@20']:.4f} mrr@20={central['mrr@20']:.4f}")
    # The like-for-like reference: the centralized recipe without its word2vec item init. word2vec runs on
    # the pooled raw sessions, which a federation never has, so federated runs start from a random init too.
    like: tuple[dict[str, object], np.ndarray] | None = None
    if w2v_init:
        like = train_centralized(
            population, rib_config, evaluator, work / "centralized-random-init", centralized_epochs, seed,
            False, progress,
        )  # fmt: skip
        _say(progress, f"  centralized, random item init: recall@20={like[0]['recall@20']:.4f}")
    like_hits = recall_hits(like[1]) if like is not None else None
    # How much the centralized references move with the seed alone (the rows use ``seed``).
    spread: dict[str, list[float]] = {}
    for other in spread_seeds:
        for init in (True, False) if w2v_init else (False,):
            key = "word2vec_init" if init else "random_init"
            sub = work / f"centralized-seed{other}{'' if init else '-random-init'}"
            res, _ = train_centralized(
                population, rib_config, evaluator, sub, centralized_epochs, other, init
            )
            spread.setdefault(key, []).append(float(res["recall@20"]))
            _say(progress, f"  centralized, seed {other}, {key}: recall@20={res['recall@20']:.4f}")

    # The catalog reference: what the centralized recipe reaches from the catalog init federated variants use.
    catalog_path: Path | None = None
    central_catalog: dict[str, object] | None = None
    if any(v.get("init") == CATALOG_INIT for v in variants):
        from model.catalog import dataset_catalog

        catalog_path = dataset_catalog(dataset, seed=seed).write_csv(work / "item-catalog.csv")
        central_catalog, _ = train_centralized(
            population, rib_config, evaluator, work / "centralized-catalog-init", centralized_epochs, seed,
            False, progress, catalog_path,
        )  # fmt: skip
        _say(progress, f"  centralized, catalog item init: recall@20={central_catalog['recall@20']:.4f}")
        for other in spread_seeds:
            res, _ = train_centralized(
                population, rib_config, evaluator, work / f"centralized-seed{other}-catalog-init",
                centralized_epochs, other, False, None, catalog_path,
            )  # fmt: skip
            spread.setdefault("catalog_init", []).append(float(res["recall@20"]))
            _say(progress, f"  centralized, seed {other}, catalog_init: recall@20={res['recall@20']:.4f}")

    # 3. Federated settings.
    plan: list[tuple[str, float | None, dict[str, object], dict[str, object]]] = [("fedavg", None, {}, {})]
    plan += [("fedavg+dp", float(e), {"dp": "user", "dp-epsilon": float(e)}, {}) for e in epsilons]
    w2v_stages: dict[str, dict[str, object]] = {}  # variant name -> its federated skip-gram stage
    for variant in variants:
        extra = {k: v for k, v in variant.items() if k not in ("name", "w2v")}
        fed_over: dict[str, object] = {}  # the run-config keys an init sets (files this benchmark writes)
        if extra.get("init") == POOLED_W2V_INIT:
            path = pooled_w2v_checkpoint(split.train, rib_config, work / "pooled-w2v-init.pt", seed)
            fed_over["initial-checkpoint"] = str(path)
        elif extra.get("init") == FEDERATED_W2V_INIT:
            stage_dir = work / f"variant-{variant['name']}-w2v-stage"
            _say(progress, f"{variant['name']}: federated skip-gram stage -> {stage_dir}")
            path, stage_report = federated_w2v_checkpoint(
                settings, dict(variant.get("w2v", {})), stage_dir, pop_dir, num_cpus, progress
            )
            _copy_run(stage_dir, out / "runs" / stage_dir.name.removeprefix("variant-"))
            stage_report["pooled_word2vec_recall@20"] = pooled_word2vec_recall(
                split, item_dim, seed, eval_max_examples
            )
            w2v_stages[str(variant["name"])] = stage_report
            fed_over["initial-checkpoint"] = str(path)
        elif extra.get("init") == CATALOG_INIT:
            fed_over["item-catalog"] = str(catalog_path)
        eps = extra.get("dp-epsilon")
        plan.append((str(variant["name"]), None if eps is None else float(eps), extra, fed_over))  # type: ignore[arg-type]
    rows: list[dict[str, object]] = [
        {
            "setting": "centralized",
            "epsilon": None,
            "delta": None,
            "rounds": None,
            "epochs": central["epochs_run"],
            "recall@20": central["recall@20"],
            "mrr@20": central["mrr@20"],
            "ratio_to_centralized": 1.0,
            "eval_examples": central["eval_examples"],
            "train_seconds": central["train_seconds"],
        }
    ]
    variant_rows: list[dict[str, object]] = []
    breakdown: dict[str, object] = {}
    bootstrap: dict[str, object] = {}
    curves: dict[
        str, tuple[str, float | None, list[dict]]
    ] = {}  # label -> (variant name or "", target eps, rows)
    n_main = 1 + len(epsilons)
    for index, (name, eps, extra, fed_over) in enumerate(plan):
        is_variant = index >= n_main
        run_settings = {**settings, **{k: v for k, v in extra.items() if k != "init"}, **fed_over}
        label = name if is_variant else setting_dir_name(name, eps)
        run_dir = work / (f"variant-{label}" if is_variant else label)
        _say(progress, f"{name}{'' if eps is None else f' (target epsilon {eps:g})'}: {run_dir}")
        t0 = time.perf_counter()
        summary = run_federated(run_settings, run_dir, pop_dir, num_cpus, progress)
        run_seconds = time.perf_counter() - t0
        metrics_rows = read_metrics(run_dir / "metrics.jsonl")
        curves[label] = (name if is_variant else "", eps, metrics_rows)
        last = metrics_rows[-1] if metrics_rows else {}
        final_round = int(last.get("round", 0))
        weights = CheckpointStore(run_dir / "checkpoints").load(final_round).weights
        fed = federation_from(run_settings, pop_dir, run_dir, n)
        run_config = run_rib_config(split.vocab, fed)
        # Same examples (same seeded sample), the run's own model layout (e.g. a tied output).
        scorer = evaluator
        if run_config != rib_config:
            scorer = CentralEvaluator(split.test, run_config, fed0.eval_max_examples, fed0.seed)
        ranks = evaluator_ranks(scorer, weights)
        hits = recall_hits(ranks)
        diff, low, high = paired_bootstrap_diff(hits, central_hits, n_boot=n_boot, seed=seed)
        ratio, r_low, r_high = paired_ratio_ci(hits, central_hits, n_boot=n_boot, seed=seed)
        bootstrap[label] = {
            "recall@20_minus_centralized": diff,
            "ci95": [low, high],
            "ratio_to_centralized": ratio,
            "ratio_ci95": [r_low, r_high],
            "n_examples": int(hits.size),
            "n_boot": n_boot,
            "checkpoint_round": final_round,
            "checkpoint_matches_last_row": bool(abs(hits.mean() - float(last.get("recall@20", -1))) < 1e-9),
        }
        if like_hits is not None:
            like_ratio, like_low, like_high = paired_ratio_ci(hits, like_hits, n_boot=n_boot, seed=seed)
            bootstrap[label]["ratio_to_centralized_random_init"] = like_ratio
            bootstrap[label]["ratio_to_centralized_random_init_ci95"] = [like_low, like_high]
        m = sampled_per_round(fed, n)
        agg_s = aggregation_seconds(fed, n, m)
        breakdown[label] = round_time_breakdown(metrics_rows, num_cpus, agg_s)
        # Summed round times survive reuse and resume; the wall time is this call's only (0 when reused).
        breakdown[label]["rounds_seconds_total"] = sum(float(r.get("seconds", 0.0)) for r in metrics_rows)
        breakdown[label]["wall_seconds_this_invocation"] = run_seconds
        row = {
            "setting": name,
            "epsilon": last.get("epsilon") if eps is not None else None,
            "target_epsilon": eps,
            "delta": last.get("delta") if eps is not None else None,
            "rounds": int(summary.get("rounds", final_round)),  # type: ignore[arg-type]
            "recall@20": float(last.get("recall@20", math.nan)),
            "mrr@20": float(last.get("mrr@20", math.nan)),
            "ratio_to_centralized": float(last.get("recall@20", math.nan)) / central["recall@20"],
            "devices_per_round": m,
            "local_steps": fed.local_steps,
            "strategy": fed.strategy,
            "noise_multiplier": _noise_multiplier(fed, n) if eps is not None else 0.0,
            "run_dir": label,
        }
        if is_variant:
            row["overrides"] = dict(extra)  # the variant's table (the init's file paths are this run's own)
            if name in w2v_stages:
                row["w2v_stage"] = w2v_stages[name]
            variant_rows.append(row)
        else:
            rows.append(row)
        _say(
            progress,
            f"  {name}: recall@20={row['recall@20']:.4f} ({row['ratio_to_centralized']:.3f} x centralized), "
            f"eps={row['epsilon']}, {run_seconds:.0f}s",
        )
        _copy_run(run_dir, out / "runs" / label)
        timings[f"{label}_seconds"] = run_seconds

    dp_step = dp_step_ratio(Path(dp_step_json) if dp_step_json else None, measure_dp_step, dataset, progress)
    result: dict[str, object] = {
        "benchmark": "fl",
        "dataset": dataset,
        "rows": rows,
        "variants": variant_rows,
        "dp_step_ratio": dp_step.get("value"),
        "dp_step": dp_step,
        "targets": targets(rows, variant_rows, dp_step.get("value")),
        "round_time_breakdown": breakdown,
        "bootstrap": bootstrap,
        "population": {
            "devices": n,
            "devices_with_data": population.info.n_ok,
            "partition": population.info.partition,
            "items": split.vocab.n_items,
            "train_sessions": split.train.n_sessions,
            "eval_examples": len(evaluator.examples),
        },
        "config": {
            "rounds": rounds,
            "fraction": fraction,
            "local_steps": local_steps,
            "local_batch_size": batch_size,
            "local_lr": learning_rate,
            "epsilons": list(epsilons),
            "item_dim": item_dim,
            "hidden_dim": hidden_dim,
            "max_len": fed0.max_len,
            "data_type": DATA_TYPE,
            "dp_clipping_norm": fed0.dp_clipping_norm,
            "eval_max_examples": eval_max_examples,
            "centralized_epochs": centralized_epochs,
            "w2v_init_centralized": w2v_init,
            "seed": seed,
            "num_cpus": num_cpus,
        },
        "centralized": {k: v for k, v in central.items() if k != "key"},
        "centralized_random_init": None if like is None else {k: v for k, v in like[0].items() if k != "key"},
        "centralized_catalog_init": None
        if central_catalog is None
        else {k: v for k, v in central_catalog.items() if k != "key"},
        "centralized_seed_spread": {
            "seeds": [int(x) for x in spread_seeds],
            "recall@20": spread,
            "row_seed": seed,
        }
        if spread
        else None,
        # This call's wall times: a reused setting costs only its re-scoring here (see rounds_seconds_total).
        "timings_this_invocation": {**timings, "total_seconds": time.perf_counter() - wall_started},
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "data": {
            "mapping": None if mapping is None else str(mapping),
            "protocol": split.info.get("protocol"),
            "activities": list(split.vocab.activities.names),
        },
    }
    # The rows carry no per-row interval here: the evaluation's example count decides.
    mark_small_test(result, len(evaluator.examples))
    (out / "fl.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "fl.md").write_text(markdown(result))
    result["plots"] = plot_curves(
        curves, central["recall@20"], out, None if like is None else float(like[0]["recall@20"])
    )
    (out / "fl.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def _noise_multiplier(fed, population: int) -> float:
    """The noise multiplier the server's accountant picks for this run (as make_run computes it)."""
    from aggregator.strategy import sampled_per_round
    from privacy.accountant import noise_for_epsilon

    if fed.dp_noise_multiplier:
        return float(fed.dp_noise_multiplier)
    delta = fed.dp_delta or 1.0 / population
    rate = min(1.0, sampled_per_round(fed, population) / population)
    return float(noise_for_epsilon(fed.dp_epsilon, rate, fed.num_server_rounds, delta))


def _copy_run(run_dir: Path, dest: Path) -> None:
    """Keep a run's small outputs (per-round metrics, settings, summary) beside fl.json."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "settings.json", "summary.json"):
        if (run_dir / name).exists() and run_dir.resolve() != dest.resolve():
            shutil.copyfile(run_dir / name, dest / name)


def targets(rows: list[dict], variant_rows: list[dict], dp_ratio: float | None) -> dict[str, object]:
    """Issue 6's targets, met or not, from the table's rows (variants are reported, not counted)."""
    fedavg = next((r for r in rows if r["setting"] == "fedavg"), None)
    dp_rows = [
        r
        for r in rows
        if r["setting"] == "fedavg+dp"
        and r["epsilon"] is not None
        and r["epsilon"] <= DP_TARGET_MAX_EPSILON + 1e-9
    ]
    best_dp = max(dp_rows, key=lambda r: r["ratio_to_centralized"], default=None)
    out: dict[str, object] = {
        "fedavg_recall_ratio": {
            "target": FEDAVG_TARGET,
            "value": None if fedavg is None else fedavg["ratio_to_centralized"],
            "met": fedavg is not None and fedavg["ratio_to_centralized"] >= FEDAVG_TARGET,
        },
        "dp_recall_ratio_at_epsilon_le_8": {
            "target": DP_TARGET,
            "value": None if best_dp is None else best_dp["ratio_to_centralized"],
            "epsilon": None if best_dp is None else best_dp["epsilon"],
            "met": best_dp is not None and best_dp["ratio_to_centralized"] >= DP_TARGET,
            "per_epsilon": {
                f"{r['target_epsilon']:g}": {
                    "ratio": r["ratio_to_centralized"],
                    "met": r["ratio_to_centralized"] >= DP_TARGET,
                }
                for r in dp_rows
            },
        },
        "dp_step_ratio": {
            "target": DP_STEP_TARGET,
            "value": dp_ratio,
            "met": dp_ratio is not None and dp_ratio <= DP_STEP_TARGET,
        },
    }

    def best(keep: Callable[[dict], bool]) -> dict | None:
        return max(filter(keep, variant_rows), key=lambda r: r["ratio_to_centralized"], default=None)

    best_variant = best(lambda r: r.get("epsilon") is None)
    if best_variant is not None:
        out["best_non_private_variant"] = {
            "name": best_variant["setting"],
            "ratio": best_variant["ratio_to_centralized"],
            "meets_fedavg_target": best_variant["ratio_to_centralized"] >= FEDAVG_TARGET,
        }
    # Deployable: no variant that starts from word2vec on the pooled raw sessions (a diagnostic).
    best_deployable = best(
        lambda r: r.get("epsilon") is None and (r.get("overrides") or {}).get("init") != POOLED_W2V_INIT
    )
    best_dp_variant = best(
        lambda r: r.get("epsilon") is not None and r["epsilon"] <= DP_TARGET_MAX_EPSILON + 1e-9
    )
    if best_dp_variant is not None:
        out["best_dp_variant_at_epsilon_le_8"] = {
            "name": best_dp_variant["setting"],
            "epsilon": best_dp_variant["epsilon"],
            "ratio": best_dp_variant["ratio_to_centralized"],
            "meets_dp_target": best_dp_variant["ratio_to_centralized"] >= DP_TARGET,
        }
    if best_deployable is not None:
        out["best_deployable_non_private_variant"] = {
            "name": best_deployable["setting"],
            "ratio": best_deployable["ratio_to_centralized"],
            "meets_fedavg_target": best_deployable["ratio_to_centralized"] >= FEDAVG_TARGET,
        }
    return out


# ---- reports --------------------------------------------------------------------------------------------


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "∞"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(result: Mapping[str, object]) -> str:
    """The utility/epsilon table, the targets, the bootstrap intervals and the round-time breakdown."""
    pop, cfg = result["population"], result["config"]  # type: ignore[index]
    lines = [
        f"# Federated RIB vs centralized: {result['dataset']}",
        "",
        f"{pop['devices']} devices (partitioned by user; {pop['devices_with_data']} with data), "  # type: ignore[index]
        f"{pop['items']} items, {pop['train_sessions']} training sessions; every model scored by the server's "  # type: ignore[index]
        f"CentralEvaluator on the same {pop['eval_examples']} held-out examples. "  # type: ignore[index]
        f"RIB {cfg['data_type']}, item_dim {cfg['item_dim']}, hidden {cfg['hidden_dim']}, full softmax. "  # type: ignore[index]
        f"Federated: {cfg['rounds']} rounds, fraction {cfg['fraction']}, {cfg['local_steps']} local Adam steps "  # type: ignore[index]
        f"(batch {cfg['local_batch_size']}, lr {cfg['local_lr']}); user-level DP clips updates to "  # type: ignore[index]
        f"{cfg['dp_clipping_norm']} and delta = 1/N.",  # type: ignore[index]
        "",
        "| setting | epsilon | delta | rounds | Recall@20 | MRR@20 | ratio to centralized | noise multiplier |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:  # type: ignore[attr-defined]
        delta = "-" if row["delta"] is None else f"{row['delta']:.2e}"
        sigma = f"{row['noise_multiplier']:.3f}" if row.get("noise_multiplier") else "-"
        rounds = "-" if row["rounds"] is None else str(row["rounds"])
        eps = _fmt(row["epsilon"], 2)
        lines.append(
            f"| {row['setting']} | {eps} | {delta} | {rounds} | {row['recall@20']:.4f} | {row['mrr@20']:.4f} "
            f"| {row['ratio_to_centralized']:.3f} | {sigma} |"
        )
    variants = result.get("variants") or []
    if variants:
        lines += ["", "Variants (tried to improve utility; not in `rows`):", ""]
        lines += [
            "| variant | overrides | epsilon | rounds | Recall@20 | MRR@20 | ratio |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in variants:  # type: ignore[attr-defined]
            lines.append(
                f"| {row['setting']} | `{json.dumps(row['overrides'])}` | {_fmt(row['epsilon'], 2)} | {row['rounds']} "
                f"| {row['recall@20']:.4f} | {row['mrr@20']:.4f} | {row['ratio_to_centralized']:.3f} |"
            )
    staged = [row for row in variants if row.get("w2v_stage")]  # type: ignore[union-attr]
    if staged:
        lines += [
            "",
            f'Variants with `"init": "{FEDERATED_W2V_INIT}"` start from a federated skip-gram run on the same '
            "devices (`task = word2vec`; the server sees only averaged weights). Its item vectors, scored as the "
            "Word2vec baseline (items nearest the last one) on the same held-out examples:",
            "",
            "| variant | stage rounds | fraction | local SGD steps (lr) | server lr | Word2vec Recall@20 | MRR@20 "
            "| gensim on pooled sessions, Recall@20 | stage seconds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in staged:
            st = row["w2v_stage"]
            lines.append(
                f"| {row['setting']} | {st['num-server-rounds']:g} | {st['fraction-fit']:g} | {st['local-steps']:g} "
                f"({st['local-lr']:g}) | {st['server-lr']:g} | {_fmt(st['word2vec_recall@20'])} | {_fmt(st['word2vec_mrr@20'])} "
                f"| {_fmt(st.get('pooled_word2vec_recall@20'))} | {st['rounds_seconds_total']:.0f} |"
            )
    spread = result.get("centralized_seed_spread")
    if spread:
        parts = [
            f"{key.replace('_', ' ')}: "
            + ", ".join(f"{v:.4f}" for v in values)
            + f" (median of these {len(values)}: {np.median(values):.4f})"
            for key, values in spread["recall@20"].items()  # type: ignore[index, union-attr]
        ]
        lines += [
            "",
            f"Centralized RIB with other seeds {spread['seeds']} (same data and recipe; the rows use seed "  # type: ignore[index]
            f"{spread['row_seed']}), Recall@20 {'; '.join(parts)}.",  # type: ignore[index]
        ]
    catalog = result.get("centralized_catalog_init")
    if catalog:
        lines += [
            "",
            f'Centralized RIB from the catalog item init (`"init": "catalog"` variants start there; seed '
            f"{result['config']['seed']}): Recall@20 {_fmt(catalog['recall@20'])}, MRR@20 {_fmt(catalog['mrr@20'])}.",  # type: ignore[index]
        ]
    t = result["targets"]  # type: ignore[index]
    lines += ["", "## Targets (issue 6)", ""]
    lines.append(
        f"- FedAvg Recall@20 >= {FEDAVG_TARGET} x centralized: {_fmt(t['fedavg_recall_ratio']['value'], 3)} "  # type: ignore[index]
        f"-> {'met' if t['fedavg_recall_ratio']['met'] else 'NOT met'}"  # type: ignore[index]
    )
    deployable = t.get("best_deployable_non_private_variant")  # type: ignore[union-attr]
    if deployable:
        lines.append(
            f"- Federated without DP, best deployable variant (`{deployable['name']}`, no pooled-data init): "
            f"{deployable['ratio']:.3f} -> {'met' if deployable['meets_fedavg_target'] else 'NOT met'}"
        )
    dp = t["dp_recall_ratio_at_epsilon_le_8"]  # type: ignore[index]
    lines.append(
        f"- FedAvg + user-level DP at epsilon <= 8 >= {DP_TARGET} x centralized: best {_fmt(dp['value'], 3)} "  # type: ignore[index]
        f"(epsilon {_fmt(dp['epsilon'], 2)}) -> {'met' if dp['met'] else 'NOT met'}"  # type: ignore[index]
    )
    dp_variant = t.get("best_dp_variant_at_epsilon_le_8")  # type: ignore[union-attr]
    if dp_variant:
        lines.append(
            f"- User-level DP at epsilon <= 8, best variant (`{dp_variant['name']}`, epsilon "
            f"{dp_variant['epsilon']:.2f}): {dp_variant['ratio']:.3f} "
            f"-> {'met' if dp_variant['meets_dp_target'] else 'NOT met'}"
        )
    step = t["dp_step_ratio"]  # type: ignore[index]
    lines.append(
        f"- DP-SGD step / non-private step <= {DP_STEP_TARGET}x: {_fmt(step['value'], 2)} "  # type: ignore[index]
        f"-> {'met' if step['met'] else 'NOT met'} (source: {result['dp_step'].get('source')})"  # type: ignore[index, union-attr]
    )
    lines += ["", "## Paired bootstrap (95%): federated - centralized Recall@20, same examples", ""]
    lines += ["| run | difference | 95% interval | ratio | ratio 95% interval |", "|---|---:|---:|---:|---:|"]
    for label, b in result["bootstrap"].items():  # type: ignore[attr-defined]
        lines.append(
            f"| {label} | {b['recall@20_minus_centralized']:+.4f} | [{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}] "
            f"| {b['ratio_to_centralized']:.3f} | [{b['ratio_ci95'][0]:.3f}, {b['ratio_ci95'][1]:.3f}] |"
        )
    like = result.get("centralized_random_init")
    if like:
        lines += [
            "",
            "## Like for like: against the centralized recipe without its word2vec init",
            "",
            f"The centralized model starts its item embeddings from word2vec trained on the pooled raw training "
            f'sessions, which no federation has (variants with `"init": "{POOLED_W2V_INIT}"` start from word2vec on the pooled training sessions '
            f"anyway, as a diagnostic of how much of the gap it explains). Trained the same way from a random "
            f"init it reaches Recall@20 "
            f"{like['recall@20']:.4f} (MRR@20 {like['mrr@20']:.4f}; centralized with word2vec "  # type: ignore[index]
            f"{result['centralized']['recall@20']:.4f}). Federated runs against it (paired bootstrap, 95%):",  # type: ignore[index]
            "",
            "| run | ratio to centralized (random init) | 95% interval |",
            "|---|---:|---:|",
        ]
        for label, b in result["bootstrap"].items():  # type: ignore[attr-defined]
            if "ratio_to_centralized_random_init" in b:
                low, high = b["ratio_to_centralized_random_init_ci95"]
                lines.append(
                    f"| {label} | {b['ratio_to_centralized_random_init']:.3f} | [{low:.3f}, {high:.3f}] |"
                )
    lines += ["", "## Round-time breakdown (medians over rounds, seconds)", ""]
    lines += [
        "| run | round | fit | eval | device train / device | devices | device train / round (summed) "
        "| critical path | aggregation | transport + overhead (est.) | all rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, b in result["round_time_breakdown"].items():  # type: ignore[attr-defined]
        cells = [
            b.get(k)
            for k in (
                "round_seconds", "fit_seconds", "eval_seconds", "device_train_seconds_per_device",
                "participants_per_round", "device_train_seconds_per_round_summed",
                "device_train_seconds_per_round_critical_path", "aggregation_seconds",
                "transport_and_overhead_seconds_estimate", "rounds_seconds_total",
            )
        ]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:.3g}" for c in cells) + " |")
    lines += [
        "",
        f"Centralized training took {result['centralized']['train_seconds']:.0f} s "  # type: ignore[index]
        f"({result['centralized']['epochs_run']} epochs, 1 thread). "  # type: ignore[index]
        "`fit` is the server's whole fit phase (send, device training in "
        f"{cfg['num_cpus']} Ray workers, receive, aggregate); `critical path` = summed device training / workers; "  # type: ignore[index]
        "`aggregation` is the server's aggregate_fit for that many updates, timed separately; the rest of `fit` "
        "is transport, (de)serialisation and scheduling. `device train / device` is the devices' own "
        "reported local training time (store read included), averaged per round weighted by examples "
        "without DP (devices report their example count) and unweighted under DP (uniform weights), so the "
        "transport estimate is coarse (clamped at 0).",
    ]
    return "\n".join(lines) + "\n"


def plot_curves(
    curves: Mapping[str, tuple[str, float | None, list[dict]]],
    central_recall: float,
    out: Path,
    random_init_recall: float | None = None,
) -> list[str]:
    """fl_recall_vs_round.png (every run, variants dashed, centralized and, when given, centralized without
    word2vec init as lines) and fl_epsilon_vs_round.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per run in both plots (tab20 holds 20 distinct ones; tab10 repeated after ten runs).
    palette = plt.get_cmap("tab20").colors
    colors = {label: palette[i % len(palette)] for i, label in enumerate(curves)}
    paths = []
    fig, ax = plt.subplots(figsize=(11, 5))
    for label, (variant, target, rows) in curves.items():
        points = [(r["round"], r["recall@20"]) for r in rows if r.get("recall@20") is not None]
        if not points:
            continue
        if variant:
            name = f"variant: {variant}" + ("" if target is None else f" (ε = {target:g})")
        else:
            name = "FedAvg (ε = ∞)" if target is None else f"FedAvg + user-level DP (ε = {target:g})"
        style = "--" if variant else "-"
        ax.plot(*zip(*points, strict=True), style, marker=".", color=colors[label], label=name)
    ax.axhline(central_recall, color="black", linestyle="--", linewidth=1, label="centralized")
    if random_init_recall is not None:
        ax.axhline(
            random_init_recall,
            color="black",
            linestyle="-.",
            linewidth=1,
            label="centralized, random item init",
        )
    ax.axhline(
        FEDAVG_TARGET * central_recall, color="grey", linestyle=":", linewidth=1, label="0.95 x centralized"
    )
    ax.axhline(
        DP_TARGET * central_recall, color="tab:red", linestyle=":", linewidth=1, label="0.90 x centralized"
    )
    ax.set_xlabel("round")
    ax.set_ylabel("Recall@20 (held-out sessions)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the curves, not on them
    fig.tight_layout()
    path = out / "fl_recall_vs_round.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(str(path))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (variant, target, rows) in curves.items():
        points = [(r["round"], r["epsilon"]) for r in rows if r.get("epsilon") is not None]
        if target is not None and points:
            name = f"target ε = {target:g}" + (f" ({variant})" if variant else "")
            ax.plot(*zip(*points, strict=True), marker=".", color=colors[label], label=name)
            ax.axhline(target, color=colors[label], linestyle=":", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (user level, δ = 1/N)")
    ax.set_title("ε spent per round (RDP accountant); FedAvg without DP: ε = ∞, not drawn", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "fl_epsilon_vs_round.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(str(path))
    return paths
