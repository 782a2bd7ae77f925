"""sync: make a destination match its reference, copying and verifying every byte written."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from pydantic import Field

from ..backends.base import DIR, FILE, LINK
from ..catalog import Difference
from ..catalog.locks import location_lock
from ..catalog.paths import from_catalog, to_catalog
from ..errors import NotFound, SafetyRefusal, StorageError, Unsupported
from ..progress import human_bytes
from ..transfer import copy_file, with_retries
from .base import Stage, StageOutcome, StageParams
from .diff import DiffResult

RECORD_BATCH = 500


class SyncParams(StageParams):
    from_: str = Field(alias="from", description="id of the diff stage whose differences to fix")
    delete: bool = Field(False, description="delete entries the reference does not have")
    max_delete: int | None = Field(None, ge=0, description="refuse to run if more deletions "
                                                           "than this would be needed")
    replace: bool = Field(True, description="replace destination files whose content differs")
    transfers: int = Field(4, ge=1, le=256, description="files copied in parallel")
    retries: int = Field(3, ge=0, le=20, description="retries of a transient failure, with backoff")
    stage_timeout: float = Field(3600, gt=0, description="seconds to wait for tape recalls")
    dry_run: bool = Field(False, description="print what would be done, change nothing")
    lock_wait: float = Field(0, ge=0, description="seconds to wait for another sync into the "
                                                  "same destination to finish")


@dataclass
class TransferPlan:
    """What a sync will do, decided from the differences before anything is touched."""

    clear_first: list[Difference] = field(default_factory=list)  # removed to resolve type clashes
    mkdirs: list[Difference] = field(default_factory=list)
    copies: list[Difference] = field(default_factory=list)
    replaces: list[Difference] = field(default_factory=list)
    mtime_checks: list[Difference] = field(default_factory=list)  # same size, other mtime
    links: list[Difference] = field(default_factory=list)
    deletes: list[Difference] = field(default_factory=list)
    kept: list[Difference] = field(default_factory=list)          # differ, but --no-replace
    extras_kept: list[Difference] = field(default_factory=list)   # extra, but no --delete
    conflicts: list[Difference] = field(default_factory=list)     # type clash, no --delete
    skipped: list[tuple[Difference, str]] = field(default_factory=list)

    @property
    def deletion_count(self) -> int:
        return len(self.deletes) + len(self.clear_first)


def make_plan(diff: DiffResult, *, delete: bool, replace: bool, dst_symlinks: bool,
              unlisted_ref: list[str] = ()) -> TransferPlan:
    """What to do about each difference. `unlisted_ref`: catalog paths of reference folders
    this run could not list; nothing below them is deleted or replaced on the word of a
    listing that never looked there."""
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
        elif d.kind in ("size", "checksum"):
            (plan.replaces if replace else plan.kept).append(d)
        elif d.kind == "mtime":
            plan.mtime_checks.append(d)
    plan.mkdirs.sort(key=lambda d: d.path)
    # children before parents, so folders are empty when their turn comes
    plan.deletes.sort(key=lambda d: d.path, reverse=True)
    plan.clear_first.sort(key=lambda d: d.path, reverse=True)
    return plan


def _plan_create(plan: TransferPlan, d: Difference, dst_symlinks: bool) -> None:
    if d.ref.kind == DIR:
        plan.mkdirs.append(d)
    elif d.ref.kind == FILE:
        plan.copies.append(d)
    elif dst_symlinks:
        plan.links.append(d)
    else:
        plan.skipped.append((d, "symbolic link: the destination cannot hold links"))


class SyncStage(Stage):
    name = "sync"
    description = "make the destination match the reference of a diff, verifying every copy"
    Params = SyncParams
    reads_results = {"from_": ("diff",)}

    def run(self) -> StageOutcome:
        p: SyncParams = self.params
        ctx = self.context
        diff: DiffResult = ctx.result(p.from_, DiffResult)
        _refuse_overlap(diff.ref.url, diff.dst.url)
        self.src, self.dst = ctx.backend(diff.ref), ctx.backend(diff.dst)
        self.diff = diff
        self.algo = diff.algorithm
        ref_index = ctx.index_results.get(diff.ref.record.id)
        plan = make_plan(diff, delete=p.delete, replace=p.replace,
                         dst_symlinks=self.dst.capabilities.symlinks,
                         unlisted_ref=[to_catalog(u) for u in getattr(ref_index, "unlisted", [])])
        if p.max_delete is not None and plan.deletion_count > p.max_delete:
            raise SafetyRefusal(
                f"sync would delete {plan.deletion_count} entries, more than --max-delete "
                f"{p.max_delete}; nothing was changed")
        self.counts = dict.fromkeys(
            ("copied", "replaced", "deleted", "failed", "bytes", "dirs_created", "links_created",
             "mtime_fixed", "kept", "extras_kept", "conflicts", "skipped", "temp_removed",
             "mtime_skipped"), 0)
        # what the destination's server refused although its protocol promised it: said
        # once in the summary, {what: count}; those entries stay differences
        self.refused: dict[str, int] = {}
        self.mtime_promised = self.dst.capabilities.set_mtime
        self.errors: list[str] = []
        self.dst_rows: list[dict] = []
        self.ref_sums: list[tuple[str, str]] = []
        self.removed: list[str] = []
        c = self.counts
        c["kept"], c["extras_kept"] = len(plan.kept), len(plan.extras_kept)
        c["skipped"], c["conflicts"] = len(plan.skipped), len(plan.conflicts)
        for d in plan.conflicts:
            self._fail(d.path, f"type conflict: reference has a {_kind(d.ref)}, destination a "
                               f"{_kind(d.dst)}; use --delete to replace it")
        leftovers = getattr(ctx.index_results.get(diff.dst.record.id), "leftover_temp", [])
        started = time.monotonic()
        if p.dry_run or ctx.dry_run:
            self._print_plan(plan, leftovers)
            return self._outcome(started, dry_run=True)
        if diff.dst.record.id in ctx.locked:      # held by the pipeline for the whole run
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

    def _execute(self, plan: TransferPlan, leftovers: list[str], p: SyncParams) -> None:
        c = self.counts
        if plan.mkdirs or plan.copies or plan.links:
            try:
                self.dst.mkdir("")   # a new destination: create its root
            except StorageError as exc:
                raise StorageError(f"cannot create destination {self.diff.dst.record.url}: {exc}")
        for path in leftovers:   # temporary files of an earlier, interrupted run
            try:
                self.dst.delete(path)
                c["temp_removed"] += 1
            except NotFound:     # a run we waited for had it, and renamed or removed it
                pass
            except StorageError as exc:
                self.errors.append(f"{path}: cannot remove leftover temporary file: {exc}")
        for d in plan.clear_first:
            self._delete(d)
        for d in plan.mkdirs:
            self._mkdir(d)
        if plan.mtime_checks:
            self._settle_mtimes(plan)
        self._transfer(plan.copies, plan.replaces, p)
        for d in plan.links:
            self._link(d)
        for d in plan.deletes:
            self._delete(d)
        self._record()

    # -- actions ---------------------------------------------------------------------------
    def _mkdir(self, d: Difference) -> None:
        try:
            self.dst.mkdir(from_catalog(d.path))
            self.counts["dirs_created"] += 1
            st = self.dst.stat(from_catalog(d.path))
            self._remember(d.path, DIR, 0, st.mtime_ns if st else None, None, None,
                           st.mode if st else None)
        except StorageError as exc:
            self._fail(d.path, f"cannot create folder: {exc}")

    def _refusal(self, what: str) -> None:
        """One entry the destination's server refused (links it cannot hold, mtimes it
        cannot set): learned at the first refusal, counted, not a failure."""
        self.refused[what] = self.refused.get(what, 0) + 1
        self.counts["skipped" if what == "links" else "mtime_skipped"] += 1

    def _link(self, d: Difference) -> None:
        if not self.dst.capabilities.symlinks:   # the server refused an earlier one
            return self._refusal("links")
        try:
            self.dst.symlink(from_catalog(d.path), from_catalog(d.ref.link_target or ""))
            self.counts["links_created"] += 1
            st = self.dst.stat(from_catalog(d.path))
            self._remember(d.path, LINK, st.size if st else None, st.mtime_ns if st else None,
                           None, d.ref.link_target, st.mode if st else None)
        except Unsupported:
            self._refusal("links")
        except StorageError as exc:
            self._fail(d.path, f"cannot create link: {exc}")

    def _delete(self, d: Difference) -> None:
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

        with ThreadPoolExecutor(max_workers=self.params.transfers) as pool:
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
                    self.counts["mtime_fixed"] += 1
                    self._remember(d.path, FILE, d.dst.size, d.ref.mtime_ns, dst_sum, None,
                                   d.dst.mode)
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
        progress = self.context.progress("sync", len(jobs), total)
        ctx = self.context

        def one(job):
            d, verb = job
            path = from_catalog(d.path)
            result = with_retries(
                lambda: copy_file(self.src, path, self.dst, path, algorithm=self.algo,
                                  expected_size=d.ref.size, expected_checksum=d.ref.checksum,
                                  mtime_ns=d.ref.mtime_ns, on_bytes=progress.add_bytes),
                retries=p.retries, backoff_s=ctx.retry_backoff_s, describe=path)
            # the copy is in place: a glitch now must not count it failed
            final = with_retries(lambda: self.dst.stat(path), retries=p.retries,
                                 backoff_s=ctx.retry_backoff_s, describe=path)
            return d, verb, result, final

        try:
            with ThreadPoolExecutor(max_workers=p.transfers) as pool:
                futures = {pool.submit(one, job): job for job in jobs}
                for fut in as_completed(futures):
                    d, verb = futures[fut]
                    try:
                        _, _, result, final = fut.result()
                    except StorageError as exc:
                        self._fail(d.path, str(exc))
                        continue
                    progress.add_file()
                    self.counts[verb] += 1
                    if self.mtime_promised and d.ref.mtime_ns is not None and not result.mtime_set:
                        self._refusal("mtimes")
                    self.counts["bytes"] += result.size or 0
                    digest = result.checksums.get(self.algo)
                    if d.ref.checksum is None and digest:
                        self.ref_sums.append((d.path, digest))
                    self._remember(d.path, FILE, final.size if final else result.size,
                                   final.mtime_ns if final else None, digest, None,
                                   final.mode if final else None)
                    if len(self.dst_rows) >= RECORD_BATCH:
                        self._record()
        finally:
            progress.close()

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
            with catalog.engine.begin() as conn:
                catalog.set_checksums(conn, self.diff.ref.record.id, self.algo, self.ref_sums)
        self.dst_rows, self.removed, self.ref_sums = [], [], []

    def _fail(self, path: str, message: str) -> None:
        self.counts["failed"] += 1
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
            print(f"would replace {d.path} ({d.kind} differs)", file=out)
            c["replaced"] += 1
            c["bytes"] += d.ref.size or 0
        for d in plan.mtime_checks:
            print(f"would compare checksums of {d.path} (mtime differs)", file=out)
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
            ("mtime_fixed", "mtimes fixed"), ("temp_removed", "leftover temporary files removed"))
            if c[k]]
        if done:
            summary += "; " + ", ".join(done)
        if c["conflicts"]:
            summary += f"; {c['conflicts']} type conflicts (file vs folder: --delete resolves)"
        if c["skipped"] - self.refused.get("links", 0):
            summary += f"; {c['skipped'] - self.refused.get('links', 0)} skipped"
        for what, reason in (("links", "links skipped: the server cannot hold links"),
                             ("mtimes", "mtimes not set: the server cannot set them")):
            if self.refused.get(what):
                summary += f"; {self.refused[what]} {reason}"
        if c["extras_kept"]:
            summary += f"; {c['extras_kept']} extra kept (no --delete)"
        if c["kept"]:
            summary += f"; {c['kept']} differing kept (--no-replace)"
        if dry_run:
            c["dry_run"] = True
        return StageOutcome(dict(c), self.errors, None, summary, 1 if c["failed"] else 0)


def _kind(side) -> str:
    return {"f": "file", "d": "folder", "l": "link"}[side.kind]


def _refuse_overlap(ref, dst) -> None:
    """One tree inside the other: each sync would copy the destination into itself again
    (a/backup/backup/...), or with --delete remove the reference's own files."""
    if (ref.scheme, ref.host) != (dst.scheme, dst.host):
        return
    a, b = ref.path.rstrip("/") + "/", dst.path.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise SafetyRefusal(f"reference {ref} and destination {dst} overlap (one is inside "
                            "the other); nothing was changed")
