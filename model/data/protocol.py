"""The session-recommendation protocol: interactions -> visits -> tuples -> temporal split -> filters.

Input is a *tuple frame* (pandas) with columns ``timestamp_ms, item_id, activity`` and optionally
``session_id, user_id, dwell_seconds``. The steps, in order:

1. Sessionize: rows without a session id are cut per user at ``session_gap_s`` of inactivity (30 min).
2. Visits: consecutive rows on one item in a session are one product visit (macro interaction);
   consecutive repeats of the same activity within a visit are one micro behavior.
3. Dwell of a visit: the ``dwell_seconds`` column when given (max over the visit's rows), otherwise the
   time from its first row to the next visit's first row, capped at ``max_dwell_s``; the last visit of a
   session has no successor and gets the *unknown* bucket. Every tuple of a visit carries its dwell.
4. Temporal split: sessions ending at or after ``split = t_max - test_seconds`` are test, the rest train
   (session-rec's rule), or a split given by the source.
5. Filters, from training data only (so nothing about test reaches training): drop visits of items
   with fewer than ``min_item_support`` training visits, then sessions with < ``min_session_visits``
   visits (one pass, as SR-GNN); in test drop visits of items unseen in training, then short sessions.
6. Vocabulary (items by training frequency) and dwell buckets (equal-frequency over training tuples).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from edge_client.schema import ActivityVocabulary, DwellBuckets, SchemaError
from model.data.dataset import SessionDataset, SplitData, Vocabulary

TUPLE_FRAME_COLUMNS = ("session_id", "user_id", "timestamp_ms", "item_id", "activity", "dwell_seconds")


@dataclass(frozen=True)
class ProtocolConfig:
    """Every knob of the protocol; its JSON form is part of the cache key."""

    session_gap_s: float = 1800.0
    max_dwell_s: float = 1800.0
    min_item_support: int = 5
    min_session_visits: int = 2
    n_dwell_buckets: int = 5
    fit_dwell_edges: bool = True  # False: the paper's fixed edges
    test_seconds: float | None = None  # the last this-many seconds are test
    test_fraction: float | None = 0.1  # used when test_seconds is None: last fraction of the time span

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def sessionize(frame: pd.DataFrame, gap_s: float) -> pd.DataFrame:
    """Give every row a ``session_id``: kept where present, else cut per user at ``gap_s`` inactivity."""
    frame = frame.copy()
    if "session_id" in frame and frame["session_id"].notna().all():
        frame["session_id"] = frame["session_id"].astype(str)
        return frame
    if "user_id" not in frame or frame["user_id"].isna().any():
        raise SchemaError("missing_field", "rows need a session_id or a user_id to sessionize")
    frame["_order"] = np.arange(len(frame))
    frame = frame.sort_values(["user_id", "timestamp_ms", "_order"], kind="stable")
    user = frame["user_id"].astype(str).to_numpy()
    ts = frame["timestamp_ms"].to_numpy(np.int64)
    new_user = np.r_[True, user[1:] != user[:-1]]
    gap = np.r_[True, (ts[1:] - ts[:-1]) > gap_s * 1000]
    number = np.cumsum(new_user | gap)
    frame["session_id"] = [f"{u}:{n}" for u, n in zip(user, number, strict=True)]
    return frame.sort_values("_order", kind="stable").drop(columns="_order")


def to_visit_tuples(frame: pd.DataFrame, config: ProtocolConfig) -> pd.DataFrame:
    """Sort, mark visits, derive dwell and collapse repeated activities (steps 1-3)."""
    missing = {"timestamp_ms", "item_id", "activity"} - set(frame.columns)
    if missing:
        raise SchemaError("missing_field", f"tuple frame lacks columns {sorted(missing)}")
    frame = sessionize(frame, config.session_gap_s)
    frame["_order"] = np.arange(len(frame))
    frame = frame.sort_values(["session_id", "timestamp_ms", "_order"], kind="stable").reset_index(drop=True)
    session = frame["session_id"].to_numpy()
    item = frame["item_id"].astype(str).to_numpy()
    frame["item_id"] = item
    new_session = np.r_[True, session[1:] != session[:-1]]
    visit_start = new_session | np.r_[True, item[1:] != item[:-1]]
    visit_id = np.cumsum(visit_start) - 1
    frame["visit_id"] = visit_id
    frame["visit_start"] = visit_start
    ts = frame["timestamp_ms"].to_numpy(np.int64)
    first_ts = ts[visit_start]
    if "dwell_seconds" in frame and frame["dwell_seconds"].notna().any():
        given = pd.to_numeric(frame["dwell_seconds"], errors="coerce").to_numpy(np.float64)
        visit_dwell = pd.Series(given).groupby(visit_id).max().to_numpy()
    else:
        session_first_visit = new_session[visit_start]
        next_first = np.r_[first_ts[1:], 0]
        has_next = np.r_[~session_first_visit[1:], False]
        visit_dwell = np.where(has_next, (next_first - first_ts) / 1000.0, np.nan)
    visit_dwell = np.minimum(visit_dwell, config.max_dwell_s)
    frame["dwell_seconds"] = visit_dwell[visit_id]
    activity = frame["activity"].astype(str).to_numpy()
    repeat = ~visit_start & np.r_[False, activity[1:] == activity[:-1]]
    return frame.loc[~repeat].drop(columns="_order").reset_index(drop=True)


def _split_time(frame: pd.DataFrame, config: ProtocolConfig) -> int:
    ts = frame["timestamp_ms"].to_numpy(np.int64)
    t_min, t_max = int(ts.min()), int(ts.max())
    if config.test_seconds is not None:
        return int(t_max - config.test_seconds * 1000)
    if config.test_fraction is None or not 0 < config.test_fraction < 1:
        raise ValueError("set test_seconds, or test_fraction in (0, 1)")
    return int(t_max - config.test_fraction * (t_max - t_min))


def _drop_short_sessions(frame: pd.DataFrame, min_visits: int) -> pd.DataFrame:
    visits = frame.groupby("session_id", sort=False)["visit_start"].transform("sum")
    return frame.loc[visits >= min_visits]


def build_split(
    frame: pd.DataFrame,
    name: str,
    activities: ActivityVocabulary,
    config: ProtocolConfig | None = None,
    test_sessions: set[str] | None = None,
) -> SplitData:
    """Run the whole protocol on a tuple frame; ``test_sessions`` overrides the temporal split."""
    config = config or ProtocolConfig()
    if frame.empty:
        raise SchemaError("empty", f"{name}: no interactions to build a dataset from")
    unknown = set(frame["activity"].astype(str).unique()) - set(activities.names)
    if unknown:
        raise SchemaError(
            "unknown_activity", f"{name}: activities {sorted(unknown)[:5]} not in the vocabulary"
        )
    has_time = bool(frame["timestamp_ms"].nunique() > 1)
    tuples = to_visit_tuples(frame, config)
    session_end = tuples.groupby("session_id", sort=False)["timestamp_ms"].transform("max")
    if test_sessions is not None:
        is_test = tuples["session_id"].isin(test_sessions).to_numpy()
        split_ms = int(tuples.loc[is_test, "timestamp_ms"].min()) if is_test.any() else None
    else:
        split_ms = _split_time(tuples, config)
        is_test = (session_end >= split_ms).to_numpy()
    train, test = tuples.loc[~is_test], tuples.loc[is_test]
    info: dict[str, object] = {
        "protocol": config.to_dict(),
        "split_time_ms": split_ms,
        "raw": {
            "rows": int(len(frame)),
            "tuples": int(len(tuples)),
            "sessions": int(tuples["session_id"].nunique()),
        },
    }

    # Step 5: filters from training data only, in one pass as SR-GNN and session-rec do (an item kept
    # here can fall below the support threshold once short sessions go; iterating would gut small sets).
    support = train.loc[train["visit_start"], "item_id"].value_counts()
    rare = support.index[support < config.min_item_support]
    train = _drop_short_sessions(train.loc[~train["item_id"].isin(rare)], config.min_session_visits)
    train_items = train.loc[train["visit_start"], "item_id"].value_counts()
    test = _drop_short_sessions(test.loc[test["item_id"].isin(train_items.index)], config.min_session_visits)
    if train.empty:
        raise SchemaError(
            "empty", f"{name}: no training session survives the filters ({config.min_item_support=})"
        )

    # Step 6: vocabulary and dwell buckets, from training data only.
    order = sorted(train_items.items(), key=lambda kv: (-kv[1], kv[0]))
    item_ids = np.array([item for item, _ in order], dtype=str)
    has_dwell = has_time or ("dwell_seconds" in frame and frame["dwell_seconds"].notna().any())
    if not has_dwell:
        dwell = DwellBuckets(())
    elif config.fit_dwell_edges:
        dwell = DwellBuckets.fit_equal_frequency(train["dwell_seconds"].to_numpy(), config.n_dwell_buckets)
    else:
        dwell = DwellBuckets()
    vocab = Vocabulary(item_ids=item_ids, activities=activities, dwell=dwell)
    has_activity = bool(tuples["activity"].nunique() > 1)
    split = SplitData(
        train=frame_to_dataset(train, f"{name}/train", vocab, has_activity, bool(has_dwell), has_time),
        test=frame_to_dataset(test, f"{name}/test", vocab, has_activity, bool(has_dwell), has_time),
        info=info,
    )
    info["train"] = describe(split.train)
    info["test"] = describe(split.test)
    return split


def frame_to_dataset(
    frame: pd.DataFrame, name: str, vocab: Vocabulary, has_activity: bool, has_dwell: bool, has_time: bool
) -> SessionDataset:
    """Encode a filtered, sorted tuple frame with a vocabulary."""
    item_index = vocab.item_index()
    items = frame["item_id"].map(item_index)
    if items.isna().any():
        raise SchemaError("unknown_item", f"{name}: items outside the vocabulary")
    session = frame["session_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, session[1:] != session[:-1]]) if len(frame) else np.zeros(0, np.int64)
    activity_index = {a: i for i, a in enumerate(vocab.activities.names)}
    dwell_seconds = frame["dwell_seconds"].to_numpy(np.float64)
    visit_start = frame["visit_start"].to_numpy(bool).copy()
    if len(frame):
        visit_start[starts] = True  # a session whose first visit was filtered out starts at its next one
    user_ids = None
    if "user_id" in frame and frame["user_id"].notna().all() and len(frame):
        user_ids = frame["user_id"].astype(str).to_numpy()[starts]
    return SessionDataset(
        name=name,
        items=items.to_numpy(np.int32),
        activities=frame["activity"].map(activity_index).to_numpy(np.int16),
        dwell_buckets=vocab.dwell.bucketize(dwell_seconds),
        dwell_seconds=dwell_seconds.astype(np.float32),
        timestamps_ms=frame["timestamp_ms"].to_numpy(np.int64),
        visit_starts=visit_start,
        offsets=np.r_[starts, len(frame)].astype(np.int64),
        session_ids=session[starts].astype(str),
        vocab=vocab,
        user_ids=user_ids,
        has_activity=has_activity,
        has_dwell=has_dwell,
        has_time=has_time,
    )


def describe(dataset: SessionDataset) -> dict[str, object]:
    """Counts people ask for first."""
    visits = dataset.visits_per_session()
    return {
        "sessions": dataset.n_sessions,
        "visits": dataset.n_visits,
        "tuples": dataset.n_tuples,
        "items_present": int(len(np.unique(dataset.items))),
        "examples": int(len(dataset.examples())),
        "visits_per_session_median": float(np.median(visits)) if len(visits) else 0.0,
        "time_range_ms": [int(dataset.timestamps_ms.min()), int(dataset.timestamps_ms.max())]
        if dataset.n_tuples
        else None,
    }
