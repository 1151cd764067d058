"""ActivityMapping: TOML files, inference from data, and applying it without losing rows silently."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.schema import ActivityVocabulary, SchemaError
from model.data.mapping import ActivityMapping, looks_like_conversion

GOOD_TOML = """
drop = ["remove_cart"]
conversions = ["Cart", "Order"]
[actions]
pv = "View"
detail = "View"
cart = "Cart"
buy = "Order"
"""


def write(tmp_path, text: str | bytes, name: str = "mapping.toml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_from_toml_builds_vocabulary_in_first_appearance_order(tmp_path):
    mapping = ActivityMapping.from_toml(write(tmp_path, GOOD_TOML))
    assert mapping.activities == ("View", "Cart", "Order")
    assert mapping.drop == frozenset({"remove_cart"})
    vocab = mapping.vocabulary()
    assert isinstance(vocab, ActivityVocabulary)
    assert vocab.names == ("View", "Cart", "Order")
    assert vocab.conversions == frozenset({"Cart", "Order"})
    assert mapping.activity_of("detail") == "View"
    assert mapping.activity_of("remove_cart") is None


def test_round_trip_through_dict(tmp_path):
    mapping = ActivityMapping.from_toml(write(tmp_path, GOOD_TOML))
    assert ActivityMapping.from_dict(mapping.to_dict()) == mapping
    assert hash(ActivityMapping.from_dict(mapping.to_dict())) == hash(mapping)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[actions\npv = 'View'", "not valid TOML"),
        ("conversions = ['Cart']\n[actions]\npv = 'View'", "conversions ['Cart'] name no activity"),
        ("drop = ['pv']\n[actions]\npv = 'View'", "both mapped and dropped"),
        ("[actions]\npv = 3", "values must be strings"),
        ("drop = 'pv'\n[actions]\nbuy = 'Order'", "'drop' must be a list of strings"),
        ("conversions = [1]\n[actions]\nbuy = 'Order'", "'conversions' must be a list of strings"),
        ("drop = ['x']", "non-empty [actions]"),
        ("[actions]", "non-empty [actions]"),
        ("action = {pv = 'View'}", "unknown key(s) ['action']"),
        ("[actions]\npv = ''", "non-empty strings"),
    ],
)
def test_bad_toml_files_raise_clear_schema_errors(tmp_path, text, message):
    with pytest.raises(SchemaError, match="bad_mapping") as err:
        ActivityMapping.from_toml(write(tmp_path, text))
    assert message in str(err.value)


def test_missing_and_non_utf8_mapping_files(tmp_path):
    with pytest.raises(SchemaError, match="cannot read mapping file"):
        ActivityMapping.from_toml(tmp_path / "nope.toml")
    with pytest.raises(SchemaError, match="not UTF-8"):
        ActivityMapping.from_toml(write(tmp_path, b"[actions]\npv = '\xff'"))


def test_infer_orders_by_frequency_then_name_and_detects_conversions():
    actions = ["pv"] * 5 + ["cart"] * 2 + ["fav"] * 2 + ["buy"] + ["remove_cart"]
    mapping = ActivityMapping.infer(actions)
    assert mapping.activities == ("pv", "cart", "fav", "buy", "remove_cart")
    assert mapping.conversions == frozenset({"cart", "buy"})
    assert all(mapping.activity_of(a) == a for a in set(actions))


@pytest.mark.parametrize(
    "name",
    [
        "cart",
        "add_cart",
        "carts",
        "orders",
        "Order",
        "buy",
        "Purchase",
        "clickout item",
        "checkout",
        "add-to-cart",
    ],
)
def test_conversion_names(name):
    assert looks_like_conversion(name)


@pytest.mark.parametrize(
    "name",
    # Cart2Product: RIB's page entry from the cart page (what `data extract` writes), not a conversion.
    ["pv", "view", "remove_cart", "delete order", "cartoon", "border", "buyer_view", "click", "Cart2Product"],
)
def test_non_conversion_names(name):
    assert not looks_like_conversion(name)


def test_apply_drops_and_counts_and_keeps_the_rest(tmp_path):
    mapping = ActivityMapping.from_toml(write(tmp_path, GOOD_TOML))
    frame = pd.DataFrame({"action": ["pv", "cart", "remove_cart", "buy", None, "remove_cart"], "x": range(6)})
    out, report = mapping.apply(frame)
    assert list(out["activity"]) == ["View", "Cart", "Order"]
    assert list(out["x"]) == [0, 1, 3]
    assert report.read == 6 and report.kept == 3
    assert report.skipped == {"dropped_action": 2, "missing_field": 1}


def test_apply_refuses_unmapped_actions_and_names_them(tmp_path):
    mapping = ActivityMapping.from_toml(write(tmp_path, GOOD_TOML))
    frame = pd.DataFrame({"action": ["pv", "fav", "fav", "share"]})
    with pytest.raises(SchemaError, match="unmapped_action") as err:
        mapping.apply(frame)
    assert "'fav' (2 rows)" in str(err.value) and "'share' (1 rows)" in str(err.value)


def test_glob_patterns_map_families_and_exact_keys_win():
    mapping = ActivityMapping(
        actions={"click:0": "HomeClick", "click:*": "Click", "browse": "View"},
        drop=frozenset({"remove_*"}),
    )
    frame = pd.DataFrame({"action": ["click:0", "click:216", "browse", "remove_cart"]})
    out, report = mapping.apply(frame)
    assert list(out["activity"]) == ["HomeClick", "Click", "View"]
    assert report.skipped == {"dropped_action": 1}
    assert mapping.vocabulary().names == ("HomeClick", "Click", "View")


def test_explicit_activity_order_must_cover_every_mapped_name():
    mapping = ActivityMapping(actions={"a": "A", "b": "B"}, activities=("B", "A", "Unused"))
    assert mapping.vocabulary().names == ("B", "A", "Unused")
    with pytest.raises(SchemaError, match="missing from the order"):
        ActivityMapping(actions={"a": "A", "b": "B"}, activities=("A",))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet="abcdef_:", min_size=1, max_size=8), min_size=1, max_size=40))
def test_inferred_mapping_keeps_every_row(actions):
    mapping = ActivityMapping.infer(actions)
    out, report = mapping.apply(pd.DataFrame({"action": actions}))
    assert list(out["activity"]) == actions
    assert report.kept == len(actions) and report.n_skipped == 0
