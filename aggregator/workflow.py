"""The server's round loop: Flower's DefaultWorkflow, plus resume, accounting, checkpoints and releases.

Per round it runs Flower's own fit workflow (``default_fit_workflow``, or ``SecAggPlusWorkflow`` so the
server only ever sees the sum of the sampled updates) on a ``CheckedGrid`` (malformed replies become failures
of their device), then central evaluation, then: step the DP accountant, append a metrics row (JSON lines),
checkpoint, and publish a signed release when one is due. On start it resumes from the newest verified
checkpoint: same weights, optimiser state, accountant and history, continuing at the next round (the client
sample of a round depends on (seed, round) only).

A round that did not train (fewer usable replies than ``min-fit-clients``, a halted SecAgg+ protocol, an
aggregate that is not a finite model) fails the run: its row goes to the metrics file with the reasons, and
``RunFailed`` is raised before any checkpoint or release of that round is written. Rerunning the same
command resumes from the last round that trained.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log as flwr_log
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from aggregator.checkpoint import CheckpointStore, ServerState
from aggregator.strategy import RoundRecorder, SeededClientManager
from aggregator.validation import CheckedGrid, distinct_failures, failure_reason
from privacy.accountant import FederatedAccountant

log = logging.getLogger(__name__)

Releaser = Callable[[int, list], Path]


class RunFailed(RuntimeError):
    """A round did not train; the message says which round and why (reasons counted per device)."""


def describe_round(row: dict[str, object]) -> str:
    """One line for a round's row: devices that trained, failures by reason, accuracy, epsilon, time."""
    reasons = row.get("failure_reasons") or {}
    failed = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none"  # type: ignore[union-attr]
    parts = [f"{row.get('participants', 0)}/{row.get('sampled', 0)} devices trained", f"failed: {failed}"]
    if "recall@20" in row:
        parts.append(f"recall@20 {float(row['recall@20']):.4f} mrr@20 {float(row.get('mrr@20', 0.0)):.4f}")
    if row.get("epsilon") is not None:
        parts.append(f"epsilon {float(row['epsilon']):.3g}")
    parts.append(f"{float(row.get('seconds', 0.0)):.1f} s")
    line = ", ".join(parts)
    return f"{line} -> NOT TRAINED: {row['failed']}" if row.get("failed") else line


class RecordedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow that, when the protocol halts, tells the strategy which devices failed and why.

    Flower's workflow returns silently on a halt (too few devices left for the reconstruction threshold), so
    the strategy's ``aggregate_fit`` never sees that round. A reply Flower's stage code cannot take (past the
    ``CheckedGrid``'s structural checks) halts the round the same way instead of ending the run.
    """

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        state = WorkflowState()
        steps = (
            self.setup_stage,
            self.share_keys_stage,
            self.collect_masked_vectors_stage,
            self.unmask_stage,
        )
        flwr_log(logging.INFO, "Secure aggregation commencing.")
        for step in steps:
            problem = None
            try:
                done = step(grid, context, state)
            except Exception as err:  # noqa: BLE001 - a device's reply broke the protocol: the round halts
                done, problem = False, f"{type(err).__name__}: {str(err)[:200]}"
            if not done:
                stage = step.__name__.removesuffix("_stage")
                flwr_log(logging.INFO, "Secure aggregation halted.")
                self._record_halt(context, state, stage, problem)
                return
        flwr_log(logging.INFO, "Secure aggregation completed.")

    @staticmethod
    def _record_halt(context: LegacyContext, state: WorkflowState, stage: str, problem: str | None) -> None:
        strategy = context.strategy
        current = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        if not isinstance(strategy, RoundRecorder):
            return
        record = strategy.rounds.setdefault(current, {})
        failures = distinct_failures(state.failures)
        reasons = Counter(failure_reason(f) for f in failures)
        why = problem or (
            f"{len(state.active_node_ids)} of {len(state.sampled_node_ids)} sampled devices left, "
            f"below the reconstruction threshold {state.threshold}"
        )
        record.update(
            {
                "results": 0,
                "failures": len(failures),
                "accepted": 0,
                "rejected": 0,
                "failure_reasons": dict(sorted(reasons.items())),
                "trained": False,
                "failed": f"SecAgg+ halted in {stage}: {why}"
                + (
                    f" (failed: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})"
                    if reasons
                    else ""
                ),
            }
        )


class FederatedRun:
    """Callable ServerApp workflow: ``FederatedRun(...)(grid, legacy_context)``."""

    def __init__(
        self,
        num_rounds: int,
        fit_workflow: Callable | None = None,
        checkpoints: CheckpointStore | None = None,
        fingerprint: str = "",
        accountant: FederatedAccountant | None = None,
        releaser: Releaser | None = None,
        release_every: int = 0,
        metrics_path: str | Path | None = None,
        eval_every: int = 1,
        stop_after: int | None = None,
        on_round: Callable[[dict], None] | None = None,
    ) -> None:
        self.num_rounds = int(num_rounds)
        self.fit_workflow = fit_workflow or default_fit_workflow
        self.checkpoints = checkpoints
        self.fingerprint = fingerprint
        self.accountant = accountant
        self.releaser = releaser
        self.release_every = int(release_every)
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.eval_every = max(1, int(eval_every))
        self.stop_after = stop_after  # tests: end the process after this round, as a kill would
        self.on_round = on_round  # progress display: called with every round's row
        self.history: list[dict[str, object]] = []
        self.releases: list[dict[str, object]] = []

    # ---------------------------------------------------------------------------------------------------
    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        """Run (or resume) the federation."""
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        strategy = context.strategy
        if not isinstance(strategy, RoundRecorder):
            raise TypeError("FederatedRun needs the RoundRecorder strategy from aggregator.strategy")
        thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
        registered.wait()
        try:
            self._run(grid, context, strategy)
        finally:
            stop.set()
            thread.join()

    def _run(self, grid: Grid, context: LegacyContext, strategy: RoundRecorder) -> None:
        state = self.checkpoints.latest(self.fingerprint) if self.checkpoints else None
        if state is not None:
            log.info("[RESUME] from the checkpoint of round %d", state.round)
            weights = state.weights
            strategy.load_optimizer_state(state.optimizer)
            if self.accountant is not None and state.accountant is not None:
                self.accountant = FederatedAccountant.from_state(state.accountant)
            self.history, self.releases = list(state.history), list(state.releases)
            if self.metrics_path is not None:
                # Rewritten from the checkpoint: rows written after it (a kill mid-round) must not repeat.
                self.metrics_path.write_text(
                    "".join(json.dumps(r, default=float) + "\n" for r in self.history)
                )
            start = state.round + 1
        else:
            parameters = strategy.initialize_parameters(context.client_manager)
            if parameters is None:
                raise RuntimeError("the strategy has no initial parameters (the server always provides them)")
            weights = parameters_to_ndarrays(parameters)
            start = 1
            row = self._evaluate(strategy, 0, weights)
            row.update({"round": 0, "seconds": 0.0})
            self._finish_round(row, weights, strategy)
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(weights), True
        )
        cfg = ConfigRecord()
        cfg[Key.START_TIME] = time.perf_counter()
        context.state.config_records[MAIN_CONFIGS_RECORD] = cfg

        for server_round in range(start, self.num_rounds + 1):
            log.info("[ROUND %d/%d]", server_round, self.num_rounds)
            cfg[Key.CURRENT_ROUND] = server_round
            if isinstance(context.client_manager, SeededClientManager):
                context.client_manager.round = server_round
            t0 = time.perf_counter()
            self.fit_workflow(CheckedGrid(grid, [tuple(w.shape) for w in weights]), context)
            fit_seconds = time.perf_counter() - t0
            done = strategy.rounds.get(server_round, {})
            row: dict[str, object] = {"round": server_round, "fit_seconds": fit_seconds}
            row.update(_round_counts(done, weights))
            if not done.get("trained"):
                # Nothing is applied, accounted, checkpointed or released for this round.
                row.update(
                    {
                        "trained": False,
                        "failed": done.get("failed") or "no device was sampled",
                        "seconds": time.perf_counter() - t0,
                    }
                )
                self._report(row)
                raise RunFailed(f"round {server_round}: {row['failed']}")
            weights = parameters_to_ndarrays(
                compat.arrayrecord_to_parameters(
                    context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
                )
            )
            if self.accountant is not None:
                self.accountant.step()
            if server_round % self.eval_every == 0 or server_round == self.num_rounds:
                row.update(self._evaluate(strategy, server_round, weights))
            row.update({"fit_metrics": done.get("fit_metrics", {}), "seconds": time.perf_counter() - t0})
            due = self.releaser is not None and (
                server_round == self.num_rounds
                or (self.release_every and server_round % self.release_every == 0)
            )
            if due:
                path = self.releaser(server_round, weights)
                self.releases.append({"round": server_round, "path": str(path)})
                row["release"] = str(path)
            self._finish_round(row, weights, strategy)
            if self.stop_after is not None and server_round >= self.stop_after:
                log.info("stopping after round %d (stop_after)", server_round)
                return

    # ---------------------------------------------------------------------------------------------------
    def _evaluate(self, strategy: RoundRecorder, server_round: int, weights: list) -> dict[str, object]:
        t0 = time.perf_counter()
        result = strategy.evaluate(server_round, ndarrays_to_parameters(weights))
        row: dict[str, object] = {"eval_seconds": time.perf_counter() - t0}
        if result is not None:
            loss, metrics = result
            row.update({"loss": float(loss), **{k: float(v) for k, v in metrics.items()}})
        if self.accountant is not None:
            row["epsilon"] = self.accountant.epsilon()
            row["delta"] = self.accountant.delta
        return row

    def _finish_round(self, row: dict[str, object], weights: list, strategy: RoundRecorder) -> None:
        """History row, then checkpoint, then the metrics line (a resume rewrites the lines from the checkpoint)."""
        self.history.append(row)
        self._checkpoint(int(row["round"]), weights, strategy)
        self._report(row)

    def _report(self, row: dict[str, object]) -> None:
        """The round's progress line and its metrics line."""
        if self.on_round is not None:
            self.on_round(row)
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            if row["round"] == 0:
                self.metrics_path.write_text("")
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=float) + "\n")

    def _checkpoint(self, server_round: int, weights: list, strategy: RoundRecorder) -> None:
        if self.checkpoints is None:
            return
        self.checkpoints.save(
            ServerState(
                round=server_round,
                weights=weights,
                fingerprint=self.fingerprint,
                optimizer=strategy.optimizer_state(),
                accountant=self.accountant.state() if self.accountant is not None else None,
                history=self.history,
                releases=self.releases,
            )
        )


def _round_counts(done: dict[str, object], weights: list) -> dict[str, object]:
    """A round's participation figures from the strategy's record of it."""
    sampled = int(done.get("sampled", 0))  # type: ignore[arg-type]
    accepted = int(done.get("accepted", 0))  # type: ignore[arg-type]
    counts = {
        "sampled": sampled,
        "participants": accepted,  # replies that passed the checks and were averaged
        "dropouts": done.get("failures", 0),  # devices that failed, declined or vanished
        "rejected": done.get("rejected", 0),  # replies the server's checks dropped
        "failure_reasons": done.get("failure_reasons", {}),
        # Plain float32 weights each way (SecAgg+ adds key exchange and masking stages on top).
        "bytes_down": sampled * _weight_bytes(weights),
        "bytes_up": int(done.get("results", 0)) * _weight_bytes(weights),  # type: ignore[arg-type]
    }
    for key in ("update_norm_median", "update_norm_max", "clipped", "examples_clamped", "dp_noise_std"):
        if key in done:
            counts[key] = done[key]
    return counts


def _weight_bytes(weights: list) -> int:
    return int(sum(int(w.size) * 4 for w in weights))
