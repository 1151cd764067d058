"""The one schema of rib-edge: raw UI events, micro-behavior tuples, activity and dwell vocabularies.

The device owns this module, so it imports nothing beyond the standard library and numpy. Every other
package (model, privacy, aggregator, simulations, cli) imports its formats from here.

Formats:
- A raw UI event is one JSON object per line (``RawEvent``). Raw events never leave the device.
- Any app's own behaviors: an ``action`` event names its activity itself (``"action": "Play"``), a name
  from the activity vocabulary the model package ships, so a hotel, media or grocery kiosk records its
  own actions (as many as its vocabulary holds) without mapping them onto the JD page sources and modules.
- A micro-behavior tuple is ``(item, activity, dwell_bucket)`` (RIB, WSDM 2018, Section 2). The device
  stores ``MicroBehavior`` records that keep the dwell in seconds; the bucket is computed with the dwell
  edges shipped with the model, so a new model with new edges re-buckets the same history.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import NamedTuple

import numpy as np

SCHEMA_VERSION = 1

# Largest accepted identifier / string field, and largest accepted JSON line: bounded input, bounded memory.
MAX_ID_CHARS = 128
MAX_EVENT_LINE_BYTES = 4096
# Timestamps are Unix epoch milliseconds; anything beyond this is not a real clock reading.
MAX_TIMESTAMP_MS = 2**53 - 1


class SchemaError(ValueError):
    """A record that does not follow the schema; ``reason`` is a short stable code for skip counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class EventType(StrEnum):
    """Raw UI event types a device records."""

    PAGE_ENTER = "page_enter"  # opened a product page; needs page_source
    MODULE_VIEW = "module_view"  # read a module of the product page; needs module
    CART = "cart"  # added the product to the cart
    ORDER = "order"  # ordered the product
    HOVER = "hover"  # pointer rested on a product (tile or page); value = duration in ms
    SCROLL = "scroll"  # scrolled the product page; value = depth in [0, 1]
    VISIBILITY_HIDDEN = "visibility_hidden"  # tab/app went to background: dwell clock pauses
    VISIBILITY_VISIBLE = "visibility_visible"  # back in foreground: dwell clock resumes
    PAGE_LEAVE = "page_leave"  # left the product page
    ACTION = "action"  # an app's own action on an item; needs action (an activity name of the package)


# How the shopper reached the product page (RIB Table 1, a1..a5).
PAGE_SOURCES: tuple[str, ...] = ("home", "shop_list", "sale", "cart", "search")
# Product-page modules (RIB Table 1, a6..a8).
MODULES: tuple[str, ...] = ("comments", "specification", "bottom")

# The 10 RIB activities (Table 1), the default activity vocabulary.
RIB_ACTIVITIES: tuple[str, ...] = (
    "Home2Product",
    "ShopList2Product",
    "Sale2Product",
    "Cart2Product",
    "SearchList2Product",
    "Detail_comments",
    "Detail_specification",
    "Detail_bottom",
    "Cart",
    "Order",
)
SOURCE_TO_ACTIVITY: dict[str, str] = dict(zip(PAGE_SOURCES, RIB_ACTIVITIES[:5], strict=True))
MODULE_TO_ACTIVITY: dict[str, str] = dict(zip(MODULES, RIB_ACTIVITIES[5:8], strict=True))
EVENT_TO_ACTIVITY: dict[str, str] = {EventType.CART.value: "Cart", EventType.ORDER.value: "Order"}

# The paper's dwell buckets: 0-9, 10-24, 25-60, 61-120, >120 seconds. Bucket k covers [edge[k-1], edge[k]).
PAPER_DWELL_EDGES_S: tuple[float, ...] = (10.0, 25.0, 61.0, 121.0)
DEFAULT_DWELL_BUCKETS = 5


# --------------------------------------------------------------------------------------------------
# Raw UI events
# --------------------------------------------------------------------------------------------------

_EVENT_FIELDS = (
    "schema_version",
    "device_id",
    "session_id",
    "timestamp_ms",
    "event_type",
    "item_id",
    "page_source",
    "module",
    "value",
    "action",
)
_NEEDS_ITEM = {
    EventType.PAGE_ENTER,
    EventType.MODULE_VIEW,
    EventType.CART,
    EventType.ORDER,
    EventType.HOVER,
    EventType.ACTION,
}


