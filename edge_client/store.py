"""The device's encrypted, append-only store of micro-behavior records (never raw events).

Layout of a store directory (mode 0700)::

    MANIFEST             encrypted list of live segments (atomically replaced: temp + fsync + rename)
    seg-0000000001.rseg  segment files; only the manifest's *active* segment is ever appended to
    store.key            the key when no OS keyring is used (mode 0600, see ``edge_client.keys``)
    blob-<name>.rblob    small named documents (e.g. the privacy ledger), AES-GCM under the store key,
                         bound to their name; replaced atomically (``write_blob`` / ``read_blob``)

Segment file: a 60-byte header ``MAGIC(8) | segment id(u64) | key id(16) | nonce(12) | tag(16)`` (the tag
authenticates the header), then frames. One frame per ``append`` (split above ``MAX_FRAME_RECORDS``)::

    body length (u32) | crc32 of the length (u32) | nonce (12) | AES-256-GCM ciphertext + tag

The associated data of a frame is ``MAGIC | segment id | key id | sequence number of its first record |
body length``, so a frame cannot be moved to another segment, reordered, dropped from the middle or
replayed undetected. The CRC protects the length field, so a damaged length is tamper, not a torn tail.

Crash safety: ``append`` writes its frames and calls ``os.fsync`` before it returns; new segments are
created as temp file + fsync + rename + directory fsync and only then listed in the manifest. After a
crash the active segment may end in an incomplete frame (a *torn tail*): readers ignore and count it,
the next writer truncates it. Sealed segments are listed with their exact length, record count and
time range, so truncating them, or cutting whole frames out of them, is tamper too.

Errors: ``StoreTamperError`` (names the file) for any authenticated byte that does not verify,
``StoreKeyError`` for a wrong or missing key, both ``StoreError``. A torn tail of the active segment is
the only damage that is tolerated (and it is indistinguishable from a crash during an unacknowledged
append, so deleting the tail of the *last* frame of the active segment is not detectable).

Privacy: ``erase`` destroys the key first (crypto-shredding), then removes the files. Retention:
``purge_expired`` rewrites the store without records older than ``retention_days``; removed ciphertext
stays encrypted under the live key until ``erase`` (no per-epoch keys yet).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge_client.keys import KeyProvider, KeyProviderError, default_key_provider, fsync_dir
from edge_client.schema import MAX_TIMESTAMP_MS, MicroBehavior, SchemaError

SEGMENT_MAGIC = b"RIBSEG01"
MANIFEST_MAGIC = b"RIBMAN01"
MANIFEST_NAME = "MANIFEST"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_BYTES = 16
_SEG_ID = struct.Struct("<Q")
_HEADER_BYTES = len(SEGMENT_MAGIC) + 8 + KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES  # 60
_FRAME_HEAD = struct.Struct("<II")  # body length, crc32 of the length
_AAD_TAIL = struct.Struct("<QI")  # first record sequence number, body length
_COUNT = struct.Struct("<I")
_RECORD = struct.Struct("<qdHHH")  # timestamp, dwell, len(session), len(item), len(activity)
MAX_FRAME_RECORDS = 4096
MAX_STRING_BYTES = 1024
# Largest frame body a reader accepts: bounded memory whatever the bytes on disk say.
MAX_FRAME_BYTES = (
    NONCE_BYTES + TAG_BYTES + _COUNT.size + MAX_FRAME_RECORDS * (_RECORD.size + 3 * MAX_STRING_BYTES)
)
DEFAULT_SEGMENT_BYTES = 4 * 1024 * 1024
DEFAULT_RETENTION_DAYS = 90.0
DAY_MS = 86_400_000
_SEGMENT_RE = re.compile(r"^seg-(\d{10})\.rseg$")
BLOB_MAGIC = b"RIBBLB01"
_BLOB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_BLOB_FILE_RE = re.compile(r"^blob-[a-z0-9][a-z0-9_.-]{0,63}\.rblob$")
MAX_BLOB_BYTES = 16 * 1024 * 1024


class StoreError(RuntimeError):
    """The tuple store cannot do what was asked."""


class StoreKeyError(StoreError):
    """The key is missing or is not the key this store was written with."""


class StoreTamperError(StoreError):
    """Committed bytes do not verify; ``path`` names the damaged file (segment or manifest)."""

    def __init__(self, path: Path | str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = str(path)


@dataclass
class ReadStats:
    """What the last read saw: torn tails are expected after a crash and are counted, not fatal."""

    segments: int = 0
    frames: int = 0
    records: int = 0
    torn_tails: int = 0
    torn_bytes: int = 0


@dataclass
class _Sealed:
    id: int
    bytes: int
    records: int
    min_ts: int | None
    max_ts: int | None


def _derive(master: bytes, label: bytes) -> bytes:
    return hmac.new(master, b"rib-edge/store/v1/" + label, sha256).digest()


def _segment_name(segment_id: int) -> str:
    return f"seg-{segment_id:010d}.rseg"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _encode_str(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise SchemaError("bad_type", f"MicroBehavior.{name} must be a string, got {type(value).__name__}")
    data = value.encode("utf-8")
    if not data or len(data) > MAX_STRING_BYTES:
        raise SchemaError("bad_value", f"MicroBehavior.{name} must have 1..{MAX_STRING_BYTES} UTF-8 bytes")
    return data


def _encode_records(records: list[MicroBehavior]) -> bytes:
    parts = [_COUNT.pack(len(records))]
    cache: dict[str, bytes] = {}
    pack = _RECORD.pack
    for rec in records:
        if not isinstance(rec, MicroBehavior):
            raise SchemaError("bad_type", f"the store keeps MicroBehavior records, got {type(rec).__name__}")
        ts = rec.timestamp_ms
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= MAX_TIMESTAMP_MS:
            raise SchemaError("bad_value", f"timestamp_ms {ts!r} out of range")
        dwell = rec.dwell_seconds
        if isinstance(dwell, bool) or not isinstance(dwell, (int, float)):
            raise SchemaError("bad_type", "dwell_seconds must be a number")
        fields = []
        for name in ("session_id", "item_id", "activity"):
            value = getattr(rec, name)
            data = cache.get(value) if isinstance(value, str) else None
            if data is None:
                data = cache[value] = _encode_str(value, name)
            fields.append(data)
        parts.append(pack(ts, float(dwell), len(fields[0]), len(fields[1]), len(fields[2])))
        parts.extend(fields)
    return b"".join(parts)


def _decode_records(plain: bytes, path: Path) -> list[MicroBehavior]:
    """Parse an authenticated frame body; malformed content is tamper (only the key holder can forge it)."""
    try:
        (count,) = _COUNT.unpack_from(plain, 0)
        if count > MAX_FRAME_RECORDS:
            raise ValueError("too many records")
        pos = _COUNT.size
        out: list[MicroBehavior] = []
        strings: dict[bytes, str] = {}
        unpack = _RECORD.unpack_from
        size = _RECORD.size
        for _ in range(count):
            ts, dwell, n_s, n_i, n_a = unpack(plain, pos)
            pos += size
            values = []
            for n in (n_s, n_i, n_a):
                raw = plain[pos : pos + n]
                if len(raw) != n or n == 0:
                    raise ValueError("truncated string")
                pos += n
                text = strings.get(raw)
                if text is None:
                    text = strings[raw] = raw.decode("utf-8")
                values.append(text)
            if not 0 <= ts <= MAX_TIMESTAMP_MS:
                raise ValueError("timestamp out of range")
            out.append(MicroBehavior(values[0], ts, values[1], values[2], dwell))
        if pos != len(plain):
            raise ValueError("trailing bytes")
        return out
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise StoreTamperError(path, f"authenticated frame does not parse ({err})") from None


class TupleStore:
    """Encrypted append-only store of ``MicroBehavior`` records; one writer per directory at a time.

    >>> store = TupleStore(path)                 # doctest: +SKIP
    >>> store.append(records); store.read(session_id="s1", since_ms=t0)   # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        key_provider: KeyProvider | None = None,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ):
        if not retention_days > 0:
            raise ValueError("retention_days must be > 0")
        self.directory = Path(directory)
        self.key_provider = key_provider if key_provider is not None else default_key_provider(self.directory)
        self.retention_days = float(retention_days)
        self.segment_bytes = max(int(segment_bytes), _HEADER_BYTES + 64)
        self.last_read = ReadStats()
        self._aead: AESGCM | None = None
        self._key_id = b""
        self._erased = False
        # manifest state
        self._sealed: list[_Sealed] = []
        self._active: int | None = None
        self._next_id = 1
        # writer state (None until the first write)
        self._fd: int | None = None
        self._active_bytes = 0
        self._active_records = 0
        self._active_min: int | None = None
        self._active_max: int | None = None

    # -- public API ------------------------------------------------------------------------------------

    def append(self, records: Iterable[MicroBehavior]) -> int:
        """Encrypt and durably store records (fsync before returning); returns how many were stored."""
        batch = list(records)
        if not batch:
            return 0
        bodies = [
            _encode_records(batch[i : i + MAX_FRAME_RECORDS]) for i in range(0, len(batch), MAX_FRAME_RECORDS)
        ]
        self._open_writer()
        assert self._aead is not None
        try:
            for start, plain in zip(range(0, len(batch), MAX_FRAME_RECORDS), bodies, strict=True):
                chunk = batch[start : start + MAX_FRAME_RECORDS]
                frame_len = _FRAME_HEAD.size + NONCE_BYTES + len(plain) + TAG_BYTES
                if self._fd is None or (
                    self._active_records and self._active_bytes + frame_len > self.segment_bytes
                ):
                    self._rollover()
                assert self._fd is not None and self._active is not None
                frame = self._seal_frame(self._active, self._active_records, plain)
                try:
                    _write_all(self._fd, frame)
                except BaseException:
                    with contextlib.suppress(OSError):  # drop the partial frame (else recovery will)
                        os.ftruncate(self._fd, self._active_bytes)
                    raise
                self._active_bytes += len(frame)
                self._active_records += len(chunk)
                lo = min(r.timestamp_ms for r in chunk)
                hi = max(r.timestamp_ms for r in chunk)
                self._active_min = lo if self._active_min is None else min(self._active_min, lo)
                self._active_max = hi if self._active_max is None else max(self._active_max, hi)
            os.fsync(self._fd)
        except BaseException:
            # Disk full, I/O error...: forget in-memory state; the next call reloads the manifest and
            # recovers the active segment from disk. Nothing of this call is acknowledged.
            self._close_fd()
            self._aead = None
            raise
        return len(batch)

    def iter_records(
        self, session_id: str | None = None, since_ms: int | None = None
    ) -> Iterator[MicroBehavior]:
        """Stream records in append order, one frame in memory at a time; updates ``last_read``."""
        self._open(create=False)
        stats = self.last_read = ReadStats()
        if self._aead is None:  # empty store, nothing written yet
            return
        for seg in self._segments():
            stats.segments += 1
            if (
                since_ms is not None
                and seg[1] is not None
                and seg[1].max_ts is not None
                and seg[1].max_ts < since_ms
            ):
                continue  # sealed segment entirely older than since_ms: still counted, not decrypted
            for frame in self._scan(seg[0], seg[1], stats):
                for rec in frame:
                    if (session_id is None or rec.session_id == session_id) and (
                        since_ms is None or rec.timestamp_ms >= since_ms
                    ):
                        yield rec

    def read(self, session_id: str | None = None, since_ms: int | None = None) -> list[MicroBehavior]:
        """All records (of one session, from ``since_ms`` on), in append order."""
        return list(self.iter_records(session_id, since_ms))

    def sessions(self) -> list[str]:
        """Session ids in order of first appearance."""
        seen: dict[str, None] = {}
        for rec in self.iter_records():
            seen.setdefault(rec.session_id)
        return list(seen)

    def count(self) -> int:
        """Number of readable records."""
        return sum(1 for _ in self.iter_records())

    def compact(self, keep: Callable[[MicroBehavior], bool] | None = None) -> int:
        """Rewrite all records (those ``keep`` accepts) into full sealed segments; returns records dropped.

        Crash safe: new segments are written and synced before the manifest switches to them; until then
        the old ones stay authoritative. Torn tails disappear.
        """
        self._open_writer()
        assert self._aead is not None
        old_files = [self._segment_path(sid) for sid, _ in self._segments()]
        self._close_fd()
        new_sealed: list[_Sealed] = []
        next_id = self._next_id
        dropped = 0
        writer: _SegmentWriter | None = None
        pending: list[MicroBehavior] = []

        def emit(chunk: list[MicroBehavior]) -> None:
            nonlocal writer, next_id
            plain = _encode_records(chunk)
            frame_len = _FRAME_HEAD.size + NONCE_BYTES + len(plain) + TAG_BYTES
            if writer is not None and writer.records and writer.size + frame_len > self.segment_bytes:
                new_sealed.append(writer.finish())
                writer = None
            if writer is None:
                writer = _SegmentWriter(self, next_id)
                next_id += 1
            writer.add(plain, chunk)

        try:
            for rec in self.iter_records():
                if keep is not None and not keep(rec):
                    dropped += 1
                    continue
                pending.append(rec)
                if len(pending) == MAX_FRAME_RECORDS:
                    emit(pending)
                    pending = []
            if pending:
                emit(pending)
            if writer is not None:
                new_sealed.append(writer.finish())
                writer = None
        except BaseException:
            if writer is not None:
                writer.abort()
            for seg in new_sealed:
                with contextlib.suppress(OSError):
                    os.unlink(self._segment_path(seg.id))
            raise
        fsync_dir(self.directory)
        self._sealed, self._active, self._next_id = new_sealed, None, next_id
        self._write_manifest()
        keep_names = {self._segment_path(seg.id) for seg in new_sealed}
        for path in old_files:
            if path not in keep_names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        fsync_dir(self.directory)
        self._reset_active()
        return dropped

    def purge_expired(self, now_ms: int) -> int:
        """Drop records older than ``retention_days`` before ``now_ms``; returns how many were removed."""
        cutoff = int(now_ms - self.retention_days * DAY_MS)
        self._open(create=False)
        if self._aead is None:
            return 0
        expired = 0
        stats = ReadStats()
        for seg_id, sealed in self._segments():
            if sealed is not None and sealed.min_ts is not None and sealed.min_ts >= cutoff:
                continue
            for frame in self._scan(seg_id, sealed, stats):
                expired += sum(1 for rec in frame if rec.timestamp_ms < cutoff)
        if not expired:
            return 0
        return self.compact(lambda rec: rec.timestamp_ms >= cutoff)

    def write_blob(self, name: str, data: bytes) -> None:
        """Durably replace the named blob with ``data``, encrypted and bound to its name (temp + fsync + rename)."""
        path = self._blob_path(name)
        if len(data) > MAX_BLOB_BYTES:
            raise ValueError(f"blob {name!r} is {len(data)} bytes; the limit is {MAX_BLOB_BYTES}")
        self._open(create=True)
        assert self._aead is not None
        nonce = os.urandom(NONCE_BYTES)
        head = BLOB_MAGIC + self._key_id
        sealed = self._aead.encrypt(nonce, bytes(data), head + name.encode())
        _atomic_write(path, head + nonce + sealed)

    def read_blob(self, name: str) -> bytes | None:
        """The named blob's bytes, or None when it was never written; ``StoreTamperError`` if it does not verify."""
        path = self._blob_path(name)
        self._open(create=False)
        if self._aead is None or not path.exists():
            return None
        raw = path.read_bytes()
        head_len = len(BLOB_MAGIC) + KEY_ID_BYTES
        if (
            len(raw) > MAX_BLOB_BYTES + head_len + NONCE_BYTES + TAG_BYTES
            or len(raw) < head_len + NONCE_BYTES + TAG_BYTES
        ):
            raise StoreTamperError(path, "not a rib-edge store blob (bad size)")
        if not raw.startswith(BLOB_MAGIC) or not hmac.compare_digest(
            raw[len(BLOB_MAGIC) : head_len], self._key_id
        ):
            raise StoreTamperError(path, "blob header does not match this store")
        nonce, sealed = raw[head_len : head_len + NONCE_BYTES], raw[head_len + NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, sealed, raw[:head_len] + name.encode())
        except InvalidTag as err:
            raise StoreTamperError(path, "blob does not authenticate (edited, swapped or renamed)") from err

    def _blob_path(self, name: str) -> Path:
        if not isinstance(name, str) or not _BLOB_NAME_RE.match(name):
            raise ValueError(f"blob names are 1-64 chars of [a-z0-9_.-], got {name!r}")
        return self.directory / f"blob-{name}.rblob"

    def erase(self) -> None:
        """Crypto-shred: destroy the key (overwrite + delete), then remove manifest and segments.

        Works without a valid key, and again after a crash half-way. The store object is unusable after.
        """
        self._close_fd()
        self._aead = None
        try:
            self.key_provider.destroy()
        except KeyProviderError as err:
            raise StoreKeyError(f"could not destroy the store key: {err}") from err
        if self.directory.is_dir():
            entries = os.listdir(self.directory)
            doomed = [
                e for e in entries if _SEGMENT_RE.match(e) or _BLOB_FILE_RE.match(e) or e.endswith(".tmp")
            ]
            doomed += [e for e in entries if e == MANIFEST_NAME]  # last: no "segments without manifest"
            for entry in doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / entry)
            fsync_dir(self.directory)
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only when empty
        self._erased = True

    def close(self) -> None:
        """Release the open segment file descriptor (appends are already durable)."""
        self._close_fd()

    def __enter__(self) -> TupleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self._close_fd()

    # -- opening and the manifest ----------------------------------------------------------------------

    def _segment_path(self, segment_id: int) -> Path:
        return self.directory / _segment_name(segment_id)

    def _segments(self) -> list[tuple[int, _Sealed | None]]:
        out: list[tuple[int, _Sealed | None]] = [(s.id, s) for s in self._sealed]
        if self._active is not None:
            out.append((self._active, None))
        return out

    def _open(self, create: bool) -> None:
        """Load key and manifest (creating the store when ``create``)."""
        if self._erased:
            raise StoreError(f"store {self.directory} was erased")
        if self._aead is not None:
            return
        manifest = self.directory / MANIFEST_NAME
        if not manifest.exists():
            leftovers = (
                [e for e in os.listdir(self.directory) if _SEGMENT_RE.match(e)]
                if self.directory.is_dir()
                else []
            )
            if leftovers:
                raise StoreTamperError(manifest, f"missing while {len(leftovers)} segment file(s) exist")
            if not create:
                return
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._set_key(self._load_key(create=True))
            self._sealed, self._active, self._next_id = [], None, 1
            self._write_manifest()
            return
        self._set_key(self._load_key(create=False))
        try:
            self._read_manifest(manifest)
        except BaseException:
            self._aead = None  # not open: the next call checks again
            raise

    def _load_key(self, create: bool) -> bytes:
        try:
            return self.key_provider.load(create=create)
        except KeyProviderError as err:
            raise StoreKeyError(f"store {self.directory}: {err}") from err

    def _set_key(self, master: bytes) -> None:
        self._aead = AESGCM(_derive(master, b"aes-gcm"))
        self._key_id = _derive(master, b"key-id")[:KEY_ID_BYTES]

    def _write_manifest(self) -> None:
        assert self._aead is not None
        body = {
            "v": 1,
            "next_id": self._next_id,
            "active": self._active,
            "sealed": [[s.id, s.bytes, s.records, s.min_ts, s.max_ts] for s in self._sealed],
        }
        nonce = os.urandom(NONCE_BYTES)
        head = MANIFEST_MAGIC + self._key_id
        data = self._aead.encrypt(nonce, json.dumps(body, separators=(",", ":")).encode(), head)
        _atomic_write(self.directory / MANIFEST_NAME, head + nonce + data)

    def _read_manifest(self, path: Path) -> None:
        assert self._aead is not None
        raw = path.read_bytes()
        head_len = len(MANIFEST_MAGIC) + KEY_ID_BYTES
        if len(raw) < head_len + NONCE_BYTES + TAG_BYTES or not raw.startswith(MANIFEST_MAGIC):
            raise StoreTamperError(path, "not a rib-edge store manifest")
        if not hmac.compare_digest(raw[len(MANIFEST_MAGIC) : head_len], self._key_id):
            with contextlib.suppress(InvalidTag):  # our key opens it: the key id bytes were altered
                nonce, data = raw[head_len : head_len + NONCE_BYTES], raw[head_len + NONCE_BYTES :]
                self._aead.decrypt(nonce, data, MANIFEST_MAGIC + self._key_id)
                raise StoreTamperError(path, "manifest key id was altered")
            raise StoreKeyError(
                f"store {self.directory} was written with a different key than {self.key_provider.description} "
                "(wrong key, or the store was erased)"
            )
        try:
            plain = self._aead.decrypt(
                raw[head_len : head_len + NONCE_BYTES], raw[head_len + NONCE_BYTES :], raw[:head_len]
            )
            body = json.loads(plain)
            sealed = [_Sealed(int(a), int(b), int(c), d, e) for a, b, c, d, e in body["sealed"]]
            active = body["active"]
            next_id = int(body["next_id"])
            if body["v"] != 1 or (active is not None and not isinstance(active, int)):
                raise ValueError("bad manifest fields")
        except InvalidTag:
            raise StoreTamperError(path, "manifest does not authenticate") from None
        except (ValueError, KeyError, TypeError) as err:
            raise StoreTamperError(path, f"authenticated manifest does not parse ({err})") from None
        self._sealed, self._active, self._next_id = sealed, active, next_id

    # -- writing ---------------------------------------------------------------------------------------

    def _seal_frame(self, segment_id: int, first_seq: int, plain: bytes) -> bytes:
        assert self._aead is not None
        body_len = NONCE_BYTES + len(plain) + TAG_BYTES
        length = struct.pack("<I", body_len)
        nonce = os.urandom(NONCE_BYTES)
        aad = SEGMENT_MAGIC + _SEG_ID.pack(segment_id) + self._key_id + _AAD_TAIL.pack(first_seq, body_len)
        return (
            length
            + struct.pack("<I", zlib.crc32(b"RIBF" + length))
            + nonce
            + self._aead.encrypt(nonce, plain, aad)
        )

    def _segment_header(self, segment_id: int) -> bytes:
        assert self._aead is not None
        prefix = SEGMENT_MAGIC + _SEG_ID.pack(segment_id) + self._key_id
        nonce = os.urandom(NONCE_BYTES)
        return prefix + nonce + self._aead.encrypt(nonce, b"", prefix)

    def _reset_active(self) -> None:
        self._active_bytes = 0
        self._active_records = 0
        self._active_min = self._active_max = None

    def _open_writer(self) -> None:
        """Open the store for appends: recover the active segment (truncate a torn tail), drop strays."""
        self._open(create=True)
        if self._fd is not None:
            return
        listed = {sid for sid, _ in self._segments()}
        for entry in os.listdir(self.directory):
            match = _SEGMENT_RE.match(entry)
            stray_segment = match is not None and int(match.group(1)) not in listed
            if stray_segment or (entry.startswith(".seg-") and entry.endswith(".tmp")):
                os.unlink(self.directory / entry)  # an unlisted segment was never acknowledged
        self._reset_active()
        if self._active is None:
            return
        path = self._segment_path(self._active)
        stats = ReadStats()
        scan = self._scan(self._active, None, stats, track=True)
        for frame in scan:
            self._active_records += len(frame)
            lo = min(r.timestamp_ms for r in frame)
            hi = max(r.timestamp_ms for r in frame)
            self._active_min = lo if self._active_min is None else min(self._active_min, lo)
            self._active_max = hi if self._active_max is None else max(self._active_max, hi)
        valid_end = self._scan_end
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        if stats.torn_tails:
            os.ftruncate(fd, valid_end)
            os.fsync(fd)
        self._fd = fd
        self._active_bytes = valid_end

    def _rollover(self) -> None:
        """Seal the active segment (if any) and start a new one, listed in the manifest before use."""
        if self._fd is not None:
            os.fsync(self._fd)
            self._close_fd()
            assert self._active is not None
            self._sealed.append(
                _Sealed(
                    self._active, self._active_bytes, self._active_records, self._active_min, self._active_max
                )
            )
            self._active = None
        new_id = self._next_id
        path = self._segment_path(new_id)
        _atomic_write(path, self._segment_header(new_id))
        self._active, self._next_id = new_id, new_id + 1
        self._write_manifest()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._reset_active()
        self._active_bytes = _HEADER_BYTES

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # -- reading ---------------------------------------------------------------------------------------

    _scan_end = 0

    def _scan(
        self, segment_id: int, sealed: _Sealed | None, stats: ReadStats, track: bool = False
    ) -> Iterator[list[MicroBehavior]]:
        """Yield the records of each frame of one segment, verifying everything.

        ``sealed`` segments must match their manifest entry exactly; the active one may end in a torn
        frame, which is counted in ``stats`` and ignored.
        """
        assert self._aead is not None
        path = self._segment_path(segment_id)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below, generator-safe
        except FileNotFoundError:
            raise StoreTamperError(path, "listed segment is missing") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(_HEADER_BYTES)
            prefix = SEGMENT_MAGIC + _SEG_ID.pack(segment_id) + self._key_id
            if len(header) != _HEADER_BYTES or header[: len(prefix)] != prefix:
                raise StoreTamperError(path, "segment header does not match (magic, id or key id)")
            try:
                self._aead.decrypt(
                    header[len(prefix) : len(prefix) + NONCE_BYTES],
                    header[len(prefix) + NONCE_BYTES :],
                    prefix,
                )
            except InvalidTag:
                raise StoreTamperError(path, "segment header does not authenticate") from None
            pos = _HEADER_BYTES
            seq = 0
            while True:
                if track:
                    self._scan_end = pos
                head = handle.read(_FRAME_HEAD.size)
                if not head:
                    break
                if len(head) < _FRAME_HEAD.size:
                    self._torn(path, sealed, stats, size - pos)
                    break
                body_len, crc = _FRAME_HEAD.unpack(head)
                if zlib.crc32(b"RIBF" + head[:4]) != crc:
                    raise StoreTamperError(path, f"frame length at byte {pos} is damaged")
                if not NONCE_BYTES + TAG_BYTES + _COUNT.size <= body_len <= MAX_FRAME_BYTES:
                    raise StoreTamperError(path, f"frame at byte {pos} has impossible length {body_len}")
                if size - pos - _FRAME_HEAD.size < body_len:  # checked before reading: bounded memory
                    self._torn(path, sealed, stats, size - pos)
                    break
                body = handle.read(body_len)
                if len(body) != body_len:  # the file shrank while reading
                    self._torn(path, sealed, stats, size - pos)
                    break
                aad = prefix + _AAD_TAIL.pack(seq, body_len)
                try:
                    plain = self._aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], aad)
                except InvalidTag:
                    raise StoreTamperError(
                        path, f"frame at byte {pos} (record {seq}) does not authenticate"
                    ) from None
                frame = _decode_records(plain, path)
                if not frame:
                    raise StoreTamperError(path, f"empty frame at byte {pos}")
                pos += _FRAME_HEAD.size + body_len
                seq += len(frame)
                stats.frames += 1
                stats.records += len(frame)
                yield frame
            if sealed is not None and (pos != sealed.bytes or seq != sealed.records or size != sealed.bytes):
                raise StoreTamperError(
                    path,
                    f"sealed segment holds {seq} records in {size} bytes, manifest says {sealed.records} in {sealed.bytes}",
                )

    @staticmethod
    def _torn(path: Path, sealed: _Sealed | None, stats: ReadStats, n_bytes: int) -> None:
        if sealed is not None:
            raise StoreTamperError(path, "sealed segment ends in an incomplete frame (truncated)")
        stats.torn_tails += 1
        stats.torn_bytes += n_bytes


