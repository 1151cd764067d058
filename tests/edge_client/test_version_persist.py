"""Anti-rollback across restarts: the highest installed model version lives in the device's encrypted store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_client.client import VERSION_BLOB, EdgeClient, read_installed_version, write_installed_version
from edge_client.package import PackageError, verify_package
from edge_client.runtime import Recommender
from edge_client.store import StoreError, StoreTamperError, TupleStore
from tests.edge_client.worlds import DEVICE


def client_on(packages, world, store: Path, version: str) -> EdgeClient:
    return EdgeClient(store, packages[version], world["public"], device_id=DEVICE)


def recorded(store: Path) -> int | None:
    return read_installed_version(TupleStore(store))


def blob_path(store: Path) -> Path:
    return store / f"blob-{VERSION_BLOB}.rblob"


def refused(fn, reason: str) -> PackageError:
    with pytest.raises(PackageError) as err:
        fn()
    assert err.value.reason == reason
    return err.value


def test_verify_package_allow_reinstall(packages, world):
    public = world["public"]
    assert verify_package(packages["v2"], public, 2, allow_reinstall=True).model_version == 2
    assert verify_package(packages["v2"], public, 1, allow_reinstall=True).model_version == 2
    refused(lambda: verify_package(packages["v2"], public, 2), "stale_version")  # the default: strictly newer
    err = refused(lambda: verify_package(packages["v1"], public, 2, allow_reinstall=True), "stale_version")
    assert "older than the installed 2" in str(err)
    assert Recommender(packages["v2"], public, installed_version=2, allow_reinstall=True).model_version == 2
    refused(
        lambda: Recommender(packages["v1"], public, installed_version=2, allow_reinstall=True),
        "stale_version",
    )


def test_restart_reloads_the_same_version_and_refuses_an_older_one(packages, world, tmp_path):
    store = tmp_path / "store"
    client = client_on(packages, world, store, "v2")
    assert client.installed_version == 2 and recorded(store) == 2  # written at the first load
    client.close()
    again = client_on(packages, world, store, "v2")  # the same package after a restart: loads
    assert again.recommender.model_version == 2 and again.installed_version == 2
    again.close()
    refused(
        lambda: client_on(packages, world, store, "v1"), "stale_version"
    )  # an older, genuinely signed one
    assert recorded(store) == 2
    fresh = client_on(packages, world, tmp_path / "fresh", "v1")  # a device that never ran v2 takes v1
    assert fresh.installed_version == 1
    fresh.close()


def test_a_refused_start_leaves_the_store_usable(packages, world, tmp_path):
    store = tmp_path / "store"
    client = client_on(packages, world, store, "v2")
    assert client.record({"session_id": "s", "timestamp_ms": 1_000, "event_type": "cart", "item_id": "x"}).ok
    client.close()
    refused(lambda: client_on(packages, world, store, "v1"), "stale_version")
    again = client_on(packages, world, store, "v2")
    assert [r.item_id for r in again.current_session()] == ["x"]
    again.close()


@pytest.mark.parametrize("via", ["client", "recommender"])
def test_swap_records_the_new_version_before_it_serves(packages, world, tmp_path, via):
    store = tmp_path / "store"
    client = client_on(packages, world, store, "v2")
    swap = client.swap if via == "client" else client.recommender.swap
    refused(lambda: swap(packages["v2"]), "stale_version")
    refused(lambda: swap(packages["v1"]), "stale_version")
    assert recorded(store) == 2
    assert swap(packages["v3"]).model_version == 3
    assert client.recommender.model_version == 3 and client.installed_version == 3 and recorded(store) == 3
    client.close()
    refused(lambda: client_on(packages, world, store, "v2"), "stale_version")  # the pre-swap package
    again = client_on(packages, world, store, "v3")
    assert again.installed_version == 3
    again.close()


def test_a_swap_that_cannot_be_recorded_is_refused(packages, world, tmp_path):
    store = tmp_path / "store"
    client = client_on(packages, world, store, "v2")
    client.close()
    with pytest.raises(StoreError, match="closed"):
        client.recommender.swap(packages["v3"])
    assert client.recommender.model_version == 2 and recorded(store) == 2  # old model keeps serving


def test_erase_keeps_the_version_floor(packages, world, tmp_path):
    store = tmp_path / "store"
    client = client_on(packages, world, store, "v3")
    client.erase()
    assert recorded(store) == 3
    client.close()
    refused(lambda: client_on(packages, world, store, "v2"), "stale_version")


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_tampered_version_record_is_detected(packages, world, tmp_path):
    store = tmp_path / "store"
    client_on(packages, world, store, "v3").close()
    original = blob_path(store).read_bytes()

    flip_last_byte(blob_path(store))  # an edited record
    with pytest.raises(StoreTamperError) as err:
        client_on(packages, world, store, "v3")
    assert err.value.path == str(blob_path(store))

    other = tmp_path / "other"  # a record from another device's store (another key)
    client_on(packages, world, other, "v1").close()
    shutil.copyfile(blob_path(other), blob_path(store))
    with pytest.raises(StoreTamperError):
        client_on(packages, world, store, "v1")

    TupleStore(store).write_blob("privacy-ledger", b'{"model_version": 1}')  # renamed into place: name-bound
    shutil.copyfile(store / "blob-privacy-ledger.rblob", blob_path(store))
    with pytest.raises(StoreTamperError):
        client_on(packages, world, store, "v1")

    TupleStore(store).write_blob(VERSION_BLOB, b"not a record")  # authentic bytes, not a version record
    with pytest.raises(StoreTamperError, match="not a model-version record"):
        client_on(packages, world, store, "v3")

    blob_path(store).write_bytes(original)
    client_on(packages, world, store, "v3").close()  # the genuine record opens again
    with pytest.raises(ValueError):
        write_installed_version(TupleStore(store), 0)


def test_cli_serve_refuses_an_older_package_and_a_tampered_record(packages, world, tmp_path):
    from rib_edge.cli_edge import edge_group

    store = tmp_path / "store"
    client_on(packages, world, store, "v2").close()

    def serve(version: str):
        args = [
            "serve",
            "--store",
            str(store),
            "--package",
            str(packages[version]),
            "--public-key",
            str(world["public"]),
            "--port",
            "0",
            "--device",
            DEVICE,
        ]
        return CliRunner().invoke(edge_group, args)

    result = serve("v1")
    assert result.exit_code == 2 and "package refused (stale_version)" in result.output
    flip_last_byte(blob_path(store))
    result = serve("v2")
    assert result.exit_code == 2 and "store refused" in result.output and VERSION_BLOB in result.output
