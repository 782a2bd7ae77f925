"""sync: make a destination match its reference, copying and verifying every byte written."""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Callable, Iterator

from ..backends.base import DIR, FILE, KIND_NAMES, LINK, Stat
from ..catalog import Difference
from ..catalog.locks import location_lock, lock_covered
from ..catalog.paths import from_catalog, parent_of, to_catalog
from ..errors import (ConfigError, NotFound, SafetyRefusal, SourceChanged, StorageError,
                      Unsupported, VerificationFailed, interruptions_held)
from ..progress import human_bytes
from ..transfer import FileCopy, copy_file, copy_files_together, temp_path, with_retries
from ..options import Cli
from .base import LazyParams, Seconds, Stage, StageOutcome
from .diff import DiffResult

RECORD_BATCH = 500
# Small files are copied a few at once where the destination writes files together
# (Backend.writes_files_together): up to GROUP_FILES of up to SMALL_FILE bytes each, and
# GROUP_BYTES in all (each is held in memory whole, by each transfer thread).
SMALL_FILE = 64 * 1024
GROUP_FILES = 32
GROUP_BYTES = 1024 * 1024


def _params():
    """The pydantic model of the parameters, built on first use (Stage.Params)."""
    from pydantic import Field

    from .base import StageParams

    class SyncParams(StageParams):
        from_: str = Field(alias="from", description="id of the diff stage whose differences to fix")
        delete: bool = Field(False, description="delete entries the reference does not have")
        max_delete: Annotated[int, Cli(metavar="N")] | None = Field(
            None, ge=0, description="refuse to run if more deletions than this would be needed")
        replace: bool = Field(True, description="replace destination files whose content differs "
                                                "(--no-replace: keep them)")
        transfers: int | None = Field(None, ge=1, le=256, description="files copied in parallel "
                                      "(default: 8 to or from SFTP, else 4)")
        retries: int = Field(3, ge=0, le=20, description="retries of a transient failure, with backoff")
        stage_timeout: Seconds = Field(3600, gt=0, description="seconds to wait for tape recalls")
        dry_run: bool = Field(False, description="print what would be done, change nothing")
        lock_wait: Seconds = Field(0, ge=0, description="seconds to wait for another sync into the "
                                                        "same destination to finish (default: "
                                                        "refuse at once)")
        owner: bool = Field(False, description="give entries the reference's owner and group "
                                               "(as rsync -o -g; local destinations, as root)")
        hard_links: bool = Field(False, description="files that are one file under several names in "
                                 "the reference are linked so on the destination (as rsync -H), "
                                 "instead of copied once per name")

    return SyncParams


@dataclass
class TransferPlan:
    """What a sync will do, decided from the differences before anything is touched."""

    clear_first: list[Difference] = field(default_factory=list)  # removed to resolve type clashes
    mkdirs: list[Difference] = field(default_factory=list)
    copies: list[Difference] = field(default_factory=list)
    replaces: list[Difference] = field(default_factory=list)
    mtime_checks: list[Difference] = field(default_factory=list)  # same size, other mtime
    modes: list[Difference] = field(default_factory=list)         # permission bits only
    links: list[Difference] = field(default_factory=list)
    deletes: list[Difference] = field(default_factory=list)
    kept: list[Difference] = field(default_factory=list)          # differ, but --no-replace
    extras_kept: list[Difference] = field(default_factory=list)   # extra, but no --delete
    conflicts: list[Difference] = field(default_factory=list)     # type clash, no --delete
    skipped: list[tuple[Difference, str]] = field(default_factory=list)
    corrupt_refs: list[Difference] = field(default_factory=list)  # never copied: rotten source

    @property
    def deletion_count(self) -> int:
        return len(self.deletes) + len(self.clear_first)

    def refuse_deletions_beyond(self, max_delete: int | None) -> None:
        """--max-delete: refuse the whole plan, before anything is touched."""
        if max_delete is not None and self.deletion_count > max_delete:
            raise SafetyRefusal(
                f"sync would delete {self.deletion_count} entries, more than --max-delete "
                f"{max_delete}; nothing was changed")


def make_plan(diff: DiffResult, *, delete: bool, replace: bool, dst_symlinks: bool,
              unlisted_ref: list[str] = (), dst_empty_dirs: bool = True) -> TransferPlan:
    """What to do about each difference. `unlisted_ref`: catalog paths of reference folders
    this run could not list; nothing below them is deleted or replaced on the word of a
    listing that never looked there. `dst_empty_dirs` False (an object store): no folder
    is made; one with entries to copy comes with them, an empty one is skipped (counted,
    not a failure: such a destination cannot hold it)."""
    plan = TransferPlan()
    clashes = [d.path for d in diff.differences if d.kind == "type"]
    clash_prefixes = tuple(p + "/" for p in clashes)
    unlisted = tuple(unlisted_ref)
    unlisted_prefixes = tuple(p + "/" for p in unlisted)
    for d in diff.differences:
        if unlisted and d.kind in ("extra", "type") and (
                d.path in unlisted or d.path.startswith(unlisted_prefixes)):
            plan.skipped.append((d, "the reference could not list this folder"))
            continue
        if d.ref is not None and d.ref.corrupted and d.ref.kind == FILE:
            # verify found the reference's bytes other than catalogued: a copy would
            # spread the rot (and over a good destination file, with replace)
            plan.corrupt_refs.append(d)
            continue
        below_clash = bool(clash_prefixes) and d.path.startswith(clash_prefixes)
        if d.kind == "extra":
            if below_clash and delete:
                plan.clear_first.append(d)
            elif delete:
                plan.deletes.append(d)
            else:
                plan.extras_kept.append(d)
            continue
        if below_clash and not delete:
            plan.skipped.append((d, "below a type conflict"))
            continue
        if d.kind == "type":
            if d.ref.kind == LINK and d.dst.kind == LINK:   # link pointing elsewhere
                if replace:
                    plan.clear_first.append(d)
                    plan.links.append(d)
                else:
                    plan.kept.append(d)
                continue
            if not delete:
                plan.conflicts.append(d)
                continue
            plan.clear_first.append(d)
            _plan_create(plan, d, dst_symlinks)
        elif d.kind == "missing":
            _plan_create(plan, d, dst_symlinks)
        elif d.kind in ("size", "checksum", "corrupted"):   # corrupted: the destination
            (plan.replaces if replace else plan.kept).append(d)
        elif d.kind == "mtime":
            plan.mtime_checks.append(d)
        elif d.kind == "mode":
            plan.modes.append(d)
    if not dst_empty_dirs and plan.mkdirs:
        _leave_folders_to_their_content(plan)
    plan.mkdirs.sort(key=lambda d: d.path)
    # children before parents, so folders are empty when their turn comes
    plan.deletes.sort(key=lambda d: d.path, reverse=True)
    plan.clear_first.sort(key=lambda d: d.path, reverse=True)
    return plan


_EMPTY_FOLDER = "empty folder"


