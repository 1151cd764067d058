"""Training RIB: time-based validation, length-bucketed batches, Adam, early stopping, checkpoints.

One file, no framework: ``train_rib`` is a plain loop.

- Validation is carved from the END of the training period (the last ``val_fraction`` of training
  sessions by end time), never from test, so early stopping sees the same kind of future as the test.
- One forward pass per session computes every prefix's prediction (see ``model/rib.py``); the loss is
  taken at the positions whose next tuple starts a new visit, i.e. exactly the dataset's examples.
  Sessions longer than ``max_len`` are cut into overlapping windows; each example is counted once.
- Batches hold windows of similar length (sorted into length buckets, order shuffled with the seed), so
  little compute goes to padding.
- Early stopping on validation Recall@20 through the one evaluator (``model.evaluate.evaluate``); the best
  state is restored at the end and, with ``checkpoint_dir``, saved as ``rib.pt``.
"""

from __future__ import annotations

import copy
import hashlib
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from model.data.dataset import SessionDataset, Vocabulary
from model.device import pick_device
from model.evaluate import evaluate
from model.recommender import PrefixBatch
from model.rib import RIB, RIBConfig, data_type_flags
from model.word2vec import ItemVectors, Word2VecConfig, train_item_vectors

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "rib.pt"


class CheckpointError(ValueError):
    """A file that is not a usable RIB checkpoint, or a checkpoint that does not fit a dataset's vocabularies."""


