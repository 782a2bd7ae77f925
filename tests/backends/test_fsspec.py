"""What is particular to the fsspec bridge's back-ends (S3, SFTP, WebDAV, memory) against
real servers: URLs, protocol specifics, credentials and failures. The contract every
back-end keeps is tests/backends/test_contract.py; SFTP's own: test_sftp.py."""
from __future__ import annotations

import hashlib
import os

import pytest

from castlib.backends import DIR, FILE, LINK, open_backend
from castlib.errors import StorageError, TransientStorageError
from castlib.transfer import is_temp_name
from tests.backends.test_contract import BACKENDS, MIB, Location
from tests.helpers import backend_listing as listing
from tests.helpers import backend_read as read
from tests.helpers import backend_write as write
from tests.servers.common import free_port

# the contract suite's back-ends that go through fsspec (and SFTP, which began there)
FSSPEC_KINDS = [k for k in BACKENDS if k.name in
                ("memory", "s3", "sftp", "rclone-sftp", "webdav", "davs", "rclone-webdav")]


@pytest.fixture(params=FSSPEC_KINDS, ids=lambda k: k.name)
def store(request) -> Location:
    """An empty location on one of the servers."""
    return request.param.location(request)


# -- URLs -----------------------------------------------------------------------------------
def test_mkdir_of_root_creates_a_missing_location_whose_url_quotes_hash_and_question(store):
    """The generic contract (test_contract.py) makes a plain new root; an fsspec URL also
    carries '#' and '?' quoted, as a URL needs."""
    url = f"{store.url}/new root %231%3F/deeper"
    b = open_backend(url, store.options)
    if b.capabilities.empty_dirs:
        assert not b.root_exists()
    b.mkdir("")
    assert b.root_exists()
    write(b, "f", b"in a new place")
    assert read(open_backend(store.url, store.options), "new root #1?/deeper/f") == b"in a new place"


@pytest.mark.parametrize("protocol", ["s3", "sftp", "webdav"])
def test_failed_upload_raises_a_storage_error(request, protocol):
    """An upload the server refuses never looks like a success (S3: a bucket that is not
    there; elsewhere: a folder that is not there), and the back-end goes on working."""
    if protocol == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        b = open_backend("s3://no-such-bucket-here/p", bucket.options)
    else:
        server = request.getfixturevalue(f"{protocol}_server")
        b = open_backend(server.url, server.options)
    with pytest.raises(StorageError):
        with b.open_write("missing/folder/f") as f:
            f.write(b"bytes that go nowhere")
    if protocol != "s3":
        assert b.stat("missing/folder/f") is None
        write(b, "after", b"still fine")
        assert read(b, "after") == b"still fine"


# -- protocol specifics -------------------------------------------------------------------
def test_s3_etag_is_the_md5_of_a_single_part_upload(s3_bucket):
    b = open_backend(s3_bucket.url, s3_bucket.options)
    small, large = os.urandom(1000), os.urandom(b.block_size + 1)
    write(b, "small", small)
    write(b, "large", large)   # more than one part: its ETag is no md5
    sums = {st.path: st.checksums for st in listing(b)}
    assert sums["small"] == {"md5": hashlib.md5(small).hexdigest()}
    assert sums["large"] is None

    def no_reading(path):
        raise AssertionError("the md5 of a single-part object comes from its ETag")

    b.open_read, real_open_read = no_reading, b.open_read
    assert b.checksum("small", "md5") == hashlib.md5(small).hexdigest()
    b.open_read = real_open_read   # the multipart one is read and hashed
    assert b.checksum("large", "md5") == hashlib.md5(large).hexdigest()


def test_s3_folders_come_from_key_prefixes(s3_bucket):
    b = open_backend(s3_bucket.url, s3_bucket.options)
    b.mkdir("nothing/here")   # a no-op: object stores keep no folders
    write(b, "x/y/z", b"z")
    assert {(st.path, st.kind) for st in listing(b)} == {("x", DIR), ("x/y", DIR), ("x/y/z", FILE)}
    assert b.stat("x/y").kind == DIR


