"""Sending a run to workers (`--on-workers`, `workers: true`): each stage to the queue of
the host that holds its data, the run's record in the catalog as the one truth.

    client                           broker (Redis)          workers
    queue_run(run)  -- segments -->  queue daq01  -->  castlib worker on daq01
    poll the run record  <--------  catalog (PostgreSQL)  <-- progress, stages, state

A pipeline is cut into segments: consecutive stages with the same queue. An index or a
verify goes to the host of its location; a diff or a sync to the host of its local side;
a stage between remote storages to the queue `queues:` maps its URL to; a stage free to run
anywhere (a remote index, a diff of two remote locations) goes with its neighbour, the
stage that reads it first; what is left goes to DEFAULT_QUEUE. The segments are a Celery
chain: each one starts when the one before ended well.

The client waits by reading the run record (status, stages, progress): not the broker,
so a broker restarted meanwhile loses nothing that was done, and a client that went away
(--detach, or killed) loses nothing either: `castlib runs show ID` tells the same story.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from .catalog import Catalog
from .config import UserConfig
from .errors import CastlibError, ConfigError
from .location import LocationURL, parse_location, redact
from .pipeline import Pipeline, RunReport, StageRun, _print_outcome
from .stages import StageOutcome

DEFAULT_QUEUE = "castlib"     # a worker consumes it besides its host's queue
FINAL = {"ok", "failed", "error", "interrupted", "died", "cancelled"}


@dataclass
class Segment:
    queue: str
    positions: list[int]


def configured_broker(explicit: str | None, user_config: UserConfig) -> str | None:
    """--broker, else $CASTLIB_BROKER, else the configuration's `broker:`; None when
    none is given (`castlib web` then runs actions itself)."""
    broker = explicit or os.environ.get("CASTLIB_BROKER") or user_config.broker or None
    return check_broker_url(broker) if broker else None


def check_broker_url(broker: str) -> str:
    """The broker URL, refused (without being shown) when its password may hold a raw
    '/', '?' or '#': no one can tell where such a password ends (redis://:pa/ss@host is
    also host ':pa', database 'ss@host'), and the broker library's error about it
    quoted a piece of the password. An '@' in a password is fine (the last '@' ends it),
    as in a location (README, "Back-ends")."""
    from .location import ambiguous_url

    if ambiguous_url(broker):
        raise ConfigError("the broker URL is ambiguous (not shown: it may hold a password): "
                          "percent-encode a '/', '?' or '#' of its password as %2F, %3F, "
                          "%23 (--broker, $CASTLIB_BROKER or broker: in the config)")
    return broker


def broker_url(explicit: str | None, user_config: UserConfig) -> str:
    """The broker configured (configured_broker), else a Redis on this machine."""
    return configured_broker(explicit, user_config) or "redis://localhost:6379/0"


def _stage_urls(pipeline: Pipeline, spec, resolve) -> list[LocationURL]:
    """The locations a stage reaches: its own, and those of the stages it reads (a sync
    reaches what its diff compared)."""
    urls = [resolve(getattr(spec.params, p)) for p in spec.cls.location_params]
    by_id = {s.params.id: s for s in pipeline.stages if s.params.id}
    for pname in spec.cls.reads_results:
        source = by_id.get(getattr(spec.params, pname))
        if source is not None:
            urls += _stage_urls(pipeline, source, resolve)
    return urls


def plan_segments(pipeline: Pipeline, resolve, user_config: UserConfig) -> list[Segment]:
    """The queue of each stage, then the segments; refuses a stage that would need two
    hosts' disks, or a stage whose input another host computes."""
    queues: list[str | None] = []
    for spec in pipeline.stages:
        urls = _stage_urls(pipeline, spec, resolve)
        hosts = sorted({u.host for u in urls if u.scheme == "file"})
        if len(hosts) > 1:
            raise ConfigError(f"stage {spec.label} reaches the disks of {' and '.join(hosts)}: "
                              "no one host can run it (sync through a storage both reach)")
        if hosts:
            queues.append(hosts[0])
            continue
        # remote only: the queue configured for it, the destination's first
        queues.append(next((q for q in (user_config.queue_for(u) for u in reversed(urls))
                            if q), None))
    for i, q in enumerate(queues):   # a free stage goes with the stage that reads it next
        if q is None:
            queues[i] = next((n for n in queues[i + 1:] if n), None) or next(
                (p for p in reversed(queues[:i]) if p), None) or DEFAULT_QUEUE
    segments: list[Segment] = []
    for spec, q in zip(pipeline.stages, queues):
        if segments and segments[-1].queue == q:
            segments[-1].positions.append(spec.position)
        else:
            segments.append(Segment(q, [spec.position]))
    segment_of = {p: i for i, s in enumerate(segments) for p in s.positions}
    by_id = {s.params.id: s for s in pipeline.stages if s.params.id}
    for spec in pipeline.stages:
        for pname in spec.cls.reads_results:
            source = by_id.get(getattr(spec.params, pname))
            if source is not None and segment_of[source.position] != segment_of[spec.position]:
                raise ConfigError(
                    f"stage {spec.label} reads the result of {source.label}, which runs on "
                    f"{queues[source.position]}, while it runs on {queues[spec.position]}")
    return segments


