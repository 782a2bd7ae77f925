"""Pipelines: a YAML list of stages over named locations, validated whole before anything runs."""
from __future__ import annotations

import logging
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, TextIO

from pydantic import ValidationError

from .catalog import Catalog
from .catalog.locks import location_lock, lock_covered, lock_key, lock_keys_above
from .catalog.paths import printable
from .config import UserConfig, load_user_config
from .errors import CastlibError, ConfigError, interruption_name
from .location import parse_location, redact, scrub_secrets
from .progress import RunBeat
from .stages import RunContext, Stage, StageOutcome, stage_class
from .stages.base import StageParams

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("name", "description", "locations", "stages", "workers")


@dataclass
class StageSpec:
    """One validated stage of a pipeline: its class, parameters and where it was written."""

    cls: type[Stage]
    params: StageParams
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
        data, lines = _load_yaml_with_lines(text, source)
        err = _Errors(source, lines)
        if not isinstance(data, dict):
            raise err.at((), "a pipeline is a mapping with 'locations' and 'stages'")
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise err.at((key,), f"unknown key (expected one of {', '.join(TOP_LEVEL_KEYS)})",
                             key=str(key))
        locations, options = {}, {}
        raw_locations = data.get("locations") or {}
        if not isinstance(raw_locations, dict):
            raise err.at(("locations",), "must map names to URLs", key="locations")
        for name, value in raw_locations.items():
            key = f"locations.{name}"
            url = value
            if isinstance(value, dict):
                extra = set(value) - {"url", "options"}
                if extra or "url" not in value:
                    raise err.at(("locations", name), "a location is a URL or {url, options}",
                                 key=key)
                url = value["url"]
                if not isinstance(value.get("options") or {}, dict):
                    raise err.at(("locations", name, "options"), "options must be a mapping",
                                 key=f"{key}.options")
                options[str(name)] = dict(value.get("options") or {})
            if not isinstance(url, str):
                raise err.at(("locations", name), "a location is a URL or a path", key=key)
            try:
                parse_location(url)
            except ConfigError as exc:
                raise err.at(("locations", name), exc.message, key=key) from None
            locations[str(name)] = url
        raw_stages = data.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise err.at(("stages",), "expected a non-empty list of stages", key="stages")
        specs = []
        for i, item in enumerate(raw_stages):
            if not isinstance(item, dict) or len(item) != 1:
                raise err.at(("stages", i), "each stage is a one-key mapping like "
                             "'- index: {location: daq}'", key=f"stages[{i}]")
            (name, params), = item.items()
            specs.append(_stage_spec(str(name), params, i, err))
        kept = scrub_secrets(data)
        if kept != data:   # the run record keeps the pipeline, never its credentials
            import yaml

            text = ("# credentials removed by castlib\n"
                    + yaml.safe_dump(kept, sort_keys=False, allow_unicode=True))
        else:              # none in the data; a URL in a comment may still carry some
            text = redact(text)
        workers = data.get("workers", False)
        if not isinstance(workers, bool):
            raise err.at(("workers",), "must be true or false", key="workers")
        pipeline = cls(specs, locations, options, source, text, workers)
        pipeline.check_references(user_config or UserConfig(), err)
        return pipeline

    @classmethod
    def from_stages(cls, stages: list[tuple[str, dict]], locations: dict[str, str] | None = None
                    ) -> "Pipeline":
        """A pipeline built in code (what the CLI's commands do)."""
        err = _Errors(None, {})
        specs = [_stage_spec(name, params, i, err) for i, (name, params) in enumerate(stages)]
        return cls(specs, dict(locations or {}))

    def check_references(self, user_config: UserConfig, err: "_Errors") -> None:
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
            out=out or sys.stdout, err=err or sys.stderr, retry_backoff_s=retry_backoff_s)
        report = RunReport(run_id if run_id is not None
                           else catalog.start_run(command, args, self.text))
        ctx.run_id = report.run_id
        from .catalog.catalog import utcnow

        locks = ExitStack()
        beat = RunBeat(catalog, report.run_id, lambda: ctx.current_progress, on_cancel)
        try:
            # beating from the start: a run waiting for a destination's lock is alive too.
            # Its last write (the final counters) comes before the run's end is recorded
            # (below); a beat never writes over an ended run's record.
            with beat:
                if not dry_run:
                    self._lock_destinations(ctx, locks)
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
            catalog.finish_run(report.run_id, "interrupted",
                               f"interrupted by {interruption_name(exc)}")
            exc.report = report   # what was done, for the command's last words
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


def _stage_spec(name: str, params: Any, position: int, err: "_Errors") -> StageSpec:
    path = ("stages", position, name)
    try:
        cls = stage_class(name)
    except ConfigError as exc:
        raise err.at(("stages", position), exc.message, key=f"stages[{position}]") from None
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise err.at(path, "stage parameters must be a mapping", key=f"stages[{position}].{name}")
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


