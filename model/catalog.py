"""Item vectors from the shop's catalog: category, brand, shop -- public facts about items, not behaviour.

Word2vec on the training sessions gives RIB its best item init (RIB §4), but in a federation those sessions
are private: a federated skip-gram stage recovers the init without DP, and under user-level DP it spends
budget and drowns in noise. A catalog costs no privacy: the shop publishes which brand and category each
product has. Items that share a brand or a category start near each other, which is most of what the
next-item task needs early (on jdata2016, 57 % of transitions between distinct products stay within the
brand and 87 % within the category).

``ItemCatalog`` is the metadata (raw item id -> one value per field); ``read_catalog`` reads a user's CSV,
``dataset_catalog`` the catalog columns the shared datasets ship; ``catalog_item_vectors`` turns a catalog
into ``ItemVectors`` for ``model.train.init_from_item_vectors``.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.word2vec import ItemVectors

ITEM_ID_COLUMN = "item_id"
MAX_CATALOG_BYTES = 1 << 30  # a catalog file larger than this is refused before it is read
MISSING_VALUES = frozenset({"", "-1", "nan", "NaN", "NULL", "null", "None"})


class CatalogError(ValueError):
    """A catalog file or mapping that cannot be used (message says why)."""


@dataclass(frozen=True)
class ItemCatalog:
    """Public item metadata: for each raw item id, one value per field (None = unknown)."""

    fields: tuple[str, ...]
    attributes: Mapping[str, tuple[str | None, ...]]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.fields:
            raise CatalogError("a catalog needs at least one attribute field")
        width = len(self.fields)
        for item, values in self.attributes.items():
            if len(values) != width:
                raise CatalogError(f"item {item!r} has {len(values)} values for {width} fields")

    def __len__(self) -> int:
        return len(self.attributes)

    def coverage(self, item_ids: Sequence[str]) -> float:
        """Fraction of ``item_ids`` the catalog describes."""
        if len(item_ids) == 0:
            return 0.0
        return sum(str(item) in self.attributes for item in item_ids) / len(item_ids)

    def write_csv(self, path: str | Path) -> Path:
        """Write the catalog as CSV (``item_id`` + one column per field; unknown = empty)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([ITEM_ID_COLUMN, *self.fields])
            for item in sorted(self.attributes):
                writer.writerow([item, *("" if v is None else v for v in self.attributes[item])])
        tmp.replace(path)
        return path


def _clean(value: object) -> str | None:
    text = str(value).strip()
    if text.endswith(".0") and text[:-2].lstrip("-").isdigit():
        text = text[:-2]  # pandas-style float ids ("489.0") name the same brand as "489"
    return None if text in MISSING_VALUES else text


def catalog_from_rows(
    rows: Iterable[Sequence[object]], fields: Sequence[str], source: str = ""
) -> ItemCatalog:
    """Build a catalog from (item_id, value per field) rows; a conflicting repeat is a CatalogError."""
    fields = tuple(str(f) for f in fields)
    attributes: dict[str, tuple[str | None, ...]] = {}
    for line, row in enumerate(rows, start=1):
        if len(row) != len(fields) + 1:
            raise CatalogError(
                f"{source or 'catalog'} row {line}: {len(row)} fields, expected {len(fields) + 1}"
            )
        item = _clean(row[0])
        if item is None:
            raise CatalogError(f"{source or 'catalog'} row {line}: empty item id")
        values = tuple(_clean(v) for v in row[1:])
        known = attributes.get(item)
        if known is not None and known != values:
            # Fill gaps from repeats, but two different brands for one product is a broken catalog.
            merged = []
            for field_name, old, new in zip(fields, known, values, strict=True):
                if old is not None and new is not None and old != new:
                    raise CatalogError(
                        f"{source or 'catalog'}: item {item!r} has {field_name} {old!r} and {new!r}"
                    )
                merged.append(old if old is not None else new)
            values = tuple(merged)
        attributes[item] = values
    return ItemCatalog(fields, attributes, source)


