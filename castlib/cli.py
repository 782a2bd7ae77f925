"""The castlib command: argument parsing and output, over the Python API in castlib.api."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2


def _global_options(p: argparse.ArgumentParser, default) -> None:
    """--db, -v and -q, accepted before and after the command (`castlib sync a b -q`)."""
    p.add_argument("--db", metavar="URL", default=default,
                   help="catalog database URL (default: $CASTLIB_DB, else an SQLite file in "
                        "the user data directory); postgresql://user@host/db for a shared one")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count",
                           default=0 if default is None else default, help="more detail")
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           default=False if default is None else default,
                           help="no progress and no summary; errors only")


def _columns() -> int:
    """shutil.get_terminal_size().columns ($COLUMNS, else the terminal's, else 80), which
    argparse asks for whenever a parser is built, without importing shutil (and bz2, lzma,
    fnmatch with it) in every command."""
    import os

    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        if columns <= 0:
            columns = 80
    return columns


class _Formatter(argparse.HelpFormatter):
    """argparse's own, given the width it would compute."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line naming the option, and where to read more; no usage dump."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"castlib: error: {message} (see {self.prog} --help)\n")


class _Commands(argparse._SubParsersAction):
    """The subcommands; a command's stage options (castlib/options.py) are added only
    when it is the one chosen, so that `castlib --help` and one command's parsing build
    no other command's options."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deferred: dict = {}

    def __call__(self, parser, namespace, values, option_string=None):
        add = self.deferred.pop(values[0], None)
        if add is not None:
            add()
        super().__call__(parser, namespace, values, option_string)


def _count(minimum: int):
    """An argparse type for the CLI's own options (workers, web): an integer of at least
    `minimum`. Stage options get theirs from their Params (castlib.options)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value
    return parse


def _add_stage_options(c: argparse.ArgumentParser, name: str) -> None:
    from . import options   # only for the command run: `castlib --help` needs none

    options.add_arguments(c, name)


def _stage_options(args, name: str) -> dict:
    from . import options

    return options.values(args, name)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    p = _Parser(
        prog="castlib",
        description="Keep file trees in sync across storage back-ends through an SQL catalog.",
        epilog="Exit codes: 0 done / identical, 1 some items failed or differ, 2 usage, "
               "configuration error or refusal.")
    _global_options(p, None)
    p.add_argument("--version", action="version", version=f"castlib {__version__}")
    p.register("action", "parsers", _Commands)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, stage_options: bool = False, **kwargs) -> argparse.ArgumentParser:
        """A subcommand; stage_options: its arguments and options are those of the stages
        its api function runs (options.COMMANDS), derived from their Params."""
        c = sub.add_parser(name, parents=[common], **kwargs)
        if stage_options:
            sub.deferred[name] = lambda: _add_stage_options(c, name)
        return c

    # index, diff, sync and verify: what is added here is presentation only
    c = command("index", True, help="list a location into the catalog")
    _worker_options(c)
    c = command("diff", True, help="compare two locations (exit 1 when they differ)")
    c.add_argument("--json", action="store_true", help="JSON Lines, one per difference")
    _worker_options(c)
    c = command("sync", True, help="make DST match REF, verifying every copy")
    c.add_argument("--json", action="store_true", help="last line: JSON object of counts")
    _worker_options(c)
    c = command("verify", True, help="re-read files and compare with the catalog")
    c.add_argument("--json", action="store_true", help="JSON Lines, one per problem")
    _worker_options(c)

    c = command("run", help="run a YAML pipeline")
    c.add_argument("pipeline")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--force", action="store_true")
    _worker_options(c)

    command("stages", help="list the stages a pipeline can use")
    command("backends", help="list the URL schemes and what each can do")
    c = command("ls", help="list a location (or a folder of it) from the catalog")
    c.add_argument("location")
    c.add_argument("--deleted", action="store_true", help="include vanished entries")
    command("locations", help="list the locations in the catalog")
    c = command("runs", help="list recent runs, or show one")
    c.add_argument("action", nargs="?", choices=("show", "cancel"))
    c.add_argument("run_id", nargs="?", type=int)
    c.add_argument("--limit", type=int, default=20)
    c.add_argument("--broker", metavar="URL", help="for cancel: the broker of the workers")
    c = command("db", help="catalog database: info, upgrade")
    c.add_argument("action", choices=("info", "upgrade"))
    _worker_command(command)
    _web_command(command)
    return p


