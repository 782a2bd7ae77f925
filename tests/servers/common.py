"""Fixtures every test may use: a throwaway catalog and helpers to run the CLI."""
from __future__ import annotations

import os
import socket

import pytest


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
