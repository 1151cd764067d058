"""Membership-inference audit of RIB trained with and without record-level DP-SGD (issue 8, item 6).

What is attacked: the membership of one *session* in a model's training data. DP-SGD's record is one
session window (``privacy/dp_sgd.py``); to make the two the same unit, every session is cut to its first
``max_len`` tuples (``one_window_sessions``), so one session is exactly one window, one record, and the
epsilon the project reports bounds exactly what this attack tries to learn.

The protocol (``audit``):

1. The dataset's TRAINING sessions (one window each, with >= 1 example) are split, seeded, into a target
   pool and a disjoint shadow pool, and the target pool into two equal halves A and B (same distribution).
2. At every epsilon target A trains on A (members) with B held out (non-members), and target B the other
   way round (``swap_roles``): a random split makes one half slightly "easier" than the other (on
   jdata2016_sample an UNTRAINED model already scores AUC 0.54 on one split), which biases one target's AUC
   up and the other's down by the same amount; their mean cancels it (exactly, for a model that does not
   depend on the split). Targets train with ``train_local_private`` (sigma from ``noise_for_epsilon`` for
   the planned steps and sample rate, delta = 1 / n_member_windows), or ``train_local`` for epsilon = inf,
   with the SAME steps, learning rate and (expected) batch size.
3. Attack 1, loss threshold (Yeom et al. 2018): score = -loss of the session (mean cross-entropy over its
   examples); AUC over members vs non-members.
4. Attack 2, shadow models, offline LiRA (Carlini et al. 2022; Shokri et al. 2017's shadow models): K shadow
   models, same recipe and epsilon, each trained on a random half of the shadow pool. None of them saw a
   target candidate, so their losses on a candidate estimate how hard it is for a model that did not train
   on it; score = (mean shadow loss - target loss) / pooled shadow std, the one-sided Gaussian likelihood
   ratio with a global variance (the variant LiRA recommends for few shadows). A per-record-free threshold
   calibrated on the shadows' own in/out losses is also applied to the target (``shadow_threshold_acc``);
   as a global threshold on the loss, its AUC would equal attack 1's, so only its accuracy is reported.
5. AUC = Mann-Whitney U / (n_m n_n), ties counted half, averaged over the targets, with a percentile
   bootstrap interval that resamples the two halves separately (a record keeps its role in every target).

The epsilon is cross-checked with Google's ``dp_accounting`` (its own RDP accountant and orders):
PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) self-composed ``steps`` times.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model.data.dataset import SessionDataset, SplitData
from model.evaluate import evaluate
from model.local import IGNORE, LocalTrainConfig, WindowDataset, train_local, window_losses
from model.rib import RIB, RIBConfig
from model.train import RIBRecommender, TrainConfig, init_from_item_vectors
from model.word2vec import ItemVectors
from privacy.dp_sgd import DPSGDConfig, train_local_private

EPSILONS: tuple[float, ...] = (1.0, 4.0, 8.0, math.inf)
AUC_TARGET = 0.55  # issue 8: attack AUC <= 0.55 at epsilon <= 8


@dataclass(frozen=True)
class AuditConfig:
    """Model, training recipe and attack settings of one audit."""

    data_type: str = "SKU+Micro"
    item_dim: int = 64  # the federation's defaults (pyproject [tool.flwr.app.config])
    hidden_dim: int = 100
    max_len: int = 50  # sessions are cut to this many tuples: one session = one window = one DP record
    epochs: float = 15.0  # expected passes over the members: steps = ceil(epochs * n_members / batch_size)
    batch_size: int = 32  # (expected, under Poisson sampling) windows per step
    lr: float = 3e-3
    max_grad_norm: float = 1.0  # DP-SGD per-window clip
    n_shadows: int = 4
    swap_roles: bool = True  # a second target with members and non-members swapped (cancels split bias)
    target_fraction: float = 0.5  # of the eligible training sessions: the target pool (rest: shadow pool)
    n_boot: int = 1000
    seed: int = 0
    # Public item table (model/catalog.py): every model of the audit (targets, shadows, null control) starts
    # its item embeddings from this catalog file's vectors (seeded by ``seed``: the attacker knows them too);
    # ``freeze_items`` keeps them fixed and ``tie_output`` scores items against them.
    item_catalog: str = ""
    tie_output: bool = False
    freeze_items: bool = False

    def __post_init__(self) -> None:
        if self.freeze_items and not self.item_catalog:
            raise ValueError("freeze_items keeps a public item table fixed: give item_catalog")
        if self.n_shadows < 2:
            raise ValueError(
                f"n_shadows must be >= 2 (the LiRA variance is pooled over shadows), got {self.n_shadows}"
            )
        if not (self.epochs > 0 and self.batch_size >= 1 and self.lr > 0 and self.max_len >= 1):
            raise ValueError(f"epochs, batch_size, lr and max_len must be positive in {self}")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Data: one window per session, and the member / non-member / shadow split
# --------------------------------------------------------------------------------------------------


def one_window_sessions(data: SessionDataset, max_len: int) -> SessionDataset:
    """Every session cut to its first ``max_len`` tuples, keeping those with >= 1 example (one window each)."""
    lengths = np.minimum(data.session_lengths(), max_len)
    starts = data.offsets[:-1]
    tuple_index = np.concatenate(
        [np.zeros(0, np.int64)] + [np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]
    ).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # An example needs a visit start after the session's first tuple, within the kept tuples.
    later_visit = data.visit_starts[tuple_index].copy()
    later_visit[offsets[:-1][lengths > 0]] = False
    session_of = np.repeat(np.arange(len(lengths)), lengths)
    has_example = np.bincount(session_of[later_visit], minlength=len(lengths)) > 0
    cut = SessionDataset(
        name=f"{data.name}/first{max_len}",
        items=data.items[tuple_index],
        activities=data.activities[tuple_index],
        dwell_buckets=data.dwell_buckets[tuple_index],
        dwell_seconds=data.dwell_seconds[tuple_index],
        timestamps_ms=data.timestamps_ms[tuple_index],
        visit_starts=data.visit_starts[tuple_index],
        offsets=offsets,
        session_ids=data.session_ids,
        vocab=data.vocab,
        user_ids=data.user_ids,
        has_activity=data.has_activity,
        has_dwell=data.has_dwell,
        has_time=data.has_time,
        meta=dict(data.meta),
    )
    return cut.select_sessions(has_example)


@dataclass(frozen=True)
class AuditSplit:
    """Disjoint session indices: target members, target non-members, shadow pool."""

    members: np.ndarray
    nonmembers: np.ndarray
    shadow_pool: np.ndarray


def split_members(n_sessions: int, seed: int, target_fraction: float = 0.5) -> AuditSplit:
    """Seeded disjoint split of ``n_sessions``: target pool halves (members, non-members), rest the shadow pool."""
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    order = np.random.default_rng(seed).permutation(n_sessions)
    n_target = int(round(n_sessions * target_fraction))
    n_members = n_target // 2
    if n_members < 1:
        raise ValueError(f"{n_sessions} sessions leave no members at target_fraction={target_fraction}")
    return AuditSplit(
        members=np.sort(order[:n_members]),
        nonmembers=np.sort(order[n_members : 2 * n_members]),  # as many as members: a balanced attack
        shadow_pool=np.sort(order[n_target:]),
    )


# --------------------------------------------------------------------------------------------------
# Per-record losses and AUC
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def per_record_losses(
    model: RIB,
    data: SessionDataset,
    max_len: int | None = None,
    reduction: str = "mean",
    batch_size: int = 256,
) -> np.ndarray:
    """(n_windows,) cross-entropy of every window of ``data`` (mean or sum over its examples), model in eval mode."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dataset = WindowDataset(data, max_len or model.config.max_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.empty(len(dataset), dtype=np.float64)
    try:
        for lo in range(0, len(dataset), batch_size):
            rows = np.arange(lo, min(lo + batch_size, len(dataset)))
            batch = dataset.batch(rows, device)
            losses = window_losses(model, batch).double()
            if reduction == "mean":
                losses = losses / (batch[4] != IGNORE).sum(1).clamp(min=1)
            out[rows] = losses.cpu().numpy()
    finally:
        model.train(was_training)
    return out


