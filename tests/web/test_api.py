"""The JSON API under /api/v1, through FastAPI's TestClient and on a real server."""
import json
import zlib
from xml.etree import ElementTree

import httpx

from castlib.catalog import Catalog
from tests.web.conftest import REF_FILES, location_ids
from tests.helpers import local_url

ML = "{urn:ietf:params:xml:ns:metalink}"


def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"


def test_locations_have_their_counts_and_bytes(client):
    rows = client.get("/api/v1/locations").json()["locations"]
    assert [r["files"] for r in rows] == [5, 3]
    assert rows[0]["bytes"] == sum(len(v) for v in REF_FILES.values())
    assert rows[0]["dirs"] == 3 and rows[0]["scheme"] == "file"
    assert rows[0]["indexed_at"].endswith("Z") and rows[0]["offline_files"] == 0


def test_entries_are_paginated_by_key_with_checksums_as_8_hex_digits(client):
    ref, _ = location_ids(client)
    seen, after = [], None
    while True:
        page = client.get(f"/api/v1/locations/{ref}/entries",
                          params={"limit": 3, **({"after": after} if after else {})}).json()
        seen += page["entries"]
        after = page["next_after"]
        if after is None:
            break
    paths = [e["path"] for e in seen]
    assert paths == sorted(paths) and len(paths) == len(set(paths)) == 8   # 5 files, 3 folders
    a = next(e for e in seen if e["path"] == "run1/a.dat")
    assert a["adler32"] == _adler(b"a" * 1000) and len(a["adler32"]) == 8
    assert a["kind"] == "file" and a["size"] == 1000 and a["mtime"].endswith("Z")
    assert next(e for e in seen if e["path"] == "run1")["kind"] == "dir"


def test_a_small_adler32_keeps_its_leading_zeros(client):
    ref, _ = location_ids(client)
    (top,) = client.get(f"/api/v1/locations/{ref}/entries", params={"prefix": "top"}).json()["entries"]
    assert _adler(b"top").startswith("0") and top["adler32"] == _adler(b"top")


def test_prefix_is_a_path_prefix_search(client):
    ref, _ = location_ids(client)
    got = client.get(f"/api/v1/locations/{ref}/entries", params={"prefix": "run1/"}).json()
    assert [e["path"] for e in got["entries"]] == ["run1/a.dat", "run1/b.dat", "run1/sub",
                                                   "run1/sub/d.dat"]


def test_updated_after_gives_only_what_changed_since(client, two_trees):
    import castlib

    db_url, ref_root, _ = two_trees
    ref, _ = location_ids(client)
    first = client.get(f"/api/v1/locations/{ref}/entries").json()["entries"]
    since = max(e["last_seen"] for e in first)
    (ref_root / "run2" / "c.dat").write_bytes(b"changed!")
    (ref_root / "top.txt").unlink()
    castlib.index(str(ref_root), db=db_url)
    got = client.get(f"/api/v1/locations/{ref}/entries",
                     params={"updated_after": since}).json()["entries"]
    assert {(e["path"], e["deleted"]) for e in got} == {("run2/c.dat", False), ("top.txt", True)}


def test_ndjson_streams_every_entry(client):
    ref, _ = location_ids(client)
    r = client.get(f"/api/v1/locations/{ref}/entries", headers={"Accept": "application/x-ndjson"})
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) == 8 and lines[0]["path"] == "run1"


def test_metalink_lists_files_with_size_hash_and_url(client, two_trees):
    ref, _ = location_ids(client)
    r = client.get(f"/api/v1/locations/{ref}/entries", params={"format": "metalink"})
    assert r.headers["content-type"].startswith("application/metalink4+xml")
    doc = ElementTree.fromstring(r.content)
    files = {f.get("name"): f for f in doc.iter(f"{ML}file")}
    assert set(files) == set(REF_FILES)
    a = files["run1/a.dat"]
    assert a.find(f"{ML}size").text == "1000"
    assert a.find(f"{ML}hash").get("type") == "adler32"
    assert a.find(f"{ML}hash").text == _adler(b"a" * 1000)
    assert a.find(f"{ML}url").text == local_url(two_trees[1]) + "/run1/a.dat"


