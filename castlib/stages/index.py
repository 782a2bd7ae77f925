"""index: list a location into the catalog; new, changed and vanished entries in bulk."""
from __future__ import annotations

import gc
from contextlib import contextmanager

from ..backends.base import DIR, FILE, LINK
from ..catalog.index_lock import index_lock
from ..catalog.paths import from_catalog, to_catalog
from ..catalog.records import BATCH, IndexedEntry, utcnow
from ..checksum import ALGORITHMS
from ..errors import ConfigError, LocationMissing, SafetyRefusal, StorageError
from ..filters import PathFilter
from ..location import parse_location
from ..transfer import TEMP_MARK, is_temp_name, with_retries
from .base import ChecksumName, Globs, IndexResult, LazyParams, Percent, Stage, StageOutcome


def _params():
    """The pydantic model of the parameters, built on first use (Stage.Params)."""
    from pydantic import Field

    from .base import StageParams

    class IndexParams(StageParams):
        location: str = Field(description="location name or URL to list")
        checksum: ChecksumName | None = Field(
            None, description="also compute this checksum (adler32, md5 or sha256) for new or "
                              "changed files")
        only: Globs = Field(default_factory=list, description="include only files matching")
        ignore: Globs = Field(default_factory=list, description="leave out entries matching")
        rehash: bool = Field(False, description="recompute checksums even when size and mtime "
                                                "agree (without checksum: every kind the "
                                                "location has)")
        workers: int = Field(4, ge=1, le=64, description="parallel checksum computations")
        force: bool = Field(False, description="accept a listing in which more of the files the "
                                               "catalog knew vanished than max_vanish allows")
        max_vanish: Percent = Field(50, ge=0, le=100, description=(
            "stop (exit 2, nothing changed) when more than this percent of the files the "
            "catalog knew in a location vanished since its last listing: an unmounted or blank "
            "disk (a location known with fewer than 10 files stops only when all vanished; "
            "100 turns it off)"))
        missing_ok: bool = Field(False, description="a root that does not exist lists as empty "
                                                    "(a destination not created yet)")

    return IndexParams


def _refuse_a_root_that_is_no_folder(backend, url: str) -> None:
    """A location is a folder: a file there is neither listed as a tree nor created over
    (`sync a /etc/passwd` would fail later as "File exists"), and "does not exist" would
    send the user looking for the wrong thing."""
    try:
        st = backend.stat("")
    except StorageError:
        return   # the caller's "cannot be reached" says it
    if st is not None and st.kind != DIR:
        kind = {FILE: "a file", LINK: "a link"}.get(st.kind, st.kind)
        raise ConfigError(f"location {url} is {kind}, not a folder: castlib syncs folders "
                          "(name the folder that holds it)")


