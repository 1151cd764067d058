"""Flower strategies for RIB: FedAvg / FedAdam, user-level DP, seeded sampling, and per-round bookkeeping.

Everything here is Flower's own machinery, configured:

- ``FedAvg`` or ``FedAdam`` (``flwr.server.strategy``), central evaluation through ``evaluate_fn``, devices
  never asked to evaluate (``fraction_evaluate = 0``), failures (dropouts, refusals) accepted;
- user-level DP: ``DifferentialPrivacyClientSideFixedClipping`` around FedAvg (devices clip their update
  with ``fixedclipping_mod``; the server adds Gaussian noise to the average); with ``strategy = fedadam``
  a second FedAdam then steps on the noised average (post-processing, so the DP guarantee is unchanged);
- ``SeededClientManager``: Flower's ``SimpleClientManager`` whose sample is drawn from the sorted node ids
  with a generator keyed by (seed, round), so a resumed run samples what the uninterrupted run would.

``RoundRecorder`` wraps the strategy to keep what a round did (sampled, results, failures and their reasons,
fit metrics), checks every reply before aggregation (``aggregator.validation``) and adapts the DP wrapper to
dropouts: Flower's wrapper drops a whole round on any failure and calibrates its noise to the number it
sampled; here failures are counted and left out, and the noise is calibrated to the number of updates
actually averaged (std = sigma * C / m_received), so the accountant's sigma holds. A round with fewer usable
replies than ``min-fit-clients``, or whose aggregate is not a finite model, is not applied: its record says
``trained = False`` and why, and the round loop fails the run.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log as flwr_log
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, Strategy

from aggregator.validation import (
    ReplyRules,
    aggregate_problem,
    distinct_failures,
    failure_reason,
    screen_results,
)
from federation.config import FederationConfig
from federation.task import SERVER_ROUND_KEY, VOCAB_KEY

__all__ = ["RoundRecorder", "SeededClientManager", "build_strategy", "failure_reason", "sampled_per_round"]

log = logging.getLogger(__name__)

EvaluateFn = Callable[[int, list[np.ndarray], dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


class SeededClientManager(SimpleClientManager):
    """SimpleClientManager with a reproducible sample: sorted node ids, generator keyed by (seed, round)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.round = 0

    def sample(
        self, num_clients: int, min_num_clients: int | None = None, criterion: Criterion | None = None
    ) -> list[ClientProxy]:
        """Wait for ``min_num_clients``, then draw ``num_clients`` reproducibly."""
        self.wait_for(num_clients if min_num_clients is None else min_num_clients)
        available = sorted(self.clients, key=lambda cid: int(cid) if cid.isdigit() else cid)
        if criterion is not None:
            available = [cid for cid in available if criterion.select(self.clients[cid])]
        if num_clients > len(available):
            log.info("sampling failed: %d available, %d requested", len(available), num_clients)
            return []
        rng = random.Random(f"{self.seed}/{self.round}")
        return [self.clients[cid] for cid in rng.sample(available, num_clients)]

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        """Flower's wait, saying what it waits for: one line whenever the count changes, else every minute."""
        deadline = time.monotonic() + timeout
        announced: tuple[int, float] | None = None
        with self._cv:
            while len(self.clients) < num_clients:
                now = time.monotonic()
                if announced is None or announced[0] != len(self.clients) or now - announced[1] >= 60:
                    flwr_log(logging.INFO, "waiting for %d devices (have %d)", num_clients, len(self.clients))
                    announced = (len(self.clients), now)
                if now >= deadline:
                    return False
                self._cv.wait(timeout=min(deadline - now, 10.0))
        return True


def sampled_per_round(fed: FederationConfig, population: int) -> int:
    """How many devices a round samples (Flower's rule: fraction of available, at least min-fit-clients)."""
    return max(int(population * fed.fraction_fit), fed.min_fit_clients)


