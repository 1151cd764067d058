"""One object a host app (or the local HTTP server) talks to: record raw UI events, get recommendations.

``EdgeClient(store_dir, package_dir, public_key, device_id=...)`` glues the device pieces together:

- ``record(event)`` takes a ``RawEvent`` (validated again: one built without ``from_dict`` never was), a
  decoded JSON object, or one JSON line (str/bytes), validates it with the schema, feeds the streaming
  extractor (``DEVICE_EXTRACTOR_CONFIG``: 2 s reorder window) and appends the micro behaviors of every
  visit that closed to the encrypted ``TupleStore``. Raw events are never persisted. It never raises into
  the host app: bad input, a full buffer or a store failure comes back as a ``RecordResult`` with a short
  reason code (the schema's codes plus ``wrong_device``, ``too_many_sessions``, ``backpressure``,
  ``too_late``, ``store_error``, ``closed``, ``internal_error``), and every drop is counted in ``stats``.
- A JSON object without ``device_id`` gets the client's own (a browser tracker does not know it); an event
  of another device is refused (``wrong_device``).
- Memory is bounded: at most ``max_open_sessions`` sessions with extractor state (sessions idle past the
  extractor's gap, in event time, are closed first), at most ``max_pending_events`` events held in reorder
  buffers, and at most ``max_recent_records`` closed records of recent sessions kept for ``recommend``.
- ``recommend(k, exclude)`` answers for the current session: the latest session among the closed records
  (stored ones, reloaded from the store on start) plus the visits still open in the extractor, taken from
  a flushed *copy* of the extractor (the open page counts with its dwell so far; nothing is stored).
- ``close()`` closes open visits, stores them and releases the store; ``erase()`` crypto-shreds the store
  and forgets all in-memory state (the client keeps working on a fresh, empty store).

All public methods take one lock, so the client may be shared by the server's threads.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_client.extract import DEVICE_EXTRACTOR_CONFIG, TupleExtractor
from edge_client.runtime import Recommendation, Recommender, latest_session
from edge_client.schema import MicroBehavior, RawEvent, SchemaError, SkipReport, parse_event_line
from edge_client.store import StoreError, TupleStore

DEFAULT_DEVICE_ID = "local"
MAX_OPEN_SESSIONS = 16
MAX_PENDING_EVENTS = 4096
MAX_RECENT_RECORDS = 1024


@dataclass(frozen=True)
class RecordResult:
    """Outcome of one ``record`` call: ``ok`` or a short ``reason`` code; ``stored`` records were persisted."""

    ok: bool
    reason: str | None = None
    message: str = ""
    stored: int = 0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        out: dict[str, object] = {"ok": self.ok, "stored": self.stored}
        if self.reason is not None:
            out["reason"] = self.reason
            out["message"] = self.message[:200]
        return out


class EdgeClient:
    """Records raw events into the encrypted tuple store and recommends for the current session."""

    def __init__(
        self,
        store_dir: str | Path,
        package_dir: str | Path,
        public_key: object,
        device_id: str = DEFAULT_DEVICE_ID,
        key_provider=None,
        max_open_sessions: int = MAX_OPEN_SESSIONS,
        max_pending_events: int = MAX_PENDING_EVENTS,
        max_recent_records: int = MAX_RECENT_RECORDS,
    ) -> None:
        if max_open_sessions < 1 or max_pending_events < 1 or max_recent_records < 1:
            raise ValueError("memory caps must be >= 1")
        self.device_id = str(device_id)
        self.store_dir = Path(store_dir)
        self.max_open_sessions = int(max_open_sessions)
        self.max_pending_events = int(max_pending_events)
        self._key_provider = key_provider
        self._lock = threading.Lock()
        self.stats: Counter = Counter()
        self.recommender = Recommender(package_dir, public_key)
        self._store = TupleStore(self.store_dir, key_provider=key_provider)
        self._extractor = self._new_extractor()
        self._recent: deque[MicroBehavior] = deque(maxlen=int(max_recent_records))
        self._recent.extend(latest_session(self._store.read()))
        self._closed = False

    def _new_extractor(self) -> TupleExtractor:
        return TupleExtractor(DEVICE_EXTRACTOR_CONFIG, SkipReport())

    # -- recording -----------------------------------------------------------------------------------------

    def record(self, event: RawEvent | Mapping[str, object] | str | bytes) -> RecordResult:
        """Validate and consume one raw event; never raises (see the module docstring)."""
        try:
            parsed = self._parse(event)
        except SchemaError as err:
            return self._drop(err.reason, str(err))
        except Exception as err:  # noqa: BLE001 - never raise into the host app
            return self._drop("internal_error", f"{type(err).__name__}")
        with self._lock:
            try:
                return self._record_locked(parsed)
            except Exception as err:  # noqa: BLE001
                return self._drop_locked("internal_error", f"{type(err).__name__}")

    def record_many(self, events: Iterable[RawEvent | Mapping[str, object] | str | bytes]) -> list[RecordResult]:
        """``record`` for each event, in order."""
        return [self.record(event) for event in events]

    def _parse(self, event: object) -> RawEvent:
        if isinstance(event, RawEvent):
            # A RawEvent built directly (not by from_dict) was never validated, and one bad event in the
            # extractor would break recommend() and close() for its session: check it like any input.
            parsed = RawEvent.from_dict({f.name: getattr(event, f.name) for f in dataclasses.fields(RawEvent)})
        elif isinstance(event, (str, bytes, bytearray)):
            parsed = parse_event_line(bytes(event) if isinstance(event, bytearray) else event)
        elif isinstance(event, Mapping):
            if "device_id" not in event:
                event = {**event, "device_id": self.device_id}
            parsed = RawEvent.from_dict(event)
        else:
            raise SchemaError("bad_type", f"an event must be a JSON object, got {type(event).__name__}")
        for name in ("device_id", "session_id", "item_id"):
            value = getattr(parsed, name)
            if value is not None:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate from a JSON escape: the store could not hold it
                    raise SchemaError("bad_value", f"'{name}' is not valid Unicode") from None
        if parsed.device_id != self.device_id:
            raise SchemaError("wrong_device", f"event of device {parsed.device_id[:40]!r}, this is {self.device_id[:40]!r}")
        return parsed

    def _record_locked(self, event: RawEvent) -> RecordResult:
        if self._closed:
            return self._drop_locked("closed", "the client is closed")
        extractor = self._extractor
        records: list[MicroBehavior] = []
        if event.session_id not in extractor._sessions and extractor.open_sessions >= self.max_open_sessions:
            records += extractor.flush(now_ms=event.timestamp_ms)  # close sessions idle past the gap
            if extractor.open_sessions >= self.max_open_sessions:
                self._persist(records)
                return self._drop_locked("too_many_sessions", f"{extractor.open_sessions} sessions are open")
        if extractor.pending_events >= self.max_pending_events:
            records += extractor.flush(now_ms=event.timestamp_ms)  # a newer event moves the window on
        if extractor.pending_events >= self.max_pending_events:
            self._persist(records)
            return self._drop_locked("backpressure", f"{extractor.pending_events} events are held")
        late = extractor.too_late
        records += extractor.push(event)
        records += extractor.flush(now_ms=event.timestamp_ms)  # release held events of quiet sessions too
        if extractor.too_late > late:
            self._persist(records)
            return self._drop_locked("too_late", "the event is older than the reorder window allows")
        try:
            stored = self._persist(records)
        except StoreError as err:
            return self._drop_locked("store_error", str(err))
        self.stats["recorded"] += 1
        return RecordResult(True, stored=stored)

    def _persist(self, records: list[MicroBehavior]) -> int:
        if not records:
            return 0
        try:
            stored = self._store.append(records)
        except (StoreError, ValueError) as err:  # ValueError: a record the store's encoder refuses
            self.stats["lost_records"] += len(records)
            if isinstance(err, StoreError):
                raise
            raise StoreError(f"records refused by the store: {err}") from err
        self._recent.extend(records)
        self.stats["stored_records"] += stored
        return stored

    def _drop(self, reason: str, message: str) -> RecordResult:
        with self._lock:
            return self._drop_locked(reason, message)

    def _drop_locked(self, reason: str, message: str) -> RecordResult:
        self.stats[f"dropped_{reason}"] += 1
        return RecordResult(False, reason, message)

    # -- recommendations -----------------------------------------------------------------------------------

    def current_session(self) -> list[MicroBehavior]:
        """The current session's micro behaviors: closed ones plus the visits still open (not stored)."""
        with self._lock:
            return self._current_locked()

    def _current_locked(self) -> list[MicroBehavior]:
        live = copy.deepcopy(self._extractor).flush() if self._extractor.open_sessions else []
        return latest_session([*self._recent, *live])

    def recommend(self, k: int = 10, exclude: Iterable[str] = (), exclude_seen: bool = True) -> list[Recommendation]:
        """Top ``k`` items for the current session (popularity when it has no known tuple yet)."""
        with self._lock:
            session = self._current_locked()
        return self.recommender.recommend(session, k=k, exclude=exclude, exclude_seen=exclude_seen)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close open visits, store their records and release the store; ``record`` refuses afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._persist(self._extractor.flush())
            except StoreError:
                pass  # counted in stats["lost_records"]
            finally:
                self._extractor = self._new_extractor()
                self._store.close()

    def erase(self) -> None:
        """Crypto-shred the store and forget everything in memory; later events go to a fresh store."""
        with self._lock:
            self._store.erase()
            self._extractor = self._new_extractor()
            self._recent.clear()
            self._store = TupleStore(self.store_dir, key_provider=self._key_provider)

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