def _leave_folders_to_their_content(plan: TransferPlan) -> None:
    """A destination without folders of its own (S3) has a folder exactly when it has an
    entry below it: folders the copies fill are left to them, empty ones are skipped. A
    marker object ("folder/") would keep those, but other tools read such markers each
    their own way, and it would cost a request a folder on every sync: castlib keeps the
    files, and says which empty folders it could not keep."""
    filled: set[str] = set()
    for d in plan.copies + plan.links:
        parent = d.path.rpartition("/")[0]
        while parent and parent not in filled:
            filled.add(parent)
            parent = parent.rpartition("/")[0]
    for d in plan.mkdirs:
        if d.path not in filled:
            plan.skipped.append((d, _EMPTY_FOLDER + ": the destination keeps no folders "
                                    "of its own (an object store)"))
    plan.mkdirs = []


def plan_hard_links(plan: TransferPlan, differences: list[Difference],
                    ref_groups: dict, failed_paths: set[str],
                    dst_inode: Callable[[str], object]) -> list[tuple[Difference | None, str, str]]:
    """(difference or None, path, leader): names of one reference file that become
    links to one of them (the leader) on the destination instead of copies. The leader
    is a name already right on the destination, else the first one copied; names right
    in content but not linked to it are re-linked (None)."""
    writes = {d.path: d for d in plan.copies + plan.replaces}
    unusable = {d.path for d in differences
                if d.kind in ("missing", "type", "size", "checksum")}
    unusable |= {d.path for d in plan.kept} | failed_paths
    jobs: list[tuple[Difference | None, str, str]] = []
    linked: set[str] = set()
    for paths in ref_groups.values():
        if len(paths) < 2:
            continue
        paths = sorted(paths)
        good = [p for p in paths if p not in writes and p not in unusable]
        leader = good[0] if good else next((p for p in paths if p in writes), None)
        if leader is None:
            continue
        leader_inode = dst_inode(leader) if good else None
        for path in paths:
            if path == leader:
                continue
            if path in writes:
                jobs.append((writes[path], path, leader))
                linked.add(path)
            elif path in good and (leader_inode is None
                                   or dst_inode(path) != leader_inode):
                jobs.append((None, path, leader))
    if linked:
        plan.copies = [d for d in plan.copies if d.path not in linked]
        plan.replaces = [d for d in plan.replaces if d.path not in linked]
    return jobs


# the lists of a TransferPlan that hold things to do
_PLAN_LISTS = ("clear_first", "mkdirs", "copies", "replaces", "mtime_checks", "modes", "links",
               "deletes")


def _planned(plan: TransferPlan, mtimes_to_set: list[Difference]) -> Iterator[Difference]:
    """Every difference the plan will act on at the destination."""
    for name in _PLAN_LISTS:
        yield from getattr(plan, name)
    yield from mtimes_to_set


def _plan_create(plan: TransferPlan, d: Difference, dst_symlinks: bool) -> None:
    if d.ref.kind == DIR:
        plan.mkdirs.append(d)
    elif d.ref.kind == FILE:
        plan.copies.append(d)
    elif dst_symlinks:
        plan.links.append(d)
    else:
        plan.skipped.append((d, "symbolic link: the destination cannot hold links"))


def _check_published(path: str, final, size: int | None) -> None:
    """What the destination holds under the final name once the verified copy was renamed
    there: that file, or the copy failed. A rename a server carried out elsewhere (WsgiDAV
    cut a MOVE's destination at a '?' of the location's folder) said nothing, and the
    catalog would have recorded a file that is not there."""
    if final is None:
        raise VerificationFailed("renamed into place, yet nothing is under its name: the "
                                 "destination put it elsewhere or lost it", path=path)
    if final.kind != FILE or (size is not None and final.size != size):
        what = KIND_NAMES.get(final.kind, final.kind) if final.kind != FILE else \
            f"{final.size} bytes"
        raise VerificationFailed(f"renamed into place, yet its name holds {what}, not the "
                                 f"{size} bytes verified", path=path)