def _canonical(value: str, pipeline: Pipeline, user_config: UserConfig, base_dir: str,
               locations: dict[str, str]) -> str:
    """What a location parameter means on the client, in words a worker on another host
    reads the same: a local path becomes file://THIS-HOST/abs/path; a name of the
    client's configuration is sent with its URL. A remote URL is kept as typed (its
    credentials, if any, are part of it: the orders travel sealed, worker.seal); a
    catalog name is the worker's to resolve."""
    if value in pipeline.locations:
        return value
    if value in user_config.locations:
        url = user_config.locations[value]
        locations[value] = _canonical_url(url, base_dir)
        return value
    if "://" not in value and not value.startswith(("/", ".", "~")):
        return value   # a catalog name
    return _canonical_url(value, base_dir)


def _canonical_url(text: str, base_dir: str) -> str:
    url = parse_location(text, base_dir=base_dir)
    return str(url) if url.scheme == "file" else text


def payload_of(pipeline: Pipeline, user_config: UserConfig, base_dir: str) -> dict:
    """The pipeline as JSON a worker rebuilds it from (Pipeline.from_stages)."""
    locations = {name: _canonical_url(url, base_dir) for name, url in pipeline.locations.items()}
    stages = []
    for spec in pipeline.stages:
        params = spec.params.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        for pname in spec.cls.location_params:
            field = spec.cls.Params.model_fields[pname]
            key = field.alias or pname
            params[key] = _canonical(getattr(spec.params, pname), pipeline, user_config,
                                     base_dir, locations)
        for pname in spec.cls.file_params:
            # relative to the pipeline file, as at home: a worker's own folder (its
            # service's, often /) is not where the user meant; written on the host that
            # runs the stage, at the path the user meant (a shared file system, or a
            # clear "cannot write" there)
            key = spec.cls.Params.model_fields[pname].alias or pname
            value = getattr(spec.params, pname)
            if isinstance(value, str) and value != "-":
                params[key] = os.path.join(base_dir, os.path.expanduser(value))
        stages.append([spec.cls.name, params])
    return {"stages": stages, "locations": locations,
            "location_options": pipeline.location_options}


