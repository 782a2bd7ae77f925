"""The pages, server-rendered: what a person sees, escaped, paginated by key."""
import re

import castlib
from tests.helpers import make_tree
from tests.web.conftest import location_ids


def test_every_page_answers(client):
    ref, dst = location_ids(client)
    for url in ["/locations", f"/locations/{ref}", f"/locations/{ref}?path=run1",
                f"/locations/{ref}/file?path=run1/a.dat", f"/diff?ref={ref}&dst={dst}",
                "/runs", "/runs/1", "/plots", "/actions", "/login"]:
        r = client.get(url)
        assert r.status_code == 200, url
        assert "cdn" not in r.text.lower() and "https://" not in r.text, url   # offline
    assert client.get("/").headers["content-type"].startswith("text/html")


def test_the_folder_browser_shows_one_folder_with_breadcrumbs(client):
    ref, _ = location_ids(client)
    page = client.get(f"/locations/{ref}", params={"path": "run1/sub"}).text
    crumbs = re.search(r'<p class="crumbs" id="crumbs">(.*?)</p>', page, re.S).group(1)
    assert ">run1</a>" in crumbs and ">sub</a>" in crumbs
    assert "d.dat" in page and "a.dat" not in page
    root = client.get(f"/locations/{ref}").text
    assert "run1/</a>" in root and "top.txt" in root and "d.dat" not in root


def test_a_big_folder_pages_by_key(tmp_path, db_url):
    from fastapi.testclient import TestClient

    from castlib.web import create_app

    big = make_tree(tmp_path / "big", {f"f{i:04d}": b"" for i in range(450)})
    castlib.index(str(big), db=db_url)
    client = TestClient(create_app(db_url))
    loc = client.get("/api/v1/locations").json()["locations"][0]["id"]
    seen, url = [], f"/locations/{loc}"
    while url:
        page = client.get(url, headers={"HX-Request": "true"} if "after=" in url else {}).text
        seen += re.findall(r">(f\d{4})</a>", page)
        more = re.search(r'hx-get="([^"]+)"', page)
        url = more.group(1).replace("&amp;", "&") if more else None
    assert seen == [f"f{i:04d}" for i in range(450)]


def test_html_in_a_file_name_is_escaped(tmp_path, db_url):
    from fastapi.testclient import TestClient

    from castlib.web import create_app

    name = '<img src=x onerror="alert(1)">&.dat'
    root = make_tree(tmp_path / "h", {name: b"x", "ok.dat": b"y"})
    castlib.index(str(root), db=db_url)
    client = TestClient(create_app(db_url))
    loc = client.get("/api/v1/locations").json()["locations"][0]["id"]
    for url, params in [(f"/locations/{loc}", {}), (f"/locations/{loc}/file", {"path": name}),
                        (f"/locations/{loc}", {"prefix": "<img"})]:
        page = client.get(url, params=params)
        assert page.status_code == 200
        assert "<img" not in page.text and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page.text


def test_a_files_page_says_where_else_the_path_is(client):
    ref, _ = location_ids(client)
    page = client.get(f"/locations/{ref}/file", params={"path": "run1/b.dat"}).text
    assert 'id="file-size">2000<' in page and "differs" in page
    page = client.get(f"/locations/{ref}/file", params={"path": "run1/a.dat"}).text
    assert ">same<" in page


def test_the_diff_page_keeps_its_choice_in_the_url(client):
    ref, dst = location_ids(client)
    page = client.get("/diff", params={"ref": ref, "dst": dst, "kind": "missing"}).text
    assert re.search(r'data-kind="missing">5<', page) and 'id="diff-total">7<' in page
    assert page.count('class="difference"') == 5
    assert f"/api/v1/diff?ref={ref}&amp;dst={dst}&amp;kind=missing&amp;format=csv" in page


def test_runs_filters_are_in_the_url(client):
    page = client.get("/runs", params={"status": "failed"}).text
    assert "No run matches" in page
    page = client.get("/runs", params={"command": "index"}).text
    assert page.count('href="/runs/') == 2


def test_a_running_run_refreshes_itself_a_finished_one_does_not(client, two_trees):
    from castlib.catalog import Catalog

    catalog = Catalog(two_trees[0])
    running = catalog.start_run("sync", {"ref": "a", "dst": "b"})
    catalog.heartbeat(running, {"label": "sync", "files": 3, "total_files": 10,
                                "bytes": 3 * 2**20, "total_bytes": 10 * 2**20,
                                "elapsed_s": 3, "rate": 2**20, "eta_s": 7})
    page = client.get(f"/runs/{running}").text
    assert f'hx-get="/runs/{running}/progress" hx-trigger="every 2s"' in page
    live = re.search(r'<p id="run-live">(.*?)</p>', page, re.S).group(1)
    assert all(w in " ".join(live.split()) for w in [
        "3</span>/10 files", "3.0 MiB</span>/10.0 MiB", "1.0 MiB/s", "ETA 0:07"])
    assert 'hx-trigger="every 2s"' not in client.get("/runs/1").text
    catalog.close()


def test_the_read_only_server_says_so(client):
    page = client.get("/actions").text
    assert 'id="read-only"' in page and "read-only" in client.get("/locations").text
    r = client.post("/actions", data={"stage": "index", "location": "/tmp"})
    assert r.status_code == 403 and "read-only" in r.text


def test_login_sets_a_cookie_that_allows_actions(two_trees):
    from fastapi.testclient import TestClient

    from castlib.web import create_app

    client = TestClient(create_app(two_trees[0], token="tok"))
    assert client.post("/login", data={"token": "nope"}).status_code == 401
    assert "castlib_session" not in client.cookies
    r = client.post("/login", data={"token": "tok"}, follow_redirects=False)
    assert r.status_code == 303 and client.cookies["castlib_session"] != "tok"
    assert "actions allowed" in client.get("/actions").text
    # the cookie acts from the server's own pages (their Origin), not from another's
    form = {"stage": "index", "location": "/nonexistent-castlib-test"}
    r = client.post("/actions", data=form, headers={"Origin": "http://testserver:1"})
    assert r.status_code == 403 and "own pages" in r.text
    r = client.post("/actions", data=form, headers={"Origin": "http://testserver"},
                    follow_redirects=False)
    assert r.status_code != 403, r.text