@pytest.mark.slow
def test_s3_walk_pages_through_many_keys_and_reads_folder_markers(s3_bucket):
    from concurrent.futures import ThreadPoolExecutor

    client = s3_bucket.server.client()
    keys = [f"p/run{i % 7}/sub{i % 3}/f{i:05d}" for i in range(2100)]   # three pages
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_bucket.bucket, Key=k, Body=b"x"),
                      keys))
    client.put_object(Bucket=s3_bucket.bucket, Key="p/made-by-console/", Body=b"")
    entries = listing(open_backend(f"{s3_bucket.url}/p", s3_bucket.options))
    files = {st.path for st in entries if st.kind == FILE}
    dirs = {st.path for st in entries if st.kind == DIR}
    assert files == {k[2:] for k in keys}
    assert dirs == {f"run{r}" for r in range(7)} | {f"run{r}/sub{s}" for r in range(7)
                                                   for s in range(3)} | {"made-by-console"}
    assert len(entries) == len(files) + len(dirs)   # each folder once
    seen = set()
    for st in entries:
        if "/" in st.path:
            assert st.path.rpartition("/")[0] in seen
        seen.add(st.path)


def test_s3_options_from_environment(s3_bucket, monkeypatch):
    for name, value in s3_bucket.server.env.items():
        monkeypatch.setenv(name, value)
    b = open_backend(s3_bucket.url)
    write(b, "env", b"from env")
    assert read(b, "env") == b"from env"


def test_sftp_sets_mtime_and_lists_links_unfollowed(sftp_server):
    b = open_backend(sftp_server.url, sftp_server.options)
    write(b, "f", b"data")
    b.set_mtime("f", 1_600_000_000_123_456_789)
    assert b.stat("f").mtime_ns == 1_600_000_000 * 10**9
    assert os.stat(sftp_server.folder / "f").st_mtime == 1_600_000_000
    b.mkdir("d")
    write(b, "d/inside", b"x")
    b.symlink("link-to-d", "d")
    os.symlink("/nonexistent/target", sftp_server.folder / "dangling")
    entries = {st.path: st for st in listing(b)}
    assert entries["link-to-d"].kind == LINK and entries["link-to-d"].link_target == "d"
    assert entries["dangling"].kind == LINK
    assert entries["dangling"].link_target == "/nonexistent/target"
    assert "link-to-d/inside" not in entries
    assert b.stat("link-to-d").kind == LINK
    b.delete("link-to-d")
    assert (sftp_server.folder / "d" / "inside").exists()


def test_sftp_unlistable_folder_is_reported_and_the_walk_goes_on(sftp_server):
    b = open_backend(sftp_server.url, sftp_server.options)
    for path in ("open/a", "closed/b", "z/c"):
        b.mkdir(path.partition("/")[0])
        write(b, path, b"x")
    os.chmod(sftp_server.folder / "closed", 0)   # closed to its owner, the login user
    try:
        errors = []
        entries = {st.path for st in b.walk(lambda path, msg: errors.append((path, msg)))}
        with pytest.raises(StorageError, match="permission denied") as info:
            write(b, "closed/new", b"x")
    finally:
        os.chmod(sftp_server.folder / "closed", 0o755)
    assert entries == {"open", "open/a", "closed", "z", "z/c"}
    assert [path for path, _ in errors] == ["closed"]
    assert "permission denied" in errors[0][1]
    assert not isinstance(info.value, TransientStorageError)


def test_sftp_password_from_url_is_never_shown(sftp_server):
    url = f"sftp://{sftp_server.user}:Sup3rS3cret@127.0.0.1:{sftp_server.port}{sftp_server.folder}"
    b = open_backend(url, {"known_hosts": None, "client_keys": []})
    with pytest.raises(StorageError) as info:
        b.stat("x")
    message = str(info.value)
    assert "Sup3rS3cret" not in message and "\n" not in message
    assert "authentication failed" in message


def test_sftp_checks_host_keys_unless_told_not_to(sftp_server):
    options = {"client_keys": [sftp_server.client_key], "known_hosts": []}   # trusts no one
    with pytest.raises(StorageError, match="host key not trusted"):
        open_backend(sftp_server.url, options).stat("")


def test_webdav_files_are_where_the_server_keeps_them(webdav_server):
    b = open_backend(webdav_server.url, webdav_server.options)
    b.mkdir("sub dir")
    write(b, "sub dir/a#b?.txt", b"on disk")
    assert (webdav_server.path / "sub dir" / "a#b?.txt").read_bytes() == b"on disk"


