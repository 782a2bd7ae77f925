"""Fixtures of the web tests: a catalog with two indexed trees, the app over it, and a real
`castlib web` server on a free port."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import castlib
from tests.helpers import castlib_command, cli_env, make_tree
from tests.servers.common import answers_on, free_port, server_process

REF_FILES = {"run1/a.dat": b"a" * 1000, "run1/b.dat": b"b" * 2000, "run2/c.dat": b"c" * 300,
             "top.txt": b"top", "run1/sub/d.dat": b"d" * 10}
MTIME_NS = 1_700_000_000_000_000_000
DST_FILES = {"run1/a.dat": b"a" * 1000, "run1/b.dat": b"B" * 2000, "extra.txt": b"x"}


@pytest.fixture
def two_trees(tmp_path, db_url):
    """(db_url, ref root, dst root): both indexed with adler32."""
    ref = make_tree(tmp_path / "ref", REF_FILES)
    dst = make_tree(tmp_path / "dst", DST_FILES)
    for root, files in ((ref, REF_FILES), (dst, DST_FILES)):
        for rel in files:   # one mtime: the differences are those of the content
            os.utime(root / rel, ns=(MTIME_NS, MTIME_NS))
    castlib.index(str(ref), db=db_url, checksum="adler32")
    castlib.index(str(dst), db=db_url, checksum="adler32")
    return db_url, ref, dst


@pytest.fixture
def client(two_trees):
    from fastapi.testclient import TestClient

    from castlib.web import create_app

    app = create_app(two_trees[0])
    with TestClient(app) as c:
        yield c
    app.state.catalog.close()


TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def web_server(tmp_path):
    """Start `castlib web` (the command, on a real uvicorn) over a catalog: a function
    (db_url, token=None, pipelines=None, env=None, args=()) -> base URL; stopped at the
    end of the test. `env`: more environment for the server (CASTLIB_BROKER,
    CASTLIB_HOSTNAME); `args`: more options of the command."""
    from contextlib import ExitStack

    stack = ExitStack()

    def start(db_url: str, token: str | None = None, pipelines: str | None = None,
              env: dict | None = None, args=()) -> str:
        port = free_port()
        argv = castlib_command("web", "--port", str(port), *args, db=db_url)
        if token:
            token_file = tmp_path / f"token-{port}"
            write_token_file(token_file, token + "\n")
            argv += ["--token-file", str(token_file)]
        if pipelines:
            argv += ["--pipelines", pipelines]
        stack.enter_context(server_process("castlib web", argv, tmp_path / f"web-{port}.log",
                                           answers_on(port), env=cli_env(env), timeout_s=60))
        return f"http://127.0.0.1:{port}"

    yield start
    stack.close()


def write_token_file(path, text: str) -> None:
    """A token file as `castlib web` takes it: the user's own, mode 600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def location_ids(client) -> tuple[int, int]:
    rows = client.get("/api/v1/locations").json()["locations"]
    return rows[0]["id"], rows[1]["id"]


ARTEFACTS = Path(__file__).resolve().parents[2] / "test-artefacts" / "web"
PYTHON = sys.executable