def _worker_options(c: argparse.ArgumentParser) -> None:
    """Sending a command's stages to the workers next to the data (castlib.dispatch)."""
    c.add_argument("--on-workers", action="store_true",
                   help="run each stage on the worker of the host that holds its data "
                        "(castlib worker; needs a PostgreSQL catalog and a broker)")
    c.add_argument("--detach", action="store_true",
                   help="with --on-workers: print the run id and return at once")
    c.add_argument("--broker", metavar="URL",
                   help="the workers' broker (default: $CASTLIB_BROKER, broker: in the "
                        "config, else redis://localhost:6379/0)")


def _worker_command(command) -> None:
    c = command("worker", help="run the stages sent to this host (a Celery worker)")
    c.add_argument("--queue", metavar="NAME", action="append", default=[],
                   help="also take the stages of this queue (e.g. eos); repeatable. The "
                        "queue named after this host is always taken")
    c.add_argument("--concurrency", metavar="N", type=_count(1), default=1,
                   help="runs taken at once (default 1)")
    c.add_argument("--broker", metavar="URL",
                   help="default: $CASTLIB_BROKER, broker: in the config, else "
                        "redis://localhost:6379/0")


def _skip_final_collections() -> None:
    """At the interpreter's exit, after the command has closed what it opened (the
    catalog, committed and closed; the back-ends) and the interpreter has joined the
    threads that are not daemons (the transfer pool's), freeze the heap for the
    collector: finalization then tears the modules down without its full collections of
    every object of asyncssh, fsspec, SQLAlchemy... (~0.1 s of a sync to SFTP, in a
    process that is ending). atexit runs this before the handlers registered earlier
    (logging's flush and close among them), which run as always, as does the flush of
    stdout and stderr; the exit code is untouched. What is left unreachable in a
    reference cycle at that point is not finalized: the interpreter gives no such
    promise at exit either, and nothing of castlib's waits on one."""
    import gc

    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    import atexit

    from . import _fewer_collections

    _fewer_collections()
    atexit.unregister(_skip_final_collections)   # once, however often main runs
    atexit.register(_skip_final_collections)
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "db", None) is not None and not args.db.strip():
        # not the default catalog in its place: an unset variable in a script (--db "$DB")
        # would quietly index into, and sync from, another catalog
        print("castlib: error: --db is empty: give a catalog (a path, sqlite:///path or "
              "postgresql://user@host/db), or leave --db out for the default", file=sys.stderr)
        return EXIT_ERROR
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="castlib: %(levelname)s: %(message)s")
    from .errors import CastlibError
    from .location import redact

    _stop_on_signals()
    try:
        return COMMANDS[args.command](args)
    except CastlibError as exc:
        from .catalog.paths import printable

        message = printable(redact(str(exc)))
        if getattr(args, "json", False) and args.command == "sync":
            # a cron job reading the last line of --json gets an answer on a refusal too
            print(json.dumps({"error": message, "exit_code": exc.exit_code}))
        print(f"castlib: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _interrupted(args, exc)
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # a bug: one line, the traceback only with -v
        if args.verbose:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"castlib: internal error: {type(exc).__name__}: {redact(first)} "
              "(run with -v for the traceback)", file=sys.stderr)
        return EXIT_ERROR


