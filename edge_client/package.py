"""Signed model packages: what a device installs, and the checks it makes before trusting one.

Device side: numpy + cryptography + the standard library only (no torch, no onnx).

A package is a flat directory:

- ``full.onnx``   the session graph and the only copy of the weights: advances a running state by L tuples
  (a whole session from the initial state, or one step), -> scores, attention, new state; the device runs it
- ``step.onnx``   one-tuple step graph for tools (one tuple + running state -> new state + scores); its weights
  are external data pointing into ``full.onnx`` (offset + length), so the file is a few KB
- ``items.json``  item ids as a JSON array; dense model index i is items[i - 1] (0 is padding)
- ``vocab.json``  ``{"activities": ActivityVocabulary.to_dict(), "dwell": DwellBuckets.to_dict()}``
- ``popularity.json`` ``{"items": [ids, most popular first], "counts": [...]}`` (cold-start fallback)
- ``manifest.json`` format version, model version (monotonic integer), created, precision, model config
  summary, and the sha256 + size of every file above
- ``manifest.sig`` Ed25519 signature over the exact bytes of ``manifest.json`` (written canonically:
  sorted keys, compact separators, ASCII)

``verify_package`` refuses, with a ``PackageError`` whose ``reason`` is one of ``REASONS``: a missing
directory or manifest, an unsigned package, a bad signature (wrong key or edited manifest), a malformed
manifest, a missing / extra / non-regular file, a hash or size mismatch (flipped byte, swapped files), and a
model version not newer than the installed one (with ``allow_reinstall=True``: older than the installed one,
so a device restarting on the package it already runs loads it again).

The device remembers the highest version it installed across restarts: ``edge_client.client.EdgeClient``
keeps it as an encrypted, name-bound blob in its ``TupleStore`` and passes it as ``installed_version``, so
restarting the app with an older (genuinely signed) package is refused as ``stale_version``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_client.schema import ActivityVocabulary, DwellBuckets

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FULL_GRAPH = "full.onnx"
STEP_GRAPH = "step.onnx"
ITEMS = "items.json"
VOCAB = "vocab.json"
POPULARITY = "popularity.json"
PAYLOAD_FILES = (FULL_GRAPH, STEP_GRAPH, ITEMS, VOCAB, POPULARITY)
PRIVATE_KEY_FILE = "edge_signing_key.pem"
PUBLIC_KEY_FILE = "edge_signing_key.pub.pem"
MAX_MANIFEST_BYTES = 1 << 20

REASONS = (
    "not_found",  # no such package directory
    "missing_manifest",
    "unsigned",  # no manifest.sig
    "bad_signature",  # wrong key, or manifest / signature edited
    "malformed_manifest",  # signed, but not a manifest this version understands
    "missing_file",
    "extra_file",  # anything not listed in the manifest (including sub-directories and links)
    "hash_mismatch",  # size or sha256 differs: flipped byte, swapped or replaced file
    "stale_version",  # model_version <= the installed one (< with allow_reinstall)
    "bad_payload",  # files hash correctly but their content is unusable (e.g. bad vocabulary)
    "bad_key",
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PackageError(Exception):
    """A package the device must not install; ``reason`` is a stable code from ``REASONS``."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Manifest:
    """A verified manifest."""

    format_version: int
    model_version: int
    created: str
    precision: str
    model: dict[str, object]
    files: dict[str, dict[str, object]]
    extra: dict[str, object] = field(default_factory=dict)
    path: Path | None = None

    def to_dict(self) -> dict[str, object]:
        """The manifest as written (without ``path``)."""
        return {
            "format_version": self.format_version,
            "model_version": self.model_version,
            "created": self.created,
            "precision": self.precision,
            "model": self.model,
            "files": self.files,
            "extra": self.extra,
        }


def canonical_bytes(data: Mapping[str, object]) -> bytes:
    """The one byte form of a manifest that gets signed."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def generate_keypair(directory: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write an Ed25519 signing key (PEM, PKCS8, mode 0600) and its public key (PEM); returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise FileExistsError(f"{directory} already holds a key pair; pass overwrite=True to replace it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if overwrite and private_path.exists():
        private_path.unlink()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    os.chmod(private_path, 0o600)  # whatever the umask
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(key: str | Path | bytes | Ed25519PrivateKey) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object, PEM bytes or a PEM file."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    data = key if isinstance(key, bytes) else Path(key).read_bytes()
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise PackageError("bad_key", f"not a PEM private key: {err}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise PackageError("bad_key", f"expected an Ed25519 private key, got {type(loaded).__name__}")
    return loaded


def load_public_key(key: str | Path | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, PEM bytes or a PEM file."""
    if isinstance(key, Ed25519PublicKey):
        return key
    data = key if isinstance(key, bytes) else Path(key).read_bytes()
    try:
        loaded = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise PackageError("bad_key", f"not a PEM public key: {err}") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise PackageError("bad_key", f"expected an Ed25519 public key, got {type(loaded).__name__}")
    return loaded


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _write_json(path: Path, data: object) -> None:
    path.write_text(
        json.dumps(data, separators=(",", ":"), ensure_ascii=True, allow_nan=False), encoding="ascii"
    )


