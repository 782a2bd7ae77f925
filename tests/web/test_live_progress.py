"""Every run keeps its live counters in its record (runs.progress, about once a second):
a sync typed on the command line is followed in /api/v1/runs/{id} while it copies."""
import os
import subprocess
import time

from castlib.catalog import Catalog
from tests.helpers import castlib_command, cli_env, make_tree, tree_digest

MIB = 1024 * 1024

# Loaded into the CLI's Python before castlib runs (PYTHONPATH): reading the source file
# `paced.dat` stops after its first MiB until the test opens the FIFO $PACE_FIFO and
# closes it. The run is thereby held mid-copy for as long as the test looks at it,
# however fast or loaded the machine: no timing in the test.
PACER = '''
import os
from castlib.backends import local

_open_read = local.LocalBackend.open_read


class _Paced:
    def __init__(self, inner):
        self.inner, self.given = inner, 0

    def read(self, n=-1):
        if self.given >= 1024 * 1024 and os.environ.get("PACE_FIFO"):
            with open(os.environ.pop("PACE_FIFO"), "rb") as gate:   # blocks till opened
                gate.read()
        data = self.inner.read(n if self.given >= 1024 * 1024 or n < 0
                               else min(n, 1024 * 1024 - self.given))
        self.given += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()


def open_read(self, path):
    f = _open_read(self, path)
    return _Paced(f) if path.endswith("paced.dat") else f


local.LocalBackend.open_read = open_read
'''


def test_a_command_line_sync_is_followed_in_the_api_while_it_copies(tmp_path, db_url):
    from fastapi.testclient import TestClient

    from castlib.web import create_app

    src = make_tree(tmp_path / "src", {"paced.dat": os.urandom(8 * MIB), "small.txt": b"s"})
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "castlib_pacer.py").write_text(PACER)
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    env = cli_env({"PYTHONPATH": str(shim), "PACE_FIFO": str(fifo)})
    argv = castlib_command("sync", str(src), str(tmp_path / "dst"), "--transfers", "1",
                           db=db_url)
    # the command as typed, with the pacer loaded first
    argv[1:3] = ["-c", "import castlib_pacer, sys; from castlib.cli import main; "
                       "sys.argv[0] = 'castlib'; sys.exit(main())"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    app = create_app(db_url)
    try:
        with TestClient(app) as client:
            deadline = time.monotonic() + 120
            seen = None
            while seen is None:   # the run's record, once its copy is held mid-way
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "no live progress within 120 s"
                runs = client.get("/api/v1/runs", params={"command": "sync"}).json()["runs"]
                if runs:
                    got = client.get(f"/api/v1/runs/{runs[0]['id']}").json()
                    p = got["progress"]
                    if p and p["label"] == "sync" and p["bytes"] >= MIB:
                        seen = got
                time.sleep(0.1)
            assert seen["run"]["status"] == "running" and seen["run"]["heartbeat_at"]
            p = seen["progress"]
            assert p["total_files"] == 2 and p["total_bytes"] == 8 * MIB + 1
            assert p["files"] <= 1 and MIB <= p["bytes"] < 8 * MIB and p["rate"] > 0
            assert p["eta_s"] is not None
            page = client.get(f"/runs/{seen['run']['id']}").text
            assert 'id="run-live"' in page and 'hx-trigger="every 2s"' in page

            with open(fifo, "wb"):   # let the copy go on
                pass
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            done = client.get(f"/api/v1/runs/{seen['run']['id']}").json()
            assert done["run"]["status"] == "ok"
            # the record keeps the last counters: all of it copied
            assert (done["progress"]["files"], done["progress"]["bytes"]) == (2, 8 * MIB + 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        app.state.catalog.close()
    assert tree_digest(tmp_path / "dst") == tree_digest(src)
    with Catalog(db_url) as catalog:   # and the command line wrote it, not a web process
        run, _ = catalog.run_details(seen["run"]["id"])
        assert run["pid"] is None and run["command"] == "sync"