def test_diff_counts_and_pages(client):
    ref, dst = location_ids(client)
    got = client.get("/api/v1/diff", params={"ref": ref, "dst": dst}).json()
    assert got["counts"]["missing"] == 5 and got["counts"]["extra"] == 1
    assert got["counts"]["checksum"] == 1 and got["total"] == 7
    kinds = {d["path"]: d["kind"] for d in got["differences"]}
    assert kinds["run1/b.dat"] == "checksum" and kinds["extra.txt"] == "extra"
    page1 = client.get("/api/v1/diff", params={"ref": ref, "dst": dst, "limit": 5}).json()
    page2 = client.get("/api/v1/diff", params={"ref": ref, "dst": dst, "limit": 5,
                                               "after": page1["next_after"]}).json()
    both = [d["path"] for d in page1["differences"] + page2["differences"]]
    assert both == [d["path"] for d in got["differences"]] and page2["next_after"] is None
    only = client.get("/api/v1/diff", params={"ref": ref, "dst": dst, "kind": "extra"}).json()
    assert [d["path"] for d in only["differences"]] == ["extra.txt"]


def test_diff_downloads_as_jsonl_and_csv(client):
    ref, dst = location_ids(client)
    jl = client.get("/api/v1/diff", params={"ref": ref, "dst": dst, "format": "jsonl"})
    assert len(jl.text.splitlines()) == 7 and "attachment" in jl.headers["content-disposition"]
    csv_ = client.get("/api/v1/diff", params={"ref": ref, "dst": dst, "format": "csv"})
    lines = csv_.text.splitlines()
    assert lines[0].startswith("path,kind,ref_type") and len(lines) == 8


def test_diff_by_location_name_or_url_and_unknown_is_404(client, two_trees):
    _, ref_root, dst_root = two_trees
    got = client.get("/api/v1/diff", params={"ref": str(ref_root), "dst": str(dst_root)})
    assert got.status_code == 200 and got.json()["total"] == 7
    r = client.get("/api/v1/diff", params={"ref": "/no/such/place", "dst": str(dst_root)})
    assert r.status_code == 404 and "no location" in r.json()["error"]


def test_runs_and_a_runs_stages_with_their_counts(client):
    runs = client.get("/api/v1/runs").json()["runs"]
    assert [r["command"] for r in runs] == ["index", "index"] and runs[0]["status"] == "ok"
    one = client.get(f"/api/v1/runs/{runs[0]['id']}").json()
    (stage,) = one["stages"]
    assert stage["stage"] == "index" and stage["counts"]["files"] == 3
    assert client.get("/api/v1/runs", params={"status": "failed"}).json()["runs"] == []
    assert client.get("/api/v1/runs/99999").status_code == 404


def test_every_error_of_a_stage_is_kept_after_the_run(client, two_trees):
    db_url = two_trees[0]
    catalog = Catalog(db_url)
    try:
        run_id = catalog.start_run("sync", {"ref": "a", "dst": "b"})
        errors = [f"run1/f{i}.dat: Permission denied" for i in range(30)]
        from castlib.catalog.records import utcnow

        catalog.record_stage(run_id, 0, "sync", None, {}, "failed", {"failed": 30}, errors,
                             utcnow())
        catalog.finish_run(run_id, "failed")
    finally:
        catalog.close()
    got = client.get(f"/api/v1/runs/{run_id}").json()
    assert got["stages"][0]["errors"] == errors and got["run"]["status"] == "failed"
    page = client.get(f"/runs/{run_id}")
    assert page.status_code == 200 and all(e in page.text for e in errors)


def test_openapi_is_served(client):
    doc = client.get("/api/v1/openapi.json").json()
    assert "/api/v1/locations/{location_id}/entries" in doc["paths"]
    assert "post" in doc["paths"]["/api/v1/runs"]


