"""What every stage is: a parameter model, a run() over a shared RunContext, an outcome."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, TextIO

from ..backends import Backend, open_backend
from ..catalog import Catalog, LocationRecord
from ..catalog.settings import temp_name_key
from ..checksum import ALGORITHMS
from ..config import UserConfig
from ..errors import ConfigError
from ..location import LocationURL, parse_location, secret_values
from ..options import Cli
from ..progress import Progress


# Types of stage parameters that say how they read on the command line (castlib/options.py):
# a command offers every parameter of its stages as an option, derived from the model.
Seconds = Annotated[float, Cli(unit="seconds", metavar="S")]
Percent = Annotated[float, Cli(unit="percent", metavar="PCT")]
Globs = Annotated[list[str], Cli(metavar="GLOB")]
ChecksumName = Annotated[Literal[ALGORITHMS], Cli(metavar="ALGO")]  # type: ignore[valid-type]


def __getattr__(name: str):
    # StageParams, the pydantic base of every stage's Params, is built on first use: a
    # command of the CLI or the API checks its stages' parameters without pydantic
    # (lean_params) and imports it only for what that check leaves to the model
    if name == "StageParams":
        from pydantic import BaseModel, ConfigDict, Field

        class StageParams(BaseModel):
            """Parameters common to every stage. `id` names the stage's result for later
            stages."""

            model_config = ConfigDict(extra="forbid", populate_by_name=True)
            id: str | None = Field(None, description="names this stage's result for later "
                                                     "stages' 'from'")

        StageParams.__module__ = __name__
        globals()["StageParams"] = StageParams
        return StageParams
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LazyParams:
    """A stage's `Params`, the pydantic model, built by `build` on first access (a class
    attribute: IndexStage.Params is the model)."""

    def __init__(self, build):
        self.build = build
        self.model = None

    def __get__(self, obj, owner=None):
        if self.model is None:
            self.model = self.build()
        return self.model


class LeanParams:
    """A stage's parameters checked without pydantic (lean_params): the fields as
    attributes, and the one dump the pipeline and the workers use."""

    def __init__(self, fields: list[dict], values: dict):
        self._fields = fields
        self.__dict__.update(values)

    def model_dump(self, *, mode: str = "json", by_alias: bool = True,
                   exclude_defaults: bool = True) -> dict:
        """As the model's model_dump(mode="json", by_alias=True, exclude_defaults=True)."""
        out = {}
        for f in self._fields:
            value = getattr(self, f["name"])
            if exclude_defaults and not f["required"] and value == f["default"]:
                continue
            out[(f["alias"] or f["name"]) if by_alias else f["name"]] = (
                list(value) if isinstance(value, list) else value)
        return out

    def __repr__(self) -> str:
        shown = ", ".join(f"{f['name']}={getattr(self, f['name'])!r}" for f in self._fields)
        return f"LeanParams({shown})"


_BAD = object()


def lean_params(stage: str, given: dict) -> LeanParams | None:
    """The parameters of a built-in stage as its model would make them, when every value
    is plainly valid (of its exact type, within its bounds and choices: what the command
    line and the API pass); else None, and the model checks them (its coercions and its
    error messages stay the one definition). The fields' table is derived from the model
    and cached with the command-line options (castlib.options.stage_fields)."""
    from ..options import stage_fields

    fields = stage_fields(stage)
    if not isinstance(fields, list):
        return None
    keys = {}
    for f in fields:
        keys[f["name"]] = f
        if f["alias"]:
            keys[f["alias"]] = f
    values = {}
    for key, value in given.items():
        f = keys.get(key)
        if f is None or f["name"] in values:
            return None
        value = _plain(f, value)
        if value is _BAD:
            return None
        values[f["name"]] = value
    for f in fields:
        if f["name"] not in values:
            if f["required"]:
                return None
            default = f["default"]
            values[f["name"]] = list(default) if isinstance(default, list) else default
    return LeanParams(fields, values)


