"""Actions of `castlib web` with workers configured (a broker, a PostgreSQL catalog): a
run started through the API goes to the worker of the host that holds its data, as
`--on-workers` sends it, and its page shows that host; a real Redis, real workers."""
import os
import time

import httpx
import pytest

from tests.helpers import make_tree, run_cli, tree_digest
from tests.servers.common import free_port
from tests.web.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIB = 1024 * 1024
FINAL = {"ok", "failed", "error", "interrupted", "died", "cancelled"}

# worker start-ups and real copies on a shared machine: more than the suite's 300 s default
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _wait_ended(http: httpx.Client, run_id: int, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = http.get(f"/api/v1/runs/{run_id}").json()
        if got["run"]["status"] in FINAL:
            return got
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} not ended after {timeout_s} s: {got}")


def test_a_sync_started_from_the_web_runs_on_the_worker_of_its_host(
        cluster, web_server, tmp_path):
    """The server plays a third machine ("web"): daq01's disk is not its to read, so the
    run can only have been done by daq01's worker."""
    ref = make_tree(tmp_path / "daq01-disk", {f"run{i}.dat": os.urandom(MIB + i)
                                              for i in range(6)} | {"sub/x.txt": b"x"})
    dst = tmp_path / "daq01-copy"
    base = web_server(cluster.db, token=TOKEN,
                      env=cluster.client_env(CASTLIB_HOSTNAME="web"))
    with httpx.Client(base_url=base, timeout=120) as http:
        r = http.post("/api/v1/runs", headers=AUTH, json={
            "stage": "sync", "params": {"ref": f"file://daq01{ref}",
                                        "dst": f"file://daq01{dst}", "transfers": 1}})
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        queued = http.get(f"/api/v1/runs/{run_id}").json()["run"]
        assert queued["hostname"] == "daq01" and queued["status"] in {"queued", "running",
                                                                     "ok"}, queued
        done = _wait_ended(http, run_id)
        assert done["run"]["status"] == "ok", done
        assert done["run"]["hostname"] == "daq01" and done["run"]["command"] == "sync"
        assert {s["stage"] for s in done["stages"]} == {"index", "diff", "sync"}
        sync = [s for s in done["stages"] if s["stage"] == "sync"][0]
        assert sync["counts"]["copied"] == 7, sync
        # the worker's last counters, in the same record every run keeps
        assert (done["progress"]["label"], done["progress"]["files"]) == ("sync", 7)
        assert tree_digest(dst) == tree_digest(ref)
        page = http.get(f"/runs/{run_id}").text
        assert '<span id="run-host">daq01</span>' in page and "state-ok" in page
        # the client's view of the same run: castlib runs shows the host too
        listed = cluster.cli("runs", check=0).stdout
        assert any(f"{run_id:>5}" in line and "daq01" in line for line in listed.splitlines())


def test_a_web_action_refused_by_the_workers_path_is_one_line(cluster, web_server, tmp_path):
    """A stage that needs two hosts' disks: refused before anything is queued (422)."""
    a = make_tree(tmp_path / "a", {"f": b"1"})
    base = web_server(cluster.db, token=TOKEN, env=cluster.client_env(CASTLIB_HOSTNAME="web"))
    with httpx.Client(base_url=base, timeout=120) as http:
        r = http.post("/api/v1/runs", headers=AUTH, json={
            "stage": "sync", "params": {"ref": f"file://daq01{a}",
                                        "dst": f"file://daq02{tmp_path / 'b'}"}})
        assert r.status_code == 422, r.text
        assert "daq01 and daq02" in r.json()["error"]


def test_web_with_broker_and_sqlite_catalog_refuses(tmp_path, redis_url):
    r = run_cli("web", "--broker", redis_url, "--port", str(free_port()),
                db=f"sqlite:///{tmp_path}/c.sqlite", check=2, timeout=60)
    assert "needs a catalog the workers share" in r.stderr and "Traceback" not in r.stderr
