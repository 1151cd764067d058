"""The Flower ClientApp of a device: federated glue only (training itself is ``federation.training``).

Which device a ClientApp instance is:

- deployment (``rib-edge fl join`` / ``flower-supernode``): node config ``device-dir`` (the device's store),
  ``package-dir`` + ``public-key`` (its installed, signed model package: the shared vocabulary comes from
  there, so a device trains only on items of a genuine release);
- simulation: node config ``partition-id`` maps to ``<population-dir>/devices/<id>`` and the vocabulary
  comes from the population's split (every virtual device shares one process-wide copy).

Before any training the device checks that it belongs to this run (``check_round``): the vocabulary
fingerprint the server sends with every round must be its installed package's, and the global weights must
have the shapes of the model it builds from that package and the run config. Otherwise, and whenever it has
nothing to train on or no budget left, it declines with a short error reply ``declined: <reason>: <why>``
(``federation.task.DECLINE_REASONS``) that the server counts and shows; nothing else leaves the device.
``check_device`` runs the same checks a device can make alone (package verifies, store opens, its activities
are the package's) when ``rib-edge fl join`` starts, so a mismatch is seen before the device joins at all.

What leaves the device is the new weights, the averaging weight and the scalar metrics named in
``federation.task.METRIC_KEYS``. ``egress_guard_mod`` enforces that on every reply: an array whose
shape is not a model shape, a metric not on the list, or a string anywhere fails the round instead of
leaving. SecAgg+ (``secaggplus_mod``) and client-side update clipping (``fixedclipping_mod``) are Flower's
own mods; they run only when the server's instructions ask for them, so one ClientApp serves every run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

# Flower posts usage telemetry unless told not to (read when flwr is first imported): devices do not phone home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client import Client, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import parameters_to_ndarrays
from flwr.common.logger import FLOWER_LOGGER, set_logger_propagation
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from edge_client.keys import KeyProviderError, default_key_provider
from edge_client.package import PackageError
from edge_client.store import MANIFEST_NAME, StoreError, TupleStore
from federation.config import FederationConfig
from federation.task import (
    METRIC_KEYS,
    SERVER_ROUND_KEY,
    VOCAB_KEY,
    declined_text,
    run_rib_config,
    vocab_fingerprint,
)
from federation.training import DeviceTrainer, DeviceTrainingConfig, TrainingRefused, set_torch_threads
from model.data.dataset import SplitData, Vocabulary
from model.local import LocalTrainConfig, get_weights
from model.rib import RIB
from model.skipgram import SkipGramConfig

log = logging.getLogger(__name__)
# Opacus' import-time logging.basicConfig would print every Flower line twice (see aggregator.server_app).
set_logger_propagation(FLOWER_LOGGER, False)


class EgressError(RuntimeError):
    """A reply that would carry something other than weights and allowed scalar metrics."""


# ---- where the device and its vocabulary are ---------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _population_vocab(split_path: str) -> Vocabulary:
    return SplitData.load(split_path).vocab


@functools.lru_cache(maxsize=4)
def _package_vocab(package_dir: str, public_key: str) -> Vocabulary:
    from edge_client.package import load_vocab, verify_package

    manifest = verify_package(package_dir, public_key)
    vocab = load_vocab(manifest)
    return Vocabulary(
        item_ids=np.asarray(vocab.item_ids, dtype=str), activities=vocab.activities, dwell=vocab.dwell
    )


def device_and_vocab(node_config: Mapping[str, object], fed: FederationConfig) -> tuple[Path, Vocabulary]:
    """This node's device directory and the federation's shared vocabulary."""
    if "device-dir" in node_config:
        device_dir = Path(str(node_config["device-dir"]))
    elif "partition-id" in node_config:
        device_dir = fed.device_dir_for(int(node_config["partition-id"]))  # type: ignore[arg-type]
    else:
        raise ValueError("node config needs device-dir (deployment) or partition-id (simulation)")
    if "package-dir" in node_config:
        if "public-key" not in node_config:
            raise ValueError("node config package-dir needs public-key (the release signing key)")
        try:
            vocab = _package_vocab(str(node_config["package-dir"]), str(node_config["public-key"]))
        except PackageError as err:
            raise TrainingRefused("package_invalid", f"the installed package is refused: {err}") from None
        return device_dir, vocab
    split = fed.eval_split_path()
    if split is None:
        raise ValueError(
            "no vocabulary: give the node a package-dir, or the run a population-dir / eval-split"
        )
    return device_dir, _population_vocab(str(split))


def training_config(fed: FederationConfig, server_round: int, device_name: str) -> DeviceTrainingConfig:
    """The round's local training settings; the seed depends on run seed, round and device only."""
    digest = hashlib.sha256(f"{fed.seed}/{server_round}/{device_name}".encode()).digest()
    local = LocalTrainConfig(
        steps=fed.local_steps,
        batch_size=fed.local_batch_size,
        lr=fed.local_lr,
        optimizer=fed.local_optimizer,
        max_len=fed.max_len,
        seed=int.from_bytes(digest[:4], "little"),
    )
    skipgram = SkipGramConfig(
        window=fed.w2v_window,
        negatives=fed.w2v_negatives,
        steps=fed.local_steps,
        lr=fed.local_lr,
        seed=local.seed,
    )
    return DeviceTrainingConfig(
        local=local,
        task=fed.task,
        skipgram=skipgram,
        record_dp_noise_multiplier=fed.record_dp_noise_multiplier,
        record_dp_max_grad_norm=fed.record_dp_max_grad_norm,
        budget_epsilon=fed.device_budget_epsilon,
        delta=fed.device_delta,
        uniform_weight=fed.dp == "user",
    )