class IndexStage(Stage):
    name = "index"
    description = "list a location into the catalog (new, changed and vanished entries)"
    Params = LazyParams(_params)
    location_params = ("location",)

    @classmethod
    def connects_to(cls, params, earlier: dict) -> list[str]:
        return [params.location]

    def run(self) -> StageOutcome:
        ctx = self.context
        loc = ctx.resolve(self.params.location)

        def waiting() -> None:
            if not ctx.quiet:
                print(f"castlib: waiting for another run writing the entries of "
                      f"{loc.name or loc.record.url}", file=ctx.err)

        # from the baseline read to the last write: see catalog.index_lock
        with index_lock(ctx.catalog, loc.record.id, on_wait=waiting), _cyclic_gc_paused():
            return self._index(loc)

    def _index(self, loc) -> StageOutcome:
        p: IndexParams = self.params
        ctx = self.context
        backend = ctx.backend(loc)
        catalog = ctx.catalog
        loc_id = loc.record.id
        result = IndexResult(loc_id, only=list(p.only), ignore=list(p.ignore))
        flt = PathFilter(p.only, p.ignore)
        counts = dict.fromkeys(("files", "dirs", "links", "bytes", "new", "changed", "unchanged",
                                "deleted", "hashed", "hashed_bytes", "unreadable",
                                "corrupted_cleared"), 0)
        errors: list[str] = []

        root_error = None

        def on_error(path: str, message: str) -> None:
            nonlocal root_error
            if not path:
                root_error = message
            result.unlisted.append(path)
            errors.append(f"{path or '.'}: cannot list: {message}")

        # the C accelerator (catalog.accel) for the common case: it needs no baseline here
        fast = self._accelerator(backend, catalog, flt)
        if fast is None:
            existing = catalog.load_entries(loc_id)
            known_files = sum(1 for e in existing.values() if e.kind == FILE and not e.deleted)
        else:   # whether there are any now; how many, the listing counts (_index_fast)
            existing, known_files = None, int(catalog.has_live_files(loc_id))
        algos = [p.checksum] if p.checksum else []
        if p.rehash and not algos:   # recompute the checksums the location has
            algos = _algorithms_held(existing)
            if not algos:
                raise ConfigError(
                    f"--rehash: the catalog holds no checksums of {loc.record.url} to "
                    f"recompute; name one with --checksum ({', '.join(ALGORITHMS)})")
        # the first call to a remote location: a line that drops now (the login's
        # connection lost) is tried again on a new one, as a folder's listing is; a host
        # not reached at all is said at once
        root_exists = with_retries(backend.root_exists, retries=ctx.retries,
                                   backoff_s=ctx.retry_backoff_s, describe=loc.record.url,
                                   retry_unreached=False)
        if existing is None and not root_exists:   # said below: the exact count
            known_files = catalog.live_count(loc_id)
        if not root_exists:
            _refuse_a_root_that_is_no_folder(backend, loc.record.url)
        forced = p.force or ctx.force
        # A location without history may be another spelling of a known folder (a bind
        # mount of it): its history then judges this listing, or a blank disk mounted
        # there would pass the vanish guard under the new spelling.
        twins = ([] if known_files or forced or not root_exists
                 else _same_folder_known(catalog, backend, loc.record))
        if not root_exists and not (p.missing_ok and (known_files == 0 or forced)):
            if known_files and p.missing_ok:
                raise SafetyRefusal(
                    f"location {loc.record.url} does not exist, but the catalog knows "
                    f"{known_files} files there: is it mounted? (use --force to accept)")
            raise LocationMissing(f"location {loc.record.url} does not exist or cannot be reached")
        result.root_missing = not root_exists
        if fast is not None and root_exists and not twins:
            return self._index_fast(loc, backend, result, counts, errors, on_error,
                                    lambda: root_error, forced)
        if existing is None:
            existing = catalog.load_entries(loc_id)

        now = utcnow()
        writer = catalog.index_writer(loc_id, now)   # holds the new entries until flush
        updates: list[dict] = []
        to_hash: list[tuple[str, str, int]] = []   # (catalog path, storage path, size)
        algo = algos[0] if algos else None   # the one a listing may provide (see flush)
        progress = ctx.progress(f"index {loc.name or loc.record.url}")
        listed_sums: dict[str, str] = {}   # checksums the listing itself provided
        recheck: dict[str, str] = {}   # files marked corrupted, re-read: their good checksum
        pending_writes = 0

        def flush() -> None:
            nonlocal updates, to_hash, pending_writes
            # each algorithm reads the files again: more than one only for a --rehash of
            # a location holding several kinds of checksum
            hashed_by = {a: self._hash(backend, a, to_hash, p.workers, counts, errors, progress)
                         for a in algos}
            sound = []   # a re-read of a corrupted file is compared, never recorded
            for path, good in recheck.items():
                if hashed_by[algo].pop(path, None) == good:
                    sound.append(path)
                for other in algos[1:]:
                    hashed_by[other].pop(path, None)
            recheck.clear()
            counts["corrupted_cleared"] += len(sound)
            if algo:
                hashed_by[algo].update(listed_sums)
            listed_sums.clear()
            writer.write(updates, hashed_by, sound)
            updates, to_hash, pending_writes = [], [], 0

        # The loop below runs once per entry (millions): locals, no avoidable calls.
        filtering, accepts, pop_existing = flt.active, flt.accepts, existing.pop
        want_links = self.context.hard_links_wanted   # for sync --hard-links only
        if twins:   # the twins' entries seen are popped too: what is left vanished
            def pop_existing(path, default, _own=existing.pop,
                             _twins=[t.pop for _, t, _ in twins]):
                for pop in _twins:
                    pop(path, None)
                return _own(path, default)
        add_new = writer.add
        one_algo = algo if not algos[1:] else None   # a listed checksum is used for it
        temp_key = backend.temp_key   # the catalog's: only castlib's own temporaries are left out
        unreported = 0   # entries not yet added to the progress counter (it takes a lock)
        try:
            for st in (backend.walk(on_error) if root_exists else ()):
                storage_path, kind = st.path, st.kind
                if (".." in storage_path or storage_path[:1] == "/" or "//" in storage_path) \
                        and _climbs_out(storage_path):
                    on_error(storage_path, "not a path below the location (a '..' or empty "
                                           "part): left out, never copied")
                    continue
                if TEMP_MARK in storage_path and is_temp_name(st.name, temp_key):
                    result.leftover_temp.append(storage_path)
                    continue
                if filtering and not accepts(storage_path, kind):
                    continue
                counts["files" if kind == FILE else "dirs" if kind == DIR else "links"] += 1
                if kind == FILE:
                    counts["bytes"] += st.size or 0
                unreported += 1
                if unreported == 1000:
                    progress.add_file(unreported)
                    unreported = 0
                # plain ASCII without "%" is stored as is (see catalog.paths)
                path = (storage_path if storage_path.isascii() and "%" not in storage_path
                        else to_catalog(storage_path))
                if kind == LINK and st.link_target is not None:   # a target is a path too
                    st.link_target = to_catalog(st.link_target)
                elif st.inode is not None and want_links:   # one file, several names
                    result.hard_links.setdefault(st.inode, []).append(path)
                old = pop_existing(path, None)
                if old is None:
                    counts["new"] += 1
                    if algo and kind == FILE:
                        listed_sum = st.checksums.get(algo) if st.checksums and one_algo else None
                        add_new(path, st, algo, listed_sum)
                        if not listed_sum:
                            to_hash.append((path, st.path, st.size or 0))
                    else:
                        add_new(path, st)
                else:
                    same_content = (old.kind == kind and old.size == st.size
                                    and old.mtime_ns == st.mtime_ns)
                    if (not same_content or old.deleted or old.mode != st.mode
                            or old.link_target != st.link_target):
                        upd = {"b_id": old.id, "kind": kind, "size": st.size,
                               "mtime_ns": st.mtime_ns, "mode": st.mode,
                               "link_target": st.link_target, "deleted": False,
                               "online": st.online, "last_seen": now,
                               # other bytes now (size or mtime moved): the mark was
                               # about the old ones
                               "corrupted": bool(old.corrupted) and same_content}
                        if not same_content:   # a checksum is trusted only for what it read
                            upd.update(adler32=None, md5=None, sha256=None)
                            if st.checksums:
                                upd.update({a: v for a, v in st.checksums.items()
                                            if a in ALGORITHMS})
                        updates.append(upd)
                        # a folder's mtime moves whenever its content does: not news
                        dir_touched = kind == DIR and old.kind == DIR and not old.deleted
                        counts["unchanged" if dir_touched else "changed"] += 1
                    else:
                        counts["unchanged"] += 1
                    if algo and kind == FILE:
                        have = old.checksum(algo) if same_content else None
                        listed_sum = (st.checksums or {}).get(algo)
                        if old.corrupted and same_content:
                            # verify found its bytes other than its (good) checksum: an
                            # index that computes checksums re-reads it, and only a match
                            # (repaired, e.g. restored with its mtime) clears the mark.
                            # A listed checksum is the server's record of what was
                            # written, no proof of what is there now: not used.
                            if have:
                                recheck[path] = have
                                to_hash.append((path, st.path, st.size or 0))
                        elif p.rehash or not (have or listed_sum):
                            to_hash.append((path, st.path, st.size or 0))
                        elif listed_sum and listed_sum != have:
                            listed_sums[path] = listed_sum
                pending_writes += 1
                if pending_writes >= BATCH:
                    flush()
        finally:
            progress.add_file(unreported)
            progress.close()

        if root_error is not None:   # nothing was listed: an empty answer proves nothing
            raise StorageError(f"cannot list location {loc.record.url}: {root_error}")
        counts["unreadable"] = len(result.unlisted)
        listed = counts["files"] + counts["dirs"] + counts["links"]
        unlisted = [to_catalog(u) for u in result.unlisted]
        if known_files and not forced:   # before the catalog marks anything vanished
            _refuse_mass_vanish(loc.record.url, existing, flt, unlisted, known_files,
                                p.max_vanish, listed)
        for twin, unseen, twin_files in twins:   # forced: none were looked for
            _refuse_mass_vanish(f"{loc.record.url} (the folder the catalog knows as "
                                f"{twin.url})", unseen, flt, unlisted, twin_files,
                                p.max_vanish, listed)
        flush()
        vanished = [e.id for path, e in existing.items()
                    if not e.deleted and flt.covers(path, e.kind)
                    and not _below_any(path, unlisted)]
        counts["deleted"] = len(vanished)
        writer.finish(vanished)
        ctx.listings[loc_id] = result
        return self._outcome(loc, backend, flt, counts, errors, result, algos)

    def _outcome(self, loc, backend, flt, counts, errors, result, algos) -> StageOutcome:
        filtering, accepts = flt.active, flt.accepts
        summary = (f"indexed {loc.name or loc.record.url}: {counts['files']} files, "
                   f"{counts['dirs']} folders; {counts['new']} new, {counts['changed']} changed, "
                   f"{counts['deleted']} vanished")
        if algos:
            summary += f"; {counts['hashed']} hashed ({', '.join(algos)})"
        if result.unlisted:
            summary += f"; {len(result.unlisted)} folders unreadable"
        specials = [(path, kind) for path, kind in backend.specials_skipped
                    if not filtering or accepts(path, FILE)]
        counts["specials_skipped"] = len(specials)
        if specials:
            kinds: dict[str, int] = {}
            for _, kind in specials:
                kinds[kind] = kinds.get(kind, 0) + 1
            what = ", ".join(f"{n} {k}" if len(kinds) > 1 else k for k, n in kinds.items())
            summary += (f"; {len(specials)} special file{'s' if len(specials) > 1 else ''} "
                        f"skipped ({what}): castlib copies files, folders and links")
        if counts["corrupted_cleared"]:
            summary += (f"; {counts['corrupted_cleared']} found corrupted earlier read back "
                        "as catalogued (mark cleared)")
        return StageOutcome(counts, errors, result, summary, 1 if errors else 0)

    def _accelerator(self, backend, catalog, flt):
        """The C accelerator (catalog.accel) when this index is the case it does: a local
        folder into the lean SQLite catalog, without filters, checksums or hard links.
        Anything else (and twins, a missing root: see _index) is the Python path's."""
        from ..backends.local import LocalBackend

        p = self.params
        if (flt.active or p.checksum or p.rehash or self.context.hard_links_wanted
                or type(backend) is not LocalBackend):
            return None
        accelerator = getattr(catalog, "index_accelerator", None)   # the lean Catalog's
        return accelerator() if accelerator is not None else None

    def _index_fast(self, loc, backend, result, counts, errors, on_error, root_error,
                    forced) -> StageOutcome:
        """The listing and its writes in C (catalog/_accel.c): the same rows as the loop of
        _index, whose policy this keeps: the errors, specials and temporaries are handed
        back in listing order and said here, and the live entries the listing did not see
        come back for the vanish guard, which runs before the last batch is committed and
        anything is marked vanished."""
        p: IndexParams = self.params
        ctx = self.context
        catalog, loc_id = ctx.catalog, loc.record.id
        flt = PathFilter([], [])
        temp_key = backend.temp_key
        progress = ctx.progress(f"index {loc.name or loc.record.url}")
        try:
            index = catalog.accelerated_index(loc_id, backend.root, utcnow(),
                                              lambda name: is_temp_name(name, temp_key),
                                              progress.add_file)
        except BaseException:
            progress.close()
            raise
        try:
            try:
                listing = index.run()
            finally:
                progress.close()
            for path, message in listing["errors"]:
                on_error(path, message)
            backend.specials_skipped = listing["specials"]
            result.leftover_temp.extend(listing["temps"])
            counts.update(listing["counts"])
            if root_error() is not None:   # nothing was listed: an empty answer proves nothing
                raise StorageError(f"cannot list location {loc.record.url}: {root_error()}")
            counts["unreadable"] = len(result.unlisted)
            listed = counts["files"] + counts["dirs"] + counts["links"]
            unlisted = [to_catalog(u) for u in result.unlisted]
            unseen = {path: IndexedEntry(id_, kind, None, None, None, None, False, None, None,
                                         None) for path, id_, kind in listing["unseen"]}
            # the live files the catalog knew: those the listing saw, and those it did not
            known_files = listing["known_files"]
            if known_files and not forced:   # before the catalog marks anything vanished
                _refuse_mass_vanish(loc.record.url, unseen, flt, unlisted, known_files,
                                    p.max_vanish, listed)
            index.commit()
        finally:
            index.close()
        vanished = [e.id for path, e in unseen.items() if not _below_any(path, unlisted)]
        counts["deleted"] = len(vanished)
        index.finish(vanished)
        ctx.listings[loc_id] = result
        return self._outcome(loc, backend, flt, counts, errors, result, [])

    def _hash(self, backend, algo, to_hash, workers, counts, errors, progress) -> dict[str, str]:
        """Checksums of the files in to_hash, computed in parallel; failures are reported."""
        out: dict[str, str] = {}
        if not algo or not to_hash:
            return out

        def one(item):
            path, storage_path, size = item
            try:
                return path, backend.checksum(storage_path, algo), size, None
            except StorageError as exc:
                return path, None, size, str(exc)

        from concurrent.futures import ThreadPoolExecutor   # only when there is hashing to do

        backend.sessions_needed(min(workers, len(to_hash)) + 1)   # and the run's thread

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for path, value, size, error in pool.map(one, to_hash):
                if error:
                    errors.append(f"{from_catalog(path)}: cannot checksum: {error}")
                    continue
                out[path] = value
                counts["hashed"] += 1
                counts["hashed_bytes"] += max(size, 0)
        return out


