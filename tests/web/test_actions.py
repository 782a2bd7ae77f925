"""Actions: POST /api/v1/runs and the page forms start runs in a child process of the
server, with the token only; the run is in the catalog when the answer comes."""
import json
import time

import httpx
import pytest

from tests.helpers import tree_digest
from tests.web.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _wait_finished(http: httpx.Client, run_id: int, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = http.get(f"/api/v1/runs/{run_id}").json()
        if got["run"]["status"] != "running":
            return got
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} still running after {timeout_s} s")


@pytest.fixture
def server(two_trees, web_server, tmp_path):
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    db_url, ref, dst = two_trees
    (pipelines / "nightly.yaml").write_text(
        f"locations: {{ref: {ref}}}\nstages:\n  - index: {{location: ref}}\n")
    base = web_server(db_url, token=TOKEN, pipelines=str(pipelines))
    with httpx.Client(base_url=base, timeout=120) as http:
        yield http, ref, dst


def test_a_sync_started_with_the_token_runs_to_the_end(server, tmp_path):
    http, ref, _ = server
    target = tmp_path / "copy"
    r = http.post("/api/v1/runs", headers=AUTH,
                  json={"stage": "sync", "params": {"ref": str(ref), "dst": str(target)}})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["url"] == f"/runs/{body['run_id']}"
    assert r.headers["location"] == f"/api/v1/runs/{body['run_id']}"
    done = _wait_finished(http, body["run_id"])
    assert done["run"]["status"] == "ok" and done["run"]["command"] == "sync"
    sync = [s for s in done["stages"] if s["stage"] == "sync"][0]
    assert sync["counts"]["copied"] == 5
    assert tree_digest(target) == tree_digest(ref)
    # the counters its process published (every second while it ran, and at the end)
    progress = done["progress"]
    assert progress["label"] == "sync" and progress["files"] == progress["total_files"] == 5
    assert progress["bytes"] == progress["total_bytes"] == sum(
        f.stat().st_size for f in ref.rglob("*") if f.is_file())
    assert 'id="run-live"' not in http.get(body["url"]).text   # the page: while running only


def test_a_dry_run_sync_copies_nothing_and_says_its_plan(server, tmp_path):
    http, ref, _ = server
    target = tmp_path / "plan-only"
    r = http.post("/api/v1/runs", headers=AUTH, json={
        "stage": "sync", "params": {"ref": str(ref), "dst": str(target)}, "dry_run": True})
    assert r.status_code == 202, r.text
    done = _wait_finished(http, r.json()["run_id"])
    assert done["run"]["args"]["dry_run"] is True and done["run"]["status"] == "ok"
    assert not target.exists()


def test_a_pipeline_by_name_from_the_configured_folder(server):
    http, _, _ = server
    r = http.post("/api/v1/runs", headers=AUTH, json={"pipeline": "nightly.yaml"})
    assert r.status_code == 202, r.text
    done = _wait_finished(http, r.json()["run_id"])
    assert done["run"]["command"] == "run" and done["stages"][0]["stage"] == "index"


FORGED = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": "Bearer"},
    {"Cookie": f"castlib_session={TOKEN}"},     # the cookie is not the token itself
    {"Cookie": "castlib_session=0000"},
]


def test_without_the_token_nothing_is_started(server, tmp_path):
    http, ref, _ = server
    before = http.get("/api/v1/runs").json()["runs"]
    target = tmp_path / "never"
    for headers in FORGED:
        r = http.post("/api/v1/runs", headers=headers,
                      json={"stage": "sync", "params": {"ref": str(ref), "dst": str(target)}})
        assert r.status_code == 401 and "token" in r.json()["error"], headers
        assert r.headers.get("www-authenticate") == "Bearer"
        page = http.post("/actions", headers=headers, data={"stage": "sync", "ref": str(ref),
                                                             "dst": str(target)})
        assert page.status_code == 401, headers
    time.sleep(0.5)
    assert http.get("/api/v1/runs").json()["runs"] == before and not target.exists()


BAD_REQUESTS = [
    ({"stage": "rm -rf", "params": {}}, 422, "unknown stage"),
    ({"stage": "sync", "params": {"ref": "/a"}}, 422, "'dst' must name a location"),
    ({"stage": "index", "params": {"location": "/tmp", "db": "sqlite:////tmp/other"}}, 422,
     "unknown parameter 'db'"),
    ({"stage": "index", "params": {"location": "/tmp", "nope": 1}}, 422, "unknown parameter"),
    ({"pipeline": "../../etc/passwd.yaml"}, 422, "file name in the pipeline folder"),
    ({"pipeline": "missing.yaml"}, 404, "no pipeline"),
    ({"stage": "index", "pipeline": "nightly.yaml"}, 422, "either"),
    ([1, 2], 422, "JSON object"),
    ({"stage": "verify", "params": {"location": "/tmp/x\u0000y"}}, 422, "must name a location"),
    ({"stage": "index", "params": {"location": "/tmp"}, "dry_run": True}, 422, "dry_run"),
]