class _Errors:
    """Builds ConfigErrors that name the pipeline file and the line of a key."""

    def __init__(self, source: str | None, lines: dict[tuple, int]):
        self.source, self.lines = source, lines

    def line(self, path: tuple) -> int | None:
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def at(self, path: tuple, message: str, key: str | None = None) -> ConfigError:
        if self.source is None and not self.lines:
            # built in code from a command's or a function's arguments: name the argument
            return ConfigError(message, key=key.rsplit(".", 1)[-1] if key else None)
        return ConfigError(message, file=self.source or "<pipeline>", line=self.line(path), key=key)


# A pipeline is a few dozen lines; these bounds leave it room a hundred times over, and
# refuse a "billion laughs" (aliases of aliases, expanding exponentially), an alias inside
# its own anchor, and nesting deep enough to overflow the stack, before any Python object
# is built from them.
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000      # nodes once every alias is expanded
_SCALAR_NODE_BYTES = 1024     # a long string counts as one node per KiB


def _bounded_loader():
    import yaml

    class YAMLRefused(yaml.MarkedYAMLError):
        """Well-formed YAML that castlib will not expand."""

    class BoundedLoader(yaml.SafeLoader):
        """The safe loader, measuring while it composes: the depth of nesting, and each
        node's size with its aliases expanded (computed once per node, so a bomb costs
        what its text costs)."""

        Refused = YAMLRefused

        def __init__(self, stream):
            super().__init__(stream)
            self._depth = 0
            self._sizes: dict[int, int] = {}   # id(node) -> expanded size, once complete

        def fetch_flow_collection_start(self, TokenClass):
            # the scanner reads a run of '[' or '{' ahead, in time quadratic in its length:
            # stop it at the bound rather than after the whole run
            if self.flow_level >= MAX_YAML_DEPTH:
                raise YAMLRefused(None, None, f"nested more than {MAX_YAML_DEPTH} levels "
                                  "deep", self.get_mark())
            super().fetch_flow_collection_start(TokenClass)

        def add_indent(self, column):
            if len(self.indents) >= MAX_YAML_DEPTH:
                raise YAMLRefused(None, None, f"nested more than {MAX_YAML_DEPTH} levels "
                                  "deep", self.get_mark())
            return super().add_indent(column)

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                target = self.anchors.get(event.anchor)
                if target is not None and id(target) not in self._sizes:
                    raise YAMLRefused(None, None, f"alias *{event.anchor} is inside the "
                                      "node it names (a recursive structure)", event.start_mark)
                return super().compose_node(parent, index)
            self._depth += 1
            try:
                if self._depth > MAX_YAML_DEPTH:
                    raise YAMLRefused(None, None, f"nested more than {MAX_YAML_DEPTH} levels "
                                      "deep", event.start_mark)
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
            sizes = self._sizes
            if isinstance(node, yaml.ScalarNode):
                size = 1 + len(node.value) // _SCALAR_NODE_BYTES
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(sizes[id(n)] for n in node.value)
            else:
                size = 1 + sum(sizes[id(k)] + sizes[id(v)] for k, v in node.value)
            if size > MAX_YAML_NODES:
                raise YAMLRefused(None, None, f"aliases expand this to more than "
                                  f"{MAX_YAML_NODES} nodes (a YAML bomb?)", node.start_mark)
            sizes[id(node)] = size
            return node

    return BoundedLoader


def _load_yaml_with_lines(text: str, source: str | None) -> tuple[Any, dict[tuple, int]]:
    """The YAML data, and the 1-based line of every mapping key and list item by path."""
    import yaml

    Loader = _bounded_loader()
    loader = Loader(text)

    def load(step):
        try:
            return step()
        except Loader.Refused as exc:
            mark = exc.problem_mark
            raise ConfigError(f"refused YAML: {exc.problem}", file=source or "<pipeline>",
                              line=mark.line + 1 if mark else None) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"malformed YAML: {problem}", file=source or "<pipeline>",
                              line=mark.line + 1 if mark else None) from None

    try:
        node = load(loader.get_single_node)
        lines = _key_lines(node, source)   # before constructing: merge keys rewrite the nodes
        data = load(lambda: loader.construct_document(node)) if node is not None else None
    finally:
        loader.dispose()
    return data, lines


def _key_lines(node, source: str | None) -> dict[tuple, int]:
    import yaml

    lines: dict[tuple, int] = {}

    def walk(n, path):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if not isinstance(k, yaml.ScalarNode):   # `? [a, b]`: no name to give it
                    raise ConfigError("a key must be a plain name, not a list or mapping",
                                      file=source or "<pipeline>", line=k.start_mark.line + 1)
                key = k.value
                if path + (key,) in lines:   # YAML keeps the last silently: a typo's mask
                    where = ".".join(str(p) for p in path + (key,))
                    raise ConfigError(f"duplicate key {key!r}", file=source or "<pipeline>",
                                      line=k.start_mark.line + 1, key=where)
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    if node is not None:
        lines[()] = node.start_mark.line + 1
        walk(node, ())
    return lines
