"""The encrypted tuple store: round trip, torn tails, tamper detection, keys, erase, retention, fuzzing."""

from __future__ import annotations

import math
import os
import shutil
import stat
import struct
from pathlib import Path

import pytest

from edge_client.keys import KeyFileProvider, KeyPermissionError, KeyProviderError, default_key_provider
from edge_client.schema import MicroBehavior, SchemaError
from edge_client.store import (
    DAY_MS,
    MANIFEST_NAME,
    StoreError,
    StoreKeyError,
    StoreTamperError,
    TupleStore,
)

T0 = 1_700_000_000_000


def rec(i: int, session: str | None = None) -> MicroBehavior:
    return MicroBehavior(
        session or f"s{i // 10}", T0 + i * 1000, f"item-{i % 37}", "Detail_comments", float(i % 90)
    )


def make(tmp_path: Path, name: str = "store", **kwargs) -> TupleStore:
    return TupleStore(tmp_path / name, key_provider=KeyFileProvider(tmp_path / f"{name}.key"), **kwargs)


def segment_files(store: TupleStore) -> list[Path]:
    return sorted(store.directory.glob("seg-*.rseg"))


def test_round_trip_filters_and_reopen(tmp_path):
    store = make(tmp_path, segment_bytes=1024)
    records = [rec(i) for i in range(95)]
    records.append(MicroBehavior("sé-ß", T0, "商品-1", "Order", math.nan))
    for start in range(0, len(records), 7):
        assert store.append(records[start : start + 7]) == len(records[start : start + 7])
    assert store.append([]) == 0
    store.close()
    again = make(tmp_path, segment_bytes=1024)
    back = again.read()
    assert back[:-1] == records[:-1] and math.isnan(back[-1].dwell_seconds) and back[-1].item_id == "商品-1"
    assert again.last_read.segments > 1 and again.last_read.torn_tails == 0
    assert again.read(session_id="s3") == [r for r in records if r.session_id == "s3"]
    assert again.read(since_ms=T0 + 50_000) == [r for r in records if r.timestamp_ms >= T0 + 50_000]
    assert again.sessions() == list(dict.fromkeys(r.session_id for r in records))
    assert again.count() == len(records)
    # Nothing readable in the files: no item ids or session ids in clear.
    blob = b"".join(p.read_bytes() for p in store.directory.iterdir())
    assert b"item-" not in blob and b"Detail" not in blob and "商品".encode() not in blob
    # Compaction keeps everything, in order, in fewer files.
    assert again.compact() == 0
    assert again.read()[:-1] == records[:-1]
    again.append([rec(200)])
    assert again.read()[-1] == rec(200)


def test_empty_store_and_bad_records(tmp_path):
    store = make(tmp_path)
    assert store.read() == [] and store.sessions() == [] and store.purge_expired(T0) == 0
    with pytest.raises(SchemaError):
        store.append([("s", 1, "i", "a", 1.0)])
    with pytest.raises(SchemaError):
        store.append([MicroBehavior("", 1, "i", "Cart", 1.0)])
    with pytest.raises(SchemaError):
        store.append([MicroBehavior("s", -5, "i", "Cart", 1.0)])
    assert store.read() == []


def test_store_files_are_private(tmp_path):
    store = make(tmp_path)
    store.append([rec(1)])
    assert stat.S_IMODE(os.stat(store.directory).st_mode) & 0o077 == 0
    for path in [*store.directory.iterdir(), tmp_path / "store.key"]:
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path


def test_torn_tail_at_every_byte_of_the_last_frame(tmp_path):
    store = make(tmp_path)
    store.append([rec(i) for i in range(5)])
    store.append([rec(i) for i in range(5, 8)])
    (segment,) = segment_files(store)
    committed_end = segment.stat().st_size
    store.append([rec(8), rec(9)])
    full = segment.read_bytes()
    store.close()
    assert len(full) > committed_end
    for cut in range(len(full) - 1, committed_end - 1, -1):
        os.truncate(segment, cut)
        reader = make(tmp_path)
        assert reader.read() == [rec(i) for i in range(8)], cut
        assert reader.last_read.torn_tails == (1 if cut > committed_end else 0)
        assert reader.last_read.torn_bytes == cut - committed_end
    # A writer after a crash truncates the torn tail and carries on; nothing is lost or corrupt.
    segment.write_bytes(full[: committed_end + 11])
    writer = make(tmp_path)
    writer.append([rec(42)])
    assert writer.read() == [*(rec(i) for i in range(8)), rec(42)]
    assert writer.last_read.torn_tails == 0