def test_davs_is_webdav_over_tls_and_checks_the_certificate(webdavs_server):
    b = open_backend(webdavs_server.url, webdavs_server.options)
    write(b, "secure", b"over TLS")
    assert (webdavs_server.path / "secure").read_bytes() == b"over TLS"
    untrusting = dict(webdavs_server.options)
    del untrusting["verify"]   # the system's CAs do not know a self-signed certificate
    with pytest.raises(StorageError) as info:
        open_backend(webdavs_server.url, untrusting).stat("secure")
    assert "certificate not trusted" in str(info.value)
    assert not isinstance(info.value, TransientStorageError)
    _assert_one_line_without(info.value, webdavs_server.password)


# -- failures -------------------------------------------------------------------------------
def _assert_one_line_without(error: Exception, *secrets: str) -> str:
    message = str(error)
    assert "\n" not in message and "Traceback" not in message
    for secret in secrets:
        assert secret not in message
    return message


@pytest.mark.timeout(60)
def test_s3_wrong_credentials(s3_auth_bucket):
    good = open_backend(s3_auth_bucket.url, s3_auth_bucket.options)
    write(good, "f", b"1")
    assert good.stat("f").size == 1
    wrong = dict(s3_auth_bucket.options, secret="WrongSecretValue123")
    with pytest.raises(StorageError) as info:
        open_backend(s3_auth_bucket.url, wrong).stat("f")
    assert not isinstance(info.value, TransientStorageError)
    message = _assert_one_line_without(info.value, "WrongSecretValue123",
                                       s3_auth_bucket.server.secret)
    assert "wrong credentials" in message and s3_auth_bucket.bucket in message
    with pytest.raises(StorageError, match="authentication failed") as info:
        write(open_backend(s3_auth_bucket.url, wrong), "g", b"2")   # a PUT's answer says why
    _assert_one_line_without(info.value, "WrongSecretValue123")


@pytest.mark.timeout(60)
def test_sftp_wrong_credentials(sftp_server, tmp_path):
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")],
                   check=True)
    b = open_backend(sftp_server.url, {"client_keys": [str(tmp_path / "stranger")],
                                       "known_hosts": None})
    with pytest.raises(StorageError) as info:
        list(b.walk(lambda *a: None)) if b.root_exists() else None
    assert not isinstance(info.value, TransientStorageError)
    message = _assert_one_line_without(info.value)
    assert message.startswith(f"sftp://{sftp_server.user}@127.0.0.1:{sftp_server.port}")
    assert "authentication failed" in message


@pytest.mark.timeout(60)
def test_webdav_wrong_credentials(webdav_server):
    url = (f"webdav://{webdav_server.user}:WrongPassw0rd@{webdav_server.host}:"
           f"{webdav_server.port}/{webdav_server.folder}")
    with pytest.raises(StorageError) as info:
        open_backend(url).stat("")
    message = _assert_one_line_without(info.value, "WrongPassw0rd", webdav_server.password)
    assert "authentication failed" in message
    with pytest.raises(StorageError, match="authentication failed"):
        write(open_backend(url), "f", b"x")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["s3", "sftp", "webdav"])
def test_unreachable_server_fails_fast_and_clearly(scheme, s3_server):
    port = free_port()   # nothing listens there
    if scheme == "s3":
        url, options = "s3://bucket/p", dict(s3_server.options, endpoint_url=f"http://127.0.0.1:{port}")
    elif scheme == "sftp":
        url, options = f"sftp://someone:PassWord1@127.0.0.1:{port}/tmp", {"known_hosts": None}
    else:
        url, options = f"webdav://someone:PassWord1@127.0.0.1:{port}/x", {}
    with pytest.raises(TransientStorageError) as info:
        open_backend(url, options).stat("f")
    message = _assert_one_line_without(info.value, "PassWord1", s3_server.secret)
    assert "connection refused" in message
    if scheme != "s3":   # an S3 location names its bucket; the endpoint is an option
        assert f"127.0.0.1:{port}" in message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["s3", "webdav"])
def test_an_unresolvable_host_is_unreachable_not_refused(scheme, s3_server):
    """httpx and botocore wrap a failed name lookup in their own "could not connect" error
    (ConnectError, EndpointConnectionError): the lookup's failure says what it is, as
    it does for SFTP, not "connection refused" (no host was there to refuse)."""
    if scheme == "s3":
        url, options = "s3://bucket/p", dict(s3_server.options,
                                             endpoint_url="http://no-such.castlib.invalid")
    else:
        url, options = "webdav://someone:PassWord1@no-such.castlib.invalid/x", {}
    with pytest.raises(TransientStorageError) as info:
        open_backend(url, options).stat("f")
    message = _assert_one_line_without(info.value, "PassWord1", s3_server.secret)
    assert "host unreachable" in message, message