def weighted_fit_metrics(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted mean of the devices' training metrics; device timings as plain mean and max."""
    keys = sorted({k for _, m in metrics for k in m})
    out: dict[str, Scalar] = {}
    for key in keys:
        values = [(n, float(m[key])) for n, m in metrics if key in m]
        if key == "seconds":  # a time per device, not per example: weighting by examples would skew it
            out["seconds"] = sum(v for _, v in values) / len(values)
            out["seconds_max"] = max(v for _, v in values)
        else:
            out[key] = sum(n * v for n, v in values) / max(1, sum(n for n, _ in values))
    out["devices"] = float(len(metrics))
    return out


def build_strategy(
    fed: FederationConfig,
    initial_weights: list[np.ndarray],
    evaluate_fn: EvaluateFn | None,
    population: int,
    noise_multiplier: float | None = None,
    vocab_hash: str = "",
) -> RoundRecorder:
    """The configured strategy stack, outermost the RoundRecorder (``noise_multiplier`` default: the config's;
    ``vocab_hash``: the run's vocabulary fingerprint, sent to devices with every round)."""
    if noise_multiplier is None:
        noise_multiplier = fed.dp_noise_multiplier

    def fit_config(server_round: int) -> dict[str, Scalar]:
        config: dict[str, Scalar] = {SERVER_ROUND_KEY: server_round}
        if vocab_hash:
            config[VOCAB_KEY] = vocab_hash  # a device whose installed vocabulary differs declines at once
        return config

    common = {
        "fraction_fit": fed.fraction_fit,
        "fraction_evaluate": 0.0,
        "min_fit_clients": fed.min_fit_clients,
        "min_evaluate_clients": 0,
        "min_available_clients": fed.min_available_clients,
        "evaluate_fn": evaluate_fn,
        "on_fit_config_fn": fit_config,
        "accept_failures": True,
        "initial_parameters": ndarrays_to_parameters(initial_weights),
        "fit_metrics_aggregation_fn": weighted_fit_metrics,
    }

    def fedadam() -> FedAdam:
        return FedAdam(
            **common,
            eta=fed.server_lr,
            eta_l=fed.local_lr,
            beta_1=fed.server_beta1,
            beta_2=fed.server_beta2,
            tau=fed.server_tau,
        )

    # Under user-level DP the noise goes on a plain average of clipped updates (the sensitivity it is
    # calibrated to); FedAdam then steps on that noised average: post-processing, the guarantee holds.
    private = fed.dp == "user"
    inner: Strategy = fedadam() if fed.strategy == "fedadam" and not private else FedAvg(**common)
    dp_wrapper = None
    post_adam = fedadam() if fed.strategy == "fedadam" and private else None
    if private:
        dp_wrapper = DifferentialPrivacyClientSideFixedClipping(
            inner,
            noise_multiplier=noise_multiplier,
            clipping_norm=fed.dp_clipping_norm,
            num_sampled_clients=sampled_per_round(fed, population),
        )
    # Honest devices clip to the DP clipping norm already; without SecAgg+ the server enforces it for the others.
    clip = fed.dp_clipping_norm if private and not fed.secagg else 0.0
    rules = ReplyRules.for_weights(
        initial_weights,
        uniform_weight=private,
        max_examples=fed.max_device_examples,
        # Under SecAgg+ every reply carries the same aggregate: there is no single update to measure.
        max_update_norm=0.0 if fed.secagg else fed.max_update_norm,
    )
    return RoundRecorder(
        dp_wrapper or inner,
        dp_wrapper,
        max_update_norm=clip,
        post_adam=post_adam,
        rules=rules,
        min_results=fed.min_fit_clients,
    )


class RoundRecorder(Strategy):
    """Delegates to a Flower strategy and records what each round did (see the module docstring on DP)."""

    def __init__(
        self,
        strategy: Strategy,
        dp_wrapper: DifferentialPrivacyClientSideFixedClipping | None = None,
        max_update_norm: float = 0.0,
        post_adam: FedAdam | None = None,
        rules: ReplyRules | None = None,
        min_results: int = 1,
    ) -> None:
        self.strategy = strategy
        self.dp_wrapper = dp_wrapper
        self.post_adam = post_adam  # FedAdam stepping on the DP average (see build_strategy)
        self.max_update_norm = float(
            max_update_norm
        )  # > 0: clip each update's distance from the global model
        self.rules = rules  # what a usable reply looks like (None: taken from the first global model seen)
        self.min_results = max(1, int(min_results))  # fewer usable replies: the round is not applied
        self._global: dict[int, list[np.ndarray]] = {}
        self.rounds: dict[int, dict[str, object]] = {}
        # Weight positions held at fixed values (a frozen public table, see RIBConfig.freeze_items): the DP
        # wrapper noises every array and FedAdam would walk on that noise, so each round restores them.
        self.frozen: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"RoundRecorder({self.strategy!r})"

    @property
    def base(self) -> Strategy:
        """The innermost optimiser strategy (FedAvg / FedAdam)."""
        return self.dp_wrapper.strategy if self.dp_wrapper is not None else self.strategy

    def initialize_parameters(self, client_manager):
        """Initial global parameters."""
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample devices; remembers how many."""
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        self.rounds.setdefault(server_round, {})["sampled"] = len(instructions)
        self._global = {server_round: parameters_to_ndarrays(parameters)}
        if self.rules is None:
            self.rules = ReplyRules.for_weights(self._global[server_round])
        return instructions

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate the replies that pass ``aggregator.validation``; failures and rejections are counted."""
        record = self.rounds.setdefault(server_round, {})
        failures = distinct_failures(failures)
        global_weights = self._global.get(server_round)
        if self.rules is None:  # aggregate_fit without configure_fit (tests): the first reply sets the shapes
            self.rules = ReplyRules.for_weights(
                global_weights or parameters_to_ndarrays(results[0][1].parameters)
            )
        screened = screen_results(results, self.rules, global_weights)
        reasons = Counter(failure_reason(f) for f in failures) + screened.rejected
        # Float sums depend on order and replies arrive in any order: aggregate in a content-defined order
        # so a resumed run reproduces the uninterrupted one bit for bit.
        usable = sorted(
            screened.usable, key=lambda pair: hashlib.sha256(b"".join(pair[1].parameters.tensors)).digest()
        )
        record.update(
            {
                "results": len(results),
                "failures": len(failures),
                "accepted": len(usable),
                "rejected": sum(screened.rejected.values()),
                "failure_reasons": dict(sorted(reasons.items())),
                "examples_clamped": screened.clamped,
                "trained": False,
            }
        )
        if screened.norms:
            record["update_norm_median"] = float(np.median(screened.norms))
            record["update_norm_max"] = float(max(screened.norms))
        if screened.rejected:
            flwr_log(logging.WARNING, "round %d: replies rejected: %s", server_round, dict(screened.rejected))
        if self.max_update_norm > 0 and global_weights is not None:
            usable, record["clipped"] = self._clip_updates(global_weights, usable)
            if record["clipped"]:
                flwr_log(
                    logging.WARNING,
                    "round %d: %d update(s) clipped to norm %.3g",
                    server_round,
                    record["clipped"],
                    self.max_update_norm,
                )
        if len(usable) < self.min_results:
            record["failed"] = f"{len(usable)} usable update(s), min-fit-clients is {self.min_results}" + (
                f" (failed: {_reasons_text(reasons)})" if reasons else ""
            )
            return None, {}
        if self.dp_wrapper is not None:
            # Noise calibrated to the updates actually averaged (uniform weights: see federation.training).
            self.dp_wrapper.num_sampled_clients = len(usable)
            record["dp_noise_std"] = (
                self.dp_wrapper.noise_multiplier * self.dp_wrapper.clipping_norm / len(usable)
            )
            parameters, metrics = self.dp_wrapper.aggregate_fit(server_round, usable, [])
            if self.post_adam is not None and parameters is not None:
                # The noised average enters Flower's FedAdam as the one update of the round.
                averaged = FitRes(usable[0][1].status, parameters, 1, {})
                parameters, _ = self.post_adam.aggregate_fit(server_round, [(usable[0][0], averaged)], [])
        else:
            parameters, metrics = self.strategy.aggregate_fit(server_round, usable, [])
        if self.frozen and parameters is not None:
            parameters = self._restore_frozen(parameters)
        problem = aggregate_problem(
            None if parameters is None else parameters_to_ndarrays(parameters), self.rules
        )
        if problem is not None:
            record["failed"] = f"{problem}: not applied"
            return None, {}
        record["trained"] = True
        record["fit_metrics"] = dict(metrics)
        return parameters, metrics

    def _restore_frozen(self, parameters: Parameters) -> Parameters:
        """Put the frozen arrays back (in the result and in FedAdam's own copy of the weights)."""
        arrays = parameters_to_ndarrays(parameters)
        adam = self.post_adam or self.base
        for index, value in self.frozen.items():
            arrays[index] = value.copy()
            if isinstance(adam, FedAdam) and adam.current_weights:
                adam.current_weights[index] = value.copy()
        return ndarrays_to_parameters(arrays)

    def _clip_updates(self, global_weights: list[np.ndarray], results: list) -> tuple[list, int]:
        """Scale each update (its weights minus the global weights) down to ``max_update_norm``; count clips.

        Without SecAgg+ the server sees single updates, so a device that skips client-side clipping (or
        sends a huge update to dominate the average) is bounded here. Under SecAgg+ only the sum is visible.
        """
        out, clipped = [], 0
        for proxy, res in results:
            weights = parameters_to_ndarrays(res.parameters)
            if [w.shape for w in weights] != [g.shape for g in global_weights]:
                continue  # not this model's update: dropped
            deltas = [w.astype(np.float64) - g for w, g in zip(weights, global_weights, strict=True)]
            norm = float(np.sqrt(sum(float((d * d).sum()) for d in deltas)))
            if norm > self.max_update_norm:
                scale = self.max_update_norm / norm
                weights = [
                    (g + d * scale).astype(w.dtype)
                    for g, d, w in zip(global_weights, deltas, weights, strict=True)
                ]
                res = FitRes(res.status, ndarrays_to_parameters(weights), res.num_examples, res.metrics)
                clipped += 1
            out.append((proxy, res))
        return out, clipped

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager):
        """No federated evaluation (central only)."""
        return []

    def aggregate_evaluate(self, server_round: int, results, failures):
        """Unused: evaluation is central."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        """Central evaluation."""
        return self.strategy.evaluate(server_round, parameters)

    # ---- state for checkpoints ----------------------------------------------------------------------------
    def optimizer_state(self) -> dict[str, list[np.ndarray]]:
        """FedAdam's moments and current weights (empty for FedAvg)."""
        base = self.post_adam or self.base
        if isinstance(base, FedAdam):
            state = {"current_weights": list(base.current_weights)}
            if base.m_t:
                state["m_t"] = list(base.m_t)
            if base.v_t:
                state["v_t"] = list(base.v_t)
            return state
        return {}

    def load_optimizer_state(self, state: dict[str, list[np.ndarray]]) -> None:
        """Restore what optimizer_state returned."""
        base = self.post_adam or self.base
        if isinstance(base, FedAdam) and state:
            base.current_weights = list(state["current_weights"])
            base.m_t = list(state.get("m_t", [])) or None
            base.v_t = list(state.get("v_t", [])) or None


def _reasons_text(reasons: Counter) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