@contextmanager
def _cyclic_gc_paused():
    """An index builds a few objects per entry (the catalog's baseline, Stat, rows) and
    no reference cycles: Python's cyclic collector only re-traverses them, again and
    again as they pile up (0.1 s of the 0.25 s of loading 100k catalog entries). Plain
    reference counting still frees everything; a collection runs as usual afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


SMALL_LOCATION = 10   # known files below which only "every one vanished" stops a run


def _refuse_mass_vanish(url: str, unseen: dict, flt: PathFilter, unlisted: list[str],
                        known_files: int, max_vanish: float, listed: int) -> None:
    """Stop before anything is marked vanished (and so before a sync deletes it
    elsewhere) when more than max_vanish percent of the files the catalog knew are gone at
    once: an unmounted disk, or a blank one mounted in its place (lost+found only), lists
    a few entries or none where thousands were. Files outside this listing's filters or
    below a folder it could not list are not judged either way. A location known with
    fewer than SMALL_LOCATION files stops only when every one vanished: there, one file
    going is already a large share and says nothing about a mount."""
    gone = out_of_scope = 0
    for path, e in unseen.items():   # the entries this listing did not see
        if e.kind != FILE or e.deleted:
            continue
        if flt.covers(path, e.kind) and not _below_any(path, unlisted):
            gone += 1
        else:
            out_of_scope += 1
    known = known_files - out_of_scope
    if not gone or (known < SMALL_LOCATION and gone < known) or gone * 100 <= max_vanish * known:
        return
    empty = ", and it lists empty" if listed == 0 else ""
    raise SafetyRefusal(
        f"location {url}: {gone} of the {known} files the catalog knew there vanished "
        f"({gone * 100 / known:.0f} %, more than --max-vanish {max_vanish:g} %){empty}: is "
        "the disk mounted? nothing was changed (use --force, or a higher --max-vanish, to "
        "accept)")


def _same_folder_known(catalog, backend, record) -> list[tuple]:
    """The listed locations of the same storage that are the same folder as `record` by
    identity (Backend.identity: for local ones, the file system and the path inside it,
    so a bind mount of a known folder is found), each as (record, its entries, its live
    files), those with files only. Looked for once, when a location has no history."""
    identity = type(backend).identity
    try:
        own = identity(backend.url)
    except OSError:
        return []
    twins = []
    for other in catalog.listed_locations_of(backend.url.scheme, backend.url.host):
        if other.id == record.id:
            continue
        try:
            if identity(parse_location(other.url)) != own:
                continue
        except (ConfigError, OSError):
            continue
        entries = catalog.load_entries(other.id)
        files = sum(1 for e in entries.values() if e.kind == FILE and not e.deleted)
        if files:
            twins.append((other, entries, files))
    return twins


def _algorithms_held(existing: dict) -> list[str]:
    """The checksum algorithms of which the catalog holds a value for some live file."""
    return [a for a in ALGORITHMS if any(e.kind == FILE and not e.deleted and e.checksum(a)
                                         for e in existing.values())]


def _below_any(path: str, folders: list[str]) -> bool:
    if not folders:
        return False
    return any(f == "" or path == f or path.startswith(f + "/") for f in folders)


def _climbs_out(path: str) -> bool:
    """Whether a listed path has a part that is '..' or empty: what a storage may hold
    (an S3 key 'a/../../x', a hostile server's listing) but no file below a location can
    be. Joined below a local destination (os.path.join), it would be written outside it."""
    return any(part in ("", "..") for part in path.split("/"))