class SyncStage(Stage):
    name = "sync"
    description = "make the destination match the reference of a diff, verifying every copy"
    Params = LazyParams(_params)
    reads_results = {"from_": ("diff",)}

    def run(self) -> StageOutcome:
        p: SyncParams = self.params
        ctx = self.context
        diff: DiffResult = ctx.result(p.from_, DiffResult)
        self.src, self.dst = ctx.backend(diff.ref), ctx.backend(diff.dst)
        _refuse_overlap(self.src, self.dst)
        self.diff = diff
        self.algo = diff.algorithm
        self.temp_key = self.dst.temp_key   # the catalog's (RunContext.backend)
        # files copied at once: the user's number, else the larger of the two ends' own
        self.transfers = p.transfers or max(self.src.default_transfers,
                                            self.dst.default_transfers)
        self.perms = diff.perms   # the diff compared modes: the sync sets them
        self.mtimes_to_set = list(diff.mtimes_to_set)   # less what _keep_out_of_links drops
        self.walled: tuple[str, ...] = ()   # "folder/" of each folder that is no folder now
        ref_index = ctx.listing(diff.ref)
        _refuse_unknown_reference(diff.ref, ref_index)
        if p.owner and not self.dst.capabilities.owner:
            raise ConfigError(f"{diff.dst.record.url} cannot take owners (a local destination "
                              "can, when castlib runs as root)", key="owner")
        self.hard_links = (p.hard_links and self.src.capabilities.hard_links
                           and self.dst.capabilities.hard_links)   # else each name is copied
        if self.hard_links and ref_index is None:
            raise ConfigError("hard links are found while listing the reference: list it in "
                              "the same run (not --index none)", key="hard_links")
        self.ref_groups = ref_index.hard_links if ref_index is not None else {}
        plan = make_plan(diff, delete=p.delete, replace=p.replace,
                         dst_symlinks=self.dst.capabilities.symlinks,
                         dst_empty_dirs=self.dst.capabilities.empty_dirs,
                         unlisted_ref=[to_catalog(u) for u in
                                       (ref_index.unlisted if ref_index is not None else [])])
        plan.refuse_deletions_beyond(p.max_delete)
        self.counts = dict.fromkeys(
            ("copied", "replaced", "deleted", "failed", "bytes", "dirs_created", "links_created",
             "hard_links_created", "mtime_fixed", "mode_fixed", "owner_fixed", "kept",
             "extras_kept", "conflicts", "skipped", "temp_removed", "changed_during_copy",
             "ref_corrupted", "mtime_skipped", "mode_skipped"), 0)
        # what the destination's server refused although its protocol promised it: said
        # once in the summary, {what: count}; those entries stay differences
        self.refused: dict[str, int] = {}
        self.mtime_promised = self.dst.capabilities.set_mtime
        self.errors: list[str] = []
        self.failed_paths: set[str] = set()
        self.touched: set[str] = set()   # folders this run wrote into: their mtimes moved
        self.meta_rows: list[tuple[str, int | None, int | None]] = []
        self.dst_rows: list[dict] = []
        self.ref_sums: list[tuple[str, str]] = []
        self.removed: list[str] = []
        c = self.counts
        c["kept"], c["extras_kept"] = len(plan.kept), len(plan.extras_kept)
        c["skipped"], c["conflicts"] = len(plan.skipped), len(plan.conflicts)
        self.empty_folders = sum(1 for _, why in plan.skipped if why.startswith(_EMPTY_FOLDER))
        # the kinds that clash, for the summary: "link vs file", not always "file vs folder"
        self.conflict_kinds: dict[str, int] = {}
        for d in plan.conflicts:
            pair = f"{_kind(d.ref)} vs {_kind(d.dst)}"
            self.conflict_kinds[pair] = self.conflict_kinds.get(pair, 0) + 1
            self._fail(d.path, f"type conflict: reference has a {_kind(d.ref)}, destination a "
                               f"{_kind(d.dst)}; use --delete to replace it")
        c["ref_corrupted"] = len(plan.corrupt_refs)
        for d in plan.corrupt_refs:
            self.errors.append(f"{d.path}: not copied: castlib verify found the reference's "
                               f"bytes corrupted; {_repair_hint(d)}")
        dst_index = ctx.listing(diff.dst)
        leftovers = dst_index.leftover_temp if dst_index is not None else []
        started = self.started = time.monotonic()
        if p.dry_run or ctx.dry_run:
            self._print_plan(plan, leftovers)
            return self._outcome(started, dry_run=True)
        if lock_covered(diff.dst.url, ctx.locked):  # held by the pipeline for the whole run
            self._execute(plan, leftovers, p)
        else:
            with location_lock(ctx.catalog, diff.dst.record.id, diff.dst.record.url, p.lock_wait):
                self._execute(plan, leftovers, p)
        return self._outcome(started)

    @classmethod
    def destinations(cls, params: SyncParams, earlier: dict) -> list[tuple[str, float]]:
        source = earlier.get(params.from_)
        if params.dry_run or source is None or not hasattr(source.params, "dst"):
            return []
        return [(source.params.dst, params.lock_wait)]

    @classmethod
    def connects_to(cls, params: SyncParams, earlier: dict) -> list[str]:
        source = earlier.get(params.from_)
        if params.dry_run or source is None or not hasattr(source.params, "dst"):
            return []
        return [source.params.ref, source.params.dst]

    def _execute(self, plan: TransferPlan, leftovers: list[str], p: SyncParams) -> None:
        c = self.counts
        # the transfer threads (_transfer, _settle_mtimes), and this one
        busy = min(self.transfers, max(len(plan.copies) + len(plan.replaces),
                                       len(plan.mtime_checks)))
        if busy:
            self.dst.sessions_needed(busy + 1)
            self.src.sessions_needed(busy + 1)
        if plan.mkdirs or plan.copies or plan.links:
            try:
                self.dst.mkdir("")   # a new destination: create its root
            except StorageError as exc:
                raise StorageError(f"cannot create destination {self.diff.dst.record.url}: {exc}")
        for path in leftovers:   # temporary files of an earlier, interrupted run
            self._touch(to_catalog(path))
            try:
                self.dst.delete(path)
                c["temp_removed"] += 1
            except NotFound:     # a run we waited for had it, and renamed or removed it
                pass
            except StorageError as exc:
                self.errors.append(f"{path}: cannot remove leftover temporary file: {exc}")
        if self.dst.capabilities_for(self.dst.url.scheme).symlinks:   # links can be there
            self._keep_out_of_links(plan)
        for d in plan.clear_first:
            self._delete(d)
        self._make_folders(plan)
        if plan.mtime_checks:
            self._settle_mtimes(plan)
        hard_links = self._plan_hard_links(plan) if self.hard_links else []
        self._transfer(plan.copies, plan.replaces, p)
        for d in plan.links:
            self._link(d)
        for job in hard_links:
            self._hard_link(*job)
        for d in plan.deletes:
            self._delete(d)
        self._record()
        # Last, as rsync does: permission bits and mtimes that writing the content moved
        # (a folder's mtime changes with each entry made or removed in it), deepest first.
        self._settle_metadata(plan)
        if p.owner:
            self._settle_owners()
        self.context.catalog.set_metadata(self.diff.dst.record.id, self.meta_rows)
        self.meta_rows = []

    def outcome_so_far(self) -> StageOutcome | None:
        """What an interrupted sync did: its copies (in the catalog by now) and errors."""
        if not hasattr(self, "started"):
            return None
        try:
            self._record()   # the copies an interruption left unrecorded
        finally:
            outcome = self._outcome(self.started)
        outcome.summary = "interrupted: " + outcome.summary
        return outcome

    # -- the destination as it is now -----------------------------------------------------
    def _keep_out_of_links(self, plan: TransferPlan) -> None:
        """Nothing is written through a link. The plan comes from the catalog; where the
        destination changed after it was listed (--index ref, or a change while the run
        went on), a folder the catalog has may be a symbolic link now, and a file written
        below it would land wherever the link points, outside the destination; a chmod or
        an SFTP set-stat of a file that is a link now would change the link's target.

        So, before anything is done: every folder the plan writes in that the catalog has
        (each one above a planned entry) and every entry whose metadata alone it sets is
        looked at (Backend.stat_many: lstat; over SFTP up to 1,000 in one round trip); the
        folders the plan makes are looked at as they are made (_make_folders). A first
        copy into an empty destination looks at nothing more.
        A folder that is something else now, or such an entry of another kind than the
        catalog has, is left alone with all the plan had below it, each counted failed,
        one line per place: the catalog is stale there, and the next listing corrects it."""
        expected: dict[str, int] = {}   # catalog path -> the kind it must have, if there
        for d in plan.mtime_checks + plan.modes + self.mtimes_to_set:
            if d.dst is not None:
                expected[d.path] = d.dst.kind
        made = {d.path for d in plan.mkdirs}   # looked at as they are made (_make_folders)
        for d in _planned(plan, self.mtimes_to_set):
            parent = parent_of(d.path)
            while parent and parent not in made and expected.get(parent) != DIR:
                expected[parent] = DIR
                parent = parent_of(parent)
        wrong: dict[str, tuple[int, int]] = {}
        for storage, st in self.dst.stat_many([from_catalog(p) for p in sorted(expected)]):
            path = to_catalog(storage)
            if isinstance(st, Stat) and st.kind != expected[path]:
                wrong[path] = (st.kind, expected[path])
        if wrong:
            self._wall_off(plan, wrong)

    def _wall_off(self, plan: TransferPlan, wrong: dict[str, tuple[int, int]]) -> None:
        """Drop from the plan each entry in `wrong` ({catalog path: (the kind found there,
        the kind wanted)}) and all below it; say so once for each."""
        for path in sorted(wrong):
            if not any(path.startswith(outer) for outer in self.walled):
                self.walled += (path + "/",)
        below: dict[str, set[str]] = {}   # each entry of `wrong`: the planned paths dropped

        def kept(differences: list[Difference]) -> list[Difference]:
            out = []
            for d in differences:
                top = self._walled_by(d.path, wrong)
                if top is None:
                    out.append(d)
                else:
                    below.setdefault(top, set()).add(d.path)
            return out

        for name in _PLAN_LISTS:
            setattr(plan, name, kept(getattr(plan, name)))
        self.mtimes_to_set = kept(self.mtimes_to_set)
        for top in sorted(wrong):
            paths = below.get(top, set())
            found, wanted = (KIND_NAMES.get(kind, "special file") for kind in wrong[top])
            if wanted != "folder":
                what = (f"a {found} on the destination now, not the {wanted} the catalog "
                        "has: left alone")
            else:
                what = (f"a {found} on the destination now, not a folder: "
                        f"{len(paths - {top})} planned entries below it left alone")
            self._fail(top, what + " (the catalog is stale here: list the destination "
                       "again, e.g. castlib index DST)")
            self.counts["failed"] += len(paths) - 1
            self.failed_paths |= paths

    def _walled_by(self, path: str, wrong: dict) -> str | None:
        """The entry of `wrong` that is `path` or a folder above it, if any."""
        probe = path
        while probe:
            if probe in wrong:
                return probe
            probe = parent_of(probe)
        return None

    def _outside(self, path: str) -> bool:
        """Whether `path` lies below a folder found to be no folder (_keep_out_of_links)."""
        return bool(self.walled) and path.startswith(self.walled)

    # -- actions ---------------------------------------------------------------------------
    def _make_folders(self, plan: TransferPlan) -> None:
        """The missing folders, a parent before its content (Backend.make_folders: over
        SFTP, a depth's together). A folder that is no folder once made (a link made
        meanwhile) is walled off as _keep_out_of_links does."""
        wanted = {}
        for d in plan.mkdirs:
            self._touch(d.path)
            wanted[from_catalog(d.path)] = d
        todo = list(wanted)
        while todo:
            answered = set()
            for path, made in self.dst.make_folders(todo):
                answered.add(path)
                d = wanted[path]
                if isinstance(made, StorageError):
                    self._fail(d.path, f"cannot create folder: {made}")
                    continue
                if made is not None and made.kind != DIR:   # a link there, unknown to the
                    self._wall_off(plan, {d.path: (made.kind, DIR)})   # catalog: no deeper
                    break
                self.counts["dirs_created"] += 1
                self._remember(d.path, DIR, 0, made.mtime_ns if made else None, None, None,
                               made.mode if made else None)
            todo = [path for path in todo
                    if path not in answered and not self._outside(wanted[path].path)]

    def _refusal(self, what: str) -> None:
        """One entry the destination's server refused (links it cannot hold, mtimes or
        permission bits it cannot set): learned at the first refusal, counted, not a
        failure."""
        self.refused[what] = self.refused.get(what, 0) + 1
        self.counts[{"links": "skipped", "mtimes": "mtime_skipped",
                     "modes": "mode_skipped"}[what]] += 1

    def _before_owner(self, mode: int | None) -> int | None:
        """A file's bits to set before the owners' pass: with --owner, not its set-ID
        bits, which come with its owner (_settle_owners), as rsync sets them after its
        chown. Set before, on a file that is root's until then, a user's own
        set-user-ID program would be root's, for anyone to run, until that pass."""
        if mode is None or not self.params.owner:
            return mode
        return mode & ~0o6000

    def _set_mode(self, storage_path: str, mode: int) -> bool:
        """chmod, unless the server refuses permission bits (learned once, said once):
        False then. Any other error is raised."""
        if not self.dst.capabilities.permissions:
            self._refusal("modes")
            return False
        try:
            self.dst.chmod(storage_path, mode)
            return True
        except Unsupported:
            self._refusal("modes")
            return False

    def _link(self, d: Difference) -> None:
        self._touch(d.path)
        if not self.dst.capabilities.symlinks:   # the server refused an earlier one
            return self._refusal("links")
        try:
            self.dst.symlink(from_catalog(d.path), from_catalog(d.ref.link_target or ""))
            self.counts["links_created"] += 1
            if d.ref.mtime_ns is not None and self.dst.capabilities.link_mtimes:
                self.dst.set_mtime(from_catalog(d.path), d.ref.mtime_ns)   # the link's own
            st = self.dst.stat(from_catalog(d.path))
            self._remember(d.path, LINK, st.size if st else None, st.mtime_ns if st else None,
                           None, d.ref.link_target, st.mode if st else None)
        except Unsupported:
            self._refusal("links")
        except StorageError as exc:
            self._fail(d.path, f"cannot create link: {exc}")

    def _delete(self, d: Difference) -> None:
        self._touch(d.path)
        try:
            self.dst.delete(from_catalog(d.path))
            self.counts["deleted"] += 1
            self.removed.append(d.path)
        except StorageError as exc:
            self._fail(d.path, f"cannot delete: {exc}")

    def _settle_mtimes(self, plan: TransferPlan) -> None:
        """Same size, other mtime: the checksums decide between fixing the mtime and
        replacing the file; a checksum the catalog lacks is computed on that side."""
        algo = self.algo

        def compare(d: Difference):
            path = from_catalog(d.path)
            ref_sum = d.ref.checksum or self.src.checksum(path, algo)
            dst_sum = d.dst.checksum or self.dst.checksum(path, algo)
            return d, ref_sum, dst_sum

        with _pool(self.transfers) as pool:
            futures = [pool.submit(compare, d) for d in plan.mtime_checks]
            for fut in as_completed(futures):
                try:
                    d, ref_sum, dst_sum = fut.result()
                except StorageError as exc:
                    self._fail(getattr(exc, "path", None) or "?", f"cannot compare: {exc}")
                    continue
                if d.ref.checksum is None:
                    self.ref_sums.append((d.path, ref_sum))
                if ref_sum != dst_sum:
                    (plan.replaces if self.params.replace else plan.kept).append(d)
                    self.counts["kept"] += 0 if self.params.replace else 1
                    continue
                try:
                    if not self.dst.capabilities.set_mtime:   # refused earlier
                        raise Unsupported("cannot set modification times")
                    self.dst.set_mtime(from_catalog(d.path), d.ref.mtime_ns)
                    mode = d.dst.mode
                    if (self._mode_to_set(d) is not None
                            and self._set_mode(from_catalog(d.path),
                                               self._before_owner(d.ref.mode))):
                        mode = d.ref.mode
                    self.counts["mtime_fixed"] += 1
                    self._remember(d.path, FILE, d.dst.size, d.ref.mtime_ns, dst_sum, None,
                                   mode)
                except Unsupported:
                    self._refusal("mtimes")
                except StorageError as exc:
                    self._fail(d.path, f"cannot set mtime: {exc}")

    def _transfer(self, copies: list[Difference], replaces: list[Difference],
                  p: SyncParams) -> None:
        jobs = [(d, "copied") for d in copies] + [(d, "replaced") for d in replaces]
        if not jobs:
            return
        if self.src.capabilities.tape:
            try:
                self.src.stage([from_catalog(d.path) for d, _ in jobs], p.stage_timeout)
            except StorageError as exc:
                self.errors.append(f"staging from tape: {exc}")
        total = sum(d.ref.size or 0 for d, _ in jobs)
        for d, _ in jobs:   # even a failed copy made and removed a temporary file there
            self._touch(d.path)
        progress = self.context.progress("sync", len(jobs), total)
        ctx = self.context
        stop = threading.Event()   # set when the run is interrupted: no copy starts after it

        def on_bytes(n: int) -> None:
            if stop.is_set():       # a copy in flight: abandon it (its temporary file goes)
                raise _Stopped()
            progress.add_bytes(n)

        def attempt(d: Difference, path: str, finish, tmp: str | None):
            if stop.is_set():
                raise _Stopped()
            return copy_file(self.src, path, self.dst, path, algorithm=self.algo,
                             expected_size=d.ref.size, expected_checksum=d.ref.checksum,
                             mtime_ns=d.ref.mtime_ns, temp_key=self.temp_key,
                             on_bytes=on_bytes, before_rename=finish, tmp=tmp)

        def one(job, tmp: str, announce_next: Callable[[], None]):
            d, verb = job
            path = from_catalog(d.path)
            mode = self._before_owner(self._mode_to_set(d, new=True))
            names = [tmp]   # the first attempt's, announced; a retry's, a new one

            def finish(written: str) -> None:
                # the bits are set under the temporary name: a file never shows with others
                if mode is not None:
                    self._set_mode(written, mode)
                announce_next()   # (its open may go out with this copy's rename)

            result = with_retries(
                lambda: attempt(d, path, finish, names.pop() if names else None),
                retries=p.retries, backoff_s=ctx.retry_backoff_s, describe=path)
            # the copy is in place: a glitch now must not count it failed
            final = with_retries(lambda: self.dst.stat(path), retries=p.retries,
                                 backoff_s=ctx.retry_backoff_s, describe=path)
            _check_published(path, final, result.size)
            return d, verb, result, final

        def together(group: list[tuple[int, str]]) -> None:
            """Small files copied a few at once (copy_files_together); one that did not
            make it that way is copied again on its own, with its retries."""
            group = [(index, tmp) for index, tmp in group
                     if in_order[index].set_running_or_notify_cancel()]
            copies = []
            for index, tmp in group:
                d, _ = jobs[index]
                path = from_catalog(d.path)
                mode = self._before_owner(self._mode_to_set(d, new=True))
                copies.append(FileCopy(
                    path, path, tmp, d.ref.size, d.ref.checksum, d.ref.mtime_ns,
                    None if mode is None else
                    lambda written, mode=mode: self._set_mode(written, mode)))
            def stopping(_: int) -> None:   # (bytes are counted once a copy is done:
                if stop.is_set():            # one copied again is counted once)
                    raise _Stopped()

            try:
                outcomes = copy_files_together(self.src, self.dst, copies,
                                               algorithm=self.algo, on_bytes=stopping)
            except Exception as exc:  # noqa: BLE001 - each is copied on its own below
                outcomes = [exc] * len(copies)
            for (index, _), copy, outcome in zip(group, copies, outcomes):
                fut = in_order[index]
                try:
                    if isinstance(outcome, Exception):
                        if stop.is_set():
                            raise _Stopped()
                        if isinstance(outcome, SourceChanged):
                            # written to as it was read: left for the next run, as
                            # copy_file leaves it (read again, it would fail as changed
                            # since it was indexed, or go out as bytes nobody indexed)
                            raise outcome
                        fut.set_result(one(jobs[index], None, lambda: None))
                        continue
                    final = with_retries(lambda: self.dst.stat(copy.dst_path),
                                         retries=p.retries, backoff_s=ctx.retry_backoff_s,
                                         describe=copy.dst_path)
                    _check_published(copy.dst_path, final, outcome.size)
                    progress.add_bytes(outcome.size)
                    fut.set_result((jobs[index][0], jobs[index][1], outcome, final))
                except BaseException as exc:  # noqa: BLE001 - the future holds it
                    fut.set_exception(exc)

        # Each transfer thread copies the jobs it claims, one after another. It claims its
        # next one as the copy in hand is about to be renamed, and tells the destination
        # which temporary file it will write next (Backend.expect_write): over SFTP, that
        # file's open goes out with the rename, a round trip less for each small file.
        # Where the destination writes files together (Backend.writes_files_together), a
        # thread claims a few small files at once instead, and copies them as one.
        announce = self.dst.expect_write
        claiming = threading.Lock()
        claimed_up_to = [0]   # the jobs before this index are claimed
        in_order = [Future() for _ in jobs]
        futures = dict(zip(in_order, jobs))
        group_small = self.dst.writes_files_together

        def small(index: int) -> bool:
            size = jobs[index][0].ref.size
            return size is not None and size <= SMALL_FILE

        def claim() -> list[tuple[int, str]] | list[None]:
            """The next job; where files go together, with the small ones that follow a
            small one, up to GROUP_FILES, fewer as the jobs left run out (so that the
            threads end together). [None]: none left."""
            with claiming:
                first = claimed_up_to[0]
                end = first + (not stop.is_set() and first < len(jobs))
                if group_small and end > first and small(first):
                    most = min(GROUP_FILES, max(1, (len(jobs) - end) // (2 * self.transfers)))
                    held = jobs[first][0].ref.size
                    while end < len(jobs) and end - first < most and small(end) and \
                            held + jobs[end][0].ref.size <= GROUP_BYTES:
                        held += jobs[end][0].ref.size
                        end += 1
                claimed_up_to[0] = end
            return [(index, temp_path(from_catalog(jobs[index][0].path), self.temp_key))
                    for index in range(first, end)] or [None]

        def transfers() -> None:
            claimed = claim()
            try:
                while claimed[0] is not None:
                    if len(claimed) > 1:
                        announce(None)   # (an open sent ahead is not of these)
                        together(claimed)
                        claimed = claim()
                        continue
                    index, tmp = claimed[0]
                    following: list = []

                    def announce_next() -> None:
                        if following:   # (a retried copy's second rename)
                            return
                        following.append(claim())
                        if following[0][0] is not None and len(following[0]) == 1:
                            announce(following[0][0][1])

                    fut = in_order[index]
                    if fut.set_running_or_notify_cancel():   # (not cancelled meanwhile)
                        try:
                            fut.set_result(one(jobs[index], tmp, announce_next))
                        except BaseException as exc:  # noqa: BLE001 - the future holds it
                            fut.set_exception(exc)
                    claimed = following[0] if following else claim()
            finally:
                announce(None)   # an open sent ahead that no copy took is undone

        collected: set = set()

        def collect(fut) -> None:
            """Count and remember one finished copy (once, whenever it is looked at)."""
            if fut in collected or fut.cancelled():
                return
            collected.add(fut)
            d, verb = futures[fut]
            try:
                _, _, result, final = fut.result()
            except _Stopped:
                return                # abandoned when the run was interrupted: not a failure
            except SourceChanged as exc:   # not a failure of the copy: the next run's index
                self.counts["changed_during_copy"] += 1              # sees the change
                self.errors.append(f"{d.path}: {exc}")
                return
            except Unsupported as exc:   # a name the destination cannot hold (not UTF-8 on
                self.counts["skipped"] += 1   # S3, a '?' on XRootD): skipped, said, no failure
                self.errors.append(f"{d.path}: not copied: {exc}")
                return
            except StorageError as exc:
                self._fail(d.path, str(exc))
                return
            progress.add_file()
            self.counts[verb] += 1
            if self.mtime_promised and d.ref.mtime_ns is not None and not result.mtime_set:
                self._refusal("mtimes")
            if self._bits_not_kept(d.ref.mode, final):   # (the catalog gets what is there)
                self._refusal("modes")
            self.counts["bytes"] += result.size or 0
            digest = result.checksums.get(self.algo)
            if d.ref.checksum is None and digest:
                self.ref_sums.append((d.path, digest))
            self._remember(d.path, FILE, final.size if final else result.size,
                           final.mtime_ns if final else None, digest, None,
                           final.mode if final else None)

        threads = [threading.Thread(target=transfers, name=f"castlib-transfer-{n}")
                   for n in range(min(self.transfers, len(jobs)))]
        try:
            for thread in threads:
                thread.start()
            for fut in as_completed(futures):
                with interruptions_held():   # a copy counted is a copy remembered
                    collect(fut)
                    if len(self.dst_rows) >= RECORD_BATCH:
                        self._record()
        except BaseException:
            # interrupted (a signal, Ctrl-C): queued copies never start, those in flight
            # stop at their next block; the copies that did finish are counted, so that
            # the run's record and the catalog say what is really on the destination
            stop.set()
            for fut in in_order:
                fut.cancel()   # (those not started)
            _join(threads)
            for fut in in_order:
                if fut.done():
                    collect(fut)
            raise
        finally:
            _join(threads)
            progress.close()

    # -- hard links --------------------------------------------------------------------------
    def _plan_hard_links(self, plan: TransferPlan) -> list[tuple[Difference | None, str, str]]:
        return plan_hard_links(plan, self.diff.differences, self.ref_groups, self.failed_paths,
                               self._dst_inode)

    def _dst_inode(self, path: str):
        try:
            st = self.dst.stat(from_catalog(path))
        except StorageError:
            return None
        return st.inode if st is not None else None

    def _hard_link(self, d: Difference | None, path: str, leader: str) -> None:
        """Give the leader's file the name `path`: linked under a temporary name, then
        renamed over whatever was there (same bytes, or bytes being replaced)."""
        if self._outside(path):   # the catalog is stale there
            return
        self._touch(path)
        if leader in self.failed_paths:
            self._fail(path, f"not linked: {leader} (the same file) failed")
            return
        if self._outside(leader):   # a name of its own here, not a way through a link
            self._fail(path, f"not linked: {leader} (the same file) is below a folder that "
                             "is no folder on the destination now")
            return
        storage = from_catalog(path)
        tmp = temp_path(storage, self.temp_key)
        try:
            self.dst.hard_link(tmp, from_catalog(leader))
            try:
                self.dst.rename(tmp, storage)
            except StorageError:
                self.dst.delete(tmp)
                raise
        except StorageError as exc:
            self._fail(path, f"cannot link to {leader}: {exc}")
            return
        self.counts["hard_links_created"] += 1
        if d is not None:   # a name the catalog did not have right: record it
            st = self.dst.stat(storage)
            self._remember(path, FILE, st.size if st else d.ref.size,
                           st.mtime_ns if st else None, d.ref.checksum, None,
                           st.mode if st else None)

    # -- metadata ------------------------------------------------------------------------------
    def _touch(self, path: str) -> None:
        """Note that this run makes or removes an entry at `path`: its folder's mtime moves."""
        self.touched.add(parent_of(path))

    def _mode_to_set(self, d: Difference, new: bool = False) -> int | None:
        """The permission bits to give the destination entry of `d`, if any."""
        if not self.perms or d.ref is None or d.ref.mode is None:
            return None
        if new or d.dst is None or d.dst.mode != d.ref.mode:
            return d.ref.mode
        return None

    def _settle_metadata(self, plan: TransferPlan) -> None:
        """Permission bits that alone differ; folder and link mtimes that differ or that
        this run moved; the folders' own permission bits. Folders last and deepest first,
        after their content is written (a read-only folder, set first, would refuse it)."""
        folders: dict[str, object] = {}
        counted: dict[str, set[str]] = {"mode_fixed": set(), "mtime_fixed": set()}
        for d in plan.mkdirs:
            if d.path not in self.failed_paths:
                folders[d.path] = d.ref
        set_bits: dict[str, tuple[int | None, int]] = {}   # looked at once all are set
        for d in plan.modes:
            counted["mode_fixed"].add(d.path)
            if d.ref.kind == DIR:
                folders[d.path] = d.ref
                continue
            try:
                if self._set_mode(from_catalog(d.path), self._before_owner(d.ref.mode)):
                    set_bits[d.path] = (None, d.ref.mode)
            except StorageError as exc:
                self._fail(d.path, f"cannot set permissions: {exc}")
        for d in self.mtimes_to_set:
            counted["mtime_fixed"].add(d.path)
            if d.ref.kind == DIR:
                folders[d.path] = d.ref
                continue
            try:   # a link: its own mtime, not its target's
                self.dst.set_mtime(from_catalog(d.path), d.ref.mtime_ns)
                self.counts["mtime_fixed"] += 1
                self.meta_rows.append((d.path, d.ref.mtime_ns, None))
            except StorageError as exc:
                self._fail(d.path, f"cannot set mtime: {exc}")
        moved = [p for p in self.touched if p and p not in folders and p not in self.failed_paths]
        for path, side in self.context.catalog.lookup(self.diff.ref.record.id, moved,
                                                      self.algo).items():
            if side.kind == DIR:
                folders[path] = side
        wanted = {}   # storage path -> (catalog path, bits, mtime)
        for path in sorted(folders, reverse=True):   # a folder's content sorts after it
            side = folders[path]
            mtime = side.mtime_ns if self.dst.capabilities.dir_mtimes else None
            wanted[from_catalog(path)] = (path, side.mode if self.perms else None, mtime)
        # (a server's first refusal of bits or times is learned by the back-end, which
        # says so for each folder after it: Backend.set_folder_metadata)
        asked = [(storage_path, mode, mtime)
                 for storage_path, (_, mode, mtime) in wanted.items()]
        for storage_path, outcome in self.dst.set_folder_metadata(asked):
            path, mode, mtime = wanted[storage_path]
            if isinstance(outcome, StorageError):
                self._fail(path, f"cannot set folder permissions or mtime: {outcome}")
                continue
            mode_set, mtime_set = outcome
            if mode_set is False:
                mode = None
                self._refusal("modes")
            if mtime_set is False:
                mtime = None
                self._refusal("mtimes")
            # fixed: what was set (a refusal is counted as such above, not as fixed too)
            self.counts["mtime_fixed"] += path in counted["mtime_fixed"] and mtime is not None
            if mode is None:
                self.meta_rows.append((path, mtime, None))
            else:
                set_bits[path] = (mtime, mode)
        self._settle_bits(set_bits, counted["mode_fixed"])
        self._settle_root()

    def _settle_bits(self, set_bits: dict[str, tuple[int | None, int]],
                     to_count: set[str]) -> None:
        """Permission bits the server took, looked at once set (one stat_many: over SFTP
        1,000 in a round trip): a server may answer a set-stat with OK and keep nothing
        (rclone serve sftp: every file 0644, every folder 0755). Bits it kept are fixed
        (counted for the entries in `to_count`, those that differed); others are counted
        as not set, and the catalog gets the bits that are there, never those asked for.
        `set_bits`: {catalog path: (the mtime set with them, or None; the bits)}."""
        if not set_bits:
            return
        found: dict[str, object] = {}
        for storage, st in self.dst.stat_many([from_catalog(p) for p in set_bits]):
            found[to_catalog(storage)] = st
        for path, (mtime, mode) in set_bits.items():
            st = found.get(path)
            if not isinstance(st, Stat):   # (gone since, or not to be looked at: as asked)
                st = None
            if st is not None and self._bits_not_kept(mode, st):
                self._refusal("modes")
                self.meta_rows.append((path, mtime, st.mode))
                continue
            self.counts["mode_fixed"] += path in to_count
            # (what is there: with --owner, set-ID bits come later, with the owner)
            self.meta_rows.append((path, mtime, mode if st is None else st.mode))

    def _bits_not_kept(self, wanted: int | None, st: Stat | None) -> bool:
        """Whether an entry whose bits were set to `wanted` shows other read, write and
        execute bits (set-ID bits aside: the kernel clears set-group-ID for a group its
        setter is not in, a matter of that file, not of the server)."""
        return (self.perms and wanted is not None and st is not None and st.mode is not None
                and bool((st.mode ^ wanted) & 0o777))

    def _settle_root(self) -> None:
        """The destination root is no catalog entry: its mtime and bits from a stat."""
        caps = self.dst.capabilities
        if not (self.perms or caps.dir_mtimes):
            return
        try:
            ref, dst = self.src.stat(""), self.dst.stat("")
            if ref is None or dst is None or ref.kind != DIR or dst.kind != DIR:
                return
            if self.perms and ref.mode is not None and ref.mode != dst.mode:
                self._set_mode("", ref.mode)
            tolerance = self.diff.mtime_tolerance_ns or 0
            if (caps.dir_mtimes and caps.set_mtime and ref.mtime_ns is not None
                    and dst.mtime_ns is not None and abs(ref.mtime_ns - dst.mtime_ns) > tolerance):
                self.dst.set_mtime("", ref.mtime_ns)
        except Unsupported:   # refused by the server: learned, said once
            self._refusal("mtimes")
        except StorageError as exc:
            self._fail(".", f"cannot set the destination root's permissions or mtime: {exc}")

    def _settle_owners(self) -> None:
        """Owner and group as the reference has them, for every entry the comparison
        covers (the catalog keeps no owners: both sides are asked). A chown clears the
        set-user-ID and set-group-ID bits of a file: they are set again after it."""
        flt = self.diff.filter
        paths = [""] + [e["path"] for e in self.context.catalog.entries(self.diff.ref.record.id)
                        if flt is None or flt.covers(e["path"], e["kind"])]
        for path in paths:
            if self._outside(path):
                continue
            storage = from_catalog(path)
            try:
                ref, dst = self.src.stat(storage), self.dst.stat(storage)
                if (path and ref is not None and ref.kind == DIR and dst is not None
                        and dst.kind != DIR):
                    # a link, maybe (a type conflict left, or the catalog stale): a chown
                    # below it would reach what it points to; the entries come in path
                    # order, so all below it come after it
                    self.walled += (path + "/",)
                    if path not in self.failed_paths:   # else said already
                        found = KIND_NAMES.get(dst.kind, "special file")
                        self._fail(path, f"a {found} on the destination now, not a folder: "
                                   "owners below it left alone (the catalog is stale here: "
                                   "list the destination again, e.g. castlib index DST)")
                    continue
                if (path in self.failed_paths or ref is None or dst is None
                        or ref.kind != dst.kind or ref.uid is None):
                    continue
                set_id = (self.perms and ref.kind == FILE and ref.mode is not None
                          and ref.mode & 0o6000)
                owned = (ref.uid, ref.gid) == (dst.uid, dst.gid)
                if owned and not (set_id and dst.mode != ref.mode):
                    continue   # (the set-ID bits left to this pass: _before_owner)
                if dst.kind == FILE and dst.inode is not None and (
                        ref.inode is None or not self.hard_links):
                    # names elsewhere that the reference's file has not (nor this run
                    # made: --hard-links): maybe a file from outside the tree linked in
                    # under its name, by whoever can write in its folder; root's, it
                    # would pass for the file this run wrote
                    self._fail(path, "a file with other names than the reference's: "
                               "owner left as it is")
                    continue
                # not the file this run wrote (root's, or the syncing user's), nor one of
                # the owner's given only its set-user-ID bit: maybe one its owner swapped
                # in since, which the bits would have made a program run as the new owner
                # or group
                suspect = set_id and dst.uid not in (0, os.geteuid()) and (
                    dst.uid != ref.uid or ref.mode & 0o2000)
                # the chown and the bits on the entry just looked at, held open: a file
                # swapped in under its name meanwhile is left as it is (Backend.chown)
                self.dst.chown(storage, ref.uid, ref.gid, was=dst,
                               mode=ref.mode if set_id and not suspect else None)
                self.counts["owner_fixed"] += not owned
                if set_id and not suspect:
                    self.meta_rows.append((path, None, ref.mode))
                if suspect:
                    self._fail(path, f"owned by uid {dst.uid}, not the reference's "
                               "owner's nor this run's: owner given, set-ID bits not")
            except StorageError as exc:
                self._fail(path or ".", f"cannot set owner: {exc}")

    # -- bookkeeping -------------------------------------------------------------------------
    def _remember(self, path, kind, size, mtime_ns, checksum, link_target, mode=None) -> None:
        row = {"path": path, "name": path.rsplit("/", 1)[-1], "kind": kind, "size": size,
               "mtime_ns": mtime_ns, "mode": mode, "link_target": link_target}
        if checksum:
            row[self.algo] = checksum
        self.dst_rows.append(row)

    def _record(self) -> None:
        """Write what was done into the catalog: the destination's new entries, the
        reference checksums learned while copying, the entries deleted."""
        catalog = self.context.catalog
        catalog.record_entries(self.diff.dst.record.id, self.dst_rows)
        catalog.forget_entries(self.diff.dst.record.id, self.removed)
        if self.ref_sums:
            catalog.record_checksums(self.diff.ref.record.id, self.algo, self.ref_sums)
        self.dst_rows, self.removed, self.ref_sums = [], [], []

    def _fail(self, path: str, message: str) -> None:
        self.counts["failed"] += 1
        self.failed_paths.add(path)
        self.errors.append(f"{path}: {message}")

    def _print_plan(self, plan: TransferPlan, leftovers: list[str]) -> None:
        out = self.context.out
        c = self.counts
        for path in leftovers:
            print(f"would remove leftover temporary {path}", file=out)
        for d in plan.clear_first:
            print(f"would delete {d.path} (type conflict)", file=out)
            c["deleted"] += 1
        for d in plan.mkdirs:
            print(f"would mkdir {d.path}", file=out)
            c["dirs_created"] += 1
        for d in plan.copies:
            print(f"would copy {d.path} ({d.ref.size} bytes)", file=out)
            c["copied"] += 1
            c["bytes"] += d.ref.size or 0
        for d in plan.replaces:
            why = "destination corrupted" if d.kind == "corrupted" else f"{d.kind} differs"
            print(f"would replace {d.path} ({why})", file=out)
            c["replaced"] += 1
            c["bytes"] += d.ref.size or 0
        for d in plan.mtime_checks:
            print(f"would compare checksums of {d.path} (mtime differs)", file=out)
        for d in plan.modes:
            print(f"would set permissions of {d.path} to {d.ref.mode:04o}", file=out)
            c["mode_fixed"] += 1
        for d in self.mtimes_to_set:
            print(f"would set mtime of {d.path}", file=out)
            c["mtime_fixed"] += 1
        for d in plan.links:
            print(f"would link {d.path} -> {d.ref.link_target}", file=out)
            c["links_created"] += 1
        for d in plan.deletes:
            print(f"would delete {d.path}", file=out)
            c["deleted"] += 1

    def _outcome(self, started: float, dry_run: bool = False) -> StageOutcome:
        c = self.counts
        elapsed = time.monotonic() - started
        rate = c["bytes"] / elapsed if elapsed > 0 else 0
        verb = "would sync" if dry_run else "synced"
        summary = (f"{verb} {self.diff.ref.name or self.diff.ref.record.url} -> "
                   f"{self.diff.dst.name or self.diff.dst.record.url}: {c['copied']} copied, "
                   f"{c['replaced']} replaced, {c['deleted']} deleted, {c['failed']} failed, "
                   f"{human_bytes(c['bytes'])}")
        if not dry_run:
            summary += f" in {elapsed:.1f} s ({human_bytes(rate)}/s)"
        done = [f"{c[k]} {label}" for k, label in (
            ("dirs_created", "folders created"), ("links_created", "links created"),
            ("hard_links_created", "hard links made"), ("mtime_fixed", "mtimes fixed"),
            ("mode_fixed", "permissions fixed"), ("owner_fixed", "owners fixed"),
            ("temp_removed", "leftover temporary files removed"))
            if c[k]]
        if done:
            summary += "; " + ", ".join(done)
        if c["conflicts"]:
            kinds = ", ".join(f"{n} {pair}" for pair, n in sorted(self.conflict_kinds.items()))
            summary += (f"; {c['conflicts']} type conflicts, reference vs destination "
                        f"({kinds}: --delete resolves)")
        others = c["skipped"] - self.refused.get("links", 0) - self.empty_folders
        if others:
            summary += f"; {others} skipped"
        if self.empty_folders:
            summary += (f"; {self.empty_folders} empty folders skipped: the destination keeps "
                        "no folders of its own")
        for what, reason in (("links", "links skipped: the server cannot hold links"),
                             ("mtimes", "mtimes not set: the server cannot set them"),
                             ("modes", "permissions not set: the server cannot set or keep them")):
            if self.refused.get(what):
                summary += f"; {self.refused[what]} {reason}"
        if c["extras_kept"]:
            summary += f"; {c['extras_kept']} extra kept (no --delete)"
        if c["kept"]:
            summary += f"; {c['kept']} differing kept (--no-replace)"
        if c["ref_corrupted"]:
            summary += (f"; {c['ref_corrupted']} not copied: reference found corrupted by "
                        "verify")
        if c["changed_during_copy"]:
            summary += (f"; {c['changed_during_copy']} changed during copy (not published, "
                        "left for the next run)")
        if dry_run:
            c["dry_run"] = True
        bad = c["failed"] or c["changed_during_copy"] or c["ref_corrupted"]
        return StageOutcome(dict(c), self.errors, None, summary, 1 if bad else 0)


def _repair_hint(d: Difference) -> str:
    dst = d.dst
    if (dst is not None and dst.kind == FILE and not dst.corrupted and dst.size == d.ref.size
            and dst.checksum is not None and dst.checksum == d.ref.checksum):
        return ("the destination's copy has the catalogued size and checksum: copy it back, "
                "then castlib index the reference --checksum (or verify it)")
    return ("restore it, then castlib index it --checksum (or verify it); a rewritten file "
            "is taken as new")


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        if thread.ident is not None:   # (started)
            thread.join()


@contextmanager
def _pool(workers: int):
    """A thread pool that, when the run is interrupted, drops the jobs not yet started
    rather than waiting for all of them (what leaving a plain `with` pool would do)."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


class _Stopped(Exception):
    """A copy abandoned because the run was interrupted (not a failure of the copy)."""


def _kind(side) -> str:
    return KIND_NAMES[side.kind]


def _refuse_unknown_reference(ref, ref_index) -> None:
    """A reference that does not exist is no word on what the destination should hold: an
    index with missing_ok (meant for a destination not created yet) lists a missing root
    as empty, and a sync with --delete would then empty the destination. Refused when this
    run's listing of the reference found its root missing, and when the run did not list it
    (--index none) and the catalog never has."""
    name = f"{ref.name} ({ref.record.url})" if ref.name else ref.record.url
    if ref_index is not None and ref_index.root_missing:
        raise SafetyRefusal(f"reference {name} does not exist (its listing found no root); "
                            "nothing was changed")
    if ref_index is None and ref.record.indexed_at is None:
        raise SafetyRefusal(f"reference {name} was never indexed: index it first; nothing "
                            "was changed")


def _refuse_overlap(src, dst) -> None:
    """One tree inside the other: each sync would copy the destination into itself again
    (a/backup/backup/...), or with --delete remove the reference's own files. Compared by
    what the roots are (Backend.overlaps: for local folders real paths and (device, inode),
    through links and bind mounts), not by how they are spelled."""
    ref, dst_url = src.url, dst.url
    if type(src) is not type(dst) or ref.scheme != dst_url.scheme:
        return
    if type(dst).overlaps(ref, dst_url):
        raise SafetyRefusal(f"reference {ref} and destination {dst_url} overlap (one is "
                            "inside the other, or both are one folder); nothing was changed")
    # a mount below one root showing (part of) the other: mount --bind D R/sub
    for root, other, role, other_role in ((ref, dst_url, "reference", "destination"),
                                          (dst_url, ref, "destination", "reference")):
        mount = type(dst).mount_overlap(root, other)
        if mount:
            raise SafetyRefusal(f"reference {ref} and destination {dst_url} overlap: the mount "
                                f"at {mount} below the {role} shows the {other_role}; "
                                "nothing was changed")
