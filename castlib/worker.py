"""`castlib worker`: a Celery worker that runs the stages sent to its host (castlib.dispatch).

Celery is imported here only, when a worker starts or a run is sent: every other command
starts without it, and an installation without `castlib[worker]` says so in one line.

A worker consumes the queue named after its host (castlib.hosts.local_hostname), the
default queue, and any --queue given (`eos` for the worker next to the archive). A task is
one segment of a run: the worker claims the run in the catalog (a task delivered twice, or
for a run cancelled or died meanwhile, is skipped there), runs its stages as a local run
would (each run beats a heartbeat into its record with the counters of the stage running,
progress.RunBeat), and reads back from it whether `castlib runs cancel` asked it to stop.

Delivery settings, and why:
- task_acks_late with a prefetch of one: the message is acknowledged when the segment
  ended, so a worker that dies before it could start a task it had taken leaves it to the
  next worker instead of losing it. A task that had started and whose worker died is
  redelivered too, later; the catalog then has the run 'died' (heartbeat, or the pid gone)
  and the claim refuses it: nothing runs twice, and a re-run is the user's call.
- visibility_timeout of 7 days (Redis): Redis gives an unacknowledged message to another
  worker once it is older than this, *even while its worker is still copying*. An hour (the
  default) would start a second copy of every sync longer than an hour; the claim would
  refuse it, but the first worker's late acknowledgement would then find its message gone.
  So: longer than any sync. The cost: a message whose worker was killed comes back after
  7 days, where the claim refuses it.
- worker_cancel_long_running_tasks_on_connection_loss off: a broker restart does not stop
  a running sync; it ends and records its result in the catalog, which is where results
  are (no result backend: the broker keeps nothing that matters once a run is taken).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from .errors import CastlibError, ConfigError

log = logging.getLogger(__name__)

VISIBILITY_TIMEOUT_S = 7 * 24 * 3600
TASK_NAME = "castlib.run_segment"


class BrokerUnreachable(CastlibError):
    """The broker cannot be reached: a worker cannot start, a run cannot be sent."""


def _celery():
    try:
        import celery  # noqa: F401
        import cryptography  # noqa: F401   (seal)
        import kombu  # noqa: F401
    except ImportError:
        raise ConfigError("workers need Celery, redis-py and cryptography: pip install "
                          "'castlib[worker]'") from None
    return celery


def make_app(broker: str, db: str | None = None):
    """The Celery application of castlib: made on demand, never at import."""
    celery = _celery()
    app = celery.Celery("castlib", broker=broker, set_as_current=False)
    from .dispatch import DEFAULT_QUEUE

    app.conf.update(
        task_default_queue=DEFAULT_QUEUE,
        task_serializer="json", accept_content=["json"],
        task_ignore_result=True, result_backend=None,
        task_acks_late=True, worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=False,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_publish_retry=False,
    )
    app.conf.castlib_db = db
    app.task(name=TASK_NAME, acks_late=True)(_run_segment_task)
    return app


def check_broker(broker: str, timeout_s: float = 5) -> None:
    """One line, exit 2, when the broker cannot be reached (not a traceback, not a
    worker retrying forever)."""
    _celery()
    from kombu import Connection

    from .dispatch import check_broker_url
    from .location import redact

    check_broker_url(broker)

    try:
        with Connection(broker, connect_timeout=timeout_s) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as exc:   # kombu raises the transport's own errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrokerUnreachable(f"cannot reach the broker {redact(broker)}: {redact(reason)} "
                                "(--broker, $CASTLIB_BROKER or broker: in the config)"
                                ) from None


def seal(key: bytes, body: dict) -> str:
    """A segment's orders as the broker carries them: encrypted and authenticated with the
    catalog's message key (catalog.settings.message_key). They hold the locations' URLs
    with their credentials and the back-end options (passwords, tokens): whoever reads the
    broker (an open Redis, `celery inspect`, a monitoring tool showing task arguments)
    must not read those; and whoever can write to it must not make a worker run a stage
    of their own choosing (a sync --delete) under a queued run's id."""
    import json

    from cryptography.fernet import Fernet

    return Fernet(key).encrypt(json.dumps(body).encode()).decode("ascii")