def _plain(f: dict, value):
    if value is None:
        return None if f["optional"] else _BAD
    kind = f["kind"]
    if kind == "list":
        if type(value) is not list or any(type(i) is not str for i in value):
            return _BAD
        if f["choices"] is not None and any(i not in f["choices"] for i in value):
            return _BAD
        return list(value)
    if kind == "bool":
        return value if type(value) is bool else _BAD
    if kind == "str":
        if type(value) is not str or (f["choices"] is not None and value not in f["choices"]):
            return _BAD
        return value
    if kind == "int":
        if type(value) is not int:
            return _BAD
    elif kind == "float":
        if type(value) not in (int, float) or value != value:   # NaN: the model says
            return _BAD
        value = float(value)
    else:
        return _BAD
    if ((f["ge"] is not None and not value >= f["ge"])
            or (f["gt"] is not None and not value > f["gt"])
            or (f["le"] is not None and not value <= f["le"])):
        return _BAD
    return value


@dataclass
class StageOutcome:
    """What a stage did: counts for the run record, per-item errors, and a result value
    (a diff's differences, an index's leftovers) that later stages read by id."""

    counts: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    value: Any = None
    summary: str = ""
    exit_code: int = 0           # 1: some items failed or differ, as the stage defines it


@dataclass
class IndexResult:
    """What an index stage found besides the entries it wrote: the value of its outcome,
    and what later stages of the run read of the location (RunContext.listing)."""

    location_id: int
    leftover_temp: list[str] = field(default_factory=list)   # castlib's own temporaries
    unlisted: list[str] = field(default_factory=list)        # folders that could not be listed
    only: list[str] = field(default_factory=list)            # the listing's filters
    ignore: list[str] = field(default_factory=list)
    # (device, inode) -> catalog paths, for files listed with more than one name
    hard_links: dict[tuple, list[str]] = field(default_factory=dict)
    # the root did not exist and was listed as empty (missing_ok: a destination not created
    # yet): as a reference it is no word on what the destination should hold (see sync)
    root_missing: bool = False


@dataclass
class ResolvedLocation:
    name: str | None
    url: LocationURL
    options: dict
    record: LocationRecord


