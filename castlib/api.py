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

import inspect
import textwrap
import typing

from . import options
from .catalog import Catalog
from .checksum import DEFAULT_ALGORITHM
from .errors import ConfigError
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


# Each command's options are its stages' parameters (castlib/options.py): the functions
# below take them as keywords, and their signature and docstring list them, generated from
# the stages' models; what a function adds is how it puts its stages together.
_RUN_OPTIONS = [name for name in inspect.signature(Pipeline.run).parameters
                if name not in ("self", "catalog", "command", "args", "dry_run", "force")]
# where it runs (see _run): on the workers next to the data, castlib.dispatch
_RUN_OPTIONS += [name for name in ("on_workers", "detach", "broker", "verbose")
                 if name not in _RUN_OPTIONS]


def _annotation(o):
    base = {"bool": bool, "int": int, "float": float, "str": str}.get(o.kind, str)
    if o.choices:
        base = typing.Literal[tuple(o.choices)]
    if o.kind == "list":
        base = list[base]
    return base | None if o.optional else base


def _signature(name: str, positional: list[str]) -> inspect.Signature:
    """The signature of the api function of a command: its arguments, db, its options
    with their defaults, and **run_options."""
    P = inspect.Parameter
    params = [P(p, P.POSITIONAL_OR_KEYWORD, annotation=str) for p in positional]
    params.append(P("db", P.KEYWORD_ONLY, default=None))
    params += [P(o.name, P.KEYWORD_ONLY, default=o.default, annotation=_annotation(o))
               for o in options.command_options(name)]
    params.append(P("run_options", P.VAR_KEYWORD))
    return inspect.Signature(params)


def _doc(name: str, text: str) -> str:
    out = [inspect.cleandoc(text), "", f"Options (those of `castlib {name}`, and the keys of "
           "its stages in a pipeline):"]
    for o in options.command_options(name):
        out.append(textwrap.fill(f"{o.name} = {o.default!r}: {o.help}", 88,
                                 initial_indent="    ", subsequent_indent="        "))
    out += ["", f"run_options: {', '.join(_RUN_OPTIONS)} (see Pipeline.run)."]
    return "\n".join(out)


def _bind(name: str, given: dict) -> tuple[dict, dict]:
    """(the command's options, defaults filled in; the run options) from an api call's
    keywords. A keyword that is neither is a TypeError naming it, as Python's own."""
    known = {o.name: o for o in options.command_options(name)}
    values = {n: list(o.default) if isinstance(o.default, list) else o.default
              for n, o in known.items()}
    run = {}
    for key, value in given.items():
        if key in known:
            if known[key].kind == "list" and not isinstance(value, (str, bytes, type(None))):
                value = list(value)   # any iterable, taken once (it goes to several stages)
            values[key] = value
        elif key in _RUN_OPTIONS:
            run[key] = value
        else:
            import difflib

            near = difflib.get_close_matches(key, [*known, *_RUN_OPTIONS], 1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}{hint}")
    for key, o in known.items():
        if o.choices and o.kind != "list" and not o.stages and values[key] not in o.choices:
            # a command's own option: no stage model checks it
            raise ConfigError(f"must be {', '.join(map(str, o.choices[:-1]))} or "
                              f"{o.choices[-1]}, not {values[key]!r}", key=key)
    return values, run


def _for_stage(values: dict, name: str, stage: str) -> dict:
    """The options of a command that a stage of it takes."""
    return {o.name: values[o.name] for o in options.command_options(name) if stage in o.stages}


def _command(name: str):
    """Give an api function the signature and docstring of its command's options."""
    def decorate(function):
        arguments = [p for p in inspect.signature(function).parameters
                     if p not in ("db", "params")]
        function.__signature__ = _signature(name, arguments)
        function.__doc__ = _doc(name, function.__doc__ or "")
        return function
    return decorate


@_command("index")
def index(location: str, *, db=None, **params) -> RunReport:
    """List a location into the catalog; `checksum` also computes that checksum. More than
    `max_vanish` percent of the files the catalog knew there gone at once stops it (an
    unmounted or blank disk), unless `force`."""
    p, run_options = _bind("index", params)
    stage = {"location": location, **_for_stage(p, "index", "index")}
    return _run(Pipeline.from_stages([("index", stage)]), db, "index", stage, **run_options)


@_command("diff")
def diff(ref: str, dst: str, *, db=None, **params) -> RunReport:
    """Differences between two locations; `report.value.differences` lists them.
    Both locations are re-listed first unless index=False (catalog only). With `checksum`,
    that checksum is computed wherever the catalog lacks it (then compared); without it,
    the adler32 checksums the catalog already holds are compared. `only`/`ignore` globs
    leave paths out of the comparison on both sides. perms=False leaves permission bits
    (kind `mode`) out, as rsync --no-perms."""
    p, run_options = _bind("diff", params)
    stages = []
    if p["index"]:
        # a destination that does not exist is more likely a typo than an empty archive
        listing = _for_stage(p, "diff", "index")
        stages += [("index", {"location": ref, **listing}),
                   ("index", {"location": dst, **listing})]
    stages.append(("diff", {"id": "diff", "ref": ref, "dst": dst,
                            **_diff_params(_for_stage(p, "diff", "diff"))}))
    return _run(Pipeline.from_stages(stages), db, "diff", {"ref": ref, "dst": dst, **p},
                force=p["force"], **run_options)


def _diff_params(params: dict) -> dict:
    # no checksum named: compare the adler32 the catalog holds (and compute none)
    return {**params, "checksum": params["checksum"] or DEFAULT_ALGORITHM}


@_command("sync")
def sync(ref: str, dst: str, *, db=None, **params) -> RunReport:
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
    p, run_options = _bind("sync", params)
    stages = []
    listing = _for_stage(p, "sync", "index")
    if p["index"] in ("both", "ref"):
        stages.append(("index", {"location": ref, **listing}))
    if p["index"] == "both":
        stages.append(("index", {"location": dst, **listing, "missing_ok": True}))
    stages.append(("diff", {"id": "plan", "ref": ref, "dst": dst,
                            **_diff_params(_for_stage(p, "sync", "diff"))}))
    stages.append(("sync", {"from": "plan", **_for_stage(p, "sync", "sync")}))
    return _run(Pipeline.from_stages(stages), db, "sync", {"ref": ref, "dst": dst, **p},
                dry_run=p["dry_run"], force=p["force"], **run_options)


@_command("verify")
def verify(location: str, *, db=None, **params) -> RunReport:
    """Re-read a location's files and compare them with the catalog's checksums."""
    p, run_options = _bind("verify", params)
    stage = {"location": location, **_for_stage(p, "verify", "verify")}
    return _run(Pipeline.from_stages([("verify", stage)]), db, "verify", stage, **run_options)


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