def _stop_on_signals() -> None:
    """SIGINT (Ctrl-C) and SIGTERM (kill, a batch system's stop) stop a run the same way:
    an Interrupted raised in the main thread, which the stages turn into "start nothing
    new, end what is in flight, record what was done". A second signal while that happens
    leaves at once: nothing is ever half-published, and the next sync cleans up."""
    import os
    import signal

    from .errors import interrupt

    stopping = []

    def handler(signum, frame):
        if stopping:
            os.write(2, b"castlib: interrupted again: leaving at once\n")
            os._exit(128 + signum)
        stopping.append(signum)
        interrupt(signum)   # (Interrupted, now or at the end of a step not to be cut)

    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:   # nohup, `cmd &` in a script
            signal.signal(signum, handler)


def _interrupted(args, exc: KeyboardInterrupt) -> int:
    from .errors import interruption_name

    code = getattr(exc, "exit_code", 130)
    report = getattr(exc, "report", None)
    if report is not None and getattr(args, "json", False) and args.command == "sync":
        print(json.dumps({**report.counts, "interrupted": interruption_name(exc),
                          **({"cancelled": True} if getattr(exc, "cancelled", False) else {}),
                          "exit_code": code}))
    where = f" (castlib runs show {report.run_id})" if report is not None else ""
    if getattr(exc, "cancelled", False):
        print(f"castlib: cancelled by castlib runs cancel{where}", file=sys.stderr)
    else:
        print(f"castlib: interrupted by {interruption_name(exc)}{where}", file=sys.stderr)
    return code


def _common(args) -> dict:
    common = {"db": args.db, "quiet": args.quiet}
    if getattr(args, "on_workers", False):
        common.update(on_workers=True, detach=args.detach, broker=args.broker,
                      verbose=args.verbose)
    elif getattr(args, "detach", False):
        from .errors import ConfigError

        raise ConfigError("--detach goes with --on-workers")
    return common


def _connect_ahead(args, *locations: str) -> None:
    """Start the logins of the locations the command will list (its SSH ones) first
    (backends.connect_ahead), where this process is the one that connects (not a
    worker's run). Only those it lists: a location it may not touch (a diff of the
    catalog alone, a sync whose destination is not indexed and may need no copy) is not
    logged in to for nothing."""
    if not getattr(args, "on_workers", False) and locations:
        from .backends import connect_ahead

        connect_ahead(locations)


def cmd_index(args) -> int:
    _connect_ahead(args, args.location)
    from . import api

    report = api.index(args.location, **_stage_options(args, "index"), **_common(args))
    return report.exit_code


def cmd_diff(args) -> int:
    _connect_ahead(args, *((args.ref, args.dst) if args.index else ()))
    from . import api
    from .catalog.paths import printable

    report = api.diff(args.ref, args.dst, **_stage_options(args, "diff"), **_common(args))
    if report.value is None:   # ran on a worker (or --detach): its summary was the output
        return _worker_exit(report)
    differences = report.value.differences
    out = sys.stdout
    for d in differences:
        if args.json:
            out.write(json.dumps(d.as_dict(), ensure_ascii=False) + "\n")
        else:
            out.write(f"{d.kind:<9} {printable(d.path)}\n")
    return max(report.exit_code, EXIT_DIFFERENT if differences else EXIT_OK)


def cmd_sync(args) -> int:
    _connect_ahead(args, *{"both": (args.ref, args.dst), "ref": (args.ref,)}.get(args.index, ()))
    from . import api

    report = api.sync(args.ref, args.dst, **_stage_options(args, "sync"), **_common(args))
    if args.json:
        print(json.dumps(report.counts))
    return report.exit_code


def cmd_verify(args) -> int:
    _connect_ahead(args, args.location)
    from . import api
    from .catalog.paths import printable

    # the problems are this command's output (stdout), not also stderr noise
    report = api.verify(args.location, **_stage_options(args, "verify"),
                        show_errors=bool(getattr(args, "on_workers", False)), **_common(args))
    if report.value is None:   # ran on a worker: the problems were shown as its errors
        return report.exit_code
    for problem in report.value.problems:
        if args.json:
            print(json.dumps(problem.as_dict(), ensure_ascii=False))
        else:
            print(f"{problem.kind:<10} {printable(problem.path)}: {printable(problem.detail)}")
    return report.exit_code