def write_payload(
    directory: str | Path,
    item_ids: Sequence[str],
    activities: ActivityVocabulary,
    dwell: DwellBuckets,
    popular_items: Sequence[str],
    popular_counts: Sequence[float],
) -> None:
    """The vocabulary and popularity files of a package (the graphs are written by the exporter)."""
    directory = Path(directory)
    _write_json(directory / ITEMS, [str(i) for i in item_ids])
    _write_json(directory / VOCAB, {"activities": activities.to_dict(), "dwell": dwell.to_dict()})
    if len(popular_items) != len(popular_counts):
        raise ValueError("popular_items and popular_counts differ in length")
    _write_json(
        directory / POPULARITY,
        {"items": [str(i) for i in popular_items], "counts": [float(c) for c in popular_counts]},
    )


def sign_package(
    directory: str | Path,
    private_key: str | Path | bytes | Ed25519PrivateKey,
    model_version: int,
    model: Mapping[str, object],
    precision: str = "int8",
    extra: Mapping[str, object] | None = None,
    created: str | None = None,
) -> Manifest:
    """Hash every payload file of ``directory``, write manifest.json and its Ed25519 signature."""
    directory = Path(directory)
    if isinstance(model_version, bool) or not isinstance(model_version, int) or model_version < 1:
        raise ValueError(f"model_version must be a positive integer, got {model_version!r}")
    key = load_private_key(private_key)
    present = sorted(p.name for p in directory.iterdir() if p.name not in (MANIFEST, SIGNATURE))
    if present != sorted(PAYLOAD_FILES):
        raise ValueError(f"{directory} must hold exactly {sorted(PAYLOAD_FILES)}, found {present}")
    files = {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in PAYLOAD_FILES
    }
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model_version=model_version,
        created=created or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        precision=precision,
        model=dict(model),
        files=files,
        extra=dict(extra or {}),
    )
    data = canonical_bytes(manifest.to_dict())
    (directory / MANIFEST).write_bytes(data)
    (directory / SIGNATURE).write_bytes(key.sign(data))
    return Manifest(**{**manifest.__dict__, "path": directory})


# --------------------------------------------------------------------------------------------------
# Verifying
# --------------------------------------------------------------------------------------------------


def _parse_manifest(data: bytes) -> Manifest:
    def bad(message: str) -> PackageError:
        return PackageError("malformed_manifest", message)

    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("manifest.json is not valid UTF-8 JSON") from None
    if not isinstance(raw, dict):
        raise bad("manifest must be a JSON object")
    expected = {"format_version", "model_version", "created", "precision", "model", "files", "extra"}
    if set(raw) != expected:
        raise bad(f"manifest keys {sorted(raw)} != {sorted(expected)}")
    version = raw["format_version"]
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise bad(f"unsupported format_version {version!r} (this device reads {FORMAT_VERSION})")
    model_version = raw["model_version"]
    if isinstance(model_version, bool) or not isinstance(model_version, int) or model_version < 1:
        raise bad(f"model_version must be a positive integer, got {model_version!r}")
    for name in ("created", "precision"):
        if not isinstance(raw[name], str):
            raise bad(f"'{name}' must be a string")
    for name in ("model", "extra"):
        if not isinstance(raw[name], dict):
            raise bad(f"'{name}' must be an object")
    files = raw["files"]
    if not isinstance(files, dict) or sorted(files) != sorted(PAYLOAD_FILES):
        raise bad(f"'files' must list exactly {sorted(PAYLOAD_FILES)}")
    for name, entry in files.items():
        if not isinstance(entry, dict) or set(entry) != {"sha256", "bytes"}:
            raise bad(f"files[{name!r}] must be {{'sha256', 'bytes'}}")
        if not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
            raise bad(f"files[{name!r}].sha256 is not a hex sha256")
        size = entry["bytes"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"files[{name!r}].bytes must be a non-negative integer")
    n_items = raw["model"].get("n_items")
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise bad("model.n_items must be a positive integer")
    return Manifest(
        raw["format_version"],
        model_version,
        raw["created"],
        raw["precision"],
        raw["model"],
        files,
        raw["extra"],
    )


