"""Hostile input: a clear 4xx for what cannot be right, nothing executed, nothing leaked."""
import pytest

from tests.web.conftest import location_ids


def _error(r) -> str:
    return r.json()["error"] if r.headers["content-type"].startswith("application/json") else r.text


@pytest.mark.parametrize("url, status, words", [
    ("/api/v1/locations/{ref}/entries?prefix=../etc", 400, "'..'"),
    ("/api/v1/locations/{ref}/entries?prefix=run1/%2E%2E/x", 400, "'..'"),
    ("/api/v1/locations/{ref}/entries?prefix=run1%00", 400, "NUL"),
    ("/api/v1/locations/{ref}/entries?after=%00", 400, "NUL"),
    ("/api/v1/locations/{ref}/entries?limit=100000000000", 422, "limit"),
    ("/api/v1/locations/{ref}/entries?limit=99999999999999999999999999", 422, "limit"),
    ("/api/v1/locations/{ref}/entries?limit=0", 422, "limit"),
    ("/api/v1/locations/{ref}/entries?limit=-5", 422, "limit"),
    ("/api/v1/locations/{ref}/entries?updated_after=yesterday", 422, "updated_after"),
    ("/api/v1/locations/{ref}/entries?format=exe", 422, "format"),
    ("/api/v1/locations/..%2F..%2Fetc/entries", 404, "Not Found"),
    ("/api/v1/locations/..%2Fetc/entries", 404, "Not Found"),
    ("/api/v1/locations/../entries", 404, "Not Found"),
    ("/api/v1/locations/1;DROP/entries", 422, "location_id"),
    ("/api/v1/locations/999999/entries", 404, "no location"),
    ("/api/v1/diff?ref={ref}&dst=%00", 400, "NUL"),
    ("/api/v1/diff?ref={ref}&dst={dst}&kind=drop", 422, "kind"),
    ("/api/v1/diff?ref={ref}&dst={dst}&checksum=crc", 422, "checksum"),
    ("/api/v1/diff?ref={ref}&dst={dst}&after=zzz", 422, "after"),
    ("/api/v1/runs?limit=1000000", 422, "limit"),
    ("/api/v1/runs/abc", 422, "run_id"),
    ("/locations/{ref}?path=../../etc", 400, "is not a path component"),
    ("/locations/{ref}?path=run1%00", 400, "NUL"),
    ("/locations/{ref}/file?path=..", 400, "is not a path component"),
    ("/locations/{ref}/file?path=no/such/file", 404, "no entry"),
    ("/locations/{ref}/file", 422, "path"),
    ("/runs/99999", 404, "no run"),
    # ids past a 64-bit integer: no id the catalog can hold, not a driver's overflow (500)
    ("/api/v1/runs/99999999999999999999", 422, "run_id"),
    ("/api/v1/runs?before=99999999999999999999", 422, "before"),
    ("/api/v1/runs?before=-1", 422, "before"),
    ("/api/v1/locations/99999999999999999999/entries", 422, "location_id"),
    ("/api/v1/diff?ref=99999999999999999999&dst={dst}", 404, "no location"),
    ("/runs/99999999999999999999", 422, "run_id"),
    ("/runs/99999999999999999999/progress", 422, "run_id"),
    ("/runs?before=99999999999999999999", 422, "before"),
    ("/locations/99999999999999999999", 422, "location_id"),
    ("/locations/99999999999999999999/file?path=a", 422, "location_id"),
    ("/plots?location=99999999999999999999", 422, "location"),
    ("/diff?ref={ref}&dst=99999999999999999999", 404, "no location"),
    ("/diff?ref={ref}&dst=nowhere", 404, "no location"),
])
def test_a_bad_parameter_is_a_clear_4xx(client, url, status, words):
    ref, dst = location_ids(client)
    r = client.get(url.format(ref=ref, dst=dst))
    assert r.status_code == status, r.text
    assert words in _error(r)
    assert "Traceback" not in r.text


@pytest.mark.parametrize("prefix", [
    "' OR '1'='1", "x'; DROP TABLE entries; --", '" OR 1=1 --', "%", "_", "run1/%", "\\",
    "run1' UNION SELECT path FROM entries --",
])
def test_a_sql_looking_prefix_is_text(client, prefix):
    ref, _ = location_ids(client)
    r = client.get(f"/api/v1/locations/{ref}/entries", params={"prefix": prefix})
    assert r.status_code == 200 and r.json()["entries"] == []
    page = client.get(f"/locations/{ref}", params={"prefix": prefix})
    assert page.status_code == 200
    # and the catalog is whole afterwards
    assert len(client.get(f"/api/v1/locations/{ref}/entries").json()["entries"]) == 8


def test_a_prefix_with_like_wildcards_matches_them_literally(client):
    ref, _ = location_ids(client)
    r = client.get(f"/api/v1/locations/{ref}/entries", params={"prefix": "run_"})
    assert r.json()["entries"] == []


def test_a_fault_of_the_server_is_one_line_and_500(client, two_trees):
    """A catalog gone bad under the server (here a table dropped by hand): the API answers
    one line of JSON, a page one line of HTML, with a 500, never the exception's words."""
    from sqlalchemy import create_engine, text

    from castlib.catalog.database import normalise_db_url

    engine = create_engine(normalise_db_url(two_trees[0]))
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE stage_results"))
    engine.dispose()
    from fastapi.testclient import TestClient

    with TestClient(client.app, raise_server_exceptions=False) as c:
        r = c.get("/api/v1/runs")
        assert r.status_code == 500, r.text
        assert r.json() == {"error": r.json()["error"]}
        assert r.json()["error"].startswith("internal error (")
        assert "stage_results" not in r.text and "Traceback" not in r.text
        page = c.get("/runs")
        assert page.status_code == 500 and page.headers["content-type"].startswith("text/html")
        assert 'id="error-message">internal error (' in page.text
