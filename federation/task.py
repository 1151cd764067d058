"""What the devices and the server share in a federated run (Flower's ``task.py``): the model a run config builds.

The ServerApp (``aggregator.server_app``) and the ClientApp (``federation.client_app``) both build the RIB
from here, so both sides agree on its shapes. Device training itself is ``federation.training``, which the
server never imports.
"""

from __future__ import annotations

from federation.config import FederationConfig
from model.data.dataset import Vocabulary
from model.rib import RIBConfig, data_type_flags


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