class _SegmentWriter:
    """Writes one sealed segment for ``compact``: temp file, fsync, rename (unlisted until the manifest)."""

    def __init__(self, store: TupleStore, segment_id: int):
        self.store = store
        self.id = segment_id
        self.path = store._segment_path(segment_id)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        _write_all(self.fd, store._segment_header(segment_id))
        self.size = _HEADER_BYTES
        self.records = 0
        self.min_ts: int | None = None
        self.max_ts: int | None = None

    def add(self, plain: bytes, chunk: list[MicroBehavior]) -> None:
        frame = self.store._seal_frame(self.id, self.records, plain)
        _write_all(self.fd, frame)
        self.size += len(frame)
        self.records += len(chunk)
        lo = min(r.timestamp_ms for r in chunk)
        hi = max(r.timestamp_ms for r in chunk)
        self.min_ts = lo if self.min_ts is None else min(self.min_ts, lo)
        self.max_ts = hi if self.max_ts is None else max(self.max_ts, hi)

    def finish(self) -> _Sealed:
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.tmp, self.path)
        return _Sealed(self.id, self.size, self.records, self.min_ts, self.max_ts)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


__all__ = [
    "DEFAULT_RETENTION_DAYS",
    "ReadStats",
    "StoreError",
    "StoreKeyError",
    "StoreTamperError",
    "TupleStore",
]
