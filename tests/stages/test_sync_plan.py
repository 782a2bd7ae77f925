"""make_plan and plan_hard_links, the sync's pure decisions, on Difference objects built by
hand: what each kind of difference becomes, with and without --delete, --no-replace,
--max-delete, links and hard links. (Whole syncs against real storage: test_sync*.py.)"""
from __future__ import annotations

import pytest

from castlib.backends.base import DIR, FILE, LINK
from castlib.catalog import Difference
from castlib.catalog.records import Side
from castlib.errors import SafetyRefusal
from castlib.stages.diff import DiffResult
from castlib.stages.sync import make_plan, plan_hard_links


def file(size=3, checksum="abc", corrupted=False, mtime_ns=10**18) -> Side:
    return Side(FILE, size, mtime_ns, checksum, None, 0o644, corrupted)


def folder() -> Side:
    return Side(DIR, None, 10**18, None, None, 0o755)


def link(target="t") -> Side:
    return Side(LINK, None, 10**18, None, target, None)


def diff(*differences: Difference) -> DiffResult:
    return DiffResult(ref=None, dst=None, algorithm="adler32", mtime_tolerance_ns=None,
                      differences=list(differences))


def plan_of(*differences, delete=False, replace=True, dst_symlinks=True, unlisted_ref=()):
    return make_plan(diff(*differences), delete=delete, replace=replace,
                     dst_symlinks=dst_symlinks, unlisted_ref=list(unlisted_ref))


def paths(ds) -> list[str]:
    return [d.path for d in ds]


def test_missing_entries_are_created_by_kind_folders_in_order():
    plan = plan_of(Difference("b/f", "missing", file(), None),
                   Difference("b", "missing", folder(), None),
                   Difference("a", "missing", folder(), None),
                   Difference("l", "missing", link(), None))
    assert paths(plan.mkdirs) == ["a", "b"]   # parents before children
    assert paths(plan.copies) == ["b/f"]
    assert paths(plan.links) == ["l"]
    assert plan.deletion_count == 0


def test_a_link_on_a_destination_without_links_is_skipped_with_a_reason():
    plan = plan_of(Difference("l", "missing", link(), None), dst_symlinks=False)
    assert plan.links == []
    assert [(d.path, why) for d, why in plan.skipped] == [
        ("l", "symbolic link: the destination cannot hold links")]


@pytest.mark.parametrize("kind", ["size", "checksum", "corrupted"])
def test_content_differences_are_replaced_or_kept_with_no_replace(kind):
    d = Difference("f", kind, file(), file(size=4, checksum="def"))
    assert paths(plan_of(d).replaces) == ["f"]
    kept = plan_of(d, replace=False)
    assert kept.replaces == [] and paths(kept.kept) == ["f"]


def test_mtime_and_mode_differences_touch_no_bytes():
    plan = plan_of(Difference("m", "mtime", file(), file(mtime_ns=5)),
                   Difference("p", "mode", file(), file()))
    assert paths(plan.mtime_checks) == ["m"] and paths(plan.modes) == ["p"]
    assert plan.copies == plan.replaces == []


def test_extras_are_kept_without_delete_and_deleted_children_first_with_it():
    extras = [Difference("x", "extra", None, folder()),
              Difference("x/y", "extra", None, folder()),
              Difference("x/y/f", "extra", None, file())]
    assert paths(plan_of(*extras).extras_kept) == ["x", "x/y", "x/y/f"]
    plan = plan_of(*extras, delete=True)
    assert paths(plan.deletes) == ["x/y/f", "x/y", "x"]
    assert plan.deletion_count == 3


def test_max_delete_refuses_the_plan_beyond_its_count_of_deletions():
    plan = plan_of(Difference("a", "extra", None, file()),
                   Difference("d", "type", file(), folder()),
                   Difference("d/inside", "extra", None, file()), delete=True)
    assert plan.deletion_count == 3   # the extra, the clash and what is below it
    plan.refuse_deletions_beyond(None)
    plan.refuse_deletions_beyond(3)
    with pytest.raises(SafetyRefusal, match="would delete 3 entries, more than --max-delete 2"):
        plan.refuse_deletions_beyond(2)


def test_a_corrupted_reference_file_is_never_copied():
    rotten = file(corrupted=True)
    plan = plan_of(Difference("new", "missing", rotten, None),
                   Difference("old", "checksum", rotten, file(checksum="good")))
    assert paths(plan.corrupt_refs) == ["new", "old"]
    assert plan.copies == plan.replaces == []


