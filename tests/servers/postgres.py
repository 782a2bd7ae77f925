"""A throwaway PostgreSQL server from Debian's binaries, on 127.0.0.1, for catalog tests."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from tests.servers.common import free_port, unprivileged_user   # PostgreSQL refuses root



def _bin(name: str) -> str:
    """A PostgreSQL server binary, from the newest version Debian installed."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4].split(".")[0]))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found under /usr/lib/postgresql "
                           "(scripts/install-test-deps installs the postgresql package)")
    return found[-1]


def _as_test_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", unprivileged_user().pw_name, "--", *cmd]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a PostgreSQL server; yields its URL without a database name
    (postgresql://user@127.0.0.1:PORT). Stopped, its files removed, on exit."""
    folder = tempfile.mkdtemp(prefix="castlib-pg-")
    data = os.path.join(folder, "data")
    if os.geteuid() == 0:
        user = unprivileged_user()
        os.chown(folder, user.pw_uid, user.pw_gid)
    port = free_port()
    subprocess.run(_as_test_user([_bin("initdb"), "-D", data, "-U", "castlib", "--locale=C",
                                  "-E", "UTF8", "--auth=trust", "--no-sync"]),
                   check=True, capture_output=True)
    with open(os.path.join(data, "postgresql.conf"), "a") as conf:
        conf.write("listen_addresses = '127.0.0.1'\n"
                   f"port = {port}\n"
                   f"unix_socket_directories = '{folder}'\n"
                   "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                   "max_connections = 200\n")
    subprocess.run(_as_test_user([_bin("pg_ctl"), "-D", data, "-l",
                                  os.path.join(folder, "server.log"), "-w", "-t", "60", "start"]),
                   check=True, capture_output=True)
    try:
        yield f"postgresql://castlib@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_test_user([_bin("pg_ctl"), "-D", data, "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def admin_execute(server_url: str, *statements: str) -> None:
    """Run statements on the server's `postgres` database in autocommit (CREATE DATABASE)."""
    import psycopg

    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The session's PostgreSQL server URL (no database name)."""
    with postgres_server() as url:
        yield url


_counter = iter(range(1, 1_000_000))


def fresh_database(server_url: str) -> str:
    """A new empty database on the server; its full URL."""
    name = f"t{os.getpid()}_{next(_counter)}_{int(time.time() * 1000) % 100000}"
    admin_execute(server_url, f'CREATE DATABASE "{name}" TEMPLATE template0')
    return f"{server_url}/{name}"
