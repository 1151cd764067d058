"""What the devices and the server share in a federated run (Flower's ``task.py``): the model a run config builds.

The ServerApp (``aggregator.server_app``) and the ClientApp (``federation.client_app``) both build the RIB
from here, so both sides agree on its shapes. Device training itself is ``federation.training``, which the
server never imports.
"""

from __future__ import annotations

import hashlib
import json
import re

from federation.config import FederationConfig
from model.data.dataset import Vocabulary
from model.rib import RIBConfig, data_type_flags

# The only metric names a device reports: the ClientApp's egress guard and the server's reply check both hold
# replies to this list.
METRIC_KEYS = ("train_loss", "examples", "steps", "seconds", "device_epsilon", "record_dp")

# What the server puts in every round's fit config.
SERVER_ROUND_KEY = "server-round"
VOCAB_KEY = (
    "vocab-hash"  # the run's vocabulary fingerprint: a device with another one declines before training
)

# Why a device declines a round. It answers with an error reply whose reason is ``declined: <reason>: <why>``
# (``declined_text``); the server counts the reasons (``declined_reason``).
DECLINE_REASONS = (
    "no_data",  # no session on the device has a next visit in the run's vocabulary
    "budget_exhausted",  # the device's record-level privacy ledger would overspend
    "diverged",  # local training produced non-finite weights
    "vocab_mismatch",  # the installed package's vocabulary is not the run's
    "shape_mismatch",  # the global weights do not fit the model the device builds
    "package_invalid",  # the installed package does not verify
    "store_unreadable",  # the device's store cannot be opened or read
    "egress_refused",  # the reply would carry something other than weights and allowed metrics
)
_DECLINED_RE = re.compile(r"declined: ([a-z_]+)")
# A simulated device that vanishes (simulations' heterogeneity mod) answers ``<prefix>offline|dropout|late``.
SIMULATED_PREFIX = "rib-edge-simulated:"


def declined_text(reason: str, why: str) -> str:
    """The error reason a declining device sends (one line, bounded: it travels to the server's log)."""
    return f"declined: {reason}: {' '.join(why.split())[:300]}"


def declined_reason(text: str) -> str | None:
    """The decline reason in a device's error reply, or None when the reply is not a decline."""
    match = _DECLINED_RE.search(text)
    return match.group(1) if match and match.group(1) in DECLINE_REASONS else None


def vocab_fingerprint(vocab: Vocabulary) -> str:
    """A short hash of everything that sizes and indexes the model: item ids in order, activities, dwell edges.

    The server sends it with every round; a device compares it with its installed package's vocabulary.
    """
    data = {
        "items": [str(i) for i in vocab.item_ids],
        "activities": vocab.activities.to_dict(),
        "dwell": vocab.dwell.to_dict(),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def federated_rib_config(
    vocab: Vocabulary,
    data_type: str,
    item_dim: int,
    hidden_dim: int,
    max_len: int,
    tie_output: bool = False,
    freeze_items: bool = False,
) -> RIBConfig:
    """The RIB every party of a federation builds: sizes from the shared vocabulary, full softmax (DP-SGD-ready)."""
    return RIBConfig(
        n_items=vocab.n_items,
        n_activities=len(vocab.activities.names),
        n_dwell=vocab.dwell.vocab_size,
        item_dim=item_dim,
        hidden_dim=hidden_dim,
        max_len=max_len,
        loss="softmax",
        tie_output=tie_output,
        freeze_items=freeze_items,
        **data_type_flags(data_type),
    )


def run_rib_config(vocab: Vocabulary, fed: FederationConfig) -> RIBConfig:
    """``federated_rib_config`` with a run config's model keys (``fed``: a FederationConfig)."""
    return federated_rib_config(
        vocab,
        fed.data_type,
        fed.item_dim,
        fed.hidden_dim,
        fed.max_len,
        tie_output=fed.tie_output,
        freeze_items=fed.freeze_item_embeddings,
    )
