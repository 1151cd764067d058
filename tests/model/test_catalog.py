"""Catalog item vectors: reading catalogs, refusing broken ones, and vectors that put a brand's items together."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from model.catalog import (
    DATASET_CATALOGS,
    CatalogError,
    CatalogInitConfig,
    catalog_from_rows,
    catalog_item_vectors,
    dataset_catalog,
    read_catalog,
)
from model.rib import RIB, RIBConfig
from model.train import init_from_catalog


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_csv_round_trip_tsv_and_gzip(tmp_path):
    catalog = catalog_from_rows(
        [["1", "8", "489"], ["2", "8", ""], ["3.0", "4", "30.0"]], ("category", "brand")
    )
    assert catalog.attributes == {"1": ("8", "489"), "2": ("8", None), "3": ("4", "30")}
    again = read_catalog(catalog.write_csv(tmp_path / "catalog.csv"))
    assert again.fields == catalog.fields and dict(again.attributes) == dict(catalog.attributes)
    tsv = tmp_path / "catalog.tsv.gz"
    with gzip.open(tsv, "wt", encoding="utf-8") as handle:
        handle.write("brand\titem_id\tshop\n489\t1\ts1\n30\t3\ts2\n")
    read = read_catalog(tsv, fields=["brand"])
    assert read.fields == ("brand",) and read.attributes == {"1": ("489",), "3": ("30",)}


def test_repeats_fill_gaps_but_conflicts_are_refused():
    merged = catalog_from_rows([["1", "8", ""], ["1", "", "489"]], ("category", "brand"))
    assert merged.attributes["1"] == ("8", "489")
    with pytest.raises(CatalogError, match="brand '489' and '30'"):
        catalog_from_rows([["1", "8", "489"], ["1", "8", "30"]], ("category", "brand"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"sku,brand\n1,2\n", "no 'item_id' column"),
        (b"item_id,brand\n1,2,3\n", "3 fields, header has 2"),
        (b"item_id,brand\n,2\n", "empty item id"),
        (b"item_id,brand\n1,\xff\xfe\n", "not UTF-8"),
    ],
)
def test_broken_catalog_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "catalog.csv"
    path.write_bytes(content)
    with pytest.raises(CatalogError, match=message):
        read_catalog(path)


def test_missing_file_column_and_dataset_are_clear_errors(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        read_catalog(tmp_path / "nope.csv")
    (tmp_path / "c.csv").write_text("item_id,brand\n1,2\n")
    with pytest.raises(CatalogError, match=r"missing column\(s\) \['shop'\]"):
        read_catalog(tmp_path / "c.csv", fields=["shop"])
    with pytest.raises(CatalogError, match="ships no item catalog"):
        dataset_catalog("yoochoose_100k")


def test_items_of_one_brand_start_closer_than_items_of_another():
    rows = [[str(i), "c0" if i < 20 else "c1", f"b{i % 4}"] for i in range(40)]
    catalog = catalog_from_rows(rows, ("category", "brand"))
    item_ids = [str(i) for i in range(40)] + ["unknown"]
    vectors = catalog_item_vectors(item_ids, catalog, dim=32, config=CatalogInitConfig(seed=1))
    assert vectors.vectors.shape == (42, 32)
    assert not vectors.present[0] and not vectors.present[-1]  # padding and the item the catalog lacks
    assert vectors.present[1:-1].all() and not vectors.vectors[-1].any()
    row = {item: i + 1 for i, item in enumerate(item_ids)}
    same_brand = [_cosine(vectors.vectors[row[str(a)]], vectors.vectors[row[str(a + 4)]]) for a in range(16)]
    other_brand = [_cosine(vectors.vectors[row[str(a)]], vectors.vectors[row[str(a + 1)]]) for a in range(16)]
    assert np.median(same_brand) > np.median(other_brand) + 0.2
    again = catalog_item_vectors(item_ids, catalog, dim=32, config=CatalogInitConfig(seed=1))
    np.testing.assert_array_equal(vectors.vectors, again.vectors)
    other_seed = catalog_item_vectors(item_ids, catalog, dim=32, config=CatalogInitConfig(seed=2))
    assert not np.array_equal(vectors.vectors, other_seed.vectors)


def test_field_weights_decide_which_fact_dominates():
    rows = [[str(i), f"c{i % 2}", f"b{i % 5}"] for i in range(40)]
    catalog = catalog_from_rows(rows, ("category", "brand"))
    items = [str(i) for i in range(40)]
    brand_only = catalog_item_vectors(
        items, catalog, 16, CatalogInitConfig(field_weights={"category": 0.0}, item_weight=0.0)
    )
    # With category weighted 0 and no own direction, items of one brand share exactly one vector.
    np.testing.assert_allclose(brand_only.vectors[1], brand_only.vectors[6])
    assert not np.allclose(brand_only.vectors[1], brand_only.vectors[2])


def test_rib_item_embeddings_start_from_a_catalog_file(tmp_path):
    path = catalog_from_rows([[str(i), f"b{i % 3}"] for i in range(1, 13)], ("brand",)).write_csv(
        tmp_path / "c.csv"
    )
    item_ids = [str(i) for i in range(1, 13)]
    torch.manual_seed(0)
    model = RIB(RIBConfig(n_items=12, n_activities=3, n_dwell=5, item_dim=8, hidden_dim=8))
    before = model.item_emb.weight.detach().clone()
    assert init_from_catalog(model, item_ids, path, seed=0) == 12
    after = model.item_emb.weight.detach()
    assert torch.equal(after[0], before[0])  # padding untouched
    assert not torch.allclose(after[1:], before[1:])
    expected = catalog_item_vectors(item_ids, read_catalog(path), 8, CatalogInitConfig(seed=0)).vectors[1:]
    cos = torch.nn.functional.cosine_similarity(after[1:], torch.from_numpy(expected), dim=1)
    assert bool((cos > 0.999).all())  # the same vectors, rescaled
    with pytest.raises(CatalogError, match="describes none"):
        init_from_catalog(model, [f"x{i}" for i in range(12)], path)


@pytest.mark.parametrize("name", sorted(DATASET_CATALOGS))
def test_shared_datasets_catalogs_cover_their_vocabularies(shared_data, name):
    from model.data.loaders import load_dataset

    catalog = dataset_catalog(name, shared_data)
    split = load_dataset(name, data_dir=shared_data)
    coverage = catalog.coverage(list(split.vocab.item_ids))
    # Every product in these logs has its catalog row (the action rows or side files carry it).
    assert coverage == 1.0, f"{name}: {coverage:.3f}"


def test_the_synthetic_population_has_a_catalog_of_its_categories():
    from model.data.open import synthetic_split
    from model.data.synthetic import SyntheticConfig, item_categories

    split = synthetic_split(SyntheticConfig(), seed=3)
    catalog = dataset_catalog("synthetic", seed=3)
    assert catalog.coverage(list(split.vocab.item_ids)) == 1.0
    categories = item_categories(seed=3)
    assert {catalog.attributes[item][0] for item in catalog.attributes} == {
        f"c{c}" for c in set(categories.values())
    }
    assert dataset_catalog("synthetic", seed=4).attributes != catalog.attributes


def test_frozen_items_are_never_trained_and_are_listed_as_frozen(tmp_path):
    from federation.task import federated_rib_config
    from model.data.open import synthetic_split
    from model.data.synthetic import SyntheticConfig
    from model.local import LocalTrainConfig, frozen_indices, get_weights, train_local

    split = synthetic_split(SyntheticConfig(n_devices=30, n_items=40, n_categories=4, days=5), seed=0)
    config = federated_rib_config(split.vocab, "SKU+Micro", 8, 8, 20, tie_output=True, freeze_items=True)
    torch.manual_seed(0)
    model = RIB(config)
    catalog = dataset_catalog("synthetic")  # another config's categories: any public table will do here
    assert init_from_catalog(model, list(split.vocab.item_ids), catalog.write_csv(tmp_path / "c.csv")) > 0
    names = list(model.state_dict().keys())
    assert [names[i] for i in frozen_indices(model)] == ["item_emb.weight", "out.scores.weight"]
    before = get_weights(model)
    train_local(model, split.train, LocalTrainConfig(steps=3, batch_size=16, lr=0.05, max_len=20))
    after = get_weights(model)
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        if i in frozen_indices(model):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert frozen_indices(RIB(federated_rib_config(split.vocab, "SKU+Micro", 8, 8, 20))) == []
