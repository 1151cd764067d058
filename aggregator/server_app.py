"""The Flower ServerApp: federated glue only (model, evaluation, privacy and releases live elsewhere).

Settings come from the run config (``[tool.flwr.app.config]``, parsed by ``FederationConfig``). The server
holds the shared vocabulary and the held-out sessions it evaluates on (``eval-split`` or the population's
``server/split.npz``); it never holds a device's data.

What it prints (Flower's log stream, which ``rib-edge fl run`` shows): "waiting for N devices (have M)" while
devices join, then one line per round (devices that trained, failures by reason, Recall@20 / MRR@20, epsilon,
time). A bad run config or a round that did not train ends the run as failed with one line, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER, set_logger_propagation
from flwr.common.logger import log as flwr_log
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp

from aggregator.checkpoint import CheckpointStore
from aggregator.evaluation import CentralEvaluator, SkipGramEvaluator
from aggregator.release import publish_release
from aggregator.strategy import SeededClientManager, build_strategy, sampled_per_round
from aggregator.workflow import FederatedRun, RecordedSecAggPlusWorkflow, RunFailed, describe_round
from federation.config import ConfigError, FederationConfig
from federation.task import run_rib_config, vocab_fingerprint
from model import skipgram
from model.data.dataset import SplitData
from model.device import pick_device
from model.local import frozen_indices, get_weights
from model.rib import RIB
from model.train import init_from_catalog, save_init_checkpoint
from privacy.accountant import FederatedAccountant, noise_for_epsilon

log = logging.getLogger(__name__)


class _ExpectedFailure(logging.Filter):
    """Flower logs a ServerApp's exception with its traceback; a failed round or a bad run config already
    said what went wrong in one line, so those are logged as that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RunFailed | ConfigError):
            record.msg, record.args = "run failed: %s", (str(error),)
            record.exc_info = record.exc_text = None
        return True


# Opacus calls logging.basicConfig when imported, so every Flower line would also reach that root handler and
# print twice; Flower's own console handler is the one that shows it (Flower does the same in notebooks).
set_logger_propagation(FLOWER_LOGGER, False)
FLOWER_LOGGER.addFilter(_ExpectedFailure())

INIT_CHECKPOINT = "rib-init.pt"  # what a task = "word2vec" run writes (see FederationConfig.task)

# Settings a resumed run must share with the checkpoint it resumes (the rest may change, e.g. rounds).
_FINGERPRINT_KEYS = (
    "seed", "strategy", "data_type", "item_dim", "hidden_dim", "max_len", "dp", "dp_noise_multiplier",
    "dp_epsilon", "dp_clipping_norm", "fraction_fit", "initial_checkpoint",
)  # fmt: skip


def fingerprint(fed: FederationConfig, population: int) -> str:
    """Hash of the settings a checkpoint belongs to."""
    settings = {k: v for k, v in asdict(fed).items() if k in _FINGERPRINT_KEYS}
    settings["population"] = population
    if fed.task != "rib":  # RIB runs keep the fingerprints their checkpoints were written with
        settings.update(task=fed.task, w2v_window=fed.w2v_window, w2v_negatives=fed.w2v_negatives)
    if fed.item_catalog or fed.tie_output or fed.freeze_item_embeddings:
        settings.update(
            item_catalog=fed.item_catalog,
            tie_output=fed.tie_output,
            freeze_item_embeddings=fed.freeze_item_embeddings,
        )
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def population_size(fed: FederationConfig, grid: Grid | None) -> int:
    """N for sampling rates and delta: the population's device count, else the nodes connected now."""
    if fed.population_dir:
        info = Path(fed.population_dir) / "population.json"
        if info.exists():
            return int(json.loads(info.read_text())["n_devices"])
    if grid is not None:
        return max(1, len(list(grid.get_node_ids())))
    raise ConfigError("cannot tell the population size: give population-dir")