def _open_text(path: Path) -> io.TextIOBase:
    if path.stat().st_size > MAX_CATALOG_BYTES:
        raise CatalogError(f"{path}: larger than {MAX_CATALOG_BYTES} bytes")
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def read_catalog(
    path: str | Path, fields: Sequence[str] | None = None, delimiter: str | None = None
) -> ItemCatalog:
    """Read a catalog CSV/TSV (gzip by extension): an ``item_id`` column plus attribute columns."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")
    try:
        with _open_text(path) as handle:
            head = handle.readline()
            if not head.strip():
                raise CatalogError(f"{path}: empty file")
            sep = delimiter or ("\t" if head.count("\t") > head.count(",") else ",")
            header = [c.strip().lstrip("\ufeff") for c in next(csv.reader([head], delimiter=sep))]
            if ITEM_ID_COLUMN not in header:
                raise CatalogError(f"{path}: no {ITEM_ID_COLUMN!r} column (found {header})")
            chosen = [c for c in header if c != ITEM_ID_COLUMN] if fields is None else list(fields)
            missing = [c for c in chosen if c not in header]
            if missing:
                raise CatalogError(f"{path}: missing column(s) {missing} (found {header})")
            index = [header.index(ITEM_ID_COLUMN), *(header.index(c) for c in chosen)]
            rows = []
            for line, row in enumerate(csv.reader(handle, delimiter=sep), start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise CatalogError(f"{path} line {line}: {len(row)} fields, header has {len(header)}")
                rows.append([row[i] for i in index])
    except UnicodeDecodeError as err:
        raise CatalogError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except (OSError, EOFError, csv.Error) as err:
        raise CatalogError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    return catalog_from_rows(rows, chosen, str(path))


# --------------------------------------------------------------------------------------------------
# The catalogs the shared datasets ship
# --------------------------------------------------------------------------------------------------


def _table(
    path: Path, columns: Sequence[str], sep: str = ",", header: Sequence[str] | None = None
) -> list[list[str]]:
    import pandas as pd

    frame = pd.read_csv(
        path, sep=sep, dtype=str, keep_default_na=False, names=header, header=None if header else "infer"
    )
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CatalogError(f"{path}: missing column(s) {missing}")
    return frame[list(columns)].drop_duplicates().to_numpy().tolist()


def _jdata2016(folder: Path) -> ItemCatalog:
    # Every action row carries the product's category and brand; JData_Product.csv adds the products
    # JD scored in the competition. Both are catalog facts (constant per sku).
    rows: list[list[str]] = []
    for name in (
        "JData_Action_201602.csv.gz",
        "JData_Action_201603.csv.gz",
        "JData_Action_201604.csv.gz",
        "JData_Product.csv.gz",
    ):
        if (folder / name).is_file():
            rows += _table(folder / name, ["sku_id", "cate", "brand"])
    return catalog_from_rows(rows, ("category", "brand"), str(folder))


def _jdata2018(folder: Path) -> ItemCatalog:
    # MKM-SR's knowledge graph: item -> brand / shop / category / years triples over dense entity ids.
    kg = folder / "kg_with_new_item"
    entities = {
        dense: raw
        for raw, dense, _kind in _table(kg / "entity2id.tsv.gz", ["entity", "id", "type"], sep="\t")
    }
    relations = {"1": 0, "2": 1, "3": 2}  # item-brand, item-shop, item-cate (item-years is too coarse)
    values: dict[str, list[str | None]] = {}
    for head, tail, relation in _table(kg / "kg2id.tsv.gz", ["head", "tail", "relation"], sep="\t"):
        if relation in relations and head in entities:
            values.setdefault(entities[head], [None, None, None])[relations[relation]] = tail
    rows = [[item, *vals] for item, vals in values.items()]
    return catalog_from_rows(rows, ("brand", "shop", "category"), str(kg))


def _taobao(file_name: str) -> Callable[[Path], ItemCatalog]:
    def read(folder: Path) -> ItemCatalog:
        names = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
        rows = _table(folder / file_name, ["item_id", "category_id"], header=names)
        return catalog_from_rows(rows, ("category",), str(folder))

    return read


def _diginetica(folder: Path) -> ItemCatalog:
    rows = _table(folder / "product-categories.csv.gz", ["itemId", "categoryId"], sep=";")
    return catalog_from_rows(rows, ("category",), str(folder))


DATASET_CATALOGS = {
    "jdata2016_sample": ("jdata2016_sample", _jdata2016),
    "jdata2018_mkmsr_demo": ("jdata2018_mkmsr_demo", _jdata2018),
    "diginetica_sample": ("diginetica_sample", _diginetica),
    "taobao_userbehavior_timeslice": (
        "taobao_userbehavior_timeslice",
        _taobao("UserBehavior_timeslice_110k.csv.gz"),
    ),
    "taobao_userbehavior_sample": ("taobao_userbehavior_sample", _taobao("UserBehavior_sample.csv.gz")),
}


def dataset_catalog(name: str, data_dir: str | Path | None = None, seed: int = 0) -> ItemCatalog:
    """The catalog a shared dataset ships (see ``DATASET_CATALOGS``), or the synthetic population's (its seed)."""
    from model.data.loaders import default_data_dir

    if name == "synthetic":
        from model.data.synthetic import item_categories

        categories = item_categories(seed=seed)
        return catalog_from_rows(
            [[item, f"c{c}"] for item, c in categories.items()], ("category",), "synthetic"
        )
    if name not in DATASET_CATALOGS:
        raise CatalogError(
            f"{name!r} ships no item catalog; datasets with one: {', '.join(DATASET_CATALOGS)}"
        )
    directory, reader = DATASET_CATALOGS[name]
    folder = Path(data_dir or default_data_dir()) / directory
    if not folder.is_dir():
        raise CatalogError(f"{name}: {folder} not found")
    try:
        return reader(folder)
    except (OSError, UnicodeDecodeError) as err:
        raise CatalogError(f"{name}: unreadable catalog files ({type(err).__name__}: {err})") from None