def test_every_flipped_byte_of_committed_segments_is_tamper(tmp_path):
    store = make(tmp_path, segment_bytes=400)
    for i in range(0, 6, 2):
        store.append([rec(i), rec(i + 1)])
    store.close()
    files = segment_files(store)
    assert len(files) >= 2  # sealed and active segments both covered
    expected = [rec(i) for i in range(6)]
    for path in files:
        original = path.read_bytes()
        for offset in range(len(original)):
            damaged = bytearray(original)
            damaged[offset] ^= 0x01 if offset % 2 else 0xFF
            path.write_bytes(bytes(damaged))
            try:
                got = make(tmp_path, segment_bytes=400).read()
            except StoreTamperError as err:
                assert err.path == str(path) and path.name in str(err)
            else:  # pragma: no cover - would be a failure
                pytest.fail(f"flip at {path.name}:{offset} not detected, read {len(got)} records")
        path.write_bytes(original)
    assert make(tmp_path, segment_bytes=400).read() == expected


def test_manifest_flips_are_detected(tmp_path):
    store = make(tmp_path)
    store.append([rec(1)])
    manifest = store.directory / MANIFEST_NAME
    original = manifest.read_bytes()
    for offset in range(len(original)):
        damaged = bytearray(original)
        damaged[offset] ^= 0x40
        manifest.write_bytes(bytes(damaged))
        with pytest.raises(StoreTamperError, match="MANIFEST"):
            make(tmp_path).read()
    manifest.write_bytes(original)
    manifest.unlink()
    with pytest.raises(StoreTamperError, match="missing"):
        make(tmp_path).read()


def _frames(data: bytes) -> list[bytes]:
    out, pos = [], 60
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos : pos + 8 + length])
        pos += 8 + length
    return out


def test_reordered_dropped_or_moved_frames_are_tamper(tmp_path):
    store = make(tmp_path)
    for i in range(3):
        store.append([rec(i)])
    store.close()
    (segment,) = segment_files(store)
    data = segment.read_bytes()
    header, frames = data[:60], _frames(data)
    assert len(frames) == 3
    for variant in (
        header + frames[1] + frames[0] + frames[2],
        header + frames[0] + frames[2],
        header + frames[0] * 2,
    ):
        segment.write_bytes(variant)
        with pytest.raises(StoreTamperError):
            make(tmp_path).read()
    # A frame of another segment (same key) spliced in.
    segment.write_bytes(data)
    other = TupleStore(tmp_path / "other", key_provider=store.key_provider)
    other.append([rec(7)])
    (other_segment,) = segment_files(other)
    segment.write_bytes(data + _frames(other_segment.read_bytes())[0])
    with pytest.raises(StoreTamperError):
        make(tmp_path).read()


def test_sealed_segment_truncation_is_tamper_not_torn(tmp_path):
    store = make(tmp_path, segment_bytes=300)
    for i in range(6):
        store.append([rec(i)])
    store.close()
    first = segment_files(store)[0]
    data = first.read_bytes()
    first.write_bytes(data[: len(data) - len(_frames(data)[-1])])  # drop a whole frame
    with pytest.raises(StoreTamperError, match=first.name):
        make(tmp_path, segment_bytes=300).read()


def test_wrong_or_missing_key_is_a_clear_error(tmp_path):
    store = make(tmp_path)
    store.append([rec(1)])
    other_key = KeyFileProvider(tmp_path / "other.key")
    other_key.load()  # an existing, valid, but different key
    wrong = TupleStore(store.directory, key_provider=other_key)
    with pytest.raises(StoreKeyError, match="different key"):
        wrong.read()
    with pytest.raises(StoreKeyError):
        wrong.append([rec(2)])
    (tmp_path / "store.key").rename(tmp_path / "moved.key")
    with pytest.raises(StoreKeyError, match="does not exist"):
        make(tmp_path).read()