def initial_weights(fed: FederationConfig, rib_config, vocab) -> list[np.ndarray]:
    """A seeded random RIB (item embeddings from ``item-catalog`` if set), or ``initial-checkpoint``'s state."""
    torch.manual_seed(fed.seed)
    model = RIB(rib_config)
    if fed.item_catalog:
        try:
            covered = init_from_catalog(model, vocab.item_ids, fed.item_catalog, fed.seed)
        except ValueError as err:  # CatalogError: a missing, unreadable or unrelated catalog file
            raise ConfigError(f"item-catalog: {err}") from None
        log.info(
            "item-catalog %s: %d of %d items start from catalog vectors",
            fed.item_catalog,
            covered,
            vocab.n_items,
        )
    if fed.initial_checkpoint:
        from model.train import load_checkpoint

        loaded = load_checkpoint(fed.initial_checkpoint, device="cpu")
        if loaded.rib_config != rib_config:
            raise ConfigError(
                f"initial-checkpoint {fed.initial_checkpoint} has another model config than this run"
            )
        model = loaded.model
    return get_weights(model)


# Run-config keys naming files the ServerApp reads (checked before the run starts).
_INPUT_FILES = ("initial-checkpoint", "item-catalog", "signing-key")


def check_run_files(fed: FederationConfig) -> None:
    """Raise ConfigError naming the first file the run config names that the server cannot read."""
    split_path = fed.eval_split_path()
    if split_path is None:
        raise ConfigError("no eval split: set eval-split (the server's held-out sessions) or population-dir")
    if not split_path.is_file():
        key = "eval-split" if fed.eval_split else "population-dir"
        raise ConfigError(f"{key}: {split_path} not found (the server's held-out sessions and vocabulary)")
    for key in _INPUT_FILES:
        value = getattr(fed, key.replace("-", "_"))
        if value and not Path(value).is_file():
            raise ConfigError(f"{key}: {value} not found")
    if fed.release_dir and fed.task == "rib" and not fed.signing_key:
        raise ConfigError("release-dir needs signing-key (an Ed25519 private key; rib-edge edge keygen)")