# --------------------------------------------------------------------------------------------------
# Catalog -> item vectors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogInitConfig:
    """How catalog facts become vectors: one random direction per attribute value, summed per item."""

    # Weight of each field's direction; fields not named get ``default_weight``. Measured on jdata2016
    # (centralized RIB, seeds 0-2, Recall@20): these defaults 0.676 / 0.659 / 0.668, brand 1 + category 0.5
    # 0.674 / 0.666 / 0.672, a random init 0.582 / 0.620 / 0.637, Word2vec 0.689 / 0.677 / 0.684.
    field_weights: Mapping[str, float] | None = None
    default_weight: float = 1.0
    item_weight: float = 0.5  # an item's own random direction, so items of one brand stay distinguishable
    seed: int = 0

    def weight(self, field_name: str) -> float:
        """This field's weight."""
        if self.field_weights and field_name in self.field_weights:
            return float(self.field_weights[field_name])
        return self.default_weight


def catalog_item_vectors(
    item_ids: Sequence[str], catalog: ItemCatalog, dim: int, config: CatalogInitConfig | None = None
) -> ItemVectors:
    """Vectors for a vocabulary (row i = ``item_ids[i - 1]``; row 0 is padding); items the catalog lacks are absent."""
    config = config or CatalogInitConfig()
    if dim < 1:
        raise CatalogError(f"vector size must be >= 1, got {dim}")
    rng = np.random.default_rng(config.seed)
    vectors = np.zeros((len(item_ids) + 1, dim), dtype=np.float32)
    present = np.zeros(len(item_ids) + 1, dtype=bool)
    rows = [(i, catalog.attributes.get(str(item))) for i, item in enumerate(item_ids, start=1)]
    for column, field_name in enumerate(catalog.fields):
        weight = config.weight(field_name)
        values = sorted(
            {attrs[column] for _, attrs in rows if attrs is not None and attrs[column] is not None}
        )
        # Sorted values and a seeded draw: a value's direction does not depend on the order of the items.
        directions = dict(zip(values, rng.standard_normal((len(values), dim)), strict=True))
        for i, attrs in rows:
            if attrs is not None and attrs[column] is not None:
                vectors[i] += weight * directions[attrs[column]]
                present[i] = True
    own = rng.standard_normal((len(item_ids) + 1, dim))
    vectors[present] += config.item_weight * own[present]
    return ItemVectors(vectors, present)


def check_covers(catalog: ItemCatalog, item_ids: Sequence[str], source: str) -> None:
    """CatalogError when ``catalog`` gives no attribute to any of ``item_ids`` (another shop's, other ids)."""
    if not any(
        any(value is not None for value in catalog.attributes.get(str(item), ())) for item in item_ids
    ):
        raise CatalogError(
            f"{source} describes none of the {len(item_ids)} items (are the item ids the same?)"
        )


def catalog_file_vectors(path: str | Path, item_ids: Sequence[str], dim: int, seed: int = 0) -> ItemVectors:
    """``catalog_item_vectors`` of a catalog file with the default weights; CatalogError if it covers no item."""
    catalog = read_catalog(path)
    check_covers(catalog, item_ids, str(path))
    return catalog_item_vectors(item_ids, catalog, dim, CatalogInitConfig(seed=seed))
