"""Pipelines: a YAML list of stages over named locations, validated whole before anything runs."""
from __future__ import annotations

import logging
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, TextIO

from .catalog import Catalog
from .catalog.locks import location_lock, lock_covered, lock_key, lock_keys_above
from .catalog.paths import printable
from .config import UserConfig, load_user_config
from .errors import CastlibError, ConfigError, interruption_name
from .location import parse_location, redact, scrub_secrets
from .progress import RunBeat
from .stages import RunContext, Stage, StageOutcome, stage_class
from .stages.base import lean_params
from .yamlfile import KeyLines, load_with_lines, name_keys

log = logging.getLogger(__name__)


# the top-level keys of a pipeline file, in the order an error lists them
FILE_KEYS = ("name", "description", "locations", "workers", "stages")
_file_model = None


def file_model():
    """The pydantic model of a pipeline file (built on first use: a command built in code,
    Pipeline.from_stages, needs none)."""
    global _file_model
    if _file_model is not None:
        return _file_model
    from typing import Annotated

    from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool,
                          field_validator, model_validator)
    from pydantic_core import PydanticCustomError

    class LocationEntry(BaseModel):
        """A location of a pipeline: a URL or path, or {url, options} with back-end options
        (over those the user's config gives its URL)."""

        model_config = ConfigDict(extra="forbid")
        url: str = Field(description="URL or path")
        options: dict[str, Any] = Field(default_factory=dict, description="back-end options")

        @model_validator(mode="before")
        @classmethod
        def _url_alone(cls, value):
            if isinstance(value, str):
                return {"url": value}
            if not isinstance(value, dict):
                raise PydanticCustomError("location", "a location is a URL or a path")
            if set(value) - {"url", "options"} or "url" not in value:
                raise PydanticCustomError("location", "a location is a URL or {url, options}")
            return {**value, "options": value.get("options") or {}}

    def _one_stage(value):
        if not isinstance(value, dict) or len(value) != 1:
            raise PydanticCustomError("stage", "each stage is a one-key mapping like "
                                      "'- index: {location: daq}'")
        return value

    class PipelineFile(BaseModel):
        """The top level of a pipeline file. Each stage's parameters are its own Params."""

        model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
        name: str | None = Field(None, description="what the pipeline is called")
        description: str | None = Field(None, description="what it is for")
        locations: dict[str, LocationEntry] = Field(
            default_factory=dict, description="names for the URLs and paths the stages use")
        workers: StrictBool = Field(False, description="send each stage to a worker on the "
                                    "host of its data (README, Several hosts)")
        stages: list[Annotated[dict[str, Any], BeforeValidator(_one_stage)]] = Field(
            min_length=1, description="the stages, run in order: '- NAME: {parameters}'")

        @field_validator("locations", mode="before")
        @classmethod
        def _names(cls, value):
            return name_keys(value)

    assert tuple(PipelineFile.model_fields) == FILE_KEYS
    _file_model = PipelineFile
    return PipelineFile


def _explain(loc: tuple, kind: str, message: str) -> str | None:
    """A pipeline's top-level errors in castlib's words (those the model's own words
    would leave a user to decode)."""
    if not loc:
        return "a pipeline is a mapping with 'locations' and 'stages'"
    if kind == "extra_forbidden" and len(loc) == 1:
        return f"unknown key (expected one of {', '.join(FILE_KEYS)})"
    if loc == ("locations",):
        return "must map names to URLs"
    if loc == ("stages",):
        return "expected a non-empty list of stages"
    if loc == ("workers",):
        return "must be true or false"
    if loc[0] == "locations" and loc[-1] == "url":
        return "a location is a URL or a path"
    if loc[0] == "locations" and loc[-1] == "options":
        return "options must be a mapping"
    return None


@dataclass
class StageSpec:
    """One validated stage of a pipeline: its class, parameters and where it was written."""

    cls: type[Stage]
    params: Any                  # the stage's Params, or stages.base.LeanParams
    position: int
    line: int | None = None

    @property
    def label(self) -> str:
        return self.params.id or f"{self.cls.name}#{self.position + 1}"


@dataclass
class StageRun:
    spec: StageSpec
    outcome: StageOutcome


@dataclass
class RunReport:
    """What a run did: one outcome per stage that ran, the run's id in the catalog."""

    run_id: int | None
    stages: list[StageRun] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return max((s.outcome.exit_code for s in self.stages), default=0)

    @property
    def last(self) -> StageOutcome | None:
        return self.stages[-1].outcome if self.stages else None

    @property
    def counts(self) -> dict:
        return self.last.counts if self.last else {}

    @property
    def value(self) -> Any:
        return self.last.value if self.last else None

    @property
    def errors(self) -> list[str]:
        return [e for s in self.stages for e in s.outcome.errors]