def make_run(
    fed: FederationConfig, population: int, stop_after: int | None = None, on_round=None
) -> tuple[FederatedRun, object]:
    """The strategy stack and round loop for one run (shared by the ServerApp and tests)."""
    check_run_files(fed)
    split_path = fed.eval_split_path()
    try:
        split = SplitData.load(split_path)
    except Exception as err:  # noqa: BLE001 - any unreadable split is the same configuration error
        raise ConfigError(f"eval split {split_path} is unreadable: {type(err).__name__}: {err}") from None
    vocab = split.vocab
    rib_config = run_rib_config(vocab, fed)
    device = pick_device(fed.device or None)  # the one place that decides CPU or CUDA
    if fed.task == "word2vec":
        evaluator = SkipGramEvaluator(split.test, fed.eval_max_examples, fed.seed)
        first_weights = skipgram.initial_weights(vocab.n_items, fed.item_dim, fed.seed)
    else:
        evaluator = CentralEvaluator(
            split.test, rib_config, fed.eval_max_examples, fed.seed, device=str(device)
        )
        first_weights = initial_weights(fed, rib_config, vocab)

    def evaluate_fn(server_round, weights, config):
        return evaluator(server_round, weights, config)

    per_round = sampled_per_round(fed, population)
    accountant, noise = None, 0.0
    if fed.dp == "user":
        delta = fed.dp_delta or 1.0 / population
        rate = min(1.0, per_round / population)
        noise = fed.dp_noise_multiplier or noise_for_epsilon(
            fed.dp_epsilon, rate, fed.num_server_rounds, delta
        )
        accountant = FederatedAccountant(noise_multiplier=noise, sample_rate=rate, delta=delta)
        log.info(
            "user-level DP: sigma=%.4f, q=%.4f, delta=%.2e over %d rounds",
            noise,
            rate,
            delta,
            fed.num_server_rounds,
        )
    strategy = build_strategy(fed, first_weights, evaluate_fn, population, noise, vocab_fingerprint(vocab))
    if fed.task == "rib" and rib_config.freeze_items:
        # Devices never change the public item table; the server keeps it out of the DP noise and FedAdam.
        strategy.frozen = {i: first_weights[i].copy() for i in frozen_indices(RIB(rib_config))}
    fit_workflow = None
    if fed.secagg:
        shares = fed.secagg_num_shares if fed.secagg_num_shares < 1 else int(fed.secagg_num_shares)
        threshold = fed.secagg_reconstruction_threshold
        threshold = threshold if threshold < 1 else int(threshold)
        fit_workflow = RecordedSecAggPlusWorkflow(
            num_shares=shares,
            reconstruction_threshold=threshold,
            clipping_range=fed.secagg_clipping_range,
            timeout=fed.secagg_timeout or None,
        )
    releaser = None
    if fed.task == "word2vec":
        init_dir = fed.release_dir or fed.checkpoint_dir
        if not init_dir:
            raise ConfigError(
                "task = 'word2vec' needs release-dir (where rib-init.pt goes) or checkpoint-dir"
            )

        def releaser(server_round: int, weights: list) -> Path:
            # The skip-gram's product is a RIB starting point for the next run (initial-checkpoint), not a
            # package for devices: no signature, it goes to devices only inside that run's signed releases.
            note = f"federated skip-gram, round {server_round}"
            vectors = skipgram.item_vectors(weights)
            return save_init_checkpoint(rib_config, vectors, Path(init_dir) / INIT_CHECKPOINT, fed.seed, note)

    elif fed.release_dir:

        def releaser(server_round: int, weights: list) -> Path:
            extra = {"federation": {"round": server_round, "strategy": fed.strategy, "dp": fed.dp}}
            if accountant is not None:
                extra["federation"]["epsilon"] = accountant.epsilon()
            return publish_release(
                weights, rib_config, vocab, fed.release_dir, fed.signing_key, server_round, extra
            )

    run = FederatedRun(
        num_rounds=fed.num_server_rounds,
        fit_workflow=fit_workflow,
        checkpoints=CheckpointStore(fed.checkpoint_dir) if fed.checkpoint_dir else None,
        fingerprint=fingerprint(fed, population),
        accountant=accountant,
        releaser=releaser,
        release_every=fed.release_every,
        metrics_path=fed.metrics_path or None,
        eval_every=fed.eval_every,
        stop_after=stop_after,
        on_round=on_round,
    )
    return run, strategy


def make_server_app(
    fed: FederationConfig | None = None, stop_after: int | None = None, on_round=None
) -> ServerApp:
    """The ServerApp; ``fed`` fixes the settings (Python-driven simulations), else the run config gives them."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        """Run the federation described by the run config."""
        settings = fed if fed is not None else FederationConfig.from_run_config(context.run_config)
        population = population_size(settings, grid)
        progress = on_round or round_logger(settings.num_server_rounds)
        run, strategy = make_run(settings, population, stop_after=stop_after, on_round=progress)
        legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=settings.num_server_rounds),
            strategy=strategy,
            client_manager=SeededClientManager(settings.seed),
        )
        run(grid, legacy)

    return server_app


def round_logger(num_rounds: int):
    """The ServerApp's own progress: one line per round in Flower's log (what ``fl run`` streams)."""

    def on_round(row: dict) -> None:
        if row["round"] == 0:
            shown = (
                f"recall@20 {row['recall@20']:.4f} mrr@20 {row['mrr@20']:.4f}" if "recall@20" in row else ""
            )
            flwr_log(logging.INFO, "round 0 (the starting model): %s", shown or "no evaluation")
        else:
            flwr_log(logging.INFO, "round %d/%d: %s", row["round"], num_rounds, describe_round(row))

    return on_round


app = make_server_app()