def auc(scores_members: np.ndarray, scores_nonmembers: np.ndarray) -> float:
    """P(member score > non-member score) + 0.5 P(tie): the Mann-Whitney AUC (higher score = 'member')."""
    m = np.asarray(scores_members, dtype=np.float64).ravel()
    n = np.asarray(scores_nonmembers, dtype=np.float64).ravel()
    if not (len(m) and len(n)):
        raise ValueError("auc needs at least one member and one non-member score")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(n))):
        raise ValueError("auc needs finite scores")
    combined = np.concatenate([m, n])
    _, inverse, counts = np.unique(combined, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: ties share the mean of the ranks they span.
    upper = np.cumsum(counts)
    average_rank = (upper - (counts - 1) / 2.0)[inverse]
    rank_sum = average_rank[: len(m)].sum()
    return float((rank_sum - len(m) * (len(m) + 1) / 2.0) / (len(m) * len(n)))


def auc_ci(
    scores_members: np.ndarray,
    scores_nonmembers: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``auc``, members and non-members resampled separately."""
    m = np.asarray(scores_members, dtype=np.float64).ravel()
    n = np.asarray(scores_nonmembers, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    values = np.array(
        [auc(m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))]) for _ in range(n_boot)]
    )
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def mean_auc(scores: Sequence[np.ndarray], members: Sequence[np.ndarray]) -> float:
    """Mean over targets k of auc(scores[k][members[k]], scores[k][~members[k]])."""
    return float(np.mean([auc(sc[m], sc[~m]) for sc, m in zip(scores, members, strict=True)]))


def mean_auc_ci(
    scores: Sequence[np.ndarray],
    members: Sequence[np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap interval of ``mean_auc``: each half of the pool (members[0] / the rest) resampled separately,
    the same resample for every target, so every record keeps its role in each."""
    scores = [np.asarray(sc, dtype=np.float64) for sc in scores]
    members = [np.asarray(m, dtype=bool) for m in members]
    strata = [np.flatnonzero(members[0]), np.flatnonzero(~members[0])]
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        index = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata])
        values[b] = mean_auc([sc[index] for sc in scores], [m[index] for m in members])
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def tpr_at_fpr(scores_members: np.ndarray, scores_nonmembers: np.ndarray, fpr: float = 0.1) -> float:
    """Share of members scoring above the non-members' (1 - fpr) quantile (LiRA's low-FPR view)."""
    threshold = np.quantile(np.asarray(scores_nonmembers, dtype=np.float64), 1 - fpr)
    return float(np.mean(np.asarray(scores_members, dtype=np.float64) > threshold))