@dataclass
class Pipeline:
    stages: list[StageSpec]
    locations: dict[str, str] = field(default_factory=dict)
    location_options: dict[str, dict] = field(default_factory=dict)
    source: str | None = None        # the file it came from
    text: str | None = None          # the YAML, kept in the run record
    workers: bool = False            # `workers: true`: its stages run on workers (dispatch)

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str, user_config: UserConfig | None = None) -> "Pipeline":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read pipeline: {exc.strerror}", file=path) from None
        except UnicodeDecodeError:
            raise ConfigError("pipeline is not UTF-8 text", file=path) from None
        return cls.from_yaml(text, source=path, user_config=user_config)

    @classmethod
    def from_yaml(cls, text: str, source: str | None = None,
                  user_config: UserConfig | None = None) -> "Pipeline":
        data, lines = load_with_lines(text, source)
        err = KeyLines(source, lines)
        from pydantic import ValidationError

        try:
            top = file_model().model_validate(data)
        except ValidationError as exc:
            raise err.invalid(exc, _explain) from None
        locations, options = {}, {}
        for name, entry in top.locations.items():
            try:
                parse_location(entry.url)
            except ConfigError as exc:
                raise err.at(("locations", name), exc.message, key=f"locations.{name}") from None
            locations[name] = entry.url
            if entry.options:
                options[name] = dict(entry.options)
        specs = []
        for i, item in enumerate(top.stages):
            (name, params), = item.items()
            specs.append(_stage_spec(str(name), params, i, err))
        kept = scrub_secrets(data)
        if kept != data:   # the run record keeps the pipeline, never its credentials
            import yaml

            text = ("# credentials removed by castlib\n"
                    + yaml.safe_dump(kept, sort_keys=False, allow_unicode=True))
        else:              # none in the data; a URL in a comment may still carry some
            text = redact(text)
        pipeline = cls(specs, locations, options, source, text, top.workers)
        pipeline.check_references(user_config or UserConfig(), err)
        return pipeline

    @classmethod
    def from_stages(cls, stages: list[tuple[str, dict]], locations: dict[str, str] | None = None
                    ) -> "Pipeline":
        """A pipeline built in code (what the CLI's commands do)."""
        err = KeyLines(None, {})
        specs = [_stage_spec(name, params, i, err, lean=True)
                 for i, (name, params) in enumerate(stages)]
        return cls(specs, dict(locations or {}))

    def check_references(self, user_config: UserConfig, err: KeyLines) -> None:
        """Every location parameter names a known location or is a URL/absolute path;
        every `from` names an earlier stage's id; ids are unique."""
        ids: dict[str, str] = {}   # id -> the name of the stage that has it
        for spec in self.stages:
            params = spec.params
            for pname in spec.cls.location_params:
                value = getattr(params, pname)
                if value is None:   # an optional one left out (http-push: location or from)
                    continue
                if value in self.locations or value in user_config.locations:
                    continue
                if "://" in value or value.startswith(("/", "./", "../", "~")):
                    continue
                raise err.at(("stages", spec.position, spec.cls.name, pname),
                             f"unknown location {value!r} (define it under 'locations:')",
                             key=f"stages[{spec.position}].{spec.cls.name}.{pname}")
            for pname, readable in spec.cls.reads_results.items():
                value = getattr(params, pname)
                if value is None:
                    continue
                alias = spec.cls.Params.model_fields[pname].alias or pname
                where = (("stages", spec.position, spec.cls.name, alias),)
                key = f"stages[{spec.position}].{spec.cls.name}.{alias}"
                if value not in ids:
                    raise err.at(*where, f"no earlier stage has id {value!r}", key=key)
                if ids[value] not in readable:
                    raise err.at(*where, f"stage {value!r} is {_a(ids[value])}: "
                                 f"{spec.cls.name} reads the result of "
                                 f"{' or '.join(_a(r) for r in readable)}", key=key)
            if params.id:
                if params.id in ids:
                    raise err.at(("stages", spec.position, spec.cls.name, "id"),
                                 f"duplicate id {params.id!r}",
                                 key=f"stages[{spec.position}].{spec.cls.name}.id")
                ids[params.id] = spec.cls.name

    # -- running -----------------------------------------------------------------------------
    def run(self, catalog: Catalog, *, command: str = "run", args: dict | None = None,
            dry_run: bool = False, force: bool = False, quiet: bool = True,
            out: TextIO | None = None, err: TextIO | None = None,
            user_config: UserConfig | None = None, retry_backoff_s: float = 1.0,
            show_errors: bool = True, run_id: int | None = None, finish: bool = True,
            on_cancel=None) -> RunReport:
        """Run the stages in order, recording the run and each stage in the catalog. A
        stage that raises stops the pipeline; the error is recorded, then re-raised.
        show_errors=False leaves the stages' per-item errors to the caller to print (a
        command whose result they are), though they are recorded all the same.
        A worker (castlib.dispatch) runs one segment of a run already recorded: `run_id`
        is that run, `finish=False` leaves it open for the next segment when this one
        ends well, and `on_cancel` is called (once, from another thread) when `castlib runs
        cancel` asks the run to stop. While the stages run, the run's record keeps their
        live counters and a heartbeat (progress.RunBeat)."""
        ctx = RunContext(
            catalog=catalog, dry_run=dry_run, force=force, quiet=quiet,
            locations=self.locations, location_options=self.location_options,
            user_config=user_config if user_config is not None else load_user_config(),
            base_dir=os.path.dirname(os.path.abspath(self.source)) if self.source else os.getcwd(),
            out=out or sys.stdout, err=err or sys.stderr, retry_backoff_s=retry_backoff_s,
            hard_links_wanted=any(getattr(spec.params, "hard_links", False) is True
                                  for spec in self.stages))
        report = RunReport(run_id if run_id is not None
                           else catalog.start_run(command, args, self.text))
        ctx.run_id = report.run_id
        from .catalog.records import utcnow

        locks = ExitStack()
        beat = RunBeat(catalog, report.run_id, lambda: ctx.current_progress,
                       on_cancel if on_cancel is not None else _cancel_by_signal())
        try:
            # beating from the start: a run waiting for a destination's lock is alive too.
            # Its last write (the final counters) comes before the run's end is recorded
            # (below); a beat never writes over an ended run's record.
            with beat:
                if not dry_run:
                    self._lock_destinations(ctx, locks)
                ctx.connect_early(self._connected_locations())
                for spec in self.stages:
                    started = utcnow()
                    ctx.current_progress = None   # a stage without counters shows none
                    stage = spec.cls(spec.params, ctx)
                    try:
                        outcome = stage.run()
                    except CastlibError as exc:
                        catalog.record_stage(report.run_id, spec.position, spec.cls.name,
                                             spec.params.id, _params_record(spec), "error", {},
                                             [redact(str(exc), ctx.secrets)], started)
                        raise
                    except KeyboardInterrupt:
                        self._record_interrupted(ctx, report, spec, stage, started)
                        raise
                    catalog.record_stage(report.run_id, spec.position, spec.cls.name,
                                         spec.params.id, _params_record(spec),
                                         "failed" if outcome.exit_code else "ok", outcome.counts,
                                         [redact(e, ctx.secrets) for e in outcome.errors], started,
                                         summary=redact(outcome.summary or "", ctx.secrets))
                    if spec.params.id:
                        ctx.results[spec.params.id] = outcome.value
                    report.stages.append(StageRun(spec, outcome))
                    _print_outcome(outcome, ctx.err, quiet, show_errors, ctx.secrets)
        except CastlibError as exc:
            catalog.finish_run(report.run_id, "error", redact(str(exc), ctx.secrets))
            raise
        except KeyboardInterrupt as exc:
            if beat.cancelled:   # the signal was the cancel's (_cancel_by_signal, a worker's)
                catalog.finish_run(report.run_id, "cancelled", CANCELLED)
            else:
                catalog.finish_run(report.run_id, "interrupted",
                                   f"interrupted by {interruption_name(exc)}")
            exc.report = report   # what was done, for the command's last words
            exc.cancelled = beat.cancelled
            raise
        except BaseException as exc:
            catalog.finish_run(report.run_id, "error",
                               redact(f"{type(exc).__name__}: {exc}", ctx.secrets))
            raise
        finally:
            locks.close()
            ctx.close()
        if finish or report.exit_code:
            catalog.finish_run(report.run_id, "failed" if report.exit_code else "ok")
        return report

    def _record_interrupted(self, ctx: RunContext, report: RunReport, spec: StageSpec,
                            stage: Stage, started) -> None:
        """Record the stage a signal stopped, with what it did before it stopped."""
        try:
            partial = stage.outcome_so_far()
        except Exception as exc:   # the record of the run matters more than its detail
            partial = None
            log.warning("could not record what the interrupted %s stage did: %s",
                        spec.cls.name, redact(str(exc), ctx.secrets))
        ctx.catalog.record_stage(
            report.run_id, spec.position, spec.cls.name, spec.params.id, _params_record(spec),
            "interrupted", partial.counts if partial else {},
            [redact(e, ctx.secrets) for e in partial.errors] if partial else [], started)
        if partial is not None:
            report.stages.append(StageRun(spec, partial))
            _print_outcome(partial, ctx.err, ctx.quiet, True, ctx.secrets)

    def _connected_locations(self) -> list[str]:
        """The locations whose storage the stages will touch (Stage.connects_to), each
        once, as the stages name them."""
        earlier: dict[str, StageSpec] = {}
        wanted: dict[str, None] = {}
        for spec in self.stages:
            for text in spec.cls.connects_to(spec.params, earlier):
                if isinstance(text, str) and text:
                    wanted.setdefault(text)
            if spec.params.id:
                earlier[spec.params.id] = spec
        return list(wanted)

    def _lock_destinations(self, ctx: RunContext, locks: ExitStack) -> None:
        """Hold, for the whole run, the lock of every location a stage will write into, so
        that two runs never interleave their listings and copies in one destination."""
        earlier: dict[str, StageSpec] = {}
        targets = []
        for spec in self.stages:
            for target, wait_s in spec.cls.destinations(spec.params, earlier):
                resolved = ctx.resolve(target)
                targets.append((len(lock_keys_above(resolved.url)), resolved, wait_s))
            if spec.params.id:
                earlier[spec.params.id] = spec
        # outermost first: a destination inside another of this run is covered by the
        # outer one's lock, and taking its own would wait on this run's own shared hold
        # of the outer key (see catalog.locks)
        for _, resolved, wait_s in sorted(targets, key=lambda t: t[0]):
            record = resolved.record
            if not lock_covered(resolved.url, ctx.locked):
                locks.enter_context(location_lock(ctx.catalog, record.id, record.url, wait_s))
                ctx.locked.add(lock_key(resolved.url))


