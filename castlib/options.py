"""Each option declared once: a command's options are its stages' Params fields.

A stage's `Params` (a pydantic model, castlib/stages/NAME.py) is the one place a parameter
is declared: its name, type, default, bounds and help. From it come

- the pipeline's keys (the model itself validates them),
- the command line: `add_arguments()` turns each field of the stages a command runs into an
  argparse option (`--max-vanish PCT`, `--perms/--no-perms`, `--checksum ALGO`),
- the Python API: `castlib.api` gives `sync()` etc. a signature and docstring listing the
  same options (`command_options()`), and checks the keywords it is called with.

The derivation itself (Params field -> Option) is castlib/stages/params.py.

`COMMANDS` says which stages each command runs and the few things the command decides
itself: its positional arguments (the stages' location parameters), the options no stage
has (sync's `--index both|ref|none`), the fields it sets rather than offers (sync lists
its destination with `missing_ok`), and its own wording of an option it gives a meaning to.
A field's wiring (`id`, a `from` naming an earlier stage, a location parameter) is the
pipeline's, never an option.

Start-up: the command line must not import pydantic or the stages to print `--help` (that
costs ten times the rest). The option tables derived from the models are kept in a small
JSON file in the user's cache folder, valid while no file of this castlib package changed
(the size and mtime of every .py file are its key); a miss derives them again, which a
command that runs imports anyway. This module imports nothing heavy at import time.
"""
from __future__ import annotations

import json
import os
import sys


class Cli:
    """How a stage parameter reads on the command line where its name and type do not say:
    `Annotated[float, Cli(unit="seconds")]`. unit: "seconds" or "percent" (a trailing %
    accepted) words the bounds in errors; metavar the placeholder in --help; short a
    one-letter alias ("-n")."""

    def __init__(self, metavar: str | None = None, unit: str | None = None,
                 short: str | None = None):
        self.metavar, self.unit, self.short = metavar, unit, short


# plain classes, not dataclasses: importing dataclasses costs --help a third of its time
class Option:
    """One option of a command, as argparse and the API's signature need it (plain data,
    kept in the cache as JSON)."""

    FIELDS = ("name", "kind", "default", "help", "choices", "optional", "ge", "gt", "le",
              "unit", "metavar", "short", "stages")

    def __init__(self, name: str, kind: str, default: object = None, help: str = "",
                 choices: list | None = None, optional: bool = False, ge: float | None = None,
                 gt: float | None = None, le: float | None = None, unit: str | None = None,
                 metavar: str | None = None, short: str | None = None,
                 stages: list[str] | None = None):
        self.name = name              # the keyword; the flag is --name-with-dashes
        self.kind = kind              # bool, int, float, str or list
        self.default = default
        self.help = help
        self.choices = choices        # for a list: the choices of each item
        self.optional = optional      # None is a value (an int | None)
        self.ge, self.gt, self.le = ge, gt, le
        self.unit, self.metavar, self.short = unit, metavar, short
        self.stages = list(stages or [])   # the stages it is passed to

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    def __repr__(self) -> str:
        return f"Option({self.as_dict()})"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


class Command:
    """What a command runs. stages: the stage names whose Params fields are its options;
    positional: its arguments, each a location parameter of one of the stages; own: the
    options no stage has; sets: fields the command sets itself (not offered); wording: its
    own help for an option it gives a meaning to."""

    def __init__(self, stages: tuple[str, ...], positional: tuple[str, ...],
                 own: tuple[Option, ...] = (), sets: tuple[str, ...] = (),
                 wording: dict[str, str] | None = None):
        self.stages, self.positional, self.own, self.sets = stages, positional, own, sets
        self.wording = wording or {}


COMMANDS: dict[str, Command] = {
    "index": Command(("index",), ("location",)),
    "diff": Command(
        ("index", "diff"), ("ref", "dst"), sets=("missing_ok",),
        own=(Option("index", "bool", True, "re-list both locations first (--no-index: "
                    "compare the catalog as it is)"),),
        wording={"checksum": "compute this checksum where the catalog lacks it and compare "
                             "(default: compare the adler32 checksums already catalogued)",
                 "force": "accept listings in which more files vanished than --max-vanish "
                          "allows"}),
    "sync": Command(
        ("index", "diff", "sync"), ("ref", "dst"), sets=("missing_ok",),
        own=(Option("index", "str", "both", "what to re-list first (ref: trust the catalog "
                    "for DST; none: for both)", choices=["both", "ref", "none"]),),
        wording={"checksum": "verify copies with ALGO and compare the content of files whose "
                             "size and mtime agree, like rsync -c (default: adler32, copies "
                             "only)",
                 "force": "act even if more files vanished than --max-vanish allows (an "
                          "empty or blank reference where files were)"}),
    "verify": Command(("verify",), ("location",)),
}


# -- the cache --------------------------------------------------------------------------------

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_tables: dict | None = None
_stage_tables: dict | None = None   # stage name -> its fields (stages.params.stage_fields)


def tables() -> dict[str, tuple[list[Option], list[Option]]]:
    """Every command's (positional arguments, options), from the cache when it is current."""
    global _tables, _stage_tables
    if _tables is None:
        key = _fingerprint()
        path = _cache_path()
        data = None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            pass
        try:
            if data["key"] != key:
                raise ValueError("stale")
            _tables, _stage_tables = _from_json(data), dict(data["stages"])
        except (KeyError, TypeError, ValueError):   # none, stale or damaged: derive again
            from .stages.params import derive, stage_fields as derive_fields

            data = {"key": key, "commands": {
                name: [[o.as_dict() for o in part] for part in derive(name)] for name in COMMANDS},
                "stages": {stage: derive_fields(stage)
                           for stage in dict.fromkeys(s for c in COMMANDS.values()
                                                      for s in c.stages)}}
            _write(path, data)
            _tables, _stage_tables = _from_json(data), data["stages"]
    return _tables