# --------------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------------


def loss_attack_scores(losses: np.ndarray) -> np.ndarray:
    """Yeom et al.: a lower loss means 'member'."""
    return -np.asarray(losses, dtype=np.float64)


def lira_offline_scores(target_losses: np.ndarray, shadow_out_losses: np.ndarray) -> np.ndarray:
    """Offline LiRA with a global variance: (mean OUT shadow loss - target loss) / pooled OUT std, per record.

    ``shadow_out_losses`` is (K, n): K shadow models' losses on the n candidates, none of which they trained on.
    """
    out = np.asarray(shadow_out_losses, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] != len(target_losses):
        raise ValueError(f"shadow_out_losses must be (K, {len(target_losses)}), got {out.shape}")
    mean = out.mean(0)
    # Pooled within-record std: per-record stds from a handful of shadows are too noisy (Carlini et al.).
    std = float(np.sqrt(out.var(0, ddof=1).mean())) if out.shape[0] > 1 else 1.0
    return (mean - np.asarray(target_losses, dtype=np.float64)) / max(std, 1e-12)


def calibrated_threshold(in_losses: np.ndarray, out_losses: np.ndarray) -> float:
    """The loss threshold with the best balanced accuracy on shadow (in, out) losses: loss < t means 'member'."""
    losses_in = np.asarray(in_losses, dtype=np.float64)
    losses_out = np.asarray(out_losses, dtype=np.float64)
    candidates = np.unique(np.concatenate([losses_in, losses_out]))
    candidates = np.concatenate([candidates, [np.inf]])
    tpr = (losses_in[None, :] < candidates[:, None]).mean(1)
    tnr = (losses_out[None, :] >= candidates[:, None]).mean(1)
    return float(candidates[int(np.argmax(tpr + tnr))])


def balanced_accuracy(member_losses: np.ndarray, nonmember_losses: np.ndarray, threshold: float) -> float:
    """Balanced accuracy of 'member iff loss < threshold'."""
    return float(0.5 * (np.mean(member_losses < threshold) + np.mean(nonmember_losses >= threshold)))


# --------------------------------------------------------------------------------------------------
# Accounting cross-check
# --------------------------------------------------------------------------------------------------