def verify_package(
    path: str | Path,
    public_key: str | Path | bytes | Ed25519PublicKey,
    installed_version: int | None = None,
    *,
    allow_reinstall: bool = False,
) -> Manifest:
    """Check signature, manifest, file set and hashes, and that the model is newer than ``installed_version``.

    ``allow_reinstall=True`` also accepts a package of exactly ``installed_version`` (a restart on the package
    the device already runs); an older one is still ``stale_version``. Updates (``Recommender.swap``) keep the
    default: strictly newer.

    Returns the verified Manifest (with ``path`` set); raises PackageError with a reason code otherwise.
    The signature is checked before the manifest is parsed, and the file hashes before anything is loaded.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise PackageError("not_found", f"{directory} is not a directory")
    key = load_public_key(public_key)
    manifest_path, signature_path = directory / MANIFEST, directory / SIGNATURE
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise PackageError("missing_manifest", f"{directory} has no {MANIFEST}")
    if not signature_path.is_file() or signature_path.is_symlink():
        raise PackageError("unsigned", f"{directory} has no {SIGNATURE}")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackageError("malformed_manifest", f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    data = manifest_path.read_bytes()
    signature = signature_path.read_bytes()
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise PackageError(
            "bad_signature", f"{SIGNATURE} does not verify {MANIFEST} with this public key"
        ) from None
    manifest = _parse_manifest(data)
    if installed_version is not None:
        if allow_reinstall and manifest.model_version < installed_version:
            raise PackageError(
                "stale_version",
                f"model_version {manifest.model_version} is older than the installed {installed_version}",
            )
        if not allow_reinstall and manifest.model_version <= installed_version:
            raise PackageError(
                "stale_version",
                f"model_version {manifest.model_version} is not newer than the installed {installed_version}",
            )
    allowed = set(PAYLOAD_FILES) | {MANIFEST, SIGNATURE}
    for entry in sorted(directory.iterdir()):
        if entry.name not in allowed:
            raise PackageError("extra_file", f"unexpected entry {entry.name!r} in the package")
        mode = entry.lstat().st_mode
        if not stat.S_ISREG(mode):
            raise PackageError("extra_file", f"{entry.name!r} is not a regular file")
    for name, expected in sorted(manifest.files.items()):
        file_path = directory / name
        if not file_path.exists():
            raise PackageError("missing_file", f"{name} is listed in the manifest but missing")
        if file_path.stat().st_size != expected["bytes"]:
            raise PackageError(
                "hash_mismatch",
                f"{name} has {file_path.stat().st_size} bytes, manifest says {expected['bytes']}",
            )
        if sha256_file(file_path) != expected["sha256"]:
            raise PackageError("hash_mismatch", f"{name} does not match its sha256 in the manifest")
    return Manifest(**{**manifest.__dict__, "path": directory})


def read_verified(manifest: Manifest, name: str) -> bytes:
    """The bytes of one payload file of a verified package, hashed again as read.

    Loaders use these bytes (not the path), so a file swapped after ``verify_package`` is never loaded.
    """
    if manifest.path is None or name not in manifest.files:
        raise ValueError(f"{name!r} is not a payload file of a verified package")
    path = manifest.path / name
    if path.is_symlink() or not path.is_file():
        raise PackageError("missing_file", f"{name} disappeared or was replaced by a non-regular file")
    data = path.read_bytes()
    expected = manifest.files[name]
    if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise PackageError("hash_mismatch", f"{name} changed after verification")
    return data


@dataclass(frozen=True)
class PackageVocab:
    """The vocabulary and cold-start files of a verified package."""

    item_ids: tuple[str, ...]
    activities: ActivityVocabulary
    dwell: DwellBuckets
    popular_items: tuple[str, ...]
    popular_counts: tuple[float, ...]

    def item_index(self) -> dict[str, int]:
        """Item id -> dense model index (1-based)."""
        return {item: i + 1 for i, item in enumerate(self.item_ids)}


def load_vocab(manifest: Manifest) -> PackageVocab:
    """Read items/vocab/popularity of a verified package (``bad_payload`` if they are not usable)."""
    if manifest.path is None:
        raise ValueError("load_vocab needs a manifest returned by verify_package")
    try:
        items = json.loads(read_verified(manifest, ITEMS).decode("utf-8"))
        vocab = json.loads(read_verified(manifest, VOCAB).decode("utf-8"))
        popularity = json.loads(read_verified(manifest, POPULARITY).decode("utf-8"))
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError("items.json must be a JSON array of strings")
        if len(items) != manifest.model["n_items"] or len(set(items)) != len(items):
            raise ValueError(
                f"items.json holds {len(items)} ids (unique: {len(set(items))}), the model has {manifest.model['n_items']}"
            )
        activities = ActivityVocabulary.from_dict(vocab["activities"])
        dwell = DwellBuckets.from_dict(vocab["dwell"])
        popular_items = tuple(str(i) for i in popularity["items"])
        popular_counts = tuple(float(c) for c in popularity["counts"])
        if len(popular_items) != len(popular_counts):
            raise ValueError("popularity items and counts differ in length")
    except PackageError:
        raise
    except (
        ValueError,
        KeyError,
        TypeError,
        OverflowError,
        RecursionError,
    ) as err:  # signed, yet unusable content
        raise PackageError("bad_payload", f"unusable vocabulary files: {type(err).__name__}: {err}") from None
    for name, size, expected in (
        ("n_activities", len(activities), manifest.model.get("n_activities")),
        ("n_dwell", dwell.vocab_size, manifest.model.get("n_dwell")),
    ):
        if expected is not None and expected != size:
            raise PackageError("bad_payload", f"vocab.json gives {name}={size}, the model has {expected}")
    return PackageVocab(tuple(items), activities, dwell, popular_items, popular_counts)