# ---- does this device belong to the run? ----------------------------------------------------------------


def expected_shapes(fed: FederationConfig, vocab: Vocabulary) -> list[tuple[int, ...]]:
    """The shapes of the global weights this device can train: the run's model built on its vocabulary."""
    if fed.task == "word2vec":
        return [(vocab.n_items + 1, fed.item_dim)] * 2
    return [tuple(w.shape) for w in get_weights(RIB(run_rib_config(vocab, fed)))]


def check_round(
    parameters: list[np.ndarray], config: Mapping[str, object], fed: FederationConfig, vocab: Vocabulary
) -> None:
    """Decline (TrainingRefused) a round whose model is not the one this device's package describes."""
    theirs, ours = config.get(VOCAB_KEY), vocab_fingerprint(vocab)
    if theirs is not None and theirs != ours:
        raise TrainingRefused(
            "vocab_mismatch",
            f"the run's vocabulary is {theirs}, this device's installed package has {ours} "
            f"({vocab.n_items} items, {len(vocab.activities.names)} activities): install the run's release",
        )
    got = [tuple(a.shape) for a in parameters]
    wanted = expected_shapes(fed, vocab)
    if got != wanted:
        first = next(
            (i for i, (a, b) in enumerate(zip(got, wanted, strict=False)) if a != b),
            min(len(got), len(wanted)),
        )
        detail = (
            f"{len(got)} arrays, this device's model has {len(wanted)}"
            if len(got) != len(wanted)
            else f"array {first} is {got[first]}, this device's model has {wanted[first]}"
        )
        raise TrainingRefused(
            "shape_mismatch", f"the global weights do not fit this device's model: {detail}"
        )