def _worker_exit(report) -> int:
    """A diff run on a worker: exit 1 when its counts say the locations differ."""
    counts = report.counts or {}
    differ = any(v for k, v in counts.items() if k != "bytes" and isinstance(v, int))
    return max(report.exit_code, EXIT_DIFFERENT if report.stages and differ else EXIT_OK)


def cmd_run(args) -> int:
    from . import api

    report = api.run_pipeline(args.pipeline, dry_run=args.dry_run, force=args.force,
                              **_common(args))
    return report.exit_code


def cmd_stages(args) -> int:
    from .stages import stage_class, stage_names

    for name in stage_names():
        cls = stage_class(name)
        print(f"{name:<8} {cls.description}")
        for pname, f in cls.Params.model_fields.items():
            label = f.alias or pname
            default = "required" if f.is_required() else f"default {_show_default(f)}"
            print(f"    {label:<16} {f.description or ''} ({default})")
    return EXIT_OK


def _show_default(field) -> str:
    value = field.get_default(call_default_factory=True)
    return json.dumps(value) if not isinstance(value, str) else value


def cmd_backends(args) -> int:
    from .backends import backend_class, is_available, registry
    from .errors import BackendUnavailable

    for scheme, spec in sorted(registry().items()):
        available = is_available(spec)
        line = f"{scheme + '://':<12}"
        if not available:
            print(f"{line} not installed: pip install 'castlib[{spec.extra}]'")
            continue
        try:
            cls = backend_class(scheme)
        except BackendUnavailable as exc:
            print(f"{line} unavailable: {exc}")
            continue
        caps = cls.capabilities_for(scheme)
        flags = [k for k, v in caps.as_dict().items() if v is True]
        sums = ",".join(sorted(caps.server_checksums)) or "-"
        extra = f" (castlib[{spec.extra}], installed)" if spec.extra else ""
        print(f"{line} {cls.description or cls.__name__}{extra}; server checksums: {sums}; "
              f"mtime precision {caps.mtime_precision_ns / 1e9:g} s"
              + (f"; {' '.join(flags)}" if flags else ""))
    return EXIT_OK


def cmd_ls(args) -> int:
    from .backends.base import FILE
    from .catalog import Catalog
    from .catalog.paths import printable
    from .errors import ConfigError

    catalog = Catalog(args.db)
    found = catalog.location_holding(args.location)
    if found is None:
        raise ConfigError(f"no location in the catalog holds {args.location!r} "
                          "(castlib locations lists them)")
    loc, prefix = found
    from datetime import datetime, timezone

    for e in catalog.entries(loc.id, prefix, include_deleted=args.deleted):
        mtime = (datetime.fromtimestamp(e["mtime_ns"] / 1e9, timezone.utc)
                 .strftime("%Y-%m-%d %H:%M:%S") if e["mtime_ns"] is not None else "-")
        kind = "-" if e["kind"] == FILE else e["kind"]   # ls -l's type column: d, l as kept
        mark = " (deleted)" if e["deleted"] else ""
        size = e["size"] if e["size"] is not None else "-"
        print(f"{kind} {size:>14} {mtime} {e['adler32'] or '-':>8} {printable(e['path'])}{mark}")
    return EXIT_OK


def cmd_locations(args) -> int:
    from .catalog import Catalog
    from .progress import human_bytes

    for r in Catalog(args.db).locations():
        when = r["indexed_at"].strftime("%Y-%m-%d %H:%M") if r["indexed_at"] else "never"
        print(f"{r['id']:>4} {r['name'] or '-':<12} {r['files']:>10} files {r['dirs']:>8} dirs "
              f"{human_bytes(r['bytes']):>10}  indexed {when}  {r['url']}")
    return EXIT_OK


