"""The Python API: index, diff, sync, verify and pipelines, as a notebook or the CLI calls them.

    import castlib
    report = castlib.sync("/data/cdr", "root://eos.example.org//eos/exp/cdr", transfers=8)
    report.counts   # {'copied': 12, 'replaced': 0, 'deleted': 0, 'failed': 0, 'bytes': ...}

Each call opens the catalog (`db` URL, else CASTLIB_DB, else the embedded SQLite file),
records a run in it, and returns a RunReport. Bad input and refusals raise CastlibError.
A KeyboardInterrupt (Ctrl-C) stops a sync within seconds, without starting another copy;
the run is recorded as interrupted with what was done, and the exception, re-raised,
carries that RunReport as its `report`.
"""
from __future__ import annotations

from typing import Iterable

from .catalog import Catalog
from .checksum import DEFAULT_ALGORITHM
from .pipeline import Pipeline, RunReport


def open_catalog(db: str | Catalog | None = None) -> Catalog:
    return db if isinstance(db, Catalog) else Catalog(db)


def _run(pipeline: Pipeline, db, command: str, args: dict, *, on_workers: bool = False,
         **run_options) -> RunReport:
    """Run here, or with on_workers=True (or `workers: true` in the pipeline) on the
    workers next to the data (castlib.dispatch: also `detach`, `broker`, `verbose`)."""
    catalog = open_catalog(db)
    worker_options = {k: run_options.pop(k) for k in ("detach", "broker", "verbose")
                      if k in run_options}
    try:
        if on_workers or pipeline.workers:
            from .dispatch import submit

            return submit(pipeline, catalog, command=command, args=args,
                          **worker_options, **run_options)
        return pipeline.run(catalog, command=command, args=args, **run_options)
    finally:
        if not isinstance(db, Catalog):
            catalog.close()


def index(location: str, *, db=None, checksum: str | None = None, only: Iterable[str] = (),
          ignore: Iterable[str] = (), rehash: bool = False, force: bool = False,
          max_vanish: float = 50, **run_options) -> RunReport:
    """List a location into the catalog; `checksum` also computes that checksum. More than
    `max_vanish` percent of the files the catalog knew there gone at once stops it (an
    unmounted or blank disk), unless `force`."""
    params = {"location": location, "checksum": checksum, "only": list(only),
              "ignore": list(ignore), "rehash": rehash, "force": force,
              "max_vanish": max_vanish}
    return _run(Pipeline.from_stages([("index", params)]), db, "index", params, **run_options)


def _filters(only: Iterable[str], ignore: Iterable[str]) -> dict:
    return {"only": list(only), "ignore": list(ignore)}


def diff(ref: str, dst: str, *, db=None, checksum: str | None = None,
         mtime_tolerance: float = 0, index: bool = True, force: bool = False,
         max_vanish: float = 50, only: Iterable[str] = (), ignore: Iterable[str] = (),
         perms: bool = True,
         **run_options) -> RunReport:
    """Differences between two locations; `report.value.differences` lists them.
    Both locations are re-listed first unless index=False (catalog only). With `checksum`,
    that checksum is computed wherever the catalog lacks it (then compared); without it,
    the adler32 checksums the catalog already holds are compared. `only`/`ignore` globs
    leave paths out of the comparison on both sides. perms=False leaves permission bits
    (kind `mode`) out, as rsync --no-perms."""
    stages = []
    globs = _filters(only, ignore)
    if index:
        # a destination that does not exist is more likely a typo than an empty archive
        guard = {"force": force, "max_vanish": max_vanish}
        stages += [("index", {"location": ref, **guard, "checksum": checksum, **globs}),
                   ("index", {"location": dst, **guard, "checksum": checksum, **globs})]
    stages.append(("diff", {"id": "diff", "ref": ref, "dst": dst,
                            "checksum": checksum or DEFAULT_ALGORITHM,
                            "mtime_tolerance": mtime_tolerance, "perms": perms, **globs}))
    args = {"ref": ref, "dst": dst, "checksum": checksum, "mtime_tolerance": mtime_tolerance,
            "index": index, "perms": perms, **globs}
    return _run(Pipeline.from_stages(stages), db, "diff", args, force=force, **run_options)