def _check_id(name: str, value: object, required: bool) -> str | None:
    if value is None:
        if required:
            raise SchemaError("missing_field", f"'{name}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SchemaError("bad_type", f"'{name}' must be a string, got {type(value).__name__}")
    text = str(value)
    if not text or len(text) > MAX_ID_CHARS:
        raise SchemaError("bad_value", f"'{name}' must have 1..{MAX_ID_CHARS} characters")
    if any(ord(ch) < 32 for ch in text):
        raise SchemaError("bad_value", f"'{name}' contains control characters")
    return text


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond the float range: JSON allows it, a float cannot hold it
        return False


def _check_choice(
    name: str, value: object, event_type: EventType, owner: EventType, choices: tuple[str, ...]
) -> str | None:
    """A field that only ``owner`` events carry, required there and drawn from ``choices``."""
    if event_type is not owner:
        if value is not None:
            raise SchemaError("bad_value", f"{name} only belongs to {owner.value}, not {event_type.value}")
        return None
    if value is None:
        raise SchemaError("missing_field", f"'{name}' is required for {owner.value}")
    if value not in choices:
        raise SchemaError("bad_value", f"{name} {str(value)[:40]!r} not in {choices}")
    return value


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One raw UI event as the device records it (schema version 1)."""

    device_id: str
    session_id: str
    timestamp_ms: int
    event_type: EventType
    item_id: str | None = None
    page_source: str | None = None
    module: str | None = None
    value: float | None = None
    action: str | None = None

    @classmethod
    def from_dict(cls, record: Mapping[str, object]) -> RawEvent:
        """Validate a decoded JSON object and build the event; raises SchemaError with a reason code."""
        if not isinstance(record, Mapping):
            raise SchemaError("bad_type", f"an event must be a JSON object, got {type(record).__name__}")
        unknown = set(record) - set(_EVENT_FIELDS)
        if unknown:
            raise SchemaError("unknown_field", f"unknown field(s) {sorted(map(str, unknown))[:5]}")
        version = record.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
            raise SchemaError(
                "bad_version", f"schema_version {version!r} is not supported (max {SCHEMA_VERSION})"
            )
        device_id = _check_id("device_id", record.get("device_id"), required=True)
        session_id = _check_id("session_id", record.get("session_id"), required=True)
        ts = record.get("timestamp_ms")
        if ts is None:
            raise SchemaError("missing_field", "'timestamp_ms' is required")
        if isinstance(ts, float) and ts.is_integer():
            ts = int(ts)
        if isinstance(ts, bool) or not isinstance(ts, int):
            raise SchemaError("bad_type", f"'timestamp_ms' must be an integer, got {type(ts).__name__}")
        if not 0 <= ts <= MAX_TIMESTAMP_MS:
            raise SchemaError("bad_value", f"'timestamp_ms' {ts} is out of range")
        raw_type = record.get("event_type")
        if raw_type is None:
            raise SchemaError("missing_field", "'event_type' is required")
        try:
            event_type = EventType(raw_type)
        except (ValueError, TypeError):
            raise SchemaError("unknown_event_type", f"unknown event_type {str(raw_type)[:40]!r}") from None
        item_id = _check_id("item_id", record.get("item_id"), required=event_type in _NEEDS_ITEM)
        page_source = _check_choice(
            "page_source", record.get("page_source"), event_type, EventType.PAGE_ENTER, PAGE_SOURCES
        )
        module = _check_choice("module", record.get("module"), event_type, EventType.MODULE_VIEW, MODULES)
        action = record.get("action")
        if event_type is EventType.ACTION:
            # Any name an activity vocabulary can hold; whether the installed model knows it is the client's check.
            action = _check_id("action", action, required=True)
        elif action is not None:
            raise SchemaError("bad_value", f"action only belongs to action events, not {event_type.value}")
        value = record.get("value")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
                raise SchemaError("bad_type", "'value' must be a finite number")
            value = float(value)
            if event_type is EventType.SCROLL and not 0.0 <= value <= 1.0:
                raise SchemaError("bad_value", f"scroll depth {value} must be in [0, 1]")
            if event_type is EventType.HOVER and value < 0:
                raise SchemaError("bad_value", "hover duration must be >= 0 ms")
        return cls(device_id, session_id, ts, event_type, item_id, page_source, module, value, action)

    def to_dict(self) -> dict[str, object]:
        """The event as a JSON-ready dict (None fields dropped)."""
        out: dict[str, object] = {"schema_version": SCHEMA_VERSION}
        for key, val in asdict(self).items():
            if val is not None:
                out[key] = val.value if isinstance(val, EventType) else val
        return out

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)


def parse_event_line(line: bytes | str) -> RawEvent:
    """Parse one JSON line into a RawEvent; raises SchemaError (never anything else) on bad input."""
    if isinstance(line, bytes):
        if len(line) > MAX_EVENT_LINE_BYTES:
            raise SchemaError("too_large", f"event line of {len(line)} bytes exceeds {MAX_EVENT_LINE_BYTES}")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise SchemaError("not_utf8", "event line is not valid UTF-8") from None
    if len(line) > MAX_EVENT_LINE_BYTES:
        raise SchemaError("too_large", f"event line exceeds {MAX_EVENT_LINE_BYTES} characters")
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise SchemaError("bad_json", "event line is not valid JSON") from None
    return RawEvent.from_dict(record)


@dataclass
class SkipReport:
    """Counts of records skipped while reading, by reason, so nothing is lost silently."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str, max_examples: int = 5) -> None:
        """Count one skipped record, keeping the first few messages."""
        self.skipped[reason] += 1
        if len(self.examples) < max_examples:
            self.examples.append(where)

    @property
    def n_skipped(self) -> int:
        """Total skipped records."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One human-readable line."""
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        return f"read {self.read}, kept {self.kept}, skipped {self.n_skipped}" + (
            f" ({parts})" if parts else ""
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "read": self.read,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "examples": self.examples,
        }


def read_event_lines(lines: Iterable[bytes | str], report: SkipReport | None = None) -> Iterator[RawEvent]:
    """Yield valid events from JSON lines; bad lines are counted in ``report`` and skipped."""
    report = report if report is not None else SkipReport()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        report.read += 1
        try:
            event = parse_event_line(line)
        except SchemaError as err:
            report.skip(err.reason, f"line {lineno}: {err}")
            continue
        report.kept += 1
        yield event


# --------------------------------------------------------------------------------------------------
# Micro-behavior tuples and vocabularies
# --------------------------------------------------------------------------------------------------


class MicroBehavior(NamedTuple):
    """One micro behavior as stored on the device: the RIB tuple plus when it happened and dwell in seconds.

    ``dwell_seconds`` is the dwell of the product visit this behavior belongs to (NaN when unknown);
    the tuple's ``dwell_bucket`` comes from the model's ``DwellBuckets``.

    A named tuple, not a frozen dataclass: equally immutable and hashable, but built in one C call. The
    batch extractor builds one per tuple, and a frozen dataclass's ``__init__`` (one ``object.__setattr__``
    per field) cost a third of its time. As any named tuple, a record also equals the plain tuple of its
    fields.
    """

    session_id: str
    timestamp_ms: int
    item_id: str
    activity: str
    dwell_seconds: float

    def rib_tuple(self, buckets: DwellBuckets) -> tuple[str, str, int]:
        """The paper's (item, activity, dwell_bucket) tuple under the given bucket edges."""
        return (self.item_id, self.activity, buckets.bucket_of(self.dwell_seconds))


@dataclass(frozen=True)
class ActivityVocabulary:
    """An ordered activity vocabulary; the model needs only this, so datasets may declare their own."""

    names: tuple[str, ...] = RIB_ACTIVITIES
    conversions: frozenset[str] | None = None  # None: whichever of RIB's Cart/Order are among names

    def __post_init__(self) -> None:
        if self.conversions is None:
            object.__setattr__(self, "conversions", frozenset({"Cart", "Order"} & set(self.names)))
        object.__setattr__(self, "conversions", frozenset(self.conversions))
        if not self.names:
            raise SchemaError("bad_vocabulary", "an activity vocabulary needs at least one activity")
        if len(set(self.names)) != len(self.names):
            raise SchemaError("bad_vocabulary", "activity names must be unique")
        missing = set(self.conversions) - set(self.names)
        if missing:
            raise SchemaError("bad_vocabulary", f"conversions {sorted(missing)} are not activities")

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """Dense index of an activity name; SchemaError if unknown."""
        try:
            return self._lookup[name]
        except KeyError:
            raise SchemaError("unknown_activity", f"activity {name!r} not in vocabulary") from None

    @property
    def _lookup(self) -> dict[str, int]:
        cached = self.__dict__.get("_lookup_cache")
        if cached is None:
            cached = {name: i for i, name in enumerate(self.names)}
            object.__setattr__(self, "_lookup_cache", cached)
        return cached

    def is_conversion(self, name: str) -> bool:
        """Whether the activity is a conversion (cart/order style)."""
        return name in self.conversions

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"names": list(self.names), "conversions": sorted(self.conversions)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ActivityVocabulary:
        """Inverse of to_dict, validated."""
        if not isinstance(data, Mapping):
            raise SchemaError(
                "bad_vocabulary", f"an activity vocabulary must be an object, got {type(data).__name__}"
            )
        names = data.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SchemaError("bad_vocabulary", "'names' must be a list of strings")
        conversions = data.get("conversions", [])
        if not isinstance(conversions, list) or not all(isinstance(c, str) for c in conversions):
            raise SchemaError("bad_vocabulary", "'conversions' must be a list of strings")
        return cls(tuple(names), frozenset(conversions))


RIB_ACTIVITY_VOCAB = ActivityVocabulary()


@dataclass(frozen=True)
class DwellBuckets:
    """Dwell-time buckets: bucket k covers [edges[k-1], edges[k]) seconds; ``unknown`` is its own index."""

    edges_s: tuple[float, ...] = PAPER_DWELL_EDGES_S

    def __post_init__(self) -> None:
        edges = tuple(float(e) for e in self.edges_s)
        if any(not math.isfinite(e) or e < 0 for e in edges) or list(edges) != sorted(set(edges)):
            raise SchemaError("bad_dwell_edges", f"dwell edges must be finite, >= 0 and increasing: {edges}")
        object.__setattr__(self, "edges_s", edges)

    @property
    def n_buckets(self) -> int:
        """Number of known-dwell buckets."""
        return len(self.edges_s) + 1

    @property
    def unknown(self) -> int:
        """Index used when the dwell is unknown (e.g. the last visit of a logged session)."""
        return self.n_buckets

    @property
    def vocab_size(self) -> int:
        """Known buckets plus the unknown bucket."""
        return self.n_buckets + 1

    def bucket_of(self, seconds: float) -> int:
        """Bucket index of one dwell in seconds (NaN or negative -> unknown)."""
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            return self.unknown
        return int(np.searchsorted(self.edges_s, seconds, side="right"))

    def bucketize(self, seconds: np.ndarray) -> np.ndarray:
        """Vectorised bucket_of; returns int8."""
        seconds = np.asarray(seconds, dtype=np.float64)
        out = np.searchsorted(np.asarray(self.edges_s), seconds, side="right").astype(np.int8)
        out[~np.isfinite(seconds) | (seconds < 0)] = self.unknown
        return out

    @classmethod
    def fit_equal_frequency(
        cls, seconds: Sequence[float] | np.ndarray, n_buckets: int = DEFAULT_DWELL_BUCKETS
    ) -> DwellBuckets:
        """Learn edges so each bucket holds about the same number of dwells (RIB Section 3.1).

        Fit on training data only. Ties (e.g. many zero-second dwells at 1-s resolution) can merge
        quantiles, so fewer than ``n_buckets`` buckets may come out; the edges are what they are.
        """
        if n_buckets < 1:
            raise SchemaError("bad_dwell_edges", "n_buckets must be >= 1")
        values = np.asarray(seconds, dtype=np.float64)
        values = values[np.isfinite(values) & (values >= 0)]
        if values.size == 0:
            return cls(())
        quantiles = np.quantile(values, np.arange(1, n_buckets) / n_buckets, method="higher")
        # An edge equal to the minimum would leave bucket 0 empty.
        edges = sorted({float(q) for q in quantiles if q > values.min()})
        return cls(tuple(edges))

    def labels(self) -> list[str]:
        """Human-readable bucket labels, unknown last."""
        if not self.edges_s:
            return ["any", "unknown"]
        bounds = [0.0, *self.edges_s]
        labels = [f"{lo:g}-{hi:g}s" for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        return [*labels, f">={self.edges_s[-1]:g}s", "unknown"]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"edges_s": list(self.edges_s)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DwellBuckets:
        """Inverse of to_dict, validated."""
        if not isinstance(data, Mapping):
            raise SchemaError(
                "bad_dwell_edges", f"dwell buckets must be an object, got {type(data).__name__}"
            )
        edges = data.get("edges_s")
        if not isinstance(edges, list) or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and _finite(e) for e in edges
        ):
            raise SchemaError("bad_dwell_edges", "'edges_s' must be a list of finite numbers")
        return cls(tuple(float(e) for e in edges))


PAPER_DWELL_BUCKETS = DwellBuckets()