class JoinRefused(RuntimeError):
    """A device that cannot take part in any run with its package and store; ``reason`` names why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_device(
    device_dir: str | Path, package_dir: str | Path, public_key: str | Path
) -> dict[str, object]:
    """What ``rib-edge fl join`` checks before the SuperNode starts; returns counts to show, or raises JoinRefused.

    The installed package must verify; the store must open with its key and be readable; and if it holds
    records, at least one must be of an activity the package's model knows (a store written under another
    activity vocabulary would train on nothing).
    """
    try:
        vocab = _package_vocab(str(package_dir), str(public_key))
    except PackageError as err:
        raise JoinRefused("package_invalid", f"the installed package is refused: {err}") from None
    device_dir = Path(device_dir)
    if not (device_dir / MANIFEST_NAME).is_file():
        raise JoinRefused("store_unreadable", f"{device_dir} holds no device store (no {MANIFEST_NAME})")
    try:
        store = TupleStore(device_dir, key_provider=default_key_provider(device_dir))
        try:
            records = store.read()
        finally:
            store.close()
    except (StoreError, KeyProviderError, OSError) as err:
        raise JoinRefused(
            "store_unreadable", f"the device store {device_dir} cannot be read: {err}"
        ) from None
    known = set(vocab.activities.names)
    activities = {r.activity for r in records}
    if records and not activities & known:
        raise JoinRefused(
            "activity_mismatch",
            f"the store's activities {sorted(activities)[:8]} are not the package's {sorted(known)}: "
            "it was recorded for another model",
        )
    return {
        "records": len(records),
        "sessions": len({r.session_id for r in records}),
        "unknown_activities": sorted(activities - known),
        "vocab_hash": vocab_fingerprint(vocab),
        "items": vocab.n_items,
    }


# ---- the client -----------------------------------------------------------------------------------------


class RIBClient(NumPyClient):
    """Trains the global RIB on this device's store for one round."""

    def __init__(self, trainer: DeviceTrainer, fed: FederationConfig) -> None:
        self.trainer = trainer
        self.fed = fed

    def fit(
        self, parameters: list[np.ndarray], config: Mapping[str, object]
    ) -> tuple[list[np.ndarray], int, dict]:
        """Local training; a refusal (another model, no data, spent budget) fails this device's round."""
        server_round = int(config.get(SERVER_ROUND_KEY, 0))  # type: ignore[arg-type]
        settings = training_config(self.fed, server_round, self.trainer.device_dir.name)
        try:
            check_round(list(parameters), config, self.fed, self.trainer.vocab)
            update = self.trainer.train(list(parameters), settings)
        except TrainingRefused as err:
            log.info(
                "device %s declines round %d: %s", self.trainer.device_dir.name, server_round, err.reason
            )
            raise
        finally:
            self.trainer.close()
        return update.weights, update.num_examples, update.metrics

    def evaluate(self, parameters: list[np.ndarray], config: Mapping[str, object]) -> tuple[float, int, dict]:
        """Devices do not evaluate: the server evaluates centrally on held-out sessions."""
        raise RuntimeError("federated evaluation is central (server-side); fraction-evaluate must stay 0")


def client_fn(context: Context, fed: FederationConfig | None = None) -> Client:
    """Build this node's client for one message (state lives on disk, not in memory between rounds)."""
    fed = fed if fed is not None else FederationConfig.from_run_config(context.run_config)
    set_torch_threads(1)
    device_dir, vocab = device_and_vocab(context.node_config, fed)
    if "device-dir" not in context.node_config and not device_dir.exists():
        # A simulated slot whose sessions all fell in the test period has no store: nothing to train on.
        raise TrainingRefused("no_data", f"simulated device {device_dir.name} has no store")
    rib_config = run_rib_config(vocab, fed)
    try:
        trainer = DeviceTrainer(device_dir, vocab, rib_config)
    except (StoreError, KeyProviderError, OSError) as err:
        raise TrainingRefused("store_unreadable", f"the device store cannot be opened: {err}") from None
    return RIBClient(trainer, fed).to_client()


# ---- mods ----------------------------------------------------------------------------------------------


def _fit_config(msg: Message) -> Mapping[str, object]:
    return compat.recorddict_to_fitins(msg.content, keep_input=True).config