@dataclass
class RunContext:
    """Everything a stage may use: the catalog, the run, named locations, earlier results."""

    catalog: Catalog
    run_id: int | None = None
    dry_run: bool = False
    force: bool = False
    quiet: bool = False
    locations: dict[str, str] = field(default_factory=dict)     # name -> URL text
    location_options: dict[str, dict] = field(default_factory=dict)
    user_config: UserConfig = field(default_factory=UserConfig)
    results: dict[str, Any] = field(default_factory=dict)        # stage id -> value
    # location id -> this run's latest index of it: a diff takes its only/ignore, a sync
    # its unlisted folders, hard links and leftover temporaries (see listing())
    listings: dict[int, IndexResult] = field(default_factory=dict)
    # a later stage links the names of one file (sync --hard-links): only then does an
    # index keep every multi-name file's (device, inode), which costs memory per file
    hard_links_wanted: bool = False
    base_dir: str = "."
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    retries: int = 3
    retry_backoff_s: float = 1.0
    locked: set[str] = field(default_factory=set)   # lock keys (locks.lock_key) the run holds
    # passwords and keys of the locations resolved: never in a message or a run record
    secrets: set[str] = field(default_factory=set)
    _backends: dict[str, Backend] = field(default_factory=dict)
    # the progress of the stage running now: what a worker reports to the client waiting
    current_progress: Progress | None = None

    def resolve(self, text: str) -> ResolvedLocation:
        """A location by pipeline name, configured name, catalog name, or URL/path."""
        name, url, options = self._locate(text)
        record = self.catalog.location(url, name=name)
        return ResolvedLocation(name, url, options, record)

    def _locate(self, text: str):
        """(name, URL, options) of a location, as resolve() finds them, writing nothing."""
        name = None
        if text in self.locations:
            name, url_text = text, self.locations[text]
        elif text in self.user_config.locations:
            name, url_text = text, self.user_config.locations[text]
        else:
            url_text = text
            if "://" not in text and not text.startswith(("/", ".", "~")):
                known = self.catalog.find_location(text)
                if known is not None and known.name == text:
                    name, url_text = text, known.url
                elif "/" not in text and not os.path.lexists(os.path.join(self.base_dir, text)):
                    # a name mistyped, not a folder to make: a sync into it would have
                    # copied the whole reference into a new folder here
                    raise ConfigError(
                        f"no location named '{text}' (in the pipeline, the configuration "
                        f"or the catalog) and no folder of that name here (a new local "
                        f"folder is written './{text}')")
        url = parse_location(url_text, base_dir=self.base_dir)   # relative to the pipeline file
        options = self.user_config.options_for(url)
        if name and name in self.location_options:
            options.override(self.location_options[name])
        self.secrets.update(secret_values(options, url))
        return name, url, options

    def backend(self, location: ResolvedLocation) -> Backend:
        """One back-end object per location for the whole run (connections are reused)."""
        return self._backend(location.url, location.options)

    def _backend(self, url, options: dict) -> Backend:
        key = str(url)   # as the catalog's record of it (Catalog.location)
        if key not in self._backends:
            backend = open_backend(url, options)
            backend.temp_key = temp_name_key(self.catalog)
            self._backends[key] = backend
        return self._backends[key]

    def connect_early(self, wanted) -> None:
        """Let the back-ends of these locations start connecting now, in the background
        (Backend.connect_in_background), so that an SSH handshake or a login overlaps the
        run's other work (the configuration, the catalog, listing a local reference)
        instead of waiting for the first stage that touches them. A location that cannot
        be found or opened is left alone: the stage that uses it says why, as before.
        `wanted`: the locations, as the stages name them. A stage that uses more sessions
        at once asks for them when it knows how many (Backend.sessions_needed)."""
        for text in wanted:
            try:
                _, url, options = self._locate(text)
                self._backend(url, options).connect_in_background()
            except Exception:  # noqa: BLE001 - reported by the stage that uses it
                continue

    def progress(self, label: str, total_files: int = 0, total_bytes: int = 0) -> Progress:
        enabled = not self.quiet and hasattr(self.err, "isatty") and self.err.isatty()
        self.current_progress = Progress(label, total_files, total_bytes, enabled=enabled,
                                         stream=self.err)
        return self.current_progress

    def listing(self, location: ResolvedLocation) -> IndexResult | None:
        """What this run's index of `location` found, or None when the run did not list
        it (--index none, or a pipeline without an index of it)."""
        return self.listings.get(location.record.id)

    def result(self, stage_id: str, wanted: type, key: str = "from") -> Any:
        if stage_id not in self.results:
            raise ConfigError(f"no earlier stage has id {stage_id!r}", key=key)
        value = self.results[stage_id]
        if not isinstance(value, wanted):
            raise ConfigError(f"stage {stage_id!r} does not produce what this stage reads",
                              key=key)
        return value

    def close(self) -> None:
        for backend in self._backends.values():
            try:
                backend.close()
            except Exception:  # closing is best effort at the end of a run
                pass
        self._backends.clear()


class Stage:
    """A step of a pipeline. Subclasses set name, description and Params, and run()."""

    name: ClassVar[str]
    description: ClassVar[str]
    # the pydantic model of its parameters (LazyParams: built on first use)
    Params: ClassVar = LazyParams(lambda: __getattr__("StageParams"))
    location_params: ClassVar[tuple[str, ...]] = ()   # parameters that name locations
    # parameters that name a file relative to the pipeline file ("-": none): made absolute
    # before a worker, whose folder is not the pipeline's, gets them (castlib.dispatch)
    file_params: ClassVar[tuple[str, ...]] = ()
    # parameters that name an earlier stage's id -> the stages whose result they can read
    reads_results: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, params: StageParams, context: RunContext):
        self.params = params
        self.context = context

    @classmethod
    def destinations(cls, params: StageParams, earlier: dict) -> list[tuple[str, float]]:
        """Locations this stage writes into, with how long to wait for their lock; the
        pipeline locks them for the whole run. `earlier` maps ids to earlier StageSpecs."""
        return []

    @classmethod
    def connects_to(cls, params: StageParams, earlier: dict) -> list[str]:
        """Locations whose storage this stage reads or writes (not only their catalog
        rows): the run lets their back-ends start connecting when it starts
        (RunContext.connect_early). `earlier` maps ids to earlier StageSpecs. A stage
        that uses several sessions of a location at once (its transfers, its readers) asks
        for them once it knows how many (Backend.sessions_needed): a login opens one."""
        return []

    def run(self) -> StageOutcome:
        raise NotImplementedError

    def outcome_so_far(self) -> StageOutcome | None:
        """After run() was interrupted (KeyboardInterrupt): what the stage had done, for
        the run's record; None when it has nothing to tell."""
        return None