def test_a_type_clash_without_delete_is_a_conflict_and_blocks_its_subtree():
    plan = plan_of(Difference("d", "type", file(), folder()),
                   Difference("d/x", "missing", file(), None),
                   Difference("d/old", "extra", None, file()))
    assert paths(plan.conflicts) == ["d"]
    assert [(d.path, why) for d, why in plan.skipped] == [("d/x", "below a type conflict")]
    assert paths(plan.extras_kept) == ["d/old"]
    assert plan.deletion_count == 0 and plan.copies == []


def test_a_type_clash_with_delete_clears_the_destination_then_creates_the_reference():
    plan = plan_of(Difference("d", "type", file(), folder()),
                   Difference("d/old", "extra", None, file()),
                   Difference("e", "type", folder(), file()), delete=True)
    assert paths(plan.clear_first) == ["e", "d/old", "d"]   # children before parents
    assert paths(plan.copies) == ["d"] and paths(plan.mkdirs) == ["e"]


def test_a_link_pointing_elsewhere_is_replaced_or_kept():
    d = Difference("l", "type", link("new"), link("old"))
    plan = plan_of(d)   # no --delete needed: a link is replaced like a file's content
    assert paths(plan.clear_first) == ["l"] and paths(plan.links) == ["l"]
    kept = plan_of(d, replace=False)
    assert paths(kept.kept) == ["l"] and kept.clear_first == kept.links == []


def test_nothing_below_a_reference_folder_that_could_not_be_listed_is_deleted():
    plan = plan_of(Difference("closed/f", "extra", None, file()),
                   Difference("closed", "type", folder(), file()),
                   Difference("closed/new", "missing", file(), None),
                   Difference("closedness", "extra", None, file()),   # not below "closed"
                   delete=True, unlisted_ref=["closed"])
    assert sorted(d.path for d, _ in plan.skipped) == ["closed", "closed/f"]
    assert {why for _, why in plan.skipped} == {"the reference could not list this folder"}
    assert paths(plan.deletes) == ["closedness"] and plan.clear_first == []
    assert paths(plan.copies) == ["closed/new"]


# -- hard links ---------------------------------------------------------------------------
def test_names_of_one_reference_file_are_linked_to_the_first_copied():
    differences = [Difference(p, "missing", file(), None) for p in ("a", "b", "c")]
    plan = make_plan(diff(*differences), delete=False, replace=True, dst_symlinks=True)
    jobs = plan_hard_links(plan, differences, {(1, 7): ["c", "a", "b"]}, set(),
                           dst_inode=lambda path: pytest.fail("nothing is on the destination"))
    assert [(d.path, path, leader) for d, path, leader in jobs] == [("b", "b", "a"),
                                                                    ("c", "c", "a")]
    assert paths(plan.copies) == ["a"]   # copied once, linked twice


def test_a_name_already_right_on_the_destination_leads_and_stray_copies_are_relinked():
    differences = [Difference("new", "missing", file(), None)]
    plan = make_plan(diff(*differences), delete=False, replace=True, dst_symlinks=True)
    inodes = {"a": 1, "b": 2}   # right in content, but two files, not one
    jobs = plan_hard_links(plan, differences, {(1, 7): ["a", "b", "new"]}, set(), inodes.get)
    assert [(d and d.path, path, leader) for d, path, leader in jobs] == [
        (None, "b", "a"), ("new", "new", "a")]
    assert plan.copies == []


def test_names_already_linked_are_left_alone_and_failed_or_kept_names_never_lead():
    differences = [Difference("a", "size", file(), file(size=1))]
    plan = make_plan(diff(*differences), delete=False, replace=False, dst_symlinks=True)
    assert paths(plan.kept) == ["a"]   # --no-replace: a is wrong and stays so
    jobs = plan_hard_links(plan, differences, {(1, 7): ["a", "b", "c"]}, {"c"},
                           dst_inode=lambda path: 5)
    assert jobs == []   # b leads (a kept, c failed); nothing else is usable to link to b
    linked = {"x": 9, "y": 9}   # one file under two names already
    assert plan_hard_links(plan, differences, {(1, 9): ["x", "y"]}, set(), linked.get) == []
    assert plan_hard_links(plan, differences, {(1, 8): ["only"]}, set(), lambda p: 1) == []
