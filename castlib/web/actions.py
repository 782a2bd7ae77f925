"""Starting runs from the web: what may be asked (checked here, before anything starts),
and who carries it out.

A request is a stage with its parameters (`{"stage": "sync", "params": {...}}`, the keyword
arguments of castlib.api's function of that name) or a pipeline file by name from the
configured folder (`{"pipeline": "nightly.yaml"}`). A Dispatcher carries it out and
answers the run's id as soon as the run is recorded in the catalog.

LocalDispatcher runs each request in a child process of the server (castlib.web.runner),
so a long sync neither blocks nor dies with a request, and the server stays responsive.
WorkerDispatcher sends it to the workers next to the data (castlib.dispatch, the path
`--on-workers` takes): `castlib web` uses it when a broker is configured and the catalog
is one the workers share (PostgreSQL). Either way the run's record in the catalog is
where its page reads its host, state and live counters. Another one plugs in with
create_app(dispatcher=...).
"""
from __future__ import annotations

import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import castlib

# the stages a request may name -> castlib.api's function, its positional parameters
STAGES = {"index": ("location",), "diff": ("ref", "dst"), "sync": ("ref", "dst"),
          "verify": ("location",)}
# keyword arguments that are the server's to choose, never a request's
_SERVER_ONLY = {"db"}
PIPELINE_SUFFIXES = (".yaml", ".yml")


class ActionRefused(Exception):
    """A request that cannot be run as asked: one line, and the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class RunRequest:
    stage: str | None = None
    params: dict = field(default_factory=dict)
    pipeline: str | None = None      # the file's full path, once checked
    dry_run: bool = False


def _allowed_keywords(stage: str) -> set[str]:
    from .. import api

    sig = inspect.signature(getattr(api, stage))
    return {name for name, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - _SERVER_ONLY


def parse_request(body, pipelines_dir: str | None) -> RunRequest:
    """A RunRequest from a request's JSON body, or ActionRefused naming what is wrong."""
    if not isinstance(body, dict):
        raise ActionRefused('expected a JSON object: {"stage": ..., "params": {...}} '
                            'or {"pipeline": NAME}')
    if ("stage" in body) == ("pipeline" in body):
        raise ActionRefused('give either "stage" (with "params") or "pipeline"')
    unknown = set(body) - {"stage", "params", "pipeline", "dry_run"}
    if unknown:
        raise ActionRefused(f"unknown key {sorted(unknown)[0]!r} "
                            "(expected stage, params, pipeline, dry_run)")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise ActionRefused("dry_run must be true or false")
    if "pipeline" in body:
        return RunRequest(pipeline=pipeline_path(body["pipeline"], pipelines_dir),
                          dry_run=dry_run)
    stage, params = body["stage"], body.get("params") or {}
    if stage not in STAGES:
        raise ActionRefused(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    if not isinstance(params, dict):
        raise ActionRefused("params must be a JSON object of the stage's parameters")
    allowed = _allowed_keywords(stage)
    for name in params:
        if name not in allowed:
            raise ActionRefused(f"{stage}: unknown parameter {name!r} "
                                f"(known: {', '.join(sorted(allowed))})")
    for name in STAGES[stage]:
        value = params.get(name)
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise ActionRefused(f"{stage}: parameter {name!r} must name a location")
    if dry_run and stage == "sync":
        params = {**params, "dry_run": True}
    elif dry_run:
        raise ActionRefused("dry_run applies to sync and pipelines only")
    return RunRequest(stage=stage, params=params, dry_run=dry_run)


def pipeline_path(name, pipelines_dir: str | None) -> str:
    """The file of a pipeline named in a request: a plain file name of the configured
    folder, never a path (no '/', no '..'): a request cannot reach other files."""
    if not pipelines_dir:
        raise ActionRefused("no pipeline folder is configured (castlib web --pipelines DIR)",
                            404)
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or "\0" in name
            or name.startswith(".") or not name.endswith(PIPELINE_SUFFIXES)):
        raise ActionRefused("a pipeline is named by its file name in the pipeline folder "
                            "(NAME.yaml)")
    path = Path(pipelines_dir, name)
    if not path.is_file():
        raise ActionRefused(f"no pipeline {name!r} in the pipeline folder", 404)
    return str(path)


