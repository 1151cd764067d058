"""A device's own records as a SessionDataset under the federation's shared vocabulary.

On a device the store holds ``MicroBehavior`` records the extractor produced. Local training needs them in
the same form centralized training uses, so this runs the same protocol steps (visits, dwell, repeated
activities collapsed: ``to_visit_tuples``), then keeps only what the shared vocabulary knows: items outside
it are dropped (a device never adds items to the federation's model, and never reports which ones it saw),
and sessions left with fewer than ``min_session_visits`` visits go.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from edge_client.schema import MicroBehavior
from model.data.dataset import SessionDataset, Vocabulary
from model.data.protocol import ProtocolConfig, frame_to_dataset, to_visit_tuples


def records_to_dataset(
    records: Iterable[MicroBehavior],
    vocab: Vocabulary,
    name: str = "device",
    min_session_visits: int = 2,
    max_dwell_s: float = ProtocolConfig.max_dwell_s,
) -> SessionDataset:
    """Encode a device's records with the shared vocabulary (unknown items and activities dropped)."""
    rows = [
        (r.session_id, int(r.timestamp_ms), str(r.item_id), str(r.activity), float(r.dwell_seconds))
        for r in records
    ]
    frame = pd.DataFrame(rows, columns=["session_id", "timestamp_ms", "item_id", "activity", "dwell_seconds"])
    has_dwell = vocab.dwell.n_buckets > 0
    if frame.empty:
        return frame_to_dataset(_empty_tuples(), name, vocab, True, has_dwell, True)
    frame["timestamp_ms"] = frame["timestamp_ms"].astype(np.int64)
    tuples = to_visit_tuples(frame, ProtocolConfig(max_dwell_s=max_dwell_s))
    known = tuples["item_id"].isin(set(vocab.item_index())) & tuples["activity"].isin(
        set(vocab.activities.names)
    )
    tuples = tuples.loc[known]
    # Dropping a tuple can join two visits of the same item; re-mark visit starts on what is left.
    session = tuples["session_id"].to_numpy()
    item = tuples["item_id"].to_numpy()
    visit_start = tuples["visit_start"].to_numpy(bool).copy()
    if len(tuples):
        visit_start |= np.r_[True, (session[1:] != session[:-1]) | (item[1:] != item[:-1])]
    tuples = tuples.assign(visit_start=visit_start)
    visits = tuples.groupby("session_id", sort=False)["visit_start"].transform("sum")
    tuples = tuples.loc[visits >= min_session_visits].reset_index(drop=True)
    if tuples.empty:
        return frame_to_dataset(_empty_tuples(), name, vocab, True, has_dwell, True)
    return frame_to_dataset(tuples, name, vocab, True, has_dwell, True)


def _empty_tuples() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "session_id": pd.Series([], dtype=str),
            "timestamp_ms": pd.Series([], dtype=np.int64),
            "item_id": pd.Series([], dtype=str),
            "activity": pd.Series([], dtype=str),
            "dwell_seconds": pd.Series([], dtype=np.float64),
            "visit_start": pd.Series([], dtype=bool),
        }
    )
