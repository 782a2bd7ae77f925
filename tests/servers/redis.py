"""A throwaway Redis server (Debian's redis-server) on 127.0.0.1, the broker of the worker
tests; and `castlib worker` processes standing for several hosts on this one machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import castlib_command, cli_env, run_cli
from tests.servers.common import answers_on, free_port, server_process

REDIS_SERVER = "/usr/bin/redis-server"
# a run of another host counts as died once its heartbeat is this old (runs beat every
# second): kept short, so the tests of killed workers do not wait long
HEARTBEAT_LIMIT = "6"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis on a free loopback port for the session, nothing kept on disk."""
    with redis_server() as url:
        yield url


@contextmanager
def redis_server(port: int | None = None, password: str | None = None) -> Iterator[str]:
    """A Redis server for the block (on `port`, or a free one): its URL (without the
    `password` it then requires)."""
    if not os.path.exists(REDIS_SERVER):
        raise RuntimeError(f"{REDIS_SERVER} not found (scripts/install-test-deps installs "
                           "the redis-server package)")
    folder = Path(tempfile.mkdtemp(prefix="castlib-redis-"))
    port = port or free_port()

    def pong() -> bool:
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            # a server that wants a password answers NOAUTH: up all the same
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))

    auth = ["--requirepass", password] if password else []
    with server_process("redis-server", [REDIS_SERVER, "--port", str(port), "--bind",
                                         "127.0.0.1", "--save", "", "--appendonly", "no",
                                         "--dir", str(folder), *auth],
                        folder / "redis.log", pong):
        yield f"redis://127.0.0.1:{port}/0"


@dataclass
class Worker:
    """A `castlib worker` process playing host `name` (CASTLIB_HOSTNAME)."""

    name: str
    env: dict
    log_path: Path
    args: tuple = ()
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, ready_within: float = 90) -> "Worker":
        log = open(self.log_path, "ab")
        # a session of its own: SIGKILL to the group takes the pool's children too
        self.proc = subprocess.Popen(castlib_command("-v", "worker", *self.args),
                                     stdout=log, stderr=subprocess.STDOUT,
                                     env=cli_env(self.env), start_new_session=True)
        log.close()
        deadline = time.monotonic() + ready_within
        while b"ready." not in self.log_path.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready in {ready_within:g} s:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        """SIGKILL, the worker and its children at once: a machine that stops."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def worker_env(name: str, db: str, broker: str, **extra) -> dict:
    return {"CASTLIB_HOSTNAME": name, "CASTLIB_DB": db, "CASTLIB_BROKER": broker, **extra}


@pytest.fixture(scope="module")
def cluster(postgres_url, redis_url, tmp_path_factory):
    """One catalog (PostgreSQL), one broker, `castlib worker`s daq01 and daq02 for the
    test module; the client's environment (host `client`)."""
    from castlib.catalog import Catalog
    from tests.servers.postgres import fresh_database

    db = fresh_database(postgres_url)
    Catalog(db).close()   # the schema, once, before three processes open it at once
    logs = tmp_path_factory.mktemp("workers")
    workers = {}
    try:
        for name in ("daq01", "daq02"):
            workers[name] = Worker(name, worker_env(name, db, redis_url,
                                                    CASTLIB_HEARTBEAT_LIMIT=HEARTBEAT_LIMIT),
                                   logs / f"{name}.log").start()
        yield _Cluster(db, redis_url, workers, logs)
    finally:
        for w in workers.values():
            w.stop()


class _Cluster:
    def __init__(self, db, broker, workers, logs):
        self.db, self.broker, self.workers, self.logs = db, broker, workers, logs

    def client_env(self, **extra) -> dict:
        return worker_env("client", self.db, self.broker,
                          CASTLIB_HEARTBEAT_LIMIT=HEARTBEAT_LIMIT, **extra)

    def cli(self, *args, check=None, timeout=300):
        return run_cli(*args, env=self.client_env(), check=check, timeout=timeout)

    def worker(self, name: str) -> Worker:
        return Worker(name, worker_env(name, self.db, self.broker,
                                       CASTLIB_HEARTBEAT_LIMIT=HEARTBEAT_LIMIT),
                      self.logs / f"{name}.log")

    def run(self, run_id: int):
        from castlib.catalog import Catalog

        with Catalog(self.db) as catalog:
            return catalog.run_details(run_id)

    def last_run_id(self) -> int:
        from castlib.catalog import Catalog

        with Catalog(self.db) as catalog:
            return catalog.runs(1)[0]["id"]