class TamperedMessage(CastlibError):
    """A task whose orders were not sealed with this catalog's key."""


def unseal(key: bytes, run_id, sealed) -> dict:
    """The orders of a task (seal), or TamperedMessage: not sealed with this catalog's
    key, altered on the way, or sealed for another run than the one it names."""
    import json

    from cryptography.fernet import Fernet, InvalidToken

    if not isinstance(sealed, str):
        raise TamperedMessage(f"run {run_id}: the task carries no sealed orders")
    try:
        body = json.loads(Fernet(key).decrypt(sealed.encode("ascii")))
    except (InvalidToken, UnicodeEncodeError, ValueError):
        raise TamperedMessage(f"run {run_id}: the task's orders were not sealed with this "
                              "catalog's key (altered, or sent for another catalog)") from None
    if not isinstance(body, dict) or body.get("run_id") != run_id:
        raise TamperedMessage(f"run {run_id}: the task's orders are sealed for another run")
    return body


def send_chain(broker: str, run_id: int, command: str, payload: dict, segments,
               dry_run: bool, force: bool, key: bytes) -> list[str]:
    """Queue the segments of a run as one chain (each starts when the one before ended),
    each segment's orders sealed with `key` (seal); the task ids, for revoke."""
    from uuid import uuid4

    from celery import chain

    app = make_app(broker)
    sigs, ids = [], []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        orders = {"run_id": run_id, "command": command, **payload,
                  "positions": seg.positions, "last": last,
                  "next_queue": None if last else segments[i + 1].queue,
                  "dry_run": dry_run, "force": force}
        # the run id stays readable: what a worker logs about a message it refuses
        body = {"run_id": run_id, "sealed": seal(key, orders)}
        task_id = str(uuid4())
        ids.append(task_id)
        sigs.append(app.signature(TASK_NAME, args=(body,), queue=seg.queue, immutable=True,
                                  task_id=task_id))
    with app.connection_for_write() as conn:
        chain(*sigs).apply_async(connection=conn)
    return ids


def revoke(broker: str, task_ids: list[str]) -> None:
    check_broker(broker)
    make_app(broker).control.revoke(task_ids)


# -- the worker's side -------------------------------------------------------------------------
_catalogs: dict[tuple, object] = {}


def _catalog(db):
    from .catalog import Catalog

    key = (os.getpid(), db)   # one engine per process: a forked pool child makes its own
    if key not in _catalogs:
        _catalogs[key] = Catalog(db)
    return _catalogs[key]


def _run_segment_task(body: dict) -> str:
    from celery import current_app

    return run_segment(body, current_app.conf.castlib_db)


