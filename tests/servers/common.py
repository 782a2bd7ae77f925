"""Fixtures every test may use (a throwaway catalog), and the one way the server
fixtures start a server process, wait for it to answer and stop it."""
from __future__ import annotations

import dataclasses
import os
import pwd
import secrets
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest


TEST_USER = "castlibtest"
_USERADD_EXISTS = 9   # useradd's exit status when another run created the user first


def unprivileged_user() -> pwd.struct_passwd:
    """The account servers run as and tests log in as: castlibtest (created if missing)
    when we are root, whom servers such as xrootd and PostgreSQL refuse; else ourselves."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                               "/nonexistent", "--shell", "/usr/sbin/nologin", TEST_USER],
                              capture_output=True, text=True)
        if done.returncode not in (0, _USERADD_EXISTS):
            raise RuntimeError(f"useradd {TEST_USER} failed: {done.stderr.strip()}")
        return pwd.getpwnam(TEST_USER)


class FolderPerTest:
    """For a server dataclass with `root` (what it serves at /) and `folder` (one test's
    folder below it): a session's server, seen by each test through a folder of its own."""

    @property
    def path(self) -> Path:
        return self.root / self.folder

    def for_test(self):
        """The same server with a fresh folder for one test."""
        folder = f"t-{secrets.token_hex(6)}"
        (self.root / folder).mkdir()
        return dataclasses.replace(self, folder=folder)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_on(port: int, banner: bytes | None = None,
               host: str = "127.0.0.1") -> Callable[[], bool]:
    """A readiness check: something accepts TCP connections on host:port (and, with
    `banner`, greets with it: sshd's "SSH-" comes only once it can serve)."""
    def check() -> bool:
        with socket.create_connection((host, port), timeout=1) as s:
            return banner is None or s.recv(64).startswith(banner)
    return check


def wait_until_ready(name: str, proc: subprocess.Popen, ready: Callable[[], bool], *,
                     log_path: Path | None = None, timeout_s: float = 30) -> None:
    """Poll `ready()` (an OSError counts as not yet) until it says yes; a server that
    exits meanwhile, or never answers, fails the fixture with the end of its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}{_log_tail(log_path)}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not answer within {timeout_s} s{_log_tail(log_path)}")


def stop_process(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not ended after `grace_s`."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def server_process(name: str, argv: list[str], log_path: Path, ready: Callable[[], bool], *,
                   env: dict | None = None, cwd: Path | None = None,
                   timeout_s: float = 30) -> Iterator[subprocess.Popen]:
    """A server process for the length of the block: started with its output in
    `log_path`, ready when the block begins, stopped when it ends."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            wait_until_ready(name, proc, ready, log_path=log_path, timeout_s=timeout_s)
            yield proc
        finally:
            stop_process(proc)


def _log_tail(log_path: Path | None) -> str:
    if log_path is None or not Path(log_path).exists():
        return ""
    return ":\n" + Path(log_path).read_text(errors="replace")[-2000:]


# CASTLIB_TEST_DB=sqlite (or postgresql) runs the catalog tests on one database only,
# for quick development; CI leaves it unset and runs both.
CATALOG_DATABASES = [d for d in ("sqlite", "postgresql")
                     if os.environ.get("CASTLIB_TEST_DB", d) == d]


@pytest.fixture(params=CATALOG_DATABASES)
def db_url(request, tmp_path, monkeypatch) -> str:
    """A fresh, empty catalog database for one test: an SQLite file, or a new database on
    the session's PostgreSQL server. CASTLIB_DB follows it, so a CLI run without --db
    uses the same catalog."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    else:
        from tests.servers.postgres import fresh_database

        url = fresh_database(request.getfixturevalue("postgres_url"))
    monkeypatch.setenv("CASTLIB_DB", url)
    return url


@pytest.fixture(autouse=True)
def _isolated_catalog(tmp_path, monkeypatch):
    """No test ever touches the user's own catalog: CASTLIB_DB points into tmp_path
    (db_url, when a test takes it, points it at that test's catalog instead)."""
    monkeypatch.setenv("CASTLIB_DB", f"sqlite:///{tmp_path / 'default-catalog.sqlite'}")
