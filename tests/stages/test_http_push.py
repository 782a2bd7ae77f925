"""http-push against a real HTTP server started in the test, which records what it got."""
from __future__ import annotations

import json
import os
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import castlib
from castlib.catalog import Catalog
from castlib.config import UserConfig
from castlib.pipeline import Pipeline
from tests.helpers import make_tree, local_url

TOKEN = "push-token-123"


class Recorder:
    """A small HTTP service: records each POST (headers and body); answers the statuses
    queued in `fail` first, then 200."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail: list[int] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": body})
                status = recorder.fail.pop(0) if recorder.fail else 200
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"no thanks\n" if status >= 400 else b"ok\n")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def lines(self) -> list[dict]:
        return [json.loads(line) for r in self.requests for line in r["body"].splitlines()]


@pytest.fixture
def service():
    recorder = Recorder()
    yield recorder
    recorder.server.shutdown()
    recorder.server.server_close()


FILES = {"a.dat": b"a" * 100, "sub/b.dat": b"b" * 20, "sub/c.dat": b"c"}


def _push(db_url, stages_yaml: str, service, **run) -> castlib.RunReport:
    config = UserConfig(storage={service.url: {"token": TOKEN}})
    catalog = Catalog(db_url)
    try:
        return Pipeline.from_yaml(stages_yaml).run(catalog, user_config=config,
                                                   retry_backoff_s=0.01, **run)
    finally:
        catalog.close()


def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"


@pytest.fixture
def indexed(tmp_path, db_url):
    root = make_tree(tmp_path / "data", FILES)
    castlib.index(str(root), db=db_url, checksum="adler32")
    return root


def test_entries_go_as_ndjson_batches_with_the_bearer_token(db_url, indexed, service):
    report = _push(db_url, f"stages:\n  - http-push: {{location: {indexed}, url: "
                           f"'{service.url}/in', batch: 2}}\n", service)
    assert report.exit_code == 0 and report.counts["sent"] == 4 and report.counts["batches"] == 2
    assert [r["path"] for r in service.requests] == ["/in", "/in"]
    for r in service.requests:
        assert r["headers"]["Content-Type"] == "application/x-ndjson"
        assert r["headers"]["Authorization"] == f"Bearer {TOKEN}"
    lines = {d["path"]: d for d in service.lines()}
    assert set(lines) == {"a.dat", "sub", "sub/b.dat", "sub/c.dat"}
    a = lines["a.dat"]
    assert a["kind"] == "file" and a["size"] == 100 and a["adler32"] == _adler(b"a" * 100)
    assert a["mtime"].endswith("Z") and a["location"] == local_url(indexed)


def test_each_run_sends_only_what_changed(db_url, indexed, service):
    pipeline = f"stages:\n  - http-push: {{location: {indexed}, url: '{service.url}'}}\n"
    _push(db_url, pipeline, service)
    assert len(service.lines()) == 4
    service.requests.clear()
    assert _push(db_url, pipeline, service).counts["sent"] == 0 and service.requests == []
    (indexed / "sub" / "c.dat").write_bytes(b"changed")
    (indexed / "a.dat").unlink()
    castlib.index(str(indexed), db=db_url)
    _push(db_url, pipeline, service)
    got = {d["path"]: d["deleted"] for d in service.lines()}
    assert got == {"a.dat": True, "sub/c.dat": False}


def test_a_transient_failure_is_retried(db_url, indexed, service):
    service.fail = [503, 502]
    report = _push(db_url, f"stages:\n  - http-push: {{location: {indexed}, url: "
                           f"'{service.url}'}}\n", service)
    assert report.exit_code == 0 and report.counts["sent"] == 4
    assert len(service.requests) == 3 and len(service.lines()) == 3 * 4


def test_a_refusal_stops_and_the_next_run_sends_it_all_again(db_url, indexed, service):
    service.fail = [401]
    pipeline = f"stages:\n  - http-push: {{location: {indexed}, url: '{service.url}'}}\n"
    report = _push(db_url, pipeline, service)
    assert report.exit_code == 1 and report.counts["failed_batches"] == 1
    assert "HTTP 401" in report.errors[0] and TOKEN not in report.errors[0]
    assert len(service.requests) == 1   # not retried: a refusal is not transient
    service.requests.clear()
    assert _push(db_url, pipeline, service).counts["sent"] == 4


def test_rucio_format(db_url, indexed, service):
    report = _push(db_url, f"stages:\n  - http-push: {{location: {indexed}, url: "
                           f"'{service.url}/replicas', format: rucio, rse: CERN-TEST, "
                           f"scope: na64}}\n", service)
    assert report.exit_code == 0
    (request,) = service.requests
    assert request["headers"]["Content-Type"] == "application/json"
    doc = json.loads(request["body"])
    assert doc["rse"] == "CERN-TEST"
    assert sorted(doc["files"], key=lambda f: f["name"]) == [
        {"name": "a.dat", "bytes": 100, "adler32": _adler(b"a" * 100), "scope": "na64"},
        {"name": "sub/b.dat", "bytes": 20, "adler32": _adler(b"b" * 20), "scope": "na64"},
        {"name": "sub/c.dat", "bytes": 1, "adler32": _adler(b"c"), "scope": "na64"}]


def test_a_diffs_differences(db_url, indexed, tmp_path, service):
    dst = make_tree(tmp_path / "dst", {"a.dat": b"a" * 100, "only-here": b"x"})
    os.utime(dst / "a.dat", ns=(os.stat(indexed / "a.dat").st_mtime_ns,) * 2)
    report = _push(db_url, f"stages:\n  - index: {{location: {dst}, checksum: adler32}}\n"
                           f"  - diff: {{id: d, ref: {indexed}, dst: {dst}}}\n"
                           f"  - http-push: {{from: d, url: '{service.url}'}}\n", service)
    assert report.exit_code == 0
    got = {d["path"]: d["difference"] for d in service.lines()}
    assert got == {"sub": "missing", "sub/b.dat": "missing", "sub/c.dat": "missing",
                   "only-here": "extra"}


def test_location_and_from_together_are_refused(db_url, indexed, service):
    with pytest.raises(castlib.errors.ConfigError, match="either 'location' or 'from'"):
        _push(db_url, f"stages:\n  - http-push: {{location: {indexed}, from: x, url: "
                      f"'{service.url}'}}\n", service)
    with pytest.raises(castlib.errors.ConfigError, match="http"):
        _push(db_url, f"stages:\n  - http-push: {{location: {indexed}, url: 'ftp://x'}}\n",
              service)
    assert service.requests == []


def _push_by_cli(tmp_path, db_url, indexed, service, token_file) -> "subprocess.CompletedProcess":
    from tests.helpers import run_cli

    config = tmp_path / "castlib.yaml"
    config.write_text(json.dumps({"storage": {service.url: {"token_file": str(token_file)}}}))
    pipeline = tmp_path / "push.yaml"
    pipeline.write_text(f"stages:\n  - http-push: {{location: {indexed}, url: '{service.url}'}}\n")
    return run_cli("run", str(pipeline), db=db_url, env={"CASTLIB_CONFIG": str(config)})


def test_the_token_file_is_its_owners_alone(tmp_path, db_url, indexed, service):
    """A token castlib sends is read from a file only its owner may read, as `castlib web`'s
    (before, any file was read: a token others could read and use)."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    r = _push_by_cli(tmp_path, db_url, indexed, service, token_file)
    assert r.returncode == 2 and not service.requests, r
    assert r.stderr.strip() == (f"castlib: error: {token_file}: the token file is readable by "
                                "its group and others (mode 0644); chmod 600 it"), r.stderr
    token_file.chmod(0o600)
    r = _push_by_cli(tmp_path, db_url, indexed, service, token_file)
    assert r.returncode == 0, r
    assert {q["headers"]["Authorization"] for q in service.requests} == {f"Bearer {TOKEN}"}