def cmd_runs(args) -> int:
    from .catalog import Catalog
    from .errors import ConfigError

    catalog = Catalog(args.db)
    catalog.mark_dead_runs()   # a worker killed, a machine stopped: said here, not 'running'
    if args.action == "cancel":
        return _cancel_run(catalog, args)
    if args.action == "show":
        if args.run_id is None:
            raise ConfigError("runs show needs a run id")
        details = catalog.run_details(args.run_id)
        if details is None:
            raise ConfigError(f"no run with id {args.run_id}")
        run, stages = details
        print(f"run {run['id']}: {run['command']} {json.dumps(run['args'])}")
        print(f"  {run['status']}, started {run['started_at']}, finished {run['finished_at']}, "
              f"on {run['hostname']} by {run['username']}")
        if run["error"]:
            print(f"  error: {run['error']}")
        for s in stages:
            took = (s["finished_at"] - s["started_at"]).total_seconds() if s["finished_at"] else 0
            print(f"  stage {s['position'] + 1} {s['stage']}"
                  f"{' (' + s['stage_id'] + ')' if s['stage_id'] else ''}: {s['status']} "
                  f"in {took:.1f} s" + (f" on {s['hostname']}" if s.get("hostname") else "")
                  + f" {json.dumps(s['counts'])}")
            for e in (s["errors"] or [])[:20]:
                print(f"    {e}")
        return EXIT_OK
    from .progress import human_bytes

    for r in catalog.runs(args.limit):
        took = ((r["finished_at"] - r["started_at"]).total_seconds()
                if r["finished_at"] else None)
        t = r["totals"]
        what = [f"{t['copied']} copied", f"{t['replaced']} replaced", f"{t['deleted']} deleted",
                f"{t['failed']} failed", human_bytes(t["bytes"])] if r["command"] in ("sync", "run") else []
        if t["errors"]:
            what.append(f"{t['errors']} errors")
        if r["error"]:
            what.append(r["error"][:80])
        print(f"{r['id']:>5} {r['started_at']:%Y-%m-%d %H:%M:%S} {r['command']:<7} "
              f"{r['status']:<11} {r['hostname'] or '-':<12} "
              f"{'-' if took is None else f'{took:.1f} s':>8}  {', '.join(what)}")
    return EXIT_OK


def _cancel_run(catalog, args) -> int:
    from .config import load_user_config
    from .dispatch import cancel
    from .errors import ConfigError

    if args.run_id is None:
        raise ConfigError("runs cancel needs a run id")
    print(cancel(catalog, args.run_id, args.broker, load_user_config()), file=sys.stderr)
    return EXIT_OK


def cmd_worker(args) -> int:
    from .worker import main as worker_main

    return worker_main(args)


def cmd_db(args) -> int:
    from .catalog import Catalog

    catalog = Catalog(args.db)
    if args.action == "upgrade":
        if catalog.upgraded_from != catalog.revision:
            print(f"catalog upgraded from {catalog.upgraded_from or 'empty'} to {catalog.revision}")
        else:
            print(f"catalog is at the newest schema, {catalog.revision}")
        return EXIT_OK
    info = catalog.info()
    locations = info["locations"]
    size = info["size"]
    print(f"database: {info['database']}")
    print(f"schema version: {info['revision']}")
    print(f"size: {size} bytes ({size / 2**20:.1f} MiB)")
    print(f"locations: {len(locations)}")
    print(f"entries: {info['entries']} ({info['deleted']} marked deleted)")
    print(f"live files: {sum(r['files'] for r in locations)}, live folders: "
          f"{sum(r['dirs'] for r in locations)}, bytes: {sum(r['bytes'] for r in locations)}")
    print(f"runs: {info['runs']}")
    return EXIT_OK


