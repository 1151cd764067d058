"""Fuzzing the model package loader: ``verify_package`` and the runtime's install path (``Recommender.swap``).

Two attackers. Without the signing key (``package_unsigned``): any edit, deletion, replacement, link,
directory or extra file in a genuine newer package is refused with the ``PackageError.reason`` that names
it, by ``verify_package`` and by ``swap``, and the installed model keeps serving. With the signing key
(``package_signed``: a compromised or buggy publisher): a re-signed package with a mutated manifest,
vocabulary, popularity list or graph either installs and then serves recommendations, or is refused with
a ``PackageError``; nothing else may escape from the loader or onnxruntime.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_client.package import (
    FULL_GRAPH,
    ITEMS,
    MANIFEST,
    PAYLOAD_FILES,
    POPULARITY,
    REASONS,
    SIGNATURE,
    STEP_GRAPH,
    VOCAB,
    PackageError,
    canonical_bytes,
    load_private_key,
    sign_package,
    verify_package,
)
from edge_client.runtime import Recommender
from edge_client.schema import MicroBehavior
from tests.edge_client.worlds import shared_packages, shared_world
from tests.fuzzing import (
    EDITS,
    JSON,
    FuzzSurface,
    assert_clear_error,
    context_fixture,
    fuzz_settings,
    mutate_bytes,
)

ALL_FILES = (*PAYLOAD_FILES, MANIFEST, SIGNATURE)
T0 = 1_700_000_000_000


@dataclass
class PackageFixture:
    """A device serving v2, a genuine newer package (v3) to mutate, the keys, a scratch directory."""

    recommender: Recommender
    installed: int
    base: Path
    foreign: Path
    public: Path
    private: object
    work: Path
    history: list[MicroBehavior]
    last_version: int = 2

    def new_version(self) -> int:
        """A model version newer than any used so far and than the serving one."""
        self.last_version = max(self.last_version, self.installed) + 1
        return self.last_version

    def fresh_copy(self) -> Path:
        """A pristine copy of the newer package in the scratch directory."""
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(self.base, self.work, symlinks=True)
        return self.work


@contextlib.contextmanager
def package_context(tmp: Path) -> Iterator[PackageFixture]:
    """The device (serving v2) and the packages of the tiny trained world."""
    world = shared_world(tmp / "world")
    packages = shared_packages(world, tmp / "packages")
    recommender = Recommender(packages["v2"], world["public"])
    items = recommender.vocab.item_ids
    history = [MicroBehavior("s", T0 + i, items[i % len(items)], "Home2Product", 5.0) for i in range(4)]
    yield PackageFixture(
        recommender,
        2,
        packages["v3"],
        packages["foreign"],
        world["public"],
        world["private"],
        tmp / "work",
        history,
    )


def _serves_installed(fx: PackageFixture) -> None:
    assert fx.recommender.model_version == fx.installed, "a refused package replaced the serving model"
    assert fx.recommender.recommend(fx.history, k=3)


# ---- without the key -----------------------------------------------------------------------------------

UNSIGNED_OPS = st.one_of(
    st.tuples(st.sampled_from(ALL_FILES), st.just("edit"), EDITS),
    st.tuples(st.sampled_from(ALL_FILES), st.just("replace"), st.binary(max_size=200)),
    st.tuples(
        st.sampled_from(ALL_FILES), st.sampled_from(["delete", "symlink", "directory", "foreign"]), st.none()
    ),
    st.tuples(st.sampled_from(PAYLOAD_FILES), st.just("swap"), st.sampled_from(PAYLOAD_FILES)),
    st.tuples(st.just("extra"), st.just("extra"), st.text("abcdefghij._-", min_size=1, max_size=12)),
)


def _expected_reason(target: str, op: str) -> str:
    if op == "extra":
        return "extra_file"
    if target == MANIFEST:
        return "missing_manifest" if op in ("delete", "symlink", "directory") else "bad_signature"
    if target == SIGNATURE:
        return "unsigned" if op in ("delete", "symlink", "directory") else "bad_signature"
    return {"delete": "missing_file", "symlink": "extra_file", "directory": "extra_file"}.get(
        op, "hash_mismatch"
    )


def apply_unsigned(fx: PackageFixture, case: tuple[str, str, object]) -> str:
    """Damage a fresh copy of the newer package as ``case`` says; returns the reason it must be refused with."""
    target, op, arg = case
    work = fx.fresh_copy()
    path = work / target
    if op == "extra":
        name = str(arg) if str(arg) not in ALL_FILES and str(arg) not in (".", "..") else "extra.bin"
        (work / name).write_bytes(b"unexpected")
        return "extra_file"
    before = path.read_bytes()
    if op in ("edit", "replace", "foreign", "swap"):
        if op == "edit":
            data = mutate_bytes(before, arg)  # type: ignore[arg-type]
        elif op == "replace":
            data = bytes(arg)  # type: ignore[arg-type]
        elif op == "foreign":  # the same file of the package signed with the other key
            data = (fx.foreign / target).read_bytes()
        else:  # another payload file of the same package
            data = (work / str(arg)).read_bytes()
        if data == before:  # make sure something changed
            data = bytes([before[0] ^ 0xFF]) + before[1:] if before else b"x"
        path.write_bytes(data)
        if target == SIGNATURE and op == "foreign":
            return "bad_signature"
    elif op == "delete":
        path.unlink()
    elif op == "symlink":  # same bytes, but through a link
        outside = work.parent / f"outside-{target}"
        path.rename(outside)
        os.symlink(outside, path)
    elif op == "directory":
        path.unlink()
        path.mkdir()
    return _expected_reason(target, op)


def check_unsigned(fx: PackageFixture, case: tuple[str, str, object]) -> str:
    """Refused by verify_package and by swap with the reason that names the damage; v2 keeps serving."""
    expected = apply_unsigned(fx, case)
    for attempt in (
        lambda: verify_package(fx.work, fx.public, fx.installed),
        lambda: fx.recommender.swap(fx.work),
    ):
        with pytest.raises(PackageError) as err:
            attempt()
        assert_clear_error(err.value, REASONS)
        assert err.value.reason == expected, f"{case[:2]}: {err.value}"
    _serves_installed(fx)
    return expected


# ---- with the key --------------------------------------------------------------------------------------

_MANIFEST_KEYS = ("format_version", "model_version", "created", "precision", "model", "files", "extra")
_MODEL_KEYS = (
    "n_items",
    "n_activities",
    "n_dwell",
    "hidden_dim",
    "max_len",
    "use_attention",
    "copy",
    "data_type",
)
_odd_values = JSON | st.sampled_from([0, -1, 1, 2, 10**9, 2**63, 10**400, 1.5, "", "x", True, None, [], {}])
SIGNED_OPS = st.one_of(
    st.tuples(
        st.just(MANIFEST),
        st.just("field"),
        st.tuples(st.sampled_from(_MANIFEST_KEYS) | st.text(max_size=6), _odd_values),
    ),
    st.tuples(st.just(MANIFEST), st.just("model"), st.tuples(st.sampled_from(_MODEL_KEYS), _odd_values)),
    st.tuples(st.just(MANIFEST), st.just("drop"), st.sampled_from(_MANIFEST_KEYS)),
    st.tuples(st.just(MANIFEST), st.just("replace"), JSON),
    st.tuples(st.sampled_from([ITEMS, VOCAB, POPULARITY]), st.just("json"), JSON),
    st.tuples(
        st.just(VOCAB), st.just("field"), st.tuples(st.sampled_from(["activities", "dwell"]), _odd_values)
    ),
    st.tuples(st.just(VOCAB), st.just("dwell"), st.lists(_odd_values, max_size=6)),
    st.tuples(
        st.just(VOCAB), st.just("activities"), st.tuples(st.lists(_odd_values, max_size=12), _odd_values)
    ),
    st.tuples(
        st.just(POPULARITY), st.just("field"), st.tuples(st.sampled_from(["items", "counts"]), _odd_values)
    ),
    st.tuples(
        st.just(ITEMS),
        st.just("items"),
        st.lists(st.text(max_size=4) | st.integers(0, 99).map(str), max_size=70),
    ),
    st.tuples(st.sampled_from([ITEMS, VOCAB, POPULARITY, FULL_GRAPH, STEP_GRAPH]), st.just("edit"), EDITS),
)


def _json_dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def apply_signed(fx: PackageFixture, case: tuple[str, str, object]) -> None:
    """Mutate a fresh copy of the newer package and sign it again with the trusted key (a newer version)."""
    target, op, arg = case
    work = fx.fresh_copy()
    version = fx.new_version()
    manifest = json.loads((work / MANIFEST).read_bytes())
    if target != MANIFEST:
        path = work / target
        if op == "edit":
            path.write_bytes(mutate_bytes(path.read_bytes(), arg))  # type: ignore[arg-type]
        elif op == "json":
            path.write_bytes(_json_dump(arg))
        else:
            data = json.loads(path.read_bytes())
            if op == "field":
                key, value = arg  # type: ignore[misc]
                data[key] = value
            elif op == "dwell":
                data["dwell"] = {"edges_s": arg}
            elif op == "activities":
                names, conversions = arg  # type: ignore[misc]
                data["activities"] = {"names": names, "conversions": conversions}
            else:  # items
                data = arg
            path.write_bytes(_json_dump(data))
        for name in (MANIFEST, SIGNATURE):
            (work / name).unlink()
        sign_package(work, fx.private, version, manifest["model"], manifest["precision"], manifest["extra"])
        return
    manifest["model_version"] = version
    if op == "field":
        key, value = arg  # type: ignore[misc]
        manifest[key] = value
    elif op == "model":
        key, value = arg  # type: ignore[misc]
        manifest["model"][key] = value
    elif op == "drop":
        manifest.pop(arg, None)
    else:
        manifest = arg
    data = canonical_bytes(manifest) if isinstance(manifest, dict) else _json_dump(manifest)
    (work / MANIFEST).write_bytes(data)
    (work / SIGNATURE).write_bytes(load_private_key(fx.private).sign(data))


def check_signed(fx: PackageFixture, case: tuple[str, str, object]) -> str:
    """Installs and serves, or a PackageError; the serving model changes only on success."""
    apply_signed(fx, case)
    try:
        manifest = fx.recommender.swap(fx.work)
    except PackageError as err:
        assert_clear_error(err, REASONS)
        _serves_installed(fx)
        return err.reason
    fx.installed = manifest.model_version
    recs = fx.recommender.recommend(fx.history, k=5)
    assert len(recs) <= 5 and all(isinstance(r.item_id, str) for r in recs)
    fx.recommender.start_session().step(fx.history[0], k=3)
    return "installed"


SURFACES = (
    FuzzSurface(
        "package_unsigned",
        "verify_package + Recommender.swap on edited, replaced, deleted, linked, swapped "
        "and extra files of a genuine package (no key)",
        UNSIGNED_OPS,
        package_context,
        check_unsigned,
    ),
    FuzzSurface(
        "package_signed",
        "Recommender.swap on re-signed packages with mutated manifest, vocabulary, "
        "popularity, items and graph bytes (the key holder)",
        SIGNED_OPS,
        package_context,
        check_signed,
    ),
)


unsigned_device = context_fixture(package_context, "fuzz-unsigned", needs="packages")
# Another device: successful installs of odd signed packages move it on, so it is not shared.
signed_device = context_fixture(package_context, "fuzz-signed", needs="packages")


@fuzz_settings()
@given(case=UNSIGNED_OPS)
def test_fuzz_unsigned_package_damage(unsigned_device, case):
    check_unsigned(unsigned_device, case)


@fuzz_settings()
@given(case=SIGNED_OPS)
def test_fuzz_signed_but_malformed_packages(signed_device, case):
    check_signed(signed_device, case)


@pytest.mark.parametrize(
    "case",
    [
        (VOCAB, "field", ("dwell", 0)),  # was AttributeError: 'int' object has no attribute 'get'
        (VOCAB, "field", ("activities", 0)),  # likewise
        (VOCAB, "dwell", [1.0, 10**400]),  # was OverflowError in float()
        (
            VOCAB,
            "activities",
            (["Cart", "Order"], [["Cart"]]),
        ),  # was TypeError from frozenset (now a clear message)
        (POPULARITY, "field", ("counts", [10**400])),  # was OverflowError
        (ITEMS, "json", None),
    ],
)
def test_regression_signed_but_unusable_vocabulary_is_bad_payload(signed_device, case):
    """Found by fuzzing: odd content in signed vocabulary files escaped load_vocab as a raw exception."""
    apply_signed(signed_device, case)
    with pytest.raises(PackageError) as err:
        signed_device.recommender.swap(signed_device.work)
    assert err.value.reason == "bad_payload", str(err.value)
    _serves_installed(signed_device)


def test_regression_deeply_nested_signed_json_is_bad_payload(signed_device):
    """Nesting deeper than the JSON decoder's recursion limit is refused, not a RecursionError."""
    apply_signed(signed_device, (ITEMS, "json", []))
    (signed_device.work / ITEMS).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    manifest = json.loads((signed_device.work / MANIFEST).read_bytes())
    for name in (MANIFEST, SIGNATURE):
        (signed_device.work / name).unlink()
    sign_package(signed_device.work, signed_device.private, signed_device.new_version(), manifest["model"])
    with pytest.raises(PackageError) as err:
        signed_device.recommender.swap(signed_device.work)
    assert err.value.reason == "bad_payload"
    _serves_installed(signed_device)