def vocabulary_record(vocab: Vocabulary) -> dict[str, object]:
    """What a checkpoint remembers of the vocabularies it was trained with: item ids (hashed, in index
    order), activity names (in index order) and dwell edges. A model's indices mean nothing under others."""
    digest = hashlib.sha256("\n".join(str(item) for item in vocab.item_ids).encode("utf-8")).hexdigest()
    return {
        "n_items": vocab.n_items,
        "items_sha256": digest,
        "activities": list(vocab.activities.names),
        "dwell_edges_s": list(vocab.dwell.edges_s),
    }


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings for one training run."""

    epochs: int = 10
    batch_size: int = 128  # windows (≈ sessions) per step
    lr: float = 5e-3  # measured: 1e-3 needs 3-4x the epochs on the small shared datasets
    weight_decay: float = 0.0
    lr_decay: float = 1.0  # learning rate x this after every epoch (ExponentialLR); 1 = constant
    patience: int = 3  # epochs without a better validation Recall@20 before stopping
    min_steps: int = (
        400  # no early stop before this many optimizer steps (tiny data: an epoch is a few steps)
    )
    val_fraction: float = 0.1  # last fraction of training sessions by end time; 0 = no validation
    seed: int = 0
    num_threads: int | None = 1  # torch intra-op threads (None: leave torch's setting alone)
    max_len: int | None = None  # training window in tuples; None = the model's max_len
    checkpoint_dir: str | None = None  # where rib.pt (best state) goes; None = keep in memory only
    grad_clip: float | None = 5.0  # max gradient norm (GRUs on long sessions occasionally spike)
    w2v_init: bool = True  # initialise item embeddings with Word2vec (the paper's choice)
    w2v_epochs: int = 10
    w2v_window: int = 5
    w2v_unit_rms: bool = True  # rescale Word2vec vectors to unit RMS entries (nn.Embedding's init scale)
    device: str | None = None  # see model.device.pick_device
    eval_batch_size: int = 512
    # Sampled softmax (RIBConfig.loss == "sampled" only): candidates = the batch's own targets (in-batch
    # negatives) + n_negatives shared items drawn from ``negative_sampler`` ("uniform" or "popularity":
    # training-frequency ** 0.75); logits get the logQ correction -log P(item is a candidate).
    n_negatives: int = 2048
    val_max_examples: int | None = (
        20_000  # early stopping on a fixed seeded sample of validation examples (speed)
    )
    negative_sampler: str = "uniform"
    # Wall-clock budget for the optimisation (seconds, Word2vec and validation excluded): the epoch that
    # crosses it ends early, is validated, and training stops. With refit_on_all it covers the selection run
    # and the refit together. None = no budget.
    max_train_seconds: float | None = None
    # After early stopping picks the epoch count on validation, train a fresh model for that many epochs on
    # every training session, the validation ones too: they are the most recent, the closest to what
    # follows. Measured on jdata2016 (choose the epochs on 80-90% of the training period, score on the last
    # 10%): val Recall@20 0.659 -> 0.676 (frozen tied table), 0.486 -> 0.551 (trained table); S-KNN given
    # the same recent sessions 0.547 -> 0.583. Costs a second training run.
    refit_on_all: bool = False

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TrainConfig:
        """Inverse of to_dict (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def rib_config_for(data: SessionDataset, data_type: str = "SKU+Micro", **overrides: object) -> RIBConfig:
    """A RIBConfig sized for ``data``'s vocabulary, with the fields of a paper data type switched on."""
    settings: dict[str, object] = {
        "n_items": data.n_items,
        "n_activities": len(data.vocab.activities),
        "n_dwell": data.vocab.dwell.vocab_size,
        **data_type_flags(data_type),
    }
    settings.update(overrides)
    return RIBConfig(**settings)


# --------------------------------------------------------------------------------------------------
# Data: validation split, windows, batches
# --------------------------------------------------------------------------------------------------


def time_validation_split(
    train: SessionDataset, val_fraction: float
) -> tuple[SessionDataset, SessionDataset | None]:
    """(fit, validation): validation = the last ``val_fraction`` of sessions by end time (dataset order on ties)."""
    n = train.n_sessions
    n_val = int(round(n * val_fraction))
    if val_fraction <= 0 or n_val == 0 or n_val >= n:
        return train, None
    lengths = train.session_lengths()
    end_time = np.zeros(n, dtype=np.int64)
    nonempty = lengths > 0
    end_time[nonempty] = train.timestamps_ms[train.offsets[1:][nonempty] - 1]
    order = np.lexsort((np.arange(n), end_time))  # by end time, then original order
    is_val = np.zeros(n, dtype=bool)
    is_val[order[n - n_val :]] = True
    fit = train.select_sessions(~is_val, name=f"{train.name}/fit")
    val = train.select_sessions(is_val, name=f"{train.name}/val")
    return fit, val


@dataclass
class Windows:
    """Training rows: tuples [start, end) of the dataset; loss at positions t >= loss_from (absolute)."""

    start: np.ndarray
    end: np.ndarray
    loss_from: np.ndarray
    session_end: np.ndarray

    def __len__(self) -> int:
        return int(len(self.start))


def make_windows(data: SessionDataset, max_len: int) -> Windows:
    """Every session as one row, or as overlapping max_len windows (stride max_len // 2) when longer."""
    stride = max(1, max_len // 2)
    starts, ends, loss_from, session_end = [], [], [], []
    lengths = data.session_lengths()
    for s in np.flatnonzero(lengths >= 2):  # a one-tuple session has no next visit to predict
        lo, hi = int(data.offsets[s]), int(data.offsets[s + 1])
        prev_end = lo
        end = min(hi, lo + max_len)
        while True:
            starts.append(end - min(max_len, end - lo))
            ends.append(end)
            loss_from.append(prev_end)  # positions before it were scored by the previous window
            session_end.append(hi)
            if end >= hi:
                break
            prev_end, end = end, min(hi, end + stride)
    as_array = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return Windows(as_array(starts), as_array(ends), as_array(loss_from), as_array(session_end))


def length_batches(windows: Windows, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Window indices grouped into batches of similar length; batch order (and ties) shuffled by ``rng``."""
    shuffled = rng.permutation(len(windows))
    by_length = shuffled[np.argsort(windows.end[shuffled] - windows.start[shuffled], kind="stable")]
    batches = [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batch_tensors(
    data: SessionDataset, windows: Windows, rows: np.ndarray, device: torch.device
) -> dict[str, torch.Tensor]:
    """Left-aligned padded inputs, mask, and the (position -> target) pairs of a batch of windows."""
    start, end = windows.start[rows], windows.end[rows]
    lengths = end - start
    steps = np.arange(int(lengths.max()))
    mask = steps[None, :] < lengths[:, None]
    index = np.where(mask, start[:, None] + steps[None, :], 0)
    # A position t (absolute index) is an example when tuple t + 1 exists and opens a new visit.
    nxt = np.minimum(index + 1, len(data.items) - 1)
    is_example = (
        mask
        & (index >= windows.loss_from[rows][:, None])
        & (index + 1 < windows.session_end[rows][:, None])
        & data.visit_starts[nxt]
    )
    as_long = lambda array: torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)  # noqa: E731
    return {
        "items": as_long(np.where(mask, data.items[index], 0)),
        "activities": as_long(np.where(mask, data.activities[index], 0)),
        "dwell": as_long(np.where(mask, data.dwell_buckets[index], 0)),
        "mask": torch.from_numpy(mask).to(device),
        "positions": torch.from_numpy(is_example).to(device),
        "targets": as_long(data.items[nxt[is_example]]),
    }


# --------------------------------------------------------------------------------------------------
# The recommender
# --------------------------------------------------------------------------------------------------


class RIBRecommender:
    """RIB behind the SessionRecommender protocol: ``fit`` trains, ``score`` runs the model in eval mode."""

    def __init__(
        self,
        rib_config: RIBConfig | None = None,
        train_config: TrainConfig | None = None,
        data_type: str = "SKU+Micro",
        progress: bool = False,
        item_vectors: ItemVectors | None = None,
        on_epoch: Callable[[dict[str, object]], None] | None = None,
        **rib_overrides: object,
    ) -> None:
        self.rib_config = rib_config
        # Called with each finished epoch's row (the refit's rows carry "refit": True): progress for callers
        # that show their own, such as an hour-long `bench accuracy`.
        self.on_epoch = on_epoch
        # Item init from elsewhere (e.g. model.catalog's vectors) instead of Word2vec on the training sessions.
        self.item_vectors = item_vectors
        self.train_config = train_config or TrainConfig()
        self.data_type = rib_config.data_type if rib_config is not None else data_type
        self.rib_overrides = rib_overrides
        self.progress = progress
        self.model: RIB | None = None
        self.history: dict[str, object] = {}
        self.vocabulary: dict[str, object] | None = None  # vocabulary_record of the training data
        self.device = pick_device(self.train_config.device)

    @property
    def name(self) -> str:
        """'RIB', or 'RIB-Attention' for the paper's ablation without the attention layer."""
        use_attention = (
            self.rib_config.use_attention
            if self.rib_config
            else self.rib_overrides.get("use_attention", True)
        )
        return "RIB" if use_attention else "RIB-Attention"

    def fit(self, train: SessionDataset) -> RIBRecommender:
        """Train on ``train`` (validation carved from its end); keeps the best state."""
        if self.rib_config is None:
            self.rib_config = rib_config_for(train, self.data_type, **self.rib_overrides)
        self.vocabulary = vocabulary_record(train.vocab)
        _train(self, train, self.progress)
        if (
            self.train_config.refit_on_all
            and self.history.get("n_val_sessions")
            and self.history.get("best_epoch")
        ):
            self._refit_on_all(train)
        return self

    def _refit_on_all(self, train: SessionDataset) -> None:
        """Replace the early-stopped model by a fresh one trained best_epoch epochs on all of ``train``."""
        selected = self.history
        budget = self.train_config.max_train_seconds
        remaining = None if budget is None else budget - float(selected["train_seconds"])
        if remaining is not None:
            # The budget covers selection and refit together. Skip a refit the budget cannot finish: one
            # cut short would stop at a higher learning rate than the epoch validation chose.
            per_epoch = float(np.median([float(e["train_seconds"]) for e in selected["epochs"]]))
            n_all = selected["n_fit_sessions"] + selected["n_val_sessions"]
            needed = per_epoch * int(selected["best_epoch"]) * n_all / max(1, selected["n_fit_sessions"])
            if needed > remaining:
                self.history = {
                    **selected,
                    "refit": {
                        "skipped": f"needs ~{needed:.0f} s of the {remaining:.0f} s the "
                        f"{budget:.0f} s budget leaves"
                    },
                }
                return
        refit_tc = replace(
            self.train_config,
            epochs=int(selected["best_epoch"]),
            val_fraction=0.0,
            refit_on_all=False,
            checkpoint_dir=None,
            max_train_seconds=remaining,
        )
        on_epoch = self.on_epoch
        refit = RIBRecommender(
            self.rib_config,
            refit_tc,
            progress=self.progress,
            item_vectors=self.item_vectors,
            on_epoch=None if on_epoch is None else lambda row: on_epoch({**row, "refit": True}),
        )
        _train(refit, train, self.progress)
        self.model = refit.model
        done = refit.history
        self.history = {
            **selected,
            "refit": {
                key: done[key]
                for key in (
                    "n_fit_sessions",
                    "steps",
                    "item_init",
                    "w2v_seconds",
                    "train_seconds",
                    "total_seconds",
                )
            }
            | {
                "epochs": len(done["epochs"]),
                "train_loss": done["epochs"][-1]["train_loss"] if done["epochs"] else None,
                "budget_seconds": remaining,
            },
            "peak_rss_mb": max(float(selected["peak_rss_mb"]), float(done["peak_rss_mb"])),
        }
        if self.train_config.checkpoint_dir:
            self.save(Path(self.train_config.checkpoint_dir) / CHECKPOINT_NAME)

    @torch.no_grad()
    def score(self, batch: PrefixBatch) -> np.ndarray:
        """(len(batch), n_items + 1) logits for the last ``max_len`` tuples of every prefix."""
        if self.model is None:
            raise RuntimeError("RIB: call fit() or load() before score()")
        self.model.eval()
        max_len = self.model.config.max_len
        out = np.empty((len(batch), self.model.config.n_items + 1), dtype=np.float32)
        size = self.train_config.eval_batch_size
        for lo in range(0, len(batch), size):
            part = PrefixBatch(batch.dataset, batch.starts[lo : lo + size], batch.ends[lo : lo + size])
            items, mask = part.padded("items", max_len)
            activities, _ = part.padded("activities", max_len)
            dwell, _ = part.padded("dwell_buckets", max_len)
            tensors = [
                torch.from_numpy(a.astype(np.int64)).to(self.device) for a in (items, activities, dwell)
            ]
            logits = self.model(*tensors, torch.from_numpy(mask).to(self.device))
            out[lo : lo + len(part)] = logits.float().cpu().numpy()
        return out

    # ---- persistence ---------------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, object]:
        """State dict + configs + history as one plain dict (what ``save`` writes)."""
        if self.model is None or self.rib_config is None:
            raise RuntimeError("RIB: nothing to save before fit()")
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {
            "format": CHECKPOINT_FORMAT,
            "state_dict": state,
            "rib_config": self.rib_config.to_dict(),
            "train_config": self.train_config.to_dict(),
            "history": _jsonable(self.history),
            **({"vocabulary": self.vocabulary} if self.vocabulary is not None else {}),
        }

    def save(self, path: str | Path) -> Path:
        """torch.save the checkpoint dict to ``path`` (atomically) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.checkpoint(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> RIBRecommender:
        """A ready-to-score recommender from a checkpoint written by ``save``; CheckpointError says why a
        file is not one (empty, not a torch file, another format, a damaged or mismatched state)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        try:
            # Plain data only: no pickled code. Whatever a damaged file makes torch raise, it is not a checkpoint.
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError (zip), ...
            raise CheckpointError(f"{path}: not a RIB checkpoint ({_first_line(err)})") from None
        if not isinstance(payload, dict) or not {"state_dict", "rib_config", "train_config"} <= set(payload):
            raise CheckpointError(f"{path}: not a RIB checkpoint (no model state and configs in it)")
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: unsupported checkpoint format {payload.get('format')!r}")
        try:
            stored = dict(payload["rib_config"])
            stored.setdefault("copy", False)  # checkpoints from before the copy term have none
            rib_config = RIBConfig.from_dict(stored)
            train_config = TrainConfig.from_dict(payload["train_config"])
            if device is not None:
                train_config = replace(train_config, device=device)
            rec = cls(rib_config, train_config)
            rec.model = RIB(rib_config).to(rec.device)
            rec.model.load_state_dict(payload["state_dict"])
        except (TypeError, ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path}: damaged RIB checkpoint ({_first_line(err)})") from None
        rec.model.eval()
        rec.history = payload.get("history", {})
        vocabulary = payload.get("vocabulary")
        rec.vocabulary = vocabulary if isinstance(vocabulary, dict) else None
        return rec

    def check_vocabulary(self, vocab: Vocabulary) -> None:
        """CheckpointError unless ``vocab`` is the vocabulary this model was trained with (items in the same
        order, the same activities, the same dwell buckets). A checkpoint written before it recorded its
        vocabulary is checked on the sizes alone."""
        config = self.rib_config
        assert config is not None
        data = vocabulary_record(vocab)
        differences = []
        if self.vocabulary is None:
            sizes = {
                "items": (config.n_items, vocab.n_items),
                "activities": (config.n_activities, len(vocab.activities)),
                "dwell buckets": (config.n_dwell, vocab.dwell.vocab_size),
            }
            differences = [
                f"{k}: {a} in the checkpoint, {b} in the data" for k, (a, b) in sizes.items() if a != b
            ]
        else:
            mine = self.vocabulary
            if mine.get("n_items") != data["n_items"]:
                differences.append(
                    f"items: {mine.get('n_items')} in the checkpoint, {data['n_items']} in the data"
                )
            elif mine.get("items_sha256") != data["items_sha256"]:
                differences.append(
                    f"items: the same count ({data['n_items']}) but other ids or another order"
                )
            if mine.get("activities") != data["activities"]:
                differences.append(
                    f"activities: {_names(mine.get('activities'))} in the checkpoint, "
                    f"{_names(data['activities'])} in the data"
                )
            if [float(e) for e in mine.get("dwell_edges_s", [])] != data["dwell_edges_s"]:
                differences.append(
                    f"dwell edges: {mine.get('dwell_edges_s')} s in the checkpoint, {data['dwell_edges_s']} s in the data"
                )
        if differences:
            raise CheckpointError(
                "the checkpoint was trained on other vocabularies (another dataset, mapping or split settings?): "
                + "; ".join(differences)
            )


def _names(names: object, shown: int = 6) -> str:
    names = list(names) if isinstance(names, (list, tuple)) else []
    more = f" ... ({len(names)} in all)" if len(names) > shown else ""
    return "[" + ", ".join(map(str, names[:shown])) + more + "]"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def load_checkpoint(path: str | Path, device: str | None = None) -> RIBRecommender:
    """Load a RIB checkpoint (``RIBRecommender.load``)."""
    return RIBRecommender.load(path, device=device)


def init_from_item_vectors(model: RIB, vectors: ItemVectors, unit_rms: bool = True) -> int:
    """Copy item vectors (gensim's or the federated skip-gram's) into ``model``'s item embeddings; rows covered."""
    config = model.config
    scaled = vectors.vectors
    if vectors.present.any() and unit_rms:
        # Word2vec entries are ~0.2 while nn.Embedding starts at N(0, 1): unscaled, the activity and
        # dwell embeddings would drown the item signal at the GRU input. One global factor keeps cosines.
        target_rms = config.item_dim**-0.5 if config.tie_output else 1.0  # the embedding's own init scale
        scaled = scaled * (target_rms / np.sqrt(np.mean(scaled[vectors.present] ** 2)))
    scaled = torch.from_numpy(np.asarray(scaled, dtype=np.float32))
    model.init_item_embeddings(scaled, torch.from_numpy(vectors.present))
    return int(vectors.present.sum())


def init_from_catalog(model: RIB, item_ids, catalog: str | Path, seed: int = 0) -> int:
    """Initialise ``model``'s item embeddings from a catalog file's vectors (model/catalog.py); items covered."""
    from model.catalog import catalog_file_vectors

    return init_from_item_vectors(model, catalog_file_vectors(catalog, item_ids, model.config.item_dim, seed))


def init_word2vec_config(item_dim: int, tc: TrainConfig) -> Word2VecConfig:
    """The gensim settings of RIB's Word2vec item init (vector size = the item embedding's)."""
    return Word2VecConfig(vector_size=item_dim, epochs=tc.w2v_epochs, window=tc.w2v_window, seed=tc.seed)


def init_from_word2vec(model: RIB, sessions: SessionDataset, tc: TrainConfig) -> int:
    """Initialise ``model``'s item embeddings from Word2vec on ``sessions``; returns how many items it covered."""
    vectors = train_item_vectors(sessions, init_word2vec_config(model.config.item_dim, tc))
    return init_from_item_vectors(model, vectors, tc.w2v_unit_rms)


def save_init_checkpoint(
    rib_config: RIBConfig, vectors: ItemVectors, path: str | Path, seed: int = 0, note: str = ""
) -> Path:
    """Save a seeded random RIB whose item embeddings come from ``vectors`` (a federated run's starting point)."""
    tc = TrainConfig(seed=seed)
    torch.manual_seed(seed)
    rec = RIBRecommender(rib_config, tc, progress=False)
    rec.model = RIB(rib_config)
    covered = init_from_item_vectors(rec.model, vectors, tc.w2v_unit_rms)
    rec.history = {"init": note or "item vectors", "items_covered": covered}
    return rec.save(path)


def train_rib(
    split_train: SessionDataset,
    rib_config: RIBConfig | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = True,
    item_vectors: ItemVectors | None = None,
) -> tuple[RIBRecommender, dict[str, object]]:
    """Train RIB on a training dataset (item init: ``item_vectors`` if given, else the config's); fitted model, history."""
    rec = RIBRecommender(rib_config, train_config, progress=progress, item_vectors=item_vectors)
    rec.fit(split_train)
    return rec, rec.history


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class NegativeSampler:
    """Shared negatives for sampled softmax and the log inclusion probability of every item (logQ)."""

    def __init__(self, fit: SessionDataset, tc: TrainConfig, device: torch.device) -> None:
        if tc.negative_sampler not in ("uniform", "popularity"):
            raise ValueError(
                f"negative_sampler must be 'uniform' or 'popularity', got {tc.negative_sampler!r}"
            )
        n = fit.n_items + 1
        examples = fit.examples()
        counts = np.bincount(examples.targets, minlength=n).astype(np.float64)[:n]
        counts[0] = 0.0
        self.target_freq = torch.from_numpy(counts / max(1.0, counts.sum())).to(device)  # in-batch draws
        weights = np.ones(n) if tc.negative_sampler == "uniform" else (counts + 1.0) ** 0.75
        weights[0] = 0.0
        self.q = torch.from_numpy(weights / weights.sum()).to(device)
        self.k = int(tc.n_negatives)
        self.generator = torch.Generator(device="cpu").manual_seed(tc.seed + 1)
        self.p_negative = 1.0 - (1.0 - self.q) ** self.k
        self.device = device

    def draw(self, n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative ids, log P(candidate)) for a batch with ``n_targets`` examples."""
        negatives = torch.multinomial(self.q.cpu(), self.k, replacement=True, generator=self.generator).to(
            self.device
        )
        p_batch = 1.0 - (1.0 - self.target_freq) ** n_targets
        p = 1.0 - (1.0 - self.p_negative) * (1.0 - p_batch)
        return negatives, torch.log(p.clamp(min=1e-12)).float()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _train(rec: RIBRecommender, train: SessionDataset, progress: bool) -> None:
    """The training loop behind ``RIBRecommender.fit``; fills rec.model and rec.history."""
    from tqdm.auto import tqdm

    config, tc = rec.rib_config, rec.train_config
    assert config is not None
    if config.n_items != train.n_items:
        raise ValueError(f"RIBConfig.n_items={config.n_items} but the dataset has {train.n_items} items")
    if not 0.0 < tc.lr_decay <= 1.0:  # checked before the Word2vec init spends minutes
        raise ValueError(f"TrainConfig.lr_decay must be in (0, 1], got {tc.lr_decay}")
    if tc.num_threads is not None:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    started = time.perf_counter()

    fit, val = time_validation_split(train, tc.val_fraction)
    model = RIB(config)
    w2v_seconds = 0.0
    item_init = "random"
    if rec.item_vectors is not None:
        init_from_item_vectors(model, rec.item_vectors, tc.w2v_unit_rms)
        item_init = "item vectors"
    elif tc.w2v_init:
        item_init = "word2vec"
        t0 = time.perf_counter()
        # Only the fit part: validation sessions must not shape what early stopping measures.
        init_from_word2vec(model, fit, tc)
        w2v_seconds = time.perf_counter() - t0
    model.to(rec.device)
    rec.model = model
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay
    )
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=tc.lr_decay)

    windows = make_windows(fit, tc.max_len or config.max_len)
    sampler = (
        NegativeSampler(fit, tc, rec.device) if config.loss == "sampled" and tc.n_negatives > 0 else None
    )
    checkpoint_path = Path(tc.checkpoint_dir) / CHECKPOINT_NAME if tc.checkpoint_dir else None
    val_examples = None
    if val is not None:
        val_examples = val.examples()
        if tc.val_max_examples is not None and len(val_examples) > tc.val_max_examples:
            keep = np.sort(
                np.random.default_rng(tc.seed + 2).choice(
                    len(val_examples), tc.val_max_examples, replace=False
                )
            )
            val_examples = val_examples.subset(keep)
    epochs: list[dict[str, object]] = []
    best_recall, best_epoch, best_state, bad_epochs, steps = -1.0, 0, None, 0, 0
    out_of_time = False
    for epoch in range(1, tc.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        total_loss, total_examples = 0.0, 0
        batches = length_batches(windows, tc.batch_size, rng)
        bar = tqdm(
            batches, desc=f"epoch {epoch}/{tc.epochs}", disable=not progress, leave=False, unit="batch"
        )
        epoch_budget = (
            None
            if tc.max_train_seconds is None
            else tc.max_train_seconds - sum(float(e["train_seconds"]) for e in epochs)
        )
        epoch_first_step = steps
        done = (
            0  # batches taken this epoch (an epoch cut by the budget covers only that share of the sessions)
        )
        for rows in bar:
            if epoch_budget is not None and time.perf_counter() - t0 >= epoch_budget:
                out_of_time = True
                break
            done += 1
            batch = batch_tensors(fit, windows, rows, rec.device)
            n = int(batch["targets"].numel())
            if n == 0:
                continue
            outputs = model.outputs_all(batch["items"], batch["activities"], batch["dwell"], batch["mask"])
            pooled, copy_term = outputs.at(batch["positions"])
            if sampler is not None:
                negatives, log_q = sampler.draw(n)
                loss = model.loss_at(pooled, batch["targets"], copy_term, negatives=negatives, log_q=log_q)
            else:
                loss = model.loss_at(pooled, batch["targets"], copy_term)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            steps += 1
            total_loss += loss.item() * n
            total_examples += n
            bar.set_postfix(loss=f"{total_loss / total_examples:.4f}")
        train_seconds = time.perf_counter() - t0
        row: dict[str, object] = {
            "epoch": epoch,
            "train_loss": total_loss / max(1, total_examples),
            "train_seconds": train_seconds,
            "sessions_per_s": fit.n_sessions * done / max(1, len(batches)) / max(train_seconds, 1e-9),
            "examples_per_s": total_examples / max(train_seconds, 1e-9),
            "steps": steps,
            "lr": schedule.get_last_lr()[0],
        }
        if steps > epoch_first_step:
            schedule.step()  # an epoch cut before its first step (time budget) leaves the rate as it was
        improved = True
        if val is not None:
            t0 = time.perf_counter()
            result = evaluate(rec, val, examples=val_examples)
            row.update({f"val_{k}": v for k, v in result.metrics.items() if k in ("recall@20", "mrr@20")})
            row["val_seconds"] = time.perf_counter() - t0
            improved = result.metrics["recall@20"] > best_recall
            if improved:
                best_recall = result.metrics["recall@20"]
        epochs.append(row)
        if rec.on_epoch is not None:
            rec.on_epoch(row)
        if progress:
            shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            tqdm.write(shown)
        if improved:
            best_epoch, bad_epochs = epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            if checkpoint_path is not None:
                rec.history = {"epochs": epochs, "best_epoch": best_epoch}
                rec.save(checkpoint_path)
        else:
            bad_epochs += 1
            # Small datasets first sit on a popularity plateau for several short epochs; don't stop there.
            if bad_epochs >= tc.patience and steps >= tc.min_steps:
                break
        if out_of_time:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    total_seconds = time.perf_counter() - started
    train_seconds = sum(float(e["train_seconds"]) for e in epochs)
    rec.history = {
        "epochs": epochs,
        "best_epoch": best_epoch,
        "best_val_recall@20": best_recall if val is not None else None,
        "n_fit_sessions": fit.n_sessions,
        "n_val_sessions": 0 if val is None else val.n_sessions,
        "n_val_examples": 0 if val_examples is None else len(val_examples),
        "n_windows": len(windows),
        "steps": steps,
        "stopped_by_time_budget": out_of_time,
        "item_init": item_init,
        "w2v_seconds": w2v_seconds,
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
        "sessions_per_s": sum(float(e["sessions_per_s"]) * float(e["train_seconds"]) for e in epochs)
        / max(train_seconds, 1e-9),
        "peak_rss_mb": _peak_rss_mb(),
        "device": str(rec.device),
        "num_threads": torch.get_num_threads(),
        "data_type": config.data_type,
        "loss": config.loss,
    }
    if checkpoint_path is not None:
        rec.save(checkpoint_path)