def epsilon_dp_accounting(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of the Poisson-sampled Gaussian mechanism by dp_accounting's own RDP accountant (default orders)."""
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # dp_accounting logs its series' convergence on the root logger
    try:
        accountant = RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
        accountant.compose(event, int(steps))
        return float(accountant.get_epsilon(delta))
    finally:
        root.setLevel(level)


def epsilon_pld(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The same mechanism's epsilon by dp_accounting's privacy-loss-distribution accountant (tighter than RDP)."""
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting

    accountant = dp_accounting.pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))


def dp_auc_bound(epsilon: float, delta: float, grid: int = 100_001) -> float:
    """Largest membership AUC any attack can reach against an (epsilon, delta)-DP training run.

    Every test's (FPR a, TPR b) satisfies b <= e^eps a + delta and 1 - a <= e^eps (1 - b) + delta (Kairouz
    et al. 2015); the AUC of that region's upper boundary bounds every attack's ROC AUC.
    """
    if math.isinf(epsilon):
        return 1.0
    fpr = np.linspace(0.0, 1.0, grid)
    tpr = np.minimum.reduce(
        [np.ones_like(fpr), math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - delta - fpr)]
    )
    return float(np.trapezoid(tpr, fpr))


# --------------------------------------------------------------------------------------------------
# Training one model, scoring it
# --------------------------------------------------------------------------------------------------


def rib_config_for_audit(data: SessionDataset, config: AuditConfig) -> RIBConfig:
    """The federation's RIB (``federated_rib_config``: full softmax, DP-SGD-ready) at the audit's sizes."""
    from federation.task import federated_rib_config

    return federated_rib_config(
        data.vocab,
        config.data_type,
        config.item_dim,
        config.hidden_dim,
        config.max_len,
        tie_output=config.tie_output,
        freeze_items=config.freeze_items,
    )


def target_met(rows: Sequence[dict]) -> bool:
    """Issue 8's target over an audit's rows: both attacks' AUC <= AUC_TARGET at every audited epsilon <= 8."""
    audited = [r for r in rows if r["epsilon"] <= 8]
    return bool(audited) and all(max(r["auc_loss"], r["auc_shadow"]) <= AUC_TARGET for r in audited)


def item_vectors_for_audit(data: SessionDataset, config: AuditConfig) -> ItemVectors | None:
    """The catalog vectors every model of the audit starts from (None: a random item init)."""
    if not config.item_catalog:
        return None
    from model.catalog import catalog_file_vectors

    return catalog_file_vectors(config.item_catalog, list(data.vocab.item_ids), config.item_dim, config.seed)


def fresh_model(rib_config: RIBConfig, seed: int, item_vectors: ItemVectors | None) -> RIB:
    """A seeded RIB, its item embeddings from ``item_vectors`` when given."""
    torch.manual_seed(seed)
    model = RIB(rib_config)
    if item_vectors is not None:
        init_from_item_vectors(model, item_vectors)
    return model


def local_config(n_members: int, config: AuditConfig, seed: int) -> LocalTrainConfig:
    """The one recipe every model of an audit trains with (target, shadows, every epsilon)."""
    steps = max(1, math.ceil(config.epochs * n_members / config.batch_size))
    return LocalTrainConfig(
        steps=steps, batch_size=config.batch_size, lr=config.lr, max_len=config.max_len, seed=seed
    )


def train_model(
    rib_config: RIBConfig,
    data: SessionDataset,
    local: LocalTrainConfig,
    epsilon: float,
    max_grad_norm: float,
    item_vectors: ItemVectors | None = None,
) -> tuple[RIB, dict[str, object]]:
    """A fresh RIB (seeded by ``local.seed``) trained on ``data``: DP-SGD at ``epsilon``, plain for inf."""
    model = fresh_model(rib_config, local.seed, item_vectors)
    if math.isinf(epsilon):
        result: dict[str, object] = dict(train_local(model, data, local))
        result.update(epsilon=math.inf, noise_multiplier=0.0, sample_rate=None, delta=None)
    else:
        n_windows = len(WindowDataset(data, local.max_len))
        dp = DPSGDConfig(target_epsilon=epsilon, delta=1.0 / n_windows, max_grad_norm=max_grad_norm)
        result = train_local_private(model, data, local, dp)
    model.eval()
    return model, result


def recall_at(model: RIB, test: SessionDataset, k: int = 20) -> float:
    """Recall@k of ``model`` on ``test`` through the project's one evaluator."""
    rec = RIBRecommender(model.config, TrainConfig(device="cpu"))
    rec.model = model
    return float(evaluate(rec, test, ks=(k,)).metrics[f"recall@{k}"])


# --------------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------------


def _interval(values: tuple[float, float]) -> list[float]:
    return [round(v, 4) for v in values]


def audit(
    split: SplitData,
    epsilons: Sequence[float] = EPSILONS,
    config: AuditConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Train target and shadow RIBs at every epsilon and attack the targets; returns ``{"rows": [...], ...}``."""
    config = config or AuditConfig()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    pool = one_window_sessions(split.train, config.max_len)
    parts = split_members(pool.n_sessions, config.seed, config.target_fraction)
    candidates = pool.select_sessions(np.concatenate([parts.members, parts.nonmembers]), name="candidates")
    first = np.r_[np.ones(len(parts.members), bool), np.zeros(len(parts.nonmembers), bool)]
    # Losses are matched to sessions by position: every audited session must give exactly one window.
    if len(WindowDataset(candidates, config.max_len)) != len(first):
        raise AssertionError("every audited session must be exactly one window")
    # (training sessions, member mask over the candidates, seed) of each target
    targets = [(pool.select_sessions(parts.members, name="members"), first, config.seed)]
    if config.swap_roles:
        swapped_seed = config.seed + config.n_shadows + 1  # distinct from every shadow's seed
        targets.append((pool.select_sessions(parts.nonmembers, name="nonmembers"), ~first, swapped_seed))
    rng = np.random.default_rng(config.seed + 1)
    shadow_halves = [
        np.sort(rng.permutation(parts.shadow_pool)[: len(parts.shadow_pool) // 2])
        for _ in range(config.n_shadows)
    ]
    shadow_pool = pool.select_sessions(parts.shadow_pool, name="shadow_pool")
    rib_config = rib_config_for_audit(split.train, config)
    target_local = local_config(len(parts.members), config, config.seed)
    say(
        f"audit: {pool.n_sessions} one-window sessions: {len(parts.members)} members, "
        f"{len(parts.nonmembers)} non-members ({len(targets)} targets), shadow pool {len(parts.shadow_pool)} "
        f"({config.n_shadows} shadows x {len(shadow_halves[0]) if shadow_halves else 0}); "
        f"{target_local.steps} steps, batch {config.batch_size}, lr {config.lr}"
    )
    # Null control: an untrained model never saw the split. On ONE target its AUC measures how much the
    # random split alone separates the halves (the bias the swapped target cancels); on the swapped pair it
    # is exactly 0.5.
    item_vectors = item_vectors_for_audit(split.train, config)
    untrained = -per_record_losses(
        fresh_model(rib_config, config.seed, item_vectors), candidates, config.max_len
    )
    null_auc = auc(untrained[first], untrained[~first])
    say(f"  null control (untrained model, one split): AUC loss {null_auc:.3f}")
    rows = []
    for epsilon in epsilons:
        t0 = time.perf_counter()
        shadow_out = np.empty((config.n_shadows, len(first)))
        shadow_in_losses, shadow_out_losses = [], []
        for k, half in enumerate(shadow_halves):
            local = local_config(len(half), config, config.seed + 1 + k)
            shadow, _ = train_model(
                rib_config, pool.select_sessions(half), local, epsilon, config.max_grad_norm, item_vectors
            )
            shadow_out[k] = per_record_losses(shadow, candidates, config.max_len)
            own = per_record_losses(shadow, shadow_pool, config.max_len)
            inside = np.isin(parts.shadow_pool, half)
            shadow_in_losses.append(own[inside])
            shadow_out_losses.append(own[~inside])
        threshold = calibrated_threshold(np.concatenate(shadow_in_losses), np.concatenate(shadow_out_losses))
        masks, loss_scores, lira_scores, infos, recalls, losses_m, losses_n, accs = ([] for _ in range(8))
        for data, member, seed in targets:
            local = dataclasses.replace(target_local, seed=seed)
            target, info = train_model(rib_config, data, local, epsilon, config.max_grad_norm, item_vectors)
            losses = per_record_losses(target, candidates, config.max_len)
            masks.append(member)
            loss_scores.append(loss_attack_scores(losses))
            lira_scores.append(lira_offline_scores(losses, shadow_out))
            infos.append(info)
            recalls.append(recall_at(target, split.test))
            losses_m.append(float(losses[member].mean()))
            losses_n.append(float(losses[~member].mean()))
            accs.append(balanced_accuracy(losses[member], losses[~member], threshold))
        info = infos[0]
        sigma = float(info["noise_multiplier"])
        q, delta, steps = info["sample_rate"], info["delta"], int(info["steps"])
        finite = not math.isinf(epsilon)
        row = {
            "epsilon": epsilon,
            "epsilon_reported": float(info["epsilon"]),
            "delta": delta,
            "noise_multiplier": sigma,
            "steps": steps,
            "sample_rate": q,
            "epsilon_dp_accounting": epsilon_dp_accounting(sigma, q, steps, delta) if finite else math.inf,
            "epsilon_pld": epsilon_pld(sigma, q, steps, delta) if finite else math.inf,
            "auc_bound": dp_auc_bound(epsilon, delta if finite else 0.0),
            "test_recall@20": float(np.mean(recalls)),
            "loss_members": float(np.mean(losses_m)),
            "loss_nonmembers": float(np.mean(losses_n)),
            "generalization_gap": float(np.mean(losses_n) - np.mean(losses_m)),
            "auc_loss": mean_auc(loss_scores, masks),
            "auc_loss_ci": _interval(mean_auc_ci(loss_scores, masks, config.n_boot, config.seed)),
            "auc_shadow": mean_auc(lira_scores, masks),
            "auc_shadow_ci": _interval(mean_auc_ci(lira_scores, masks, config.n_boot, config.seed)),
            "tpr_at_10pct_fpr_loss": float(
                np.mean([tpr_at_fpr(s[m], s[~m]) for s, m in zip(loss_scores, masks, strict=True)])
            ),
            "tpr_at_10pct_fpr_shadow": float(
                np.mean([tpr_at_fpr(s[m], s[~m]) for s, m in zip(lira_scores, masks, strict=True)])
            ),
            "shadow_threshold": threshold,
            "shadow_threshold_acc": float(np.mean(accs)),
            "per_target": [
                {
                    "epsilon_reported": float(i["epsilon"]),
                    "noise_multiplier": float(i["noise_multiplier"]),
                    "test_recall@20": r,
                    "loss_members": lm,
                    "loss_nonmembers": ln,
                    "auc_loss": auc(s[m], s[~m]),
                    "auc_shadow": auc(ls[m], ls[~m]),
                }
                for i, r, lm, ln, s, ls, m in zip(
                    infos, recalls, losses_m, losses_n, loss_scores, lira_scores, masks, strict=True
                )
            ],
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        say(
            f"  eps={epsilon}: sigma={sigma:.3f}, recall@20={row['test_recall@20']:.4f}, loss "
            f"{row['loss_members']:.3f} / {row['loss_nonmembers']:.3f}, AUC loss {row['auc_loss']:.3f} "
            f"{row['auc_loss_ci']}, AUC shadow {row['auc_shadow']:.3f} {row['auc_shadow_ci']} "
            f"(per target: {[round(t['auc_loss'], 3) for t in row['per_target']]} / "
            f"{[round(t['auc_shadow'], 3) for t in row['per_target']]}; {row['seconds']:.0f} s)"
        )
    return {
        "dataset": split.train.name.split("/")[0],
        "config": config.to_dict(),
        "rib_config": rib_config.to_dict(),
        "local": target_local.to_dict(),
        "sessions": {
            "one_window_sessions": pool.n_sessions,
            "training_sessions": split.train.n_sessions,
            "members": len(parts.members),
            "nonmembers": len(parts.nonmembers),
            "targets": len(targets),
            "shadow_pool": len(parts.shadow_pool),
            "shadow_train": len(shadow_halves[0]) if shadow_halves else 0,
            "test_examples": len(split.test.examples()),
        },
        "null_control_auc_loss_one_split": null_auc,
        "null_control_auc_loss_one_split_ci": _interval(
            auc_ci(untrained[first], untrained[~first], config.n_boot, config.seed)
        ),
        "rows": rows,
        "auc_target": AUC_TARGET,
        "target_met": target_met(rows),
        "seconds": time.perf_counter() - started,
    }
