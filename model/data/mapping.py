"""Raw action names -> activity names: the per-dataset step before the session protocol.

A log names its events its own way (``pv``, ``type=6``, ``clicks``); the model only needs an ordered
activity vocabulary and which activities are conversions. An ``ActivityMapping`` says how one maps to the
other, which actions are dropped (counted, never silently), and it refuses data with actions it does not
know, so a typo in a mapping file cannot quietly lose rows.

TOML form (keys may be glob patterns such as ``"click:*"``; exact keys win over patterns)::

    drop = ["remove_cart"]
    conversions = ["Cart", "Order"]
    [actions]
    pv = "View"
    cart = "Cart"
    buy = "Order"
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pandas as pd

from edge_client.schema import MAX_ID_CHARS, ActivityVocabulary, SchemaError, SkipReport

# Action names that read as a conversion when no mapping file says otherwise ("add_cart", "orders",
# "clickout item", "Purchase"), but not when they undo one ("remove_cart", "delete_order"), nor RIB's page
# entries ("Cart2Product": reaching a product from the cart page).
_CONVERSION_WORD = re.compile(
    r"(?<![a-z])(cart|order|buy|purchase|clickout|checkout)(s|ed)?(?![a-z0-9])", re.I
)
_UNDO_WORD = re.compile(
    r"(?<![a-z])(remove|removed|delete|deleted|del|cancel|cancelled|refund)(?![a-z])", re.I
)
_PATTERN_CHARS = set("*?[")


class _Unmapped:
    def __repr__(self) -> str:
        return "<unmapped>"


_UNMAPPED = _Unmapped()  # resolution result for an action neither mapped nor dropped


def count_skips(report: SkipReport, reason: str, n: int, example: str) -> None:
    """Count ``n`` skipped rows under ``reason`` at once, keeping one example message."""
    if n <= 0:
        return
    report.skipped[reason] += n
    if len(report.examples) < 5:
        report.examples.append(example)


def looks_like_conversion(action: str) -> bool:
    """Whether an action name reads as a conversion (cart/order/buy/purchase/clickout/checkout)."""
    text = action.replace("_", " ").replace("-", " ")
    return bool(_CONVERSION_WORD.search(text)) and not _UNDO_WORD.search(text)


@dataclass(frozen=True)
class ActivityMapping:
    """How raw action names become activity names; built from a TOML file or inferred from the data."""

    actions: Mapping[str, str]  # raw action (or glob pattern) -> activity name
    drop: frozenset[str] = frozenset()  # raw actions (or patterns) whose rows are removed, counted
    conversions: frozenset[str] = frozenset()  # activity names that are conversions
    activities: tuple[str, ...] = field(default=())  # vocabulary order; default: first appearance in actions

    def __post_init__(self) -> None:
        actions = dict(self.actions)
        for key, value in actions.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key or not value:
                raise SchemaError(
                    "bad_mapping", f"action {key!r} -> {value!r}: both must be non-empty strings"
                )
            if len(value) > MAX_ID_CHARS:
                raise SchemaError(
                    "bad_mapping", f"activity name {value[:40]!r}... is longer than {MAX_ID_CHARS}"
                )
        if not actions:
            raise SchemaError("bad_mapping", "a mapping needs at least one action")
        object.__setattr__(self, "actions", MappingProxyType(actions))
        object.__setattr__(self, "drop", frozenset(self.drop))
        object.__setattr__(self, "conversions", frozenset(self.conversions))
        both = sorted(set(actions) & self.drop)
        if both:
            raise SchemaError("bad_mapping", f"actions {both} are both mapped and dropped")
        mapped = list(dict.fromkeys(actions.values()))
        order = tuple(self.activities) or tuple(mapped)
        if len(set(order)) != len(order):
            raise SchemaError("bad_mapping", "activity order lists a name twice")
        unordered = sorted(set(mapped) - set(order))
        if unordered:
            raise SchemaError(
                "bad_mapping", f"activities {unordered} are mapped to but missing from the order"
            )
        object.__setattr__(self, "activities", order)
        unknown = sorted(self.conversions - set(order))
        if unknown:
            raise SchemaError(
                "bad_mapping", f"conversions {unknown} name no activity (activities: {list(order)})"
            )

    def __hash__(self) -> int:
        return hash((tuple(self.actions.items()), self.drop, self.conversions, self.activities))

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path) -> ActivityMapping:
        """Read a mapping file (``drop``, ``conversions``, ``[actions]``); SchemaError says what is wrong."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise SchemaError(
                "bad_mapping", f"cannot read mapping file {path}: {err.strerror or err}"
            ) from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise SchemaError("bad_mapping", f"{path}: mapping file is not UTF-8") from None
        except tomllib.TOMLDecodeError as err:
            raise SchemaError("bad_mapping", f"{path}: not valid TOML ({err})") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, object], where: str = "mapping") -> ActivityMapping:
        """Build from the decoded TOML structure (also the inverse of to_dict)."""
        unknown = sorted(set(data) - {"actions", "drop", "conversions", "activities"})
        if unknown:
            raise SchemaError(
                "bad_mapping", f"{where}: unknown key(s) {unknown}; expected actions, drop, conversions"
            )
        actions = data.get("actions")
        if not isinstance(actions, Mapping) or not actions:
            raise SchemaError(
                "bad_mapping", f'{where}: needs a non-empty [actions] table of action = "Activity"'
            )
        bad = [k for k, v in actions.items() if not isinstance(v, str)]
        if bad:
            raise SchemaError(
                "bad_mapping", f"{where}: [actions] values must be strings (activity names); bad: {bad[:5]}"
            )
        lists = {}
        for key in ("drop", "conversions", "activities"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SchemaError("bad_mapping", f"{where}: '{key}' must be a list of strings")
            lists[key] = value
        try:
            return cls(
                actions=dict(actions),
                drop=frozenset(lists["drop"]),
                conversions=frozenset(lists["conversions"]),
                activities=tuple(lists["activities"]),
            )
        except SchemaError as err:
            raise SchemaError("bad_mapping", f"{where}: {str(err).split(': ', 1)[-1]}") from None

    @classmethod
    def infer(cls, actions: Iterable[object]) -> ActivityMapping:
        """Each distinct action is its own activity (most frequent first); conversion names detected."""
        counts = Counter(str(a) for a in actions if a is not None and not (isinstance(a, float) and a != a))
        if not counts:
            raise SchemaError("empty", "no actions to infer an activity mapping from")
        order = sorted(counts, key=lambda a: (-counts[a], a))
        return cls(
            actions={a: a for a in order},
            conversions=frozenset(a for a in order if looks_like_conversion(a)),
        )

    # ---- use ---------------------------------------------------------------------------------------
    def vocabulary(self) -> ActivityVocabulary:
        """The activity vocabulary the model is built with."""
        return ActivityVocabulary(self.activities, self.conversions)

    def activity_of(self, action: str) -> str | None:
        """Activity of one raw action; None when dropped; SchemaError when unmapped."""
        resolved = self._resolve([action])[action]
        if resolved is _UNMAPPED:
            raise SchemaError("unmapped_action", f"action {action!r} is neither mapped nor dropped")
        return resolved

    def _resolve(self, distinct: Iterable[str]) -> dict[str, object]:
        patterns = [k for k in self.actions if _PATTERN_CHARS & set(k)]
        drop_patterns = [k for k in self.drop if _PATTERN_CHARS & set(k)]
        out: dict[str, object] = {}
        for action in distinct:
            if action in self.actions:
                out[action] = self.actions[action]
            elif action in self.drop:
                out[action] = None
            else:
                hit = next((p for p in patterns if fnmatch.fnmatchcase(action, p)), None)
                if hit is not None:
                    out[action] = self.actions[hit]
                elif any(fnmatch.fnmatchcase(action, p) for p in drop_patterns):
                    out[action] = None
                else:
                    out[action] = _UNMAPPED
        return out

    def apply(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, SkipReport]:
        """Add the ``activity`` column and remove dropped rows, counting them; unmapped actions are an error."""
        report = SkipReport()
        if "action" not in frame:
            raise SchemaError("missing_field", "the interactions frame has no 'action' column")
        actions = frame["action"]
        missing = actions.isna().to_numpy()
        distinct = actions[~missing].astype(str).unique()
        resolved = self._resolve(distinct)
        unmapped = [a for a, v in resolved.items() if v is _UNMAPPED]
        if unmapped:
            counts = actions[actions.astype(str).isin(unmapped)].value_counts()
            listing = ", ".join(f"{a!r} ({n} rows)" for a, n in counts.head(10).items())
            raise SchemaError(
                "unmapped_action",
                f"{len(unmapped)} action(s) are neither mapped nor dropped by the mapping: {listing}"
                + (" ..." if len(unmapped) > 10 else "")
                + "; add them to [actions] or to drop",
            )
        activity = actions.astype(object).map({a: v for a, v in resolved.items()})
        dropped = activity.isna().to_numpy() & ~missing
        report.read += len(frame)
        count_skips(report, "missing_field", int(missing.sum()), "row without an action")
        dropped_names = sorted(set(actions[dropped].astype(str)))[:5]
        count_skips(report, "dropped_action", int(dropped.sum()), f"dropped by the mapping: {dropped_names}")
        keep = ~(missing | dropped)
        out = frame.loc[keep].copy()
        out["activity"] = activity[keep].astype(str).to_numpy()
        report.kept += int(keep.sum())
        return out, report

    def to_dict(self) -> dict[str, object]:
        """JSON/TOML-ready form (part of the cache key and of ``split.info``)."""
        return {
            "actions": dict(self.actions),
            "drop": sorted(self.drop),
            "conversions": sorted(self.conversions),
            "activities": list(self.activities),
        }