MAX_ERRORS_SHOWN = 50
CANCELLED = "cancelled by castlib runs cancel"


def _cancel_by_signal():
    """How a run of this process stops when `castlib runs cancel` asks (read back by its
    heartbeat, progress.RunBeat): as a signal stops it (no copy starts, those in flight
    end or are abandoned, what was done is recorded), by sending this process's main
    thread the signal its handler turns into a KeyboardInterrupt: SIGTERM where castlib's
    command line handles it, else SIGINT (Python's own handler: a script, a notebook, the
    web view's child process). None when no such handler is there to stop the run (a run
    in another thread than the main one, SIGINT ignored): the cancel cannot reach it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    main = threading.main_thread().ident
    for signum in (signal.SIGTERM, signal.SIGINT):
        if callable(signal.getsignal(signum)):
            return lambda: signal.pthread_kill(main, signum)
    return None


def _a(stage_name: str) -> str:
    return f"{'an' if stage_name[0] in 'aeiou' else 'a'} {stage_name}"


def _print_outcome(outcome: StageOutcome, err: TextIO, quiet: bool, show_errors: bool,
                   secrets=()) -> None:
    for line in outcome.errors[:MAX_ERRORS_SHOWN] if show_errors else ():
        print(f"castlib: {printable(redact(line, secrets))}", file=err)
    if show_errors and len(outcome.errors) > MAX_ERRORS_SHOWN:
        print(f"castlib: ... and {len(outcome.errors) - MAX_ERRORS_SHOWN} more (castlib runs show)",
              file=err)
    if outcome.summary and not quiet:
        print(outcome.summary, file=err)


def _params_record(spec: StageSpec) -> dict:
    return spec.params.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def _stage_spec(name: str, params: Any, position: int, err: KeyLines,
                lean: bool = False) -> StageSpec:
    """lean: parameters plainly valid (the CLI's, the API's) are taken without the model
    (stages.base.lean_params), which spares a command importing pydantic."""
    path = ("stages", position, name)
    try:
        cls = stage_class(name)
    except ConfigError as exc:
        raise err.at(("stages", position), exc.message, key=f"stages[{position}]") from None
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise err.at(path, "stage parameters must be a mapping", key=f"stages[{position}].{name}")
    if lean:
        checked = lean_params(name, params)
        if checked is not None:
            return StageSpec(cls, checked, position, err.line(path))
    from pydantic import ValidationError

    try:
        model = cls.Params.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        key = ".".join(str(x) for x in loc)
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            known = ", ".join(f.alias or n for n, f in cls.Params.model_fields.items())
            msg = f"unknown parameter (known: {known})"
        elif first["type"] == "missing":
            msg = "required parameter is missing"
        raise err.at(path + loc[:1], msg, key=f"stages[{position}].{name}.{key}") from None
    return StageSpec(cls, model, position, err.line(path))