def test_scheme_aliases_reach_the_same_servers(sftp_server, webdav_server):
    (sftp_server.folder / "via-ssh").write_bytes(b"ssh")
    assert read(open_backend(sftp_server.url.replace("sftp://", "ssh://"), sftp_server.options),
                "via-ssh") == b"ssh"
    (webdav_server.path / "via-dav").write_bytes(b"dav")
    assert read(open_backend(webdav_server.url.replace("webdav://", "dav://"),
                             webdav_server.options), "via-dav") == b"dav"


def test_capabilities_are_declared_per_protocol(s3_bucket, sftp_server, webdav_server):
    s3 = open_backend(s3_bucket.url, s3_bucket.options).capabilities
    sftp = open_backend(sftp_server.url, sftp_server.options).capabilities
    dav = open_backend(webdav_server.url, webdav_server.options).capabilities
    assert (s3.set_mtime, s3.empty_dirs, s3.server_checksums) == (False, False, {"md5"})
    assert (sftp.set_mtime, sftp.symlinks) == (True, True)
    assert dav.set_mtime is False
    assert s3.mtime_precision_ns == sftp.mtime_precision_ns == 10**9



@pytest.mark.parametrize("kind", ["webdav", "rclone-webdav"])
def test_webdav_puts_only_under_castlib_temporary_names(request, kind, tmp_path):
    """A PUT broken off may be stored by the server later than any look for it (rclone
    serve webdav under load: over a second after the abort), so no PUT goes under a name
    that is not a castlib temporary: a write to `name` streams into a temporary, renamed
    on commit; an abort leaves at most that temporary, never a partial `name`."""
    import threading

    server = request.getfixturevalue("webdav_server" if kind == "webdav"
                                     else "rclone_webdav_server")
    b = open_backend(server.url, server.options)
    b.stat("")
    on_disk = server.path

    def names_with_bytes() -> set[str]:
        return {p.name for p in on_disk.iterdir() if p.is_file() and p.stat().st_size}

    seen: set[str] = set()
    streaming = threading.Event()
    stream = b.open_write("report.bin")
    stream.write(os.urandom(MIB))

    def watch():   # what the server's disk holds while the body is still coming (rclone
        # may buffer it a while under load: watched on until bytes show, or 10 s after)
        import time

        deadline = None
        while not (streaming.is_set() and seen):
            seen.update(names_with_bytes())
            if streaming.is_set():
                deadline = deadline or time.monotonic() + 10
                if time.monotonic() > deadline:
                    break
    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in range(8):
        stream.write(os.urandom(MIB))
    streaming.set()
    watcher.join()
    stream.abort()
    assert seen and "report.bin" not in seen, seen
    assert all(is_temp_name(name, b.temp_key) for name in seen), seen
    assert b.stat("report.bin") is None
    with b.open_write("report.bin") as w:   # committed: renamed to its name
        w.write(b"whole")
    assert (on_disk / "report.bin").read_bytes() == b"whole"


@pytest.mark.parametrize("kind", ["webdav", "rclone-webdav"])
def test_sync_into_a_webdav_folder_named_with_a_question_mark_lands_there(request, kind,
                                                                        tmp_path):
    """WsgiDAV unquotes a MOVE's Destination header before parsing it: with a '?' in the
    location's own folder every rename (temporary -> final) went to a name cut short
    there, and the sync said it had copied."""
    import json

    from tests.helpers import last_json, run_cli

    server = request.getfixturevalue("webdav_server" if kind == "webdav"
                                     else "rclone_webdav_server")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_bytes(b"payload")
    (src / "sub" / "g").write_bytes(b"more")
    config = tmp_path / "castlib.yaml"
    config.write_text(json.dumps({"storage": {server.url: server.options}}))
    r = run_cli("sync", str(src), f"{server.url}/runs %3F1", "--json",
                db=f"sqlite:///{tmp_path}/c.db", env={"CASTLIB_CONFIG": str(config)}, check=0)
    assert last_json(r.stdout)["copied"] == 2
    assert (server.path / "runs ?1" / "f").read_bytes() == b"payload"
    assert (server.path / "runs ?1" / "sub" / "g").read_bytes() == b"more"
    assert sorted(p.name for p in server.path.iterdir()) == ["runs ?1"]