def _from_json(data: dict) -> dict:
    return {name: tuple([Option(**o) for o in part] for part in parts)
            for name, parts in data["commands"].items()}


def stage_fields(stage: str) -> list[dict] | None:
    """The fields of a stage that a command runs, as stages.params.stage_fields gives them
    (cached with the tables); None for another stage."""
    tables()
    return _stage_tables.get(stage)


def command_options(name: str) -> list[Option]:
    return tables()[name][1]


def _fingerprint() -> list:
    """The size and mtime of every .py file of the package: the tables depend on the
    stages, and on whatever the stages' models take their types from."""
    stats = []
    pending = [_PACKAGE]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(".py"):
                    st = entry.stat()
                    stats.append([os.path.relpath(entry.path, _PACKAGE), st.st_size,
                                  st.st_mtime_ns])
                elif entry.is_dir() and entry.name != "__pycache__":
                    pending.append(entry.path)
    return [sys.version, _PACKAGE, sorted(stats)]


def _cache_path() -> str:
    import zlib

    home = os.path.expanduser("~")
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
    elif sys.platform == "darwin":
        base = os.path.join(home, "Library", "Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    # one file per installed copy of castlib (a checkout and a site-packages copy differ)
    return os.path.join(base, "castlib", f"options-{zlib.adler32(_PACKAGE.encode()):08x}.json")


def _write(path: str, data: dict) -> None:
    """Best effort, atomic: a read-only home only costs the derivation each time."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


# -- the command line -------------------------------------------------------------------------

def add_arguments(parser, name: str) -> None:
    """The command's positional arguments and options, on an argparse (sub)parser."""
    import argparse

    class Repeat(argparse.Action):
        """A list option: each use adds one item, and the first use replaces the default
        (a list the model fills in, such as every kind of difference)."""

        def __call__(self, parser, namespace, value, option_string=None):
            current = getattr(namespace, self.dest, None)
            items = [] if current is self.default or current is None else list(current)
            setattr(namespace, self.dest, items + [value])

    positional, options = tables()[name]
    for o in positional:
        parser.add_argument(o.name, help=o.help or None)
    for o in options:
        flags = [o.flag] + ([o.short] if o.short else [])
        help_text = (o.help + _default_note(o)).replace("%", "%%")   # argparse formats it
        if o.kind == "bool":
            if o.default:
                parser.add_argument(*flags, action=argparse.BooleanOptionalAction,
                                    default=True, help=help_text)
            else:
                parser.add_argument(*flags, action="store_true", help=help_text)
            continue
        kwargs: dict = {"default": o.default, "help": help_text}
        if o.kind == "list":
            kwargs["action"] = Repeat
        if o.choices is not None:
            kwargs["choices"] = o.choices
        if o.kind in ("int", "float"):
            kwargs["type"] = _number(o)
        kwargs["metavar"] = o.metavar or (None if o.choices else _metavar(o))
        parser.add_argument(*flags, **kwargs)


def values(args, name: str) -> dict:
    """The command's options from parsed arguments, as keywords for its api function."""
    return {o.name: getattr(args, o.name) for o in command_options(name)}


def _default_note(o: Option) -> str:
    notes = []
    if o.choices and o.metavar:   # the usage line shows the placeholder, not the choices
        notes.append(f"{o.metavar}: {', '.join(map(str, o.choices))}")
    if o.kind == "list":
        notes.append("repeatable")
    if o.kind == "bool":
        notes += [f"default: {o.flag}"] if o.default else []
    elif o.default not in (None, "", []) and "default" not in o.help:
        if isinstance(o.default, list):
            shown = " ".join(map(str, o.default)) or "none"
        elif isinstance(o.default, float):
            shown = f"{o.default:g}"
        else:
            shown = o.default
        notes.append(f"default: {shown}{'%' if o.unit == 'percent' else ''}")
    return f" ({'; '.join(notes)})" if notes else ""


def _metavar(o: Option) -> str:
    return {"seconds": "S", "percent": "PCT"}.get(o.unit or "", "N" if o.kind in (
        "int", "float") else o.name.upper())


def _number(o: Option):
    """An argparse type for a bounded number: the bounds said in the option's own words."""
    import argparse

    whole = o.kind == "int"
    unit = {"seconds": " seconds", "percent": ""}.get(o.unit or "", "")
    noun = {"seconds": "a number of seconds", "percent": "a percentage"}.get(
        o.unit or "", "a whole number" if whole else "a number")

    def parse(text: str):
        try:
            value = (int if whole else float)(text.removesuffix("%") if o.unit == "percent"
                                              else text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
        if o.unit == "percent" and o.ge is not None and o.le is not None \
                and not o.ge <= value <= o.le:
            raise argparse.ArgumentTypeError(
                f"must be a percentage from {o.ge:g} to {o.le:g}, not {text}")
        if o.ge is not None and not value >= o.ge:
            raise argparse.ArgumentTypeError(f"must be {o.ge:g} or more{unit}, not {text}")
        if o.gt is not None and not value > o.gt:
            raise argparse.ArgumentTypeError(f"must be more than {o.gt:g}{unit}, not {text}")
        if o.le is not None and not value <= o.le:
            raise argparse.ArgumentTypeError(f"must be {o.le:g} or less{unit}, not {text}")
        if value != value:   # nan passes no bound, and means nothing here
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}")
        return value

    parse.__name__ = o.name   # argparse names the type in some messages
    return parse
