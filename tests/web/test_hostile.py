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