def list_pipelines(pipelines_dir: str | None) -> list[str]:
    if not pipelines_dir or not os.path.isdir(pipelines_dir):
        return []
    return sorted(n for n in os.listdir(pipelines_dir)
                  if n.endswith(PIPELINE_SUFFIXES) and not n.startswith("."))


class LocalDispatcher:
    """Runs each request in a child process of the server (see the module's text)."""

    ANNOUNCE_TIMEOUT_S = 120   # a catalog behind a slow network, an upgrade on first use

    def __init__(self, db_url: str, log_dir: str | None = None, temporary_logs: bool = False):
        self.db_url = db_url
        self.log_dir = log_dir
        # no folder given: one of the server's own, made when a first run starts (a
        # server, or a test's app, that starts none leaves nothing behind in /tmp)
        self._temporary_logs = temporary_logs and log_dir is None
        self._children: list[subprocess.Popen] = []

    def submit(self, request: RunRequest) -> int:
        env = dict(os.environ)
        # the castlib this server runs, whether installed or run from a source tree
        tree = str(Path(castlib.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
        if self._temporary_logs and self.log_dir is None:
            self.log_dir = tempfile.mkdtemp(prefix="castlib-web-")
        log = (open(os.path.join(self.log_dir, f"run-{os.getpid()}-{len(self._children)}.log"),
                    "ab") if self.log_dir else subprocess.DEVNULL)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "castlib.web.runner"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                    env=env, start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self._children.append(proc)
        threading.Thread(target=self._reap, args=(proc,), daemon=True).start()
        proc.stdin.write(json.dumps({"db": self.db_url, **asdict(request)}).encode())
        proc.stdin.close()
        answer: list[bytes] = []
        reader = threading.Thread(target=lambda: answer.append(proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(self.ANNOUNCE_TIMEOUT_S)
        if not answer or not answer[0].strip():
            raise ActionRefused("the run did not start (its process ended or did not answer "
                                f"within {self.ANNOUNCE_TIMEOUT_S} s)", 500)
        said = json.loads(answer[0])
        if "error" in said:
            raise ActionRefused(said["error"], said.get("status", 422))
        return int(said["run_id"])

    def _reap(self, proc: subprocess.Popen) -> None:
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
        self._children.remove(proc)

    def running(self) -> int:
        return len(self._children)


class WorkerDispatcher:
    """Sends each request to the workers, as `castlib ... --on-workers --detach` does: the
    run is recorded 'queued' for the host that holds its data (or the queue its storage
    maps to), its id answered at once; a worker there claims and runs it."""

    def __init__(self, db_url: str, broker: str):
        self.db_url = db_url
        self.broker = broker

    def submit(self, request: RunRequest) -> int:
        from .. import api
        from ..errors import CastlibError
        from ..worker import BrokerUnreachable

        # what dispatch says for a person at a terminal (the run id, "queued for") is
        # the answer's to say here
        options = {"db": self.db_url, "on_workers": True, "detach": True,
                   "broker": self.broker, "quiet": True, "out": io.StringIO(),
                   "err": io.StringIO()}
        try:
            if request.pipeline:
                report = api.run_pipeline(request.pipeline, dry_run=request.dry_run,
                                          **options)
            else:
                params = dict(request.params)
                positional = [params.pop(n) for n in STAGES[request.stage]]
                report = getattr(api, request.stage)(*positional, **params, **options)
        except BrokerUnreachable as exc:
            raise ActionRefused(str(exc), 503) from None
        except CastlibError as exc:
            raise ActionRefused(str(exc), 422) from None
        return int(report.run_id)