def sync(ref: str, dst: str, *, db=None, dry_run: bool = False, delete: bool = False,
         max_delete: int | None = None, replace: bool = True, checksum: str | None = None,
         transfers: int = 4, index: str = "both", force: bool = False, retries: int = 3,
         mtime_tolerance: float = 0, lock_wait: float = 0, max_vanish: float = 50,
         only: Iterable[str] = (), ignore: Iterable[str] = (), perms: bool = True,
         owner: bool = False, hard_links: bool = False, **run_options) -> RunReport:
    """Make `dst` match `ref`. index: "both" re-lists both sides, "ref" trusts the catalog
    for the destination, "none" trusts it for both. Copies are verified with `checksum`
    (adler32 by default); naming it explicitly also compares the content of files whose
    size and mtime agree (computing checksums the catalog lacks, as rsync -c would).
    `only`/`ignore` globs leave paths out on both sides: neither copied nor deleted.
    More than `max_vanish` percent of the files the catalog knew in a location gone since
    its last listing stops the run before anything is touched, unless `force`.
    Metadata as rsync -a: permission bits (perms=False: left as they are), the mtimes of
    files, folders and links; owner=True also owner and group (as root, on local
    destinations); hard_links=True keeps the names of one file linked (rsync -H)."""
    if index not in ("both", "ref", "none"):
        from .errors import ConfigError

        raise ConfigError(f"index must be both, ref or none, not {index!r}", key="index")
    stages = []
    globs = _filters(only, ignore)
    guard = {"force": force, "max_vanish": max_vanish}
    if index in ("both", "ref"):
        stages.append(("index", {"location": ref, **guard, "checksum": checksum, **globs}))
    if index == "both":
        stages.append(("index", {"location": dst, **guard, "missing_ok": True,
                                 "checksum": checksum, **globs}))
    stages.append(("diff", {"id": "plan", "ref": ref, "dst": dst,
                            "checksum": checksum or DEFAULT_ALGORITHM,
                            "mtime_tolerance": mtime_tolerance, "perms": perms, **globs}))
    stages.append(("sync", {"from": "plan", "delete": delete, "max_delete": max_delete,
                            "replace": replace, "transfers": transfers, "retries": retries,
                            "dry_run": dry_run, "lock_wait": lock_wait, "owner": owner,
                            "hard_links": hard_links}))
    args = {"ref": ref, "dst": dst, "dry_run": dry_run, "delete": delete,
            "max_delete": max_delete, "replace": replace, "checksum": checksum,
            "transfers": transfers, "index": index, "force": force, "max_vanish": max_vanish,
            "perms": perms, "owner": owner, "hard_links": hard_links, **globs}
    return _run(Pipeline.from_stages(stages), db, "sync", args, dry_run=dry_run, force=force,
                **run_options)


def verify(location: str, *, db=None, checksum: str = "adler32", prefix: str = "",
           **run_options) -> RunReport:
    """Re-read a location's files and compare them with the catalog's checksums."""
    params = {"location": location, "checksum": checksum, "prefix": prefix}
    return _run(Pipeline.from_stages([("verify", params)]), db, "verify", params, **run_options)


def run_pipeline(path: str, *, db=None, dry_run: bool = False, force: bool = False,
                 **run_options) -> RunReport:
    """Validate the YAML pipeline at `path`, then run it."""
    from .config import load_user_config

    user_config = load_user_config()
    pipeline = Pipeline.from_file(path, user_config)
    return _run(pipeline, db, "run", {"pipeline": path, "dry_run": dry_run}, dry_run=dry_run,
                force=force, user_config=user_config, **run_options)


__all__ = ["index", "diff", "sync", "verify", "run_pipeline", "open_catalog", "RunReport",
           "Pipeline", "Catalog"]