def when(condition: Callable[[Message], bool], mod: Mod) -> Mod:
    """Run ``mod`` only for messages where ``condition`` holds (else pass straight through)."""

    def conditional(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if condition(msg):
            return mod(msg, ctxt, call_next)
        return call_next(msg, ctxt)

    conditional.__name__ = f"when_{getattr(mod, '__name__', 'mod')}"
    return conditional


def asks_for_secagg(msg: Message) -> bool:
    """The server runs SecAgg+ for this round (its workflow sends the protocol's config record)."""
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def asks_for_clipping(msg: Message) -> bool:
    """The server's DP wrapper asked for client-side clipping (it sends the clipping norm)."""
    if msg.metadata.message_type != MessageType.TRAIN or not msg.content.array_records:
        return False
    return KEY_CLIPPING_NORM in _fit_config(msg)


def egress_guard_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Check a training reply carries only model-shaped float arrays and allowed scalar metrics."""
    out = call_next(msg, ctxt)
    if msg.metadata.message_type != MessageType.TRAIN or out.has_error() or not msg.content.array_records:
        return out
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    expected = [tuple(a.shape) for a in parameters_to_ndarrays(fitins.parameters)]
    fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
    sent = parameters_to_ndarrays(fitres.parameters)
    try:
        check_egress(sent, expected, dict(fitres.metrics))
    except EgressError as err:
        raise TrainingRefused("egress_refused", str(err)) from None
    return out


def check_egress(
    arrays: list[np.ndarray], expected_shapes: list[tuple[int, ...]], metrics: Mapping[str, object]
) -> None:
    """Raise EgressError unless ``arrays`` match the model's shapes as floats and metrics are allowed scalars."""
    if [tuple(a.shape) for a in arrays] != list(expected_shapes):
        raise EgressError("reply arrays do not have the global model's shapes")
    if any(a.dtype.kind != "f" for a in arrays):
        raise EgressError("reply arrays must be floating point model weights")
    for key, value in metrics.items():
        if key not in METRIC_KEYS:
            raise EgressError(f"metric {key!r} is not on the device's egress list")
        if isinstance(value, (str, bytes)) or not isinstance(value, (int, float)):
            raise EgressError(f"metric {key!r} must be a number")


def describe_message(message: Message) -> dict[str, object]:
    """Every key and scalar a message's records carry (bytes as hex), and its arrays' dtypes and shapes."""
    out: dict[str, object] = {"type": message.metadata.message_type, "error": message.has_error()}
    strings: list[str] = []
    blobs: list[str] = []
    integers: list[int] = []
    arrays: list[list[object]] = []
    if not message.has_error():
        content = message.content
        for record in list(content.config_records.values()) + list(content.metric_records.values()):
            for key, value in record.items():
                strings.append(key)
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, str):
                        strings.append(item)
                    elif isinstance(item, bytes):
                        blobs.append(item.hex())
                    elif isinstance(item, int) and not isinstance(item, bool):
                        integers.append(item)
        for record in content.array_records.values():
            arrays += [[a.dtype.kind, list(a.shape)] for a in record.to_numpy_ndarrays()]
    out.update({"str": strings, "bytes": blobs, "int": integers, "arrays": arrays})
    return out


def egress_audit_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """With node config ``egress-log`` set, append what every outgoing message carries to that JSON-lines file
    (a device owner can audit exactly what left the device; the loopback deployment test reads it)."""
    out = call_next(msg, ctxt)
    path = ctxt.node_config.get("egress-log") if ctxt.node_config else None
    if path:
        with open(str(path), "a", encoding="utf-8") as log_file:
            log_file.write(json.dumps(describe_message(out)) + "\n")
    return out


def refusal_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """A device that declines a round (no data, spent budget) answers with a short error reply, not a traceback."""
    try:
        return call_next(msg, ctxt)
    except TrainingRefused as err:
        log.info("declining the round: %s: %s", err.reason, err)
        return Message(Error(code=0, reason=declined_text(err.reason, str(err))), reply_to=msg)


def make_client_app(extra_mods: list[Mod] | None = None, fed: FederationConfig | None = None) -> ClientApp:
    """The device ClientApp; ``fed`` fixes the settings (Python-driven simulations), else the run config gives
    them; ``extra_mods`` (outermost first) are for tests and harnesses that watch or shape the wire."""
    # refusal_mod sits outside SecAgg+ and clipping: they expect a reply with content from what they wrap, so a
    # decline travels through them as an exception and becomes the error reply here.
    mods: list[Mod] = [egress_audit_mod, *list(extra_mods or [])]
    mods += [
        refusal_mod,
        when(asks_for_secagg, secaggplus_mod),
        when(asks_for_clipping, fixedclipping_mod),
        egress_guard_mod,
    ]

    def bound_client_fn(context: Context) -> Client:
        return client_fn(context, fed)

    return ClientApp(client_fn=bound_client_fn, mods=mods)


app = make_client_app()