def submit(pipeline: Pipeline, catalog: Catalog, *, command: str, args: dict,
           broker: str | None = None, detach: bool = False, dry_run: bool = False,
           force: bool = False, quiet: bool = False, verbose: int = 0,
           user_config: UserConfig | None = None, show_errors: bool = True,
           out=None, err=None, **_ignored) -> RunReport:
    """Queue the run's segments and (unless `detach`) wait for it, showing its progress
    and the stages' summaries as they are recorded; a RunReport as a local run gives
    (without the stages' values: they stay on the worker)."""
    from .config import load_user_config
    from .worker import check_broker, send_chain

    if catalog.dialect == "sqlite":
        raise ConfigError("--on-workers needs a catalog the workers share: give "
                          "--db postgresql://... (this one is an SQLite file)")
    user_config = user_config if user_config is not None else load_user_config()
    base_dir = (os.path.dirname(os.path.abspath(pipeline.source)) if pipeline.source
                else os.getcwd())
    payload = payload_of(pipeline, user_config, base_dir)
    worker_pipeline = Pipeline.from_stages([tuple(s) for s in payload["stages"]],
                                           payload["locations"])

    def resolve(text: str) -> LocationURL:
        if text in payload["locations"]:
            text = payload["locations"][text]
        elif "://" not in text and not text.startswith("/"):
            known = catalog.find_location(text)
            if known is None:
                raise ConfigError(f"unknown location {text!r}")
            text = known.url
        return parse_location(text)

    segments = plan_segments(worker_pipeline, resolve, user_config)
    broker = broker_url(broker, user_config)
    check_broker(broker)
    run_id = catalog.queue_run(command, args, pipeline.text, segments[0].queue)
    try:
        from .catalog.settings import message_key

        task_ids = send_chain(broker, run_id, command, payload, segments,
                              dry_run=dry_run, force=force, key=message_key(catalog))
    except BaseException as exc:
        catalog.finish_run(run_id, "error", redact(f"could not queue the run: {exc}"))
        raise
    catalog.set_run_tasks(run_id, task_ids)
    err = err or sys.stderr
    if detach:
        print(run_id, file=out or sys.stdout)
        if not quiet:
            print(f"castlib: run {run_id} queued for {segments[0].queue} (castlib runs show "
                  f"{run_id}; castlib runs cancel {run_id})", file=err)
        return RunReport(run_id)
    return wait(catalog, run_id, quiet=quiet, verbose=verbose, show_errors=show_errors, err=err)


def wait(catalog: Catalog, run_id: int, *, quiet: bool = False, verbose: int = 0,
         show_errors: bool = True, err=None, poll_s: float = 0.5) -> RunReport:
    """Follow a run in the catalog until it ends: stage summaries as they are recorded,
    the progress line of the stage running (on a terminal; with -v, as log lines). Ctrl-C
    stops the waiting, not the run (castlib runs cancel ID stops that)."""
    err = err or sys.stderr
    try:
        return _follow(catalog, run_id, quiet, verbose, show_errors, err, poll_s)
    except KeyboardInterrupt:
        print(f"\ncastlib: stopped waiting; run {run_id} goes on (castlib runs show {run_id}, "
              f"castlib runs cancel {run_id})", file=err)
        raise


def _follow(catalog: Catalog, run_id: int, quiet: bool, verbose: int, show_errors: bool,
            err, poll_s: float) -> RunReport:
    from .catalog.paths import printable
    from .progress import human_bytes

    tty = hasattr(err, "isatty") and err.isatty()
    report = RunReport(run_id)
    shown_stages = 0
    last_line, last_logged = "", 0.0
    where = None

    def announce(host):   # each host the run moves to, once on arrival
        nonlocal where, last_line
        if host and host != where and not quiet:
            where = host
            if tty and last_line:
                err.write("\r\033[K")
                last_line = ""
            print(f"castlib: run {run_id} running on {where}", file=err)

    while True:
        catalog.mark_dead_runs()
        details = catalog.run_details(run_id)
        if details is None:
            raise ConfigError(f"no run with id {run_id}")
        run, stages = details
        for s in stages[shown_stages:]:
            # a stage that ran between two polls: where it ran is in its record
            announce(s.get("hostname"))
            outcome = StageOutcome(s["counts"] or {}, list(s["errors"] or []), None,
                                   s["summary"] or "",
                                   1 if s["status"] == "failed" else
                                   2 if s["status"] == "error" else 0)
            report.stages.append(StageRun(_RecordedSpec(s), outcome))
            if tty and last_line:
                err.write("\r\033[K")
                last_line = ""
            if s.get("hostname") and s["hostname"] != where and not quiet:
                # a stage short enough to start and end between two looks at the run
                # record still says where it ran
                where = s["hostname"]
                print(f"castlib: run {run_id} running on {where}", file=err)
            if s["status"] != "error":
                _print_outcome(outcome, err, quiet, show_errors)
        shown_stages = len(stages)
        if run["status"] == "running":
            announce(run["hostname"])
        if run["status"] in FINAL:
            if tty and last_line:
                err.write("\r\033[K")
            elif verbose and not tty and not quiet and not last_line and run.get("progress"):
                # a run short enough to end between two looks: its last counters (kept
                # with the run) still go to the log, as a local -v run's would
                print(f"castlib: {printable(_progress_line(run['progress'], human_bytes))}",
                      file=err)
            return _ending(report, run)
        progress = run.get("progress") or None
        if progress and not quiet:
            line = _progress_line(progress, human_bytes)
            if tty:
                if line != last_line:
                    err.write("\r\033[K" + printable(line))
                    err.flush()
                    last_line = line
            elif verbose and (line != last_line) and time.monotonic() - last_logged >= 1:
                print(f"castlib: {printable(line)}", file=err)
                last_line, last_logged = line, time.monotonic()
        time.sleep(poll_s)


