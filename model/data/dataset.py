"""SessionDataset: sessions of micro-behavior tuples as flat numpy arrays, and the prefixes they predict.

A session is a sequence of tuples (item, activity, dwell_bucket) grouped into product *visits* (macro
interactions): consecutive tuples on one item form one visit. The recommendation task (RIB Section 2) is
to predict the item of the next visit from every tuple before it, so a session with V visits yields
V - 1 examples: prefix = all tuples of visits 1..j, target = item of visit j + 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_client.schema import ActivityVocabulary, DwellBuckets

PADDING_ITEM = 0  # dense item index 0 is padding; real items are 1..n_items


@dataclass(frozen=True)
class Vocabulary:
    """Everything needed to turn raw tuples into model indices: items, activities, dwell edges."""

    item_ids: np.ndarray  # original item ids (str); dense index i is item_ids[i - 1]
    activities: ActivityVocabulary
    dwell: DwellBuckets

    @property
    def n_items(self) -> int:
        """Number of real items (the model's output size is n_items + 1 with padding)."""
        return int(len(self.item_ids))

    def item_index(self) -> dict[str, int]:
        """Original id -> dense index (1-based)."""
        return {str(item): i + 1 for i, item in enumerate(self.item_ids)}

    def to_json(self) -> dict[str, object]:
        """JSON-ready metadata (item ids travel separately as an array)."""
        return {
            "activities": self.activities.to_dict(),
            "dwell": self.dwell.to_dict(),
            "n_items": self.n_items,
        }


@dataclass
class Examples:
    """Next-item examples: prefix = tuples [starts[k], ends[k]) of the dataset, target = targets[k]."""

    session_index: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return int(len(self.targets))

    def subset(self, index: np.ndarray | slice) -> Examples:
        """Select examples."""
        return Examples(self.session_index[index], self.starts[index], self.ends[index], self.targets[index])


@dataclass
class SessionDataset:
    """Sessions of micro-behavior tuples, flat (CSR-style) so millions of tuples stay cheap."""

    name: str
    items: np.ndarray  # int32, 1..n_items
    activities: np.ndarray  # int16, index into vocab.activities
    dwell_buckets: np.ndarray  # int8, index into vocab.dwell (unknown = vocab.dwell.unknown)
    dwell_seconds: np.ndarray  # float32, NaN when unknown
    timestamps_ms: np.ndarray  # int64 (0 when the source has no time)
    visit_starts: np.ndarray  # bool, True on the first tuple of each visit
    offsets: np.ndarray  # int64, session s holds tuples offsets[s]:offsets[s+1]
    session_ids: np.ndarray  # str
    vocab: Vocabulary
    user_ids: np.ndarray | None = None  # str, when the source knows users
    has_activity: bool = True
    has_dwell: bool = True
    has_time: bool = True
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Ids are plain unicode arrays so the dataset saves without pickles.
        self.session_ids = np.asarray(self.session_ids, dtype=str)
        if self.user_ids is not None:
            self.user_ids = np.asarray(self.user_ids, dtype=str)
        n = len(self.items)
        for name in ("activities", "dwell_buckets", "dwell_seconds", "timestamps_ms", "visit_starts"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, items has {n}")
        if len(self.offsets) != len(self.session_ids) + 1 or self.offsets[0] != 0 or self.offsets[-1] != n:
            raise ValueError("offsets do not cover the tuples")
        if n and not self.visit_starts[self.offsets[:-1][np.diff(self.offsets) > 0]].all():
            raise ValueError("every session must start with a visit start")

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def n_sessions(self) -> int:
        """Number of sessions."""
        return int(len(self.session_ids))

    @property
    def n_tuples(self) -> int:
        """Number of micro behaviors."""
        return int(len(self.items))

    @property
    def n_items(self) -> int:
        """Catalogue size (vocabulary, not only items present here)."""
        return self.vocab.n_items

    @property
    def n_visits(self) -> int:
        """Number of macro interactions (product visits)."""
        return int(self.visit_starts.sum())

    def session_lengths(self) -> np.ndarray:
        """Tuples per session."""
        return np.diff(self.offsets)

    def session_of_tuple(self) -> np.ndarray:
        """Session index of every tuple."""
        return np.repeat(np.arange(self.n_sessions), self.session_lengths())

    def visits_per_session(self) -> np.ndarray:
        """Visits per session."""
        return (
            np.add.reduceat(self.visit_starts.astype(np.int64), self.offsets[:-1])
            if self.n_tuples
            else np.zeros(0, np.int64)
        )

    def session(self, s: int) -> slice:
        """Slice of session s's tuples."""
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def visit_items(self, start: int, end: int) -> np.ndarray:
        """Item of each visit within tuples [start, end) (the macro, item-only view of a prefix)."""
        return self.items[start:end][self.visit_starts[start:end]]

    def session_visit_sequences(self) -> list[np.ndarray]:
        """Every session's visit-level item sequence (what item-only baselines train on)."""
        items = self.items[self.visit_starts]
        counts = self.visits_per_session()
        return np.split(items, np.cumsum(counts)[:-1]) if len(counts) else []

    # ---- the prediction task ---------------------------------------------------------------------
    def examples(self) -> Examples:
        """Every prefix -> next visit's item, in session order (the standard protocol)."""
        visit_pos = np.flatnonzero(self.visit_starts)
        session_of_visit = self.session_of_tuple()[visit_pos]
        is_first = visit_pos == self.offsets[session_of_visit]
        targets_pos = visit_pos[~is_first]
        sessions = session_of_visit[~is_first]
        return Examples(
            session_index=sessions.astype(np.int64),
            starts=self.offsets[sessions].astype(np.int64),
            ends=targets_pos.astype(np.int64),
            targets=self.items[targets_pos].astype(np.int64),
        )

    def repeat_rate(self) -> float:
        """Share of examples whose target is the prefix's last item (0 where visits merge repeats)."""
        examples = self.examples()
        if not len(examples):
            return 0.0
        return float(np.mean(self.items[examples.ends - 1] == examples.targets))

    def select_sessions(self, mask_or_index: np.ndarray, name: str | None = None) -> SessionDataset:
        """A new dataset holding only the chosen sessions (same vocabulary)."""
        index = (
            np.flatnonzero(mask_or_index)
            if np.asarray(mask_or_index).dtype == bool
            else np.asarray(mask_or_index)
        )
        lengths = self.session_lengths()[index]
        tuple_index = (
            np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in index])
            if len(index)
            else np.zeros(0, np.int64)
        )
        return SessionDataset(
            name=name or self.name,
            items=self.items[tuple_index],
            activities=self.activities[tuple_index],
            dwell_buckets=self.dwell_buckets[tuple_index],
            dwell_seconds=self.dwell_seconds[tuple_index],
            timestamps_ms=self.timestamps_ms[tuple_index],
            visit_starts=self.visit_starts[tuple_index],
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            session_ids=self.session_ids[index],
            vocab=self.vocab,
            user_ids=None if self.user_ids is None else self.user_ids[index],
            has_activity=self.has_activity,
            has_dwell=self.has_dwell,
            has_time=self.has_time,
            meta=dict(self.meta),
        )

    # ---- persistence -----------------------------------------------------------------------------
    _ARRAYS = (
        "items",
        "activities",
        "dwell_buckets",
        "dwell_seconds",
        "timestamps_ms",
        "visit_starts",
        "offsets",
        "session_ids",
    )

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The arrays to save (``prefix`` namespaces several datasets in one file)."""
        out = {prefix + name: getattr(self, name) for name in self._ARRAYS}
        if self.user_ids is not None:
            out[prefix + "user_ids"] = self.user_ids
        return out

    def header(self) -> dict[str, object]:
        """JSON-ready description of everything that is not an array."""
        return {
            "name": self.name,
            "has_activity": self.has_activity,
            "has_dwell": self.has_dwell,
            "has_time": self.has_time,
            "meta": self.meta,
        }

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], header: dict, vocab: Vocabulary, prefix: str = ""
    ) -> SessionDataset:
        """Inverse of arrays() + header()."""
        kwargs = {name: arrays[prefix + name] for name in cls._ARRAYS}
        kwargs["user_ids"] = arrays.get(prefix + "user_ids")
        return cls(
            vocab=vocab,
            name=header["name"],
            has_activity=header["has_activity"],
            has_dwell=header["has_dwell"],
            has_time=header["has_time"],
            meta=header.get("meta", {}),
            **kwargs,
        )


@dataclass
class SplitData:
    """A train/test pair sharing one vocabulary, plus what was done to make it."""

    train: SessionDataset
    test: SessionDataset
    info: dict = field(default_factory=dict)

    @property
    def vocab(self) -> Vocabulary:
        """The shared vocabulary (built from training data only)."""
        return self.train.vocab

    def save(self, path: str | Path) -> None:
        """Write one .npz with both datasets, the vocabulary and a JSON header."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "train": self.train.header(),
            "test": self.test.header(),
            "vocab": self.vocab.to_json(),
            "info": self.info,
        }
        arrays = {
            **self.train.arrays("train/"),
            **self.test.arrays("test/"),
            "vocab/item_ids": self.vocab.item_ids,
        }
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, header=np.array(json.dumps(header)), **arrays)
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache

    @classmethod
    def load(cls, path: str | Path) -> SplitData:
        """Read what save() wrote (no pickles involved)."""
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        header = json.loads(str(arrays.pop("header")))
        vocab = Vocabulary(
            item_ids=arrays.pop("vocab/item_ids"),
            activities=ActivityVocabulary.from_dict(header["vocab"]["activities"]),
            dwell=DwellBuckets.from_dict(header["vocab"]["dwell"]),
        )
        train = SessionDataset.from_arrays(arrays, header["train"], vocab, "train/")
        test = SessionDataset.from_arrays(arrays, header["test"], vocab, "test/")
        return cls(train, test, header["info"])
