"""Item-only baselines behind the SessionRecommender interface, by the names used in reports.

``BASELINES[name](**hyper_parameters)`` builds an unfitted model; keyword arguments override the
fields of the model's config dataclass (e.g. ``BASELINES["S-KNN"](k=50)``), or pass ``config=...``.
RIB (WSDM 2018, Section 5.2) compares against POP, BPR-MF and Item-KNN; SR, S-KNN, V-SKNN and STAN
are the strong simple session-based baselines of Ludewig et al. (2018, 2021) and Garg et al. (2019).
"""

from __future__ import annotations

from collections.abc import Callable

from model.baselines.bpr_mf import BPRMF, BPRMFConfig
from model.baselines.item_knn import ItemKNN, ItemKNNConfig
from model.baselines.pop import Pop, PopConfig
from model.baselines.rules import SequentialRules, SRConfig
from model.baselines.session_knn import SKNN, STAN, VSKNN, SKNNConfig, STANConfig, VSKNNConfig
from model.recommender import SessionRecommender

BASELINES: dict[str, Callable[..., SessionRecommender]] = {
    "POP": Pop,
    "Item-KNN": ItemKNN,
    "BPR-MF": BPRMF,
    "SR": SequentialRules,
    "S-KNN": SKNN,
    "V-SKNN": VSKNN,
    "STAN": STAN,
}


def make_baseline(name: str, **hyper_parameters: object) -> SessionRecommender:
    """An unfitted baseline by its report name; unknown names list the known ones."""
    try:
        factory = BASELINES[name]
    except KeyError:
        raise KeyError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}") from None
    return factory(**hyper_parameters)


__all__ = [
    "BASELINES",
    "BPRMF",
    "BPRMFConfig",
    "ItemKNN",
    "ItemKNNConfig",
    "Pop",
    "PopConfig",
    "SKNN",
    "SKNNConfig",
    "STAN",
    "STANConfig",
    "SRConfig",
    "SequentialRules",
    "VSKNN",
    "VSKNNConfig",
    "make_baseline",
]