class _RecordedSpec:
    """What a RunReport's StageRun needs of a stage that ran on a worker."""

    def __init__(self, record: dict):
        self.position = record["position"]
        self.label = record["stage_id"] or f"{record['stage']}#{record['position'] + 1}"
        self.hostname = record.get("hostname")


def _progress_line(p: dict, human_bytes) -> str:
    files = f"{p.get('files', 0)}" + (f"/{p['total_files']}" if p.get("total_files") else "")
    line = f"{p.get('label', 'working')}: {files} files"
    if p.get("bytes") or p.get("total_bytes"):
        line += f", {human_bytes(p.get('bytes', 0))}"
        if p.get("total_bytes"):
            line += f"/{human_bytes(p['total_bytes'])}"
    return line


class RunEnded(CastlibError):
    """A run on a worker ended in error, died or was cancelled: its record says why."""


def _ending(report: RunReport, run: dict) -> RunReport:
    status = run["status"]
    if status in ("ok", "failed"):
        return report
    error = run["error"] or status
    if status == "error":
        raise RunEnded(f"{redact(error)} (run {run['id']} on {run['hostname']})")
    if status == "died":
        raise RunEnded(f"run {run['id']} died on {run['hostname']}: {error}; run it again "
                       "(nothing partial was published)")
    if status == "cancelled":
        raise RunEnded(f"run {run['id']} was cancelled on {run['hostname']}")
    raise RunEnded(f"run {run['id']} {status} on {run['hostname']}: {error}")


def cancel(catalog: Catalog, run_id: int, broker: str | None, user_config: UserConfig) -> str:
    """`castlib runs cancel ID`: the catalog is told first (a running run, on a worker or
    of a command line, the web view or a script, reads it in its heartbeat and stops
    cleanly; a queued run is cancelled at once), then the broker drops the run's queued
    tasks, if it can be reached. What happened, in words."""
    details = catalog.run_details(run_id)
    if details is None:
        raise ConfigError(f"no run with id {run_id}")
    if details[0]["status"] in FINAL:   # cancelled too: not "cancelled" a second time
        raise ConfigError(f"run {run_id} has ended already ({details[0]['status']})")
    run = catalog.request_cancel(run_id)
    if run["status"] in FINAL - {"cancelled"}:   # it ended meanwhile
        raise ConfigError(f"run {run_id} has ended already ({run['status']})")
    if run.get("tasks"):
        try:
            from .worker import revoke

            revoke(broker_url(broker, user_config), run["tasks"])
        except CastlibError:
            pass   # the catalog's word stops it anyway: a worker claims no cancelled run
    if run["status"] == "cancelled":
        return f"run {run_id} cancelled (no worker had taken it)"
    return f"run {run_id} on {run['hostname']}: asked to stop; it ends its copies in flight"
