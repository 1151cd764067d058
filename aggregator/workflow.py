"""The server's round loop: Flower's DefaultWorkflow, plus resume, accounting, checkpoints and releases.

Per round it runs Flower's own fit workflow (``default_fit_workflow``, or ``SecAggPlusWorkflow`` so the
server only ever sees the sum of the sampled updates), then central evaluation, then: step the DP
accountant, append a metrics row (JSON lines), checkpoint, and publish a signed release when one is due.
On start it resumes from the newest verified checkpoint: same weights, optimiser state, accountant and
history, continuing at the next round (the client sample of a round depends on (seed, round) only).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid

from aggregator.checkpoint import CheckpointStore, ServerState
from aggregator.strategy import RoundRecorder, SeededClientManager
from privacy.accountant import FederatedAccountant

log = logging.getLogger(__name__)

Releaser = Callable[[int, list], Path]


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
            self.fit_workflow(grid, context)
            fit_seconds = time.perf_counter() - t0
            weights = parameters_to_ndarrays(
                compat.arrayrecord_to_parameters(
                    context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
                )
            )
            done = strategy.rounds.get(server_round, {})
            if self.accountant is not None and done.get("results", 0):
                self.accountant.step()
            row: dict[str, object] = {"round": server_round, "fit_seconds": fit_seconds}
            if server_round % self.eval_every == 0 or server_round == self.num_rounds:
                row.update(self._evaluate(strategy, server_round, weights))
            row.update(
                {
                    "sampled": done.get("sampled", 0),
                    "participants": done.get("results", 0),
                    "dropouts": done.get("failures", 0),
                    "rejected": done.get("rejected_non_finite", 0),
                    "failure_reasons": done.get("failure_reasons", {}),
                    # Plain float32 weights each way (SecAgg+ adds key exchange and masking stages on top).
                    "bytes_down": done.get("sampled", 0) * _weight_bytes(weights),
                    "bytes_up": done.get("results", 0) * _weight_bytes(weights),
                    "fit_metrics": done.get("fit_metrics", {}),
                    "seconds": time.perf_counter() - t0,
                }
            )
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
        shown = {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "fit_metrics"
        }
        log.info("round %s: %s", row.get("round"), shown)
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


def _weight_bytes(weights: list) -> int:
    return int(sum(int(w.size) * 4 for w in weights))