def test_the_api_on_a_real_server(two_trees, web_server):
    base = web_server(two_trees[0])
    with httpx.Client(base_url=base, timeout=30) as http:
        rows = http.get("/api/v1/locations").json()["locations"]
        assert [r["files"] for r in rows] == [5, 3]
        with http.stream("GET", f"/api/v1/locations/{rows[0]['id']}/entries",
                         headers={"Accept": "application/x-ndjson"}) as r:
            lines = [json.loads(line) for line in r.iter_lines() if line]
        assert len(lines) == 8
        assert http.get("/locations").status_code == 200
        refused = http.post("/api/v1/runs", json={"stage": "index",
                                                  "params": {"location": "/tmp"}})
        assert refused.status_code == 403 and "read-only" in refused.json()["error"]


def _overview(client) -> dict:
    return {r["url"]: r for r in client.get("/api/v1/locations").json()["locations"]}


def test_the_overview_answers_from_kept_counts_until_a_location_is_written(
        client, two_trees, tmp_path):
    """/api/v1/locations counts a location's entries once, then answers from the counts
    it kept (not a pass over every entry at each call), until an index or a sync writes
    the location's entries: those are counted again, and the page is right."""
    import castlib
    from castlib.catalog.catalog import COUNTS_KEY
    from castlib.catalog.settings import get_setting, set_setting

    db_url, ref, dst = two_trees
    first = _overview(client)
    ref_url, dst_url = local_url(ref), local_url(dst)
    assert first[ref_url]["files"] == len(REF_FILES)
    catalog = Catalog(db_url)
    try:
        ref_id = first[ref_url]["id"]
        kept = json.loads(get_setting(catalog, f"{COUNTS_KEY}{ref_id}"))
        assert kept["files"] == len(REF_FILES)
        # kept counts are what the overview says while nothing was written: proof it
        # reads them rather than counting (these numbers are in no entry)
        set_setting(catalog, f"{COUNTS_KEY}{ref_id}", json.dumps({**kept, "files": 4242}))
        assert _overview(client)[ref_url]["files"] == 4242
        # a sync that adds files to dst and deletes its extra one: dst recounted, right
        castlib.sync(str(ref), str(dst), db=db_url, delete=True, quiet=True)
        after = _overview(client)
        assert after[dst_url]["files"] == len(REF_FILES)
        assert after[dst_url]["bytes"] == sum(len(b) for b in REF_FILES.values())
        (ref / "new.dat").write_bytes(b"n" * 7)   # an index that finds a new file
        castlib.index(str(ref), db=db_url, quiet=True)
        assert _overview(client)[ref_url]["files"] == len(REF_FILES) + 1
    finally:
        catalog.close()


def test_metalink_of_names_with_control_characters_is_well_formed(tmp_path, db_url):
    """A control character is a valid byte of a file name, but XML 1.0 cannot hold one:
    written as it was, it made the whole document unreadable, every file's entry lost."""
    from fastapi.testclient import TestClient

    import castlib
    from castlib.web import create_app
    from tests.helpers import make_tree

    names = {"a\x01b.dat": b"1", "esc\x1b[31m.dat": b"2", "new\nline.dat": b"3",
             "<x>&'\".dat": b"4", "plain.dat": b"5"}
    root = make_tree(tmp_path / "t", names)
    castlib.index(str(root), db=db_url, checksum="adler32")
    with TestClient(create_app(db_url)) as client:
        loc = client.get("/api/v1/locations").json()["locations"][0]["id"]
        r = client.get(f"/api/v1/locations/{loc}/entries", params={"format": "metalink"})
    assert r.status_code == 200
    doc = ElementTree.fromstring(r.content)
    got = {f.get("name"): f.find(f"{ML}url").text for f in doc.iter(f"{ML}file")}
    assert set(got) == {"a%01b.dat", "esc%1B[31m.dat", "new\nline.dat", "<x>&'\".dat",
                        "plain.dat"}
    assert got["a%01b.dat"].endswith("/a%01b.dat")