def test_a_bad_request_is_refused_with_one_line(server):
    http, _, _ = server
    before = http.get("/api/v1/runs").json()["runs"]
    for body, status, words in BAD_REQUESTS:
        r = http.post("/api/v1/runs", headers=AUTH, json=body)
        assert r.status_code == status and words in r.json()["error"], (body, r.text)
    assert http.get("/api/v1/runs").json()["runs"] == before


def test_a_refusal_of_castlib_itself_comes_back_as_422_and_not_json_as_400(server, tmp_path):
    http, _, _ = server
    r = http.post("/api/v1/runs", headers=AUTH, json={
        "stage": "index", "params": {"location": str(tmp_path / "ref"), "checksum": "crc99"}})
    assert r.status_code == 422 and "checksum" in r.json()["error"]
    r = http.post("/api/v1/runs", headers={**AUTH, "Content-Type": "application/json"},
                  content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]


def test_a_run_started_from_the_web_can_be_cancelled(server, two_trees, tmp_path):
    """The server's child process runs the sync; `castlib runs cancel` reaches it through
    the run's record (here while it waits for its destination's lock, held by this test:
    alive, and stopped by nothing else)."""
    from castlib.catalog import Catalog
    from castlib.catalog.locks import location_lock
    from tests.helpers import run_cli

    http, ref, _ = server
    db_url = two_trees[0]
    target = tmp_path / "locked"
    catalog = Catalog(db_url)
    loc = catalog.location(str(target))
    with location_lock(catalog, loc.id, loc.url):
        r = http.post("/api/v1/runs", headers=AUTH, json={
            "stage": "sync", "params": {"ref": str(ref), "dst": str(target),
                                        "lock_wait": 120}})
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        r = run_cli("runs", "cancel", str(run_id), db=db_url, check=0)
        assert "asked to stop" in r.stderr, r.stderr
        done = _wait_finished(http, run_id, timeout_s=60)
    catalog.close()
    assert (done["run"]["status"], done["run"]["error"]) == (
        "cancelled", "cancelled by castlib runs cancel"), done
    assert not target.exists() or not any(target.iterdir())


def test_the_login_cookie_acts_only_from_the_servers_own_pages(server, tmp_path):
    """SameSite=Strict keeps other sites' pages from sending the cookie, but a page of
    this host on another port is the same site to a browser (a dev server on
    127.0.0.1:3000 ...): it could post the Actions form, or a text/plain body to the
    API, with the cookie. Only a request whose Origin is this server may act with it."""
    http, ref, _ = server
    r = http.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert r.status_code == 303 and "castlib_session" in http.cookies
    base = str(http.base_url).rstrip("/")
    other = base.rsplit(":", 1)[0] + ":1"      # the same host, another port
    before = http.get("/api/v1/runs").json()["runs"]
    target = tmp_path / "csrf"
    form = {"stage": "sync", "ref": str(ref), "dst": str(target)}
    body = json.dumps({"stage": "sync", "params": {"ref": str(ref), "dst": str(target)}})
    for headers in ({"Origin": other}, {"Origin": "null"}, {"Referer": other + "/page"},
                    {}):
        r = http.post("/actions", data=form, headers=headers, follow_redirects=False)
        assert r.status_code == 403 and "own pages" in r.text, (headers, r.text)
        r = http.post("/api/v1/runs", content=body, follow_redirects=False,
                      headers={**headers, "Content-Type": "text/plain"})
        assert r.status_code == 403 and "own pages" in r.json()["error"], (headers, r.text)
    time.sleep(0.5)
    assert http.get("/api/v1/runs").json()["runs"] == before and not target.exists()
    # the server's own page (its Origin, or its Referer alone) acts with the cookie
    r = http.post("/actions", data={"stage": "index", "location": str(ref)},
                  headers={"Origin": base}, follow_redirects=False)
    assert r.status_code == 303, r.text
    r = http.post("/actions", data={"stage": "index", "location": str(ref)},
                  headers={"Referer": base + "/actions"}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_the_servers_run_logs_folder_is_made_by_its_first_run_only(two_trees, web_server,
                                                                      tmp_path):
    """A server (or a test's app) that starts no run leaves nothing in the temporary
    folder (5,000 empty castlib-web-* folders had piled up in /tmp); the first run it
    starts makes its logs' folder there, and its log is in it."""
    db_url, ref, _ = two_trees
    temp = tmp_path / "tmp"
    temp.mkdir()
    base = web_server(db_url, token=TOKEN, env={"TMPDIR": str(temp)})
    with httpx.Client(base_url=base, timeout=120) as http:
        assert http.get("/api/v1/runs").status_code == 200
        assert list(temp.glob("castlib-web-*")) == []
        r = http.post("/api/v1/runs", headers=AUTH,
                      json={"stage": "index", "params": {"location": str(ref)}})
        assert r.status_code == 202, r.text
        assert _wait_finished(http, r.json()["run_id"])["run"]["status"] == "ok"
    [logs] = temp.glob("castlib-web-*")
    assert [p.name for p in logs.iterdir()][0].startswith("run-")
