"""Shared plumbing for the item-only baselines: visit-level views of training sessions and of prefixes.

Every baseline works on visit-level item sequences (one item per product visit, RIB's macro view), so
micro behaviours never reach them. Everything here is vectorised over a whole batch of prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from model.data.dataset import SessionDataset
from model.recommender import PrefixBatch


def concat_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[k], ends[k]) over k, without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(ends, dtype=np.int64) - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    # Offset of every output slot from its range's start = running index minus the range's first slot.
    first_slot = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - first_slot)


@dataclass
class VisitSequences:
    """Visit-level item sequences of a dataset's sessions, flat: session s is items[offsets[s]:offsets[s+1]]."""

    items: np.ndarray  # int64
    offsets: np.ndarray  # int64, n_sessions + 1
    last_time_ms: np.ndarray  # int64, last timestamp of every session (0 when the source has no time)
    n_items: int

    @classmethod
    def from_dataset(cls, data: SessionDataset) -> VisitSequences:
        """Visit items of every session of ``data``."""
        counts = data.visits_per_session()
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        lengths = data.session_lengths()
        last = np.where(lengths > 0, data.offsets[1:] - 1, 0)
        last_time = (
            data.timestamps_ms[last].astype(np.int64)
            if data.n_tuples
            else np.zeros(data.n_sessions, np.int64)
        )
        return cls(data.items[data.visit_starts].astype(np.int64), offsets, last_time, data.n_items)

    @property
    def n_sessions(self) -> int:
        """Number of sessions."""
        return int(len(self.offsets) - 1)

    def session_of_visit(self) -> np.ndarray:
        """Session index of every visit."""
        return np.repeat(np.arange(self.n_sessions), np.diff(self.offsets))

    def positions(self) -> np.ndarray:
        """1-based position of every visit within its session."""
        return np.arange(len(self.items)) - np.repeat(self.offsets[:-1], np.diff(self.offsets)) + 1

    def visit_counts(self) -> np.ndarray:
        """Visits per item, (n_items + 1,) with index 0 (padding) always 0."""
        return np.bincount(self.items, minlength=self.n_items + 1).astype(np.int64)

    def session_item_matrix(self, session_order: np.ndarray | None = None) -> sp.csr_matrix:
        """Binary (n_sessions, n_items + 1) CSR of which items each session contains.

        With ``session_order`` (a permutation), row r holds session ``session_order[r]``. The data
        of the returned matrix is the 1-based position of the item's *last* visit in the session
        (always >= 1, so the matrix stays binary in structure); use ``.astype(bool)`` for a plain one.
        """
        rows = self.session_of_visit()
        if session_order is not None:
            rank = np.empty(self.n_sessions, np.int64)
            rank[session_order] = np.arange(self.n_sessions)
            rows = rank[rows]
        pos = self.positions()
        key = rows * (self.n_items + 1) + self.items
        order = np.lexsort((pos, key))
        key, pos = key[order], pos[order]
        last = np.r_[key[1:] != key[:-1], True] if len(key) else np.zeros(0, bool)
        key, pos = key[last], pos[last]
        return sp.csr_matrix(
            (pos.astype(np.float32), (key // (self.n_items + 1), key % (self.n_items + 1))),
            shape=(self.n_sessions, self.n_items + 1),
        )


@dataclass
class PrefixVisits:
    """Visit-level items of a batch of prefixes, flat: visit v belongs to prefix row[v] at position pos[v]."""

    row: np.ndarray  # int64, prefix index in the batch
    items: np.ndarray  # int64
    pos: np.ndarray  # int64, 1-based position among the prefix's visits
    lengths: np.ndarray  # int64, visits per prefix
    last_time_ms: np.ndarray  # int64, timestamp of every prefix's last tuple
    n_items: int

    @classmethod
    def from_batch(cls, batch: PrefixBatch) -> PrefixVisits:
        """Gather the visits of every prefix in ``batch`` (targets are never touched: only [start, end))."""
        data = batch.dataset
        starts = np.asarray(batch.starts, np.int64)
        ends = np.asarray(batch.ends, np.int64)
        index = concat_ranges(starts, ends)
        row = np.repeat(np.arange(len(starts)), ends - starts)
        is_visit = data.visit_starts[index]
        index, row = index[is_visit], row[is_visit]
        lengths = np.bincount(row, minlength=len(starts)).astype(np.int64)
        pos = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1
        last_time = (
            data.timestamps_ms[np.maximum(ends - 1, 0)].astype(np.int64)
            if data.n_tuples
            else np.zeros(len(starts), np.int64)
        )
        return cls(row, data.items[index].astype(np.int64), pos, lengths, last_time, data.n_items)

    def __len__(self) -> int:
        return int(len(self.lengths))

    def distinct(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, item, last position) of every distinct item per prefix, sorted by (row, item)."""
        key = self.row * (self.n_items + 1) + self.items
        order = np.lexsort((self.pos, key))
        key, pos = key[order], self.pos[order]
        last = np.r_[key[1:] != key[:-1], True] if len(key) else np.zeros(0, bool)
        key, pos = key[last], pos[last]
        return key // (self.n_items + 1), key % (self.n_items + 1), pos


def rows_of_csr(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each requested row, the flat CSR slots it owns: (which request each slot serves, slot index)."""
    starts = matrix.indptr[rows].astype(np.int64)
    ends = matrix.indptr[np.asarray(rows) + 1].astype(np.int64)
    slots = concat_ranges(starts, ends)
    owner = np.repeat(np.arange(len(rows)), ends - starts)
    return owner, slots


def rank_within_groups(group: np.ndarray) -> np.ndarray:
    """0-based rank of every element within its run of equal ``group`` values (``group`` must be sorted)."""
    if len(group) == 0:
        return np.zeros(0, np.int64)
    new = np.r_[True, group[1:] != group[:-1]]
    start_of_run = np.maximum.accumulate(np.where(new, np.arange(len(group)), 0))
    return np.arange(len(group)) - start_of_run


def dense_scores(
    rows: np.ndarray, items: np.ndarray, values: np.ndarray, n_rows: int, n_items: int
) -> np.ndarray:
    """(n_rows, n_items + 1) float32 array with ``values`` summed at (rows, items); zeros elsewhere."""
    out = sp.coo_matrix(
        (np.asarray(values, np.float32), (np.asarray(rows, np.int64), np.asarray(items, np.int64))),
        shape=(n_rows, n_items + 1),
    )
    return np.asarray(out.toarray(), dtype=np.float32)  # toarray sums duplicate entries


# Below this share of repeat targets in training, demoting the current item costs nothing measurable.
REPEAT_RATE_TO_DEMOTE = 0.01


def resolve_exclude_last(flag: bool | None, train: SessionDataset) -> bool:
    """Whether to demote the prefix's last item: as configured, or (None) learned from training data.

    Logs where visits merge consecutive events on one item almost never repeat the last item; SR-GNN
    splits (one click = one visit) often do, and there demoting it would throw hits away.
    """
    return flag if flag is not None else train.repeat_rate() < REPEAT_RATE_TO_DEMOTE


def demote_last_items(scores: np.ndarray, last_items: np.ndarray) -> np.ndarray:
    """Give each prefix's last visited item the row's lowest score, in place, and return ``scores``.

    Consecutive tuples on one item form one visit, so the next visit is (up to rare artefacts of
    the test-item filter) a different item; models that score the current item highly (every
    session-KNN neighbour contains it) would otherwise waste rank 1 on it.
    """
    rows = np.arange(len(last_items))
    scores[rows, last_items] = scores[:, 1:].min(axis=1) if scores.shape[1] > 1 else 0.0
    return scores
