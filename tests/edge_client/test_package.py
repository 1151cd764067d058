"""Signed model packages: the refusal matrix of verify_package, key files, and no torch on the device."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client.package import (
    FULL_GRAPH,
    MANIFEST,
    PAYLOAD_FILES,
    SIGNATURE,
    STEP_GRAPH,
    PackageError,
    canonical_bytes,
    generate_keypair,
    load_private_key,
    load_vocab,
    read_verified,
    sign_package,
    verify_package,
    write_payload,
)
from edge_client.schema import RIB_ACTIVITY_VOCAB, DwellBuckets

REPO = Path(__file__).resolve().parents[2]
MODEL = {"n_items": 3, "n_activities": 10, "n_dwell": 6, "hidden_dim": 8, "max_len": 50}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("keys")
    return generate_keypair(base / "good"), generate_keypair(base / "other")


def make_package(directory: Path, private_key: Path, version: int = 5) -> Path:
    """A package with stand-in graph bytes (verification never loads them)."""
    directory.mkdir(parents=True)
    (directory / FULL_GRAPH).write_bytes(b"full-graph-bytes" * 10)
    (directory / STEP_GRAPH).write_bytes(b"step-graph-bytes" * 10)
    write_payload(directory, ["a", "b", "c"], RIB_ACTIVITY_VOCAB, DwellBuckets(), ["b", "a"], [5, 2])
    sign_package(directory, private_key, version, MODEL, precision="int8")
    return directory


@pytest.fixture
def package(tmp_path, keys):
    (private, _), _ = keys
    return make_package(tmp_path / "pkg", private)


def refused(path: Path, public_key, reason: str, installed: int | None = None) -> None:
    with pytest.raises(PackageError) as err:
        verify_package(path, public_key, installed)
    assert err.value.reason == reason, str(err.value)


def test_valid_package_verifies(package, keys):
    (_, public), _ = keys
    manifest = verify_package(package, public, installed_version=4)
    assert manifest.model_version == 5 and manifest.precision == "int8"
    assert sorted(manifest.files) == sorted(PAYLOAD_FILES)
    vocab = load_vocab(manifest)
    assert vocab.item_ids == ("a", "b", "c") and vocab.popular_items == ("b", "a")
    assert vocab.dwell == DwellBuckets() and vocab.activities == RIB_ACTIVITY_VOCAB


def test_file_changed_after_verification_is_not_read(package, keys):
    manifest = verify_package(package, keys[0][1])
    assert read_verified(manifest, FULL_GRAPH) == (package / FULL_GRAPH).read_bytes()
    (package / FULL_GRAPH).write_bytes(b"evil" * 40)
    with pytest.raises(PackageError) as err:
        read_verified(manifest, FULL_GRAPH)
    assert err.value.reason == "hash_mismatch"
    (package / "items.json").write_text('["x", "y", "z"]')
    with pytest.raises(PackageError) as err:
        load_vocab(manifest)
    assert err.value.reason == "hash_mismatch"


def test_unsigned(package, keys):
    (package / SIGNATURE).unlink()
    refused(package, keys[0][1], "unsigned")


def test_wrong_key(package, keys):
    refused(package, keys[1][1], "bad_signature")


def test_missing_manifest(package, keys):
    (package / MANIFEST).unlink()
    refused(package, keys[0][1], "missing_manifest")


def test_not_a_directory(tmp_path, keys):
    refused(tmp_path / "nope", keys[0][1], "not_found")


@pytest.mark.parametrize("name", [*PAYLOAD_FILES, MANIFEST, SIGNATURE])
def test_flipped_byte_in_each_file(package, keys, name):
    path = package / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    expected = "bad_signature" if name in (MANIFEST, SIGNATURE) else "hash_mismatch"
    refused(package, keys[0][1], expected)


def test_swapped_files(package, keys):
    full, step = package / FULL_GRAPH, package / STEP_GRAPH
    a, b = full.read_bytes(), step.read_bytes()
    full.write_bytes(b)
    step.write_bytes(a)
    refused(package, keys[0][1], "hash_mismatch")


@pytest.mark.parametrize("name", PAYLOAD_FILES)
def test_missing_file(package, keys, name):
    (package / name).unlink()
    refused(package, keys[0][1], "missing_file")


def test_extra_file(package, keys):
    (package / "notes.txt").write_text("hi")
    refused(package, keys[0][1], "extra_file")


def test_extra_directory_and_symlink(package, keys):
    (package / "sub").mkdir()
    refused(package, keys[0][1], "extra_file")
    (package / "sub").rmdir()
    target = package / FULL_GRAPH
    moved = package.parent / "elsewhere.onnx"
    shutil.move(target, moved)
    os.symlink(moved, target)
    refused(package, keys[0][1], "extra_file")


def test_older_or_equal_version(package, keys):
    refused(package, keys[0][1], "stale_version", installed=5)
    refused(package, keys[0][1], "stale_version", installed=9)


def _resign(package: Path, private: Path, data: bytes) -> None:
    (package / MANIFEST).write_bytes(data)
    (package / SIGNATURE).write_bytes(load_private_key(private).sign(data))


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: b"not json",
        lambda m: b"[1, 2]",
        lambda m: canonical_bytes({k: v for k, v in m.items() if k != "files"}),
        lambda m: canonical_bytes({**m, "format_version": 99}),
        lambda m: canonical_bytes({**m, "model_version": "7"}),
        lambda m: canonical_bytes({**m, "model_version": 0}),
        lambda m: canonical_bytes({**m, "files": {**m["files"], "evil.so": m["files"][FULL_GRAPH]}}),
        lambda m: canonical_bytes({**m, "files": {**m["files"], FULL_GRAPH: {"sha256": "xyz", "bytes": 1}}}),
        lambda m: canonical_bytes({**m, "model": {}}),
        lambda m: canonical_bytes({**m, "surprise": 1}),
    ],
)
def test_malformed_manifest_even_when_signed(package, keys, edit):
    (private, public), _ = keys
    manifest = json.loads((package / MANIFEST).read_bytes())
    _resign(package, private, edit(manifest))
    refused(package, public, "malformed_manifest")


def test_edited_manifest_without_resigning(package, keys):
    manifest = json.loads((package / MANIFEST).read_bytes())
    manifest["model_version"] = 999
    (package / MANIFEST).write_bytes(canonical_bytes(manifest))
    refused(package, keys[0][1], "bad_signature")


def test_keypair_files(tmp_path):
    private, public = generate_keypair(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path)
    with pytest.raises(PackageError) as err:
        verify_package(tmp_path, private)  # a private key is not a public key
    assert err.value.reason == "bad_key"


def test_sign_refuses_wrong_file_set(tmp_path, keys):
    (private, _), _ = keys
    directory = tmp_path / "bad"
    directory.mkdir()
    (directory / FULL_GRAPH).write_bytes(b"x")
    with pytest.raises(ValueError, match="exactly"):
        sign_package(directory, private, 1, MODEL)


def test_device_modules_do_not_import_torch():
    code = (
        "import sys, edge_client.package, edge_client.runtime, edge_client.schema, edge_client.extract; "
        "bad = sorted(m for m in ('torch', 'onnx', 'onnxscript', 'pandas') if m in sys.modules); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
