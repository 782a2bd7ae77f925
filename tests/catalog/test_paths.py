"""Catalog paths: any local name, valid UTF-8 or not, round-trips through the catalog form."""
import os

from hypothesis import given, strategies as st

from castlib.catalog.paths import from_catalog, subtree_range, to_catalog

names = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b)


@given(st.lists(names, min_size=1, max_size=4))
def test_round_trip_of_any_byte_name(parts):
    path = os.fsdecode(b"/".join(parts))
    stored = to_catalog(path)
    stored.encode("utf-8")          # storable as text in SQLite and PostgreSQL
    assert from_catalog(stored) == path
    assert stored.count("/") == path.count("/")


def test_plain_names_are_stored_unchanged():
    assert to_catalog("run1/cdr01001-000123.dat") == "run1/cdr01001-000123.dat"


def test_percent_and_raw_bytes_are_escaped():
    assert to_catalog("100%") == "100%25"
    assert to_catalog(os.fsdecode(b"caf\xe9")) == "caf%E9"
    assert from_catalog("caf%E9") == os.fsdecode(b"caf\xe9")


def test_subtree_range_selects_children_only():
    low, high = subtree_range("a/b")
    inside = ["a/b/c", "a/b/c/d", "a/b/-x"]
    outside = ["a/b", "a/bc", "a/b-c", "a/b0", "a/c"]
    assert all(low <= p < high for p in inside)
    assert not any(low <= p < high for p in outside)