def run_segment(body: dict, db: str | None) -> str:
    """Run one segment of a run recorded in the catalog; what happened, in a word."""
    from .errors import interrupt
    from .hosts import local_hostname
    from .pipeline import Pipeline

    from .catalog.settings import message_key

    catalog = _catalog(db)
    run_id = body.get("run_id") if isinstance(body, dict) else None
    try:
        body = unseal(message_key(catalog), run_id,
                      body.get("sealed") if isinstance(body, dict) else None)
    except TamperedMessage as exc:   # the run is left as it is: its true message may come
        log.error("%s: refused", exc)
        return "refused"
    positions = body["positions"]
    if not catalog.claim_run(run_id, positions[0]):
        log.warning("run %s: not mine to run (cancelled, died, ended, or taken already)",
                    run_id)
        return "skipped"
    log.warning("run %s: stages %s on %s", run_id, [p + 1 for p in positions],
                local_hostname())
    try:
        pipeline = Pipeline.from_stages([tuple(s) for s in body["stages"]],
                                        body["locations"])
    except Exception as exc:
        # orders this castlib cannot build (a client newer than this worker: a stage or
        # a parameter it does not know): the run it claimed ends here, with the reason.
        # Left to Celery, the run stayed 'running' on a live worker process for ever,
        # and the traceback in the log was all that said why
        from .location import redact

        reason = redact(str(exc) if isinstance(exc, CastlibError)
                        else f"{type(exc).__name__}: {exc}")
        catalog.finish_run(run_id, "error",
                           f"{local_hostname()} cannot run this run's stages: {reason}")
        log.error("run %s: cannot run its stages: %s", run_id, reason)
        return "error"
    pipeline.location_options = body.get("location_options") or {}
    pipeline.stages = [s for s in pipeline.stages if s.position in positions]

    cancelled = []
    main = threading.main_thread().ident

    def on_cancel():   # from the run's heartbeat (progress.RunBeat), once
        cancelled.append(True)
        signal.pthread_kill(main, signal.SIGTERM)   # the clean stop of a run

    stopping = []

    def on_sigterm(signum, frame):
        if stopping:   # a second one: the worker is being stopped for good
            return
        stopping.append(signum)
        interrupt(signum)   # (Interrupted, now or at the end of a step not to be cut)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        report = pipeline.run(catalog, command=body["command"], run_id=run_id,
                              finish=body["last"], dry_run=body.get("dry_run", False),
                              force=body.get("force", False), quiet=False,
                              on_cancel=on_cancel)
    except KeyboardInterrupt:
        if cancelled:
            catalog.finish_run(run_id, "cancelled", "cancelled by castlib runs cancel")
            return "cancelled"
        # the worker itself was told to stop (systemctl stop): the run is recorded
        # 'interrupted'; the signal goes on to Celery's own handler (warm shutdown)
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)
        return "interrupted"
    except CastlibError:
        return "error"   # recorded by the pipeline
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not body["last"] and not report.exit_code:
        catalog.hand_over_run(run_id, body["next_queue"])
    return "failed" if report.exit_code else "ok"


def _check_queues(catalog, host: str, queues: list[str]) -> None:
    """Refuse a --queue that is another host's own queue (a service file copied from
    daq01 to daq02 with its `--queue daq01`): this worker would take stages of daq01's
    disks, which it cannot read, and fail them, while daq01's worker could have run them.
    The hosts known are those of the catalog's local locations listed once."""
    for queue in queues:
        if queue == host:
            continue
        if catalog.listed_locations_of("file", queue):
            raise ConfigError(f"--queue {queue}: that is the queue of host {queue}'s "
                              f"worker (the catalog has local locations of {queue}); this "
                              f"host is {host}, which cannot read {queue}'s disks")


def main(args) -> int:
    """`castlib worker`: refuse what cannot work (an SQLite catalog, no broker) in one
    line, then run the Celery worker until it is stopped (SIGTERM: warm shutdown)."""
    from .catalog.database import default_db_url, normalise_db_url
    from .config import load_user_config
    from .dispatch import DEFAULT_QUEUE, broker_url
    from .hosts import local_hostname

    db = args.db or default_db_url()
    if normalise_db_url(db).startswith("sqlite"):
        raise ConfigError("workers need a shared catalog: give --db postgresql://... (an "
                          "SQLite catalog is a file on one machine)")
    user_config = load_user_config()
    broker = broker_url(args.broker, user_config)
    host = local_hostname()
    check_broker(broker)
    from .catalog import Catalog

    with Catalog(db) as catalog:   # reachable and at the newest schema, before any task
        _check_queues(catalog, host, args.queue)
    queues = list(dict.fromkeys([host, DEFAULT_QUEUE, *args.queue]))
    app = make_app(broker, db)
    print(f"castlib worker {host}: queues {', '.join(queues)}; concurrency "
          f"{args.concurrency}", file=sys.stderr, flush=True)
    worker = app.Worker(hostname=f"castlib@{host}", queues=queues,
                        concurrency=args.concurrency,
                        pool="solo" if args.concurrency == 1 else "prefork",
                        loglevel="INFO" if args.verbose else "WARNING",
                        without_heartbeat=True, without_mingle=True, without_gossip=True)
    worker.start()
    return worker.exitcode or 0