def test_erase_crypto_shreds_the_key_and_a_disk_copy_stays_sealed(tmp_path):
    store = make(tmp_path)
    store.append([rec(i) for i in range(20)])
    key_path = tmp_path / "store.key"
    original_key = key_path.read_bytes()
    os.link(key_path, tmp_path / "inode-of-key")  # sees the bytes the overwrite leaves on that inode
    copy = tmp_path / "disk-copy"
    shutil.copytree(store.directory, copy)
    store.erase()
    assert not key_path.exists() and not store.directory.exists()
    assert (tmp_path / "inode-of-key").read_bytes() != original_key
    with pytest.raises(StoreError, match="erased"):
        store.read()
    with pytest.raises(StoreKeyError):  # the copy with the key gone
        TupleStore(copy, key_provider=KeyFileProvider(key_path)).read()
    fresh_key = KeyFileProvider(tmp_path / "fresh.key")
    fresh_key.load()
    with pytest.raises(StoreKeyError, match="different key"):  # nor does any other key
        TupleStore(copy, key_provider=fresh_key).read()
    # erase is idempotent and a new store can start in the same place
    store.erase()
    fresh = make(tmp_path)
    fresh.append([rec(1)])
    assert fresh.read() == [rec(1)]


def test_key_file_permissions_and_format(tmp_path):
    provider = KeyFileProvider(tmp_path / "k" / "store.key")
    key = provider.load()
    assert len(key) == 32 and provider.load() == key
    assert stat.S_IMODE(os.stat(provider.path).st_mode) == 0o600
    for mode in (0o640, 0o604, 0o660):
        os.chmod(provider.path, mode)
        with pytest.raises(KeyPermissionError, match="chmod 600"):
            provider.load()
    os.chmod(provider.path, 0o600)
    link = KeyFileProvider(tmp_path / "link.key")
    os.symlink(provider.path, link.path)
    with pytest.raises(KeyPermissionError, match="symlink"):
        link.load()
    short = KeyFileProvider(tmp_path / "short.key")
    fd = os.open(short.path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"x" * 31)
    os.close(fd)
    with pytest.raises(KeyProviderError, match="31 bytes"):
        short.load()
    with pytest.raises(KeyProviderError):
        KeyFileProvider(tmp_path / "absent.key").load(create=False)
    provider.destroy()
    assert not provider.exists()
    provider.destroy()  # no-op
    # keyring is not installed here: the default provider is the key file next to the store.
    default = default_key_provider(tmp_path / "dir")
    assert isinstance(default, KeyFileProvider) and default.path == tmp_path / "dir" / "store.key"


def test_group_readable_key_refuses_to_open_the_store(tmp_path):
    store = make(tmp_path)
    store.append([rec(1)])
    os.chmod(tmp_path / "store.key", 0o644)
    with pytest.raises(StoreKeyError, match="group or others"):
        make(tmp_path).read()


def test_retention_purge(tmp_path):
    store = make(tmp_path, retention_days=30, segment_bytes=600)
    now = T0 + 100 * DAY_MS
    ages_days = [120, 95, 31, 29.5, 10, 0, 45, 1]
    records = [
        MicroBehavior(f"s{i}", int(now - age * DAY_MS), "i", "Cart", 1.0) for i, age in enumerate(ages_days)
    ]
    for record in records:
        store.append([record])
    assert store.purge_expired(now) == 4
    assert store.read() == [r for r, age in zip(records, ages_days, strict=True) if age < 30]
    assert store.purge_expired(now) == 0
    store.append([MicroBehavior("late", now, "i", "Cart", 1.0)])
    assert store.read()[-1].session_id == "late"
    assert make(tmp_path).retention_days == 90.0  # default TTL


def test_stray_files_from_an_interrupted_rollover_or_compaction_are_ignored(tmp_path):
    store = make(tmp_path)
    store.append([rec(1)])
    store.close()
    stray = store.directory / "seg-0000000099.rseg"
    stray.write_bytes(b"junk from a crash before the manifest listed it")
    (store.directory / ".seg-0000000100.rseg.tmp").write_bytes(b"half-written compaction output")
    assert make(tmp_path).read() == [rec(1)]
    writer = make(tmp_path)
    writer.append([rec(2)])
    assert not stray.exists() and writer.read() == [rec(1), rec(2)]


def test_failed_write_is_not_acknowledged_and_leaves_the_store_usable(tmp_path, monkeypatch):
    import edge_client.store as store_module

    store = make(tmp_path)
    store.append([rec(1), rec(2)])
    real_write = store_module._write_all

    def half_then_fail(fd, data):
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        store.append([rec(3)])
    monkeypatch.setattr(store_module, "_write_all", real_write)
    assert store.read() == [rec(1), rec(2)] and store.last_read.torn_tails == 0
    store.append([rec(4)])
    assert make(tmp_path).read() == [rec(1), rec(2), rec(4)]
