"""A federation in one process: the real ServerApp round loop and the real ClientApps, no Ray, no sockets.

``LoopbackGrid`` is a Flower ``Grid`` whose ``send_and_receive`` hands every message to the destination
node's ``ClientApp`` (``federation.client_app.make_client_app``) with that node's own ``Context``, so state
between SecAgg+ stages lives where it would on a SuperNode. A ClientApp that raises answers with the error
reply a SuperNode would send. ``run_federation`` runs ``aggregator.server_app.make_run`` over it, as the
ServerApp's ``main`` does; one round of a 6-device population takes well under a second.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from aggregator.server_app import make_run
from aggregator.strategy import RoundRecorder, SeededClientManager
from federation.client_app import make_client_app
from federation.config import FederationConfig

SERVER_NODE = 1


class LoopbackGrid(Grid):
    """Nodes ``1000 + partition`` whose ClientApps run in this process when a message reaches them."""

    def __init__(
        self,
        fed: FederationConfig,
        partitions: Iterable[int],
        mods_for: Callable[[int], list] | None = None,
        node_config_for: Callable[[int], dict] | None = None,
    ):
        self._run = Run.create_empty(7)
        self.apps, self.contexts = {}, {}
        for partition in partitions:
            node = 1000 + partition
            self.apps[node] = make_client_app(extra_mods=mods_for(partition) if mods_for else None, fed=fed)
            # Simulation nodes are a partition of the population; deployment nodes name their store and package.
            node_config = node_config_for(partition) if node_config_for else {"partition-id": partition}
            self.contexts[node] = Context(7, node, node_config, RecordDict(), {})

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LoopbackGrid answers through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LoopbackGrid answers through send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex
            message.metadata.__dict__["_run_id"] = self._run.run_id
            message.metadata.__dict__["_src_node_id"] = SERVER_NODE
            node = message.metadata.dst_node_id
            try:
                # A copy, as the wire makes one: SecAgg+'s mod edits the message it receives.
                reply = self.apps[node](copy.deepcopy(message), self.contexts[node])
            except Exception as err:  # noqa: BLE001 - what a SuperNode does with a ClientApp that raised
                reason = f"{type(err)}:<'{err}'>"
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
                )
            replies.append(reply)
        return replies


def run_federation(
    fed: FederationConfig,
    partitions: Iterable[int],
    mods_for: Callable[[int], list] | None = None,
    node_config_for: Callable[[int], dict] | None = None,
) -> tuple[RoundRecorder, Sequence[dict], BaseException | None]:
    """Run (or resume) ``fed`` over the population's devices ``partitions``, one loopback node each:
    (strategy, history rows, the run's error)."""
    threads = torch.get_num_threads()  # the ClientApp sets 1 thread for its training; give it back after
    grid = LoopbackGrid(fed, partitions, mods_for, node_config_for)
    run, strategy = make_run(fed, len(grid.apps))
    context = LegacyContext(
        context=Context(7, SERVER_NODE, {}, RecordDict(), {}),
        config=ServerConfig(num_rounds=fed.num_server_rounds),
        strategy=strategy,
        client_manager=SeededClientManager(fed.seed),
    )
    error = None
    started = time.perf_counter()
    # Flower's Message reads who is sending from the process's task identity, as a ServerApp process sets it.
    identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SERVER_NODE
    try:
        run(grid, context)
    except Exception as err:  # noqa: BLE001 - the caller asserts on it
        error = err
    finally:
        torch.set_num_threads(threads)
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity
    run.seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    return strategy, run.history, error