def _web_command(command) -> None:
    c = command("web", help="serve the web view and the HTTP API (pip install castlib[web])")
    c.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    c.add_argument("--port", type=_count(1), default=8080, help="port (default 8080)")
    c.add_argument("--token-file", metavar="FILE",
                   help="file holding the token that allows actions (starting runs), "
                        "readable by its owner only (chmod 600); "
                        "without it the server is read-only")
    c.add_argument("--pipelines", metavar="DIR",
                   help="folder of pipeline files that actions may start by name")
    c.add_argument("--broker", metavar="URL",
                   help="send actions to the workers of this broker (default: "
                        "$CASTLIB_BROKER, broker: in the config; none: actions run in the "
                        "server's own background process)")
    c.add_argument("--allow-host", metavar="NAME", action="append", default=[],
                   help="a name the server answers to in a request's Host header (a "
                        "proxy's, the machine's), repeatable; on 127.0.0.1 it answers to "
                        "localhost and loopback addresses only unless named here")


def cmd_web(args) -> int:
    import os
    import socket

    from .errors import ConfigError

    from .token_file import read_token_file

    token = read_token_file(args.token_file) if args.token_file else None
    if args.pipelines and not os.path.isdir(args.pipelines):
        raise ConfigError("not a folder", key="--pipelines", file=args.pipelines)
    try:
        import uvicorn

        from .web import create_app
    except ImportError as exc:
        raise ConfigError(f"castlib web needs {exc.name}: pip install 'castlib[web]'") from None
    dispatcher, where = _web_dispatcher(args)
    try:   # a port in use is one line here, not uvicorn's log and exit
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: "
                          f"{exc.strerror or exc}") from None
    app = create_app(args.db, token, pipelines_dir=args.pipelines, dispatcher=dispatcher,
                     allowed_hosts=_allowed_hosts(args))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"castlib web: http://{host}:{args.port}/ "
          f"({'actions need the token; ' + where if token else 'read-only: no --token-file'})",
          file=sys.stderr, flush=True)
    # proxy_headers off: the limit on wrong tokens counts by the address that connects
    # (web/auth.py client_address), which X-Forwarded-For from any local process would
    # otherwise rename at will
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                proxy_headers=False)
    return EXIT_OK


def _allowed_hosts(args) -> list[str] | None:
    """The Host header names `castlib web` answers to (web.app.HostCheck): bound to a
    loopback address, those of this machine's loopback and each --allow-host (a page of
    another site whose name was made to resolve to 127.0.0.1 is refused); bound to
    another address, any name unless --allow-host lists them."""
    import ipaddress

    loopback = ["localhost", "127.0.0.1", "::1"]
    try:
        on_loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:   # a host name to bind to
        on_loopback = False
    if on_loopback:
        return loopback + [args.host] + args.allow_host
    return loopback + args.allow_host if args.allow_host else None


def _web_dispatcher(args):
    """Who carries out the web's actions, and those words for the start-up line: the
    workers when a broker is configured (as --on-workers), else the server's own child
    processes (None: create_app's default). Workers need the catalog they share: with
    --broker and an SQLite catalog, a refusal; with a broker from the environment or the
    config, the server runs actions itself and says so."""
    from .catalog.database import default_db_url, normalise_db_url
    from .config import load_user_config
    from .dispatch import configured_broker
    from .errors import ConfigError
    from .location import redact

    broker = configured_broker(args.broker, load_user_config())
    if not broker:
        return None, "actions run in this server's background processes"
    db = args.db or default_db_url()
    if normalise_db_url(db).startswith("sqlite"):
        if args.broker:
            raise ConfigError("--broker needs a catalog the workers share: give --db "
                              "postgresql://... (this one is an SQLite file)")
        return None, ("actions run in this server's background processes (the broker "
                      "configured needs a PostgreSQL catalog)")
    from .web.actions import WorkerDispatcher

    return WorkerDispatcher(db, broker), f"actions go to the workers of {redact(broker)}"


COMMANDS = {"index": cmd_index, "diff": cmd_diff, "sync": cmd_sync, "verify": cmd_verify,
            "run": cmd_run, "stages": cmd_stages, "backends": cmd_backends, "ls": cmd_ls,
            "locations": cmd_locations, "runs": cmd_runs, "db": cmd_db,
            "worker": cmd_worker,
            "web": cmd_web}
