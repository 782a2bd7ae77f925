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


@pytest.fixture
def db_url(tmp_path) -> str:
    """A fresh SQLite catalog for one test."""
    return f"sqlite:///{tmp_path / 'catalog.sqlite'}"


@pytest.fixture(autouse=True)
def _isolated_catalog(tmp_path, monkeypatch):
    """No test ever touches the user's own catalog: CASTLIB_DB points into tmp_path."""
    if "CASTLIB_DB" not in os.environ or not os.environ["CASTLIB_DB"].startswith("postgresql"):
        monkeypatch.setenv("CASTLIB_DB", f"sqlite:///{tmp_path / 'default-catalog.sqlite'}")
