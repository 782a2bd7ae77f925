"""castlib sync between local folders and real S3 (moto), SFTP (sshd, `rclone serve sftp`)
and WebDAV (wsgidav, `rclone serve webdav`) servers, as a user runs it: byte-exact copies, and a second sync that finds nothing to do."""
from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import time

import pytest
import yaml

from castlib.backends import DIR, FILE, open_backend
from tests.helpers import (castlib_command, cli_env, json_lines, last_json, make_tree, run_cli,
                           run_cli_interrupted, tree_digest)

MIB = 1024 * 1024
TREE = {
    "top.txt": b"top level\n",
    "empty.dat": b"",
    "data/run 001/raw.bin": os.urandom(3 * MIB + 11),
    "data/run 001/notes #1?.txt": "ünïcödé notes\n".encode(),
    "data/-dash/quote'd.txt": b"quoted",
    "data/deep/a/b/c/leaf": b"leaf",
}


def remote_digest(url: str, options: dict) -> dict[str, str]:
    """{path: sha256 or 'dir'} of a tree as the back-end sees it."""
    backend = open_backend(url, options)
    out = {}
    try:
        for st in backend.walk(lambda path, msg: pytest.fail(f"cannot list {path}: {msg}")):
            if st.kind == DIR:
                out[st.path] = "dir"
            elif st.kind == FILE:
                h = hashlib.sha256()
                with backend.open_read(st.path) as f:
                    while chunk := f.read(MIB):
                        h.update(chunk)
                out[st.path] = h.hexdigest()
    finally:
        backend.close()
    return out


def seed(url: str, options: dict, files: dict[str, bytes]) -> None:
    backend = open_backend(url, options)
    try:
        for path, data in files.items():
            backend.mkdir(path.rpartition("/")[0])
            with backend.open_write(path) as f:
                f.write(data)
    finally:
        backend.close()


@pytest.fixture
def remotes(request, tmp_path):
    """Lazily started servers by name -> (location URL, back-end options), and a castlib
    config file that hands those options to the CLI (as a user's config would)."""
    made: dict[str, tuple[str, dict]] = {}

    def get(kind: str) -> tuple[str, dict]:
        if kind not in made:
            if kind == "s3":
                bucket = request.getfixturevalue("s3_bucket")
                made[kind] = (f"{bucket.url}/archive", bucket.options)
            elif kind in ("sftp", "webdav", "rclone-sftp", "rclone-webdav"):
                server = request.getfixturevalue(kind.replace("-", "_") + "_server")
                made[kind] = (server.url.rstrip("/") + "/archive", server.options)
            elif kind.endswith("-asyncssh"):   # an SFTP server through asyncssh, not ssh
                url, options = get(kind[:-len("-asyncssh")])
                del made[kind[:-len("-asyncssh")]]
                made[kind] = (url, {**options, "ssh_client": "asyncssh"})
            elif kind == "xrootd":
                made[kind] = (request.getfixturevalue("xrootd_folder").url, {})
            else:
                made[kind] = (str(tmp_path / f"local-{len(made)}"), {})
        return made[kind]

    def env() -> dict:
        config = tmp_path / "castlib.yaml"
        storage = {url: opts for url, opts in made.values() if opts}
        config.write_text(yaml.safe_dump({"storage": storage}))
        return {"CASTLIB_CONFIG": str(config)}

    get.env = env
    return get


def digest_of(kind: str, url: str, options: dict) -> dict[str, str]:
    return tree_digest(url) if kind == "local" else remote_digest(url, options)


def files_only(digest: dict[str, str]) -> dict[str, str]:
    return {p: d for p, d in digest.items() if d != "dir"}


MATRIX = [("local", "s3"), ("s3", "local"), ("local", "sftp"), ("sftp", "local"),
          ("local", "webdav"), ("webdav", "local"), ("s3", "sftp"), ("xrootd", "s3"),
          # other servers of the same protocols: rclone's
          ("local", "rclone-sftp"), ("rclone-sftp", "local"), ("local", "rclone-webdav"),
          ("rclone-webdav", "local"), ("rclone-sftp", "rclone-webdav"),
          # SFTP through asyncssh (ssh_client: asyncssh) rather than OpenSSH's ssh
          ("local", "sftp-asyncssh"), ("rclone-sftp-asyncssh", "local")]


@pytest.mark.parametrize("src_kind,dst_kind", MATRIX, ids=[f"{a}-to-{b}" for a, b in MATRIX])
def test_sync_copies_byte_exact_and_second_sync_is_a_no_op(remotes, db_url, tmp_path,
                                                            src_kind, dst_kind):
    src_url, src_opts = remotes(src_kind)
    dst_url, dst_opts = remotes(dst_kind)
    tree = TREE
    if "xrootd" in (src_kind, dst_kind):   # '?' starts XRootD's opaque part: no such names
        tree = {p: v for p, v in TREE.items() if "?" not in p}
    if src_kind == "local":
        make_tree(src_url, tree)
    else:
        seed(src_url, src_opts, tree)
    env = remotes.env()

    first = run_cli("sync", src_url, dst_url, "--json", db=db_url, env=env, check=0)
    counts = last_json(first.stdout)
    assert counts["copied"] == len(tree) and counts["failed"] == 0, first.stdout
    assert counts["bytes"] == sum(len(v) for v in tree.values())

    expected = {p: hashlib.sha256(v).hexdigest() for p, v in tree.items()}
    assert files_only(digest_of(dst_kind, dst_url, dst_opts)) == expected
    assert files_only(digest_of(src_kind, src_url, src_opts)) == expected   # source untouched
    # no temporary file left behind, no stray entry
    assert set(digest_of(dst_kind, dst_url, dst_opts)) == set(digest_of(src_kind, src_url, src_opts))

    second = run_cli("sync", src_url, dst_url, "--json", db=db_url, env=env, check=0)
    again = last_json(second.stdout)
    assert (again["copied"], again["replaced"], again["deleted"], again["failed"]) == (0, 0, 0, 0), \
        second.stdout


@pytest.mark.parametrize("dst_kind", ["s3", "sftp", "webdav", "rclone-sftp", "rclone-webdav"])
def test_sync_replaces_a_changed_file_and_deletes_on_request(remotes, db_url, dst_kind):
    src_url, _ = remotes("local")
    dst_url, dst_opts = remotes(dst_kind)
    make_tree(src_url, {"keep.txt": b"v1", "gone.txt": b"bye", "sub/x": b"x"})
    env = remotes.env()
    run_cli("sync", src_url, dst_url, "--json", db=db_url, env=env, check=0)

    make_tree(src_url, {"keep.txt": b"version two"})
    os.remove(os.path.join(src_url, "gone.txt"))
    result = last_json(run_cli("sync", src_url, dst_url, "--delete", "--json", db=db_url,
                               env=env, check=0).stdout)
    assert (result["replaced"], result["deleted"]) == (1, 1), result
    assert files_only(remote_digest(dst_url, dst_opts)) == {
        "keep.txt": hashlib.sha256(b"version two").hexdigest(),
        "sub/x": hashlib.sha256(b"x").hexdigest()}


def test_sync_with_wrong_credentials_fails_on_one_line(remotes, db_url, tmp_path, webdav_server):
    src_url, _ = remotes("local")
    make_tree(src_url, {"f": b"1"})
    url = (f"webdav://{webdav_server.user}:NotThePassword@{webdav_server.host}:"
           f"{webdav_server.port}/{webdav_server.folder}")
    proc = run_cli("sync", src_url, url, db=db_url)
    assert proc.returncode != 0
    assert "authentication failed" in proc.stderr
    assert "NotThePassword" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def _final_names(url: str, options: dict) -> set[str]:
    """Files under their final name (castlib's temporary files left out)."""
    from castlib.transfer import TEMP_MARK

    backend = open_backend(url, options)
    try:
        if not backend.root_exists():
            return set()
        return {st.path for st in backend.walk(lambda path, msg: None)
                if st.kind == FILE and TEMP_MARK not in st.name}
    finally:
        backend.close()


@pytest.mark.parametrize("kind", ["s3", "sftp", "webdav", "rclone-sftp", "rclone-webdav"])
def test_line_cut_mid_sync_leaves_no_partial_file_and_rerun_completes(
        request, kind, outage_proxy, db_url, tmp_path):
    """The server drops off the network during a sync (every connection cut, new ones
    refused, for two seconds): whatever carries a final name is complete, the run ends
    with a clear word (or its retries get through), and a re-run finishes the job."""
    files = {f"run/{i:02d}.raw": os.urandom(2 * MIB + i) for i in range(12)}
    src = make_tree(tmp_path / "src", files)
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        url, real = f"{bucket.url}/archive", bucket.options
        proxy = outage_proxy(int(bucket.server.endpoint_url.rsplit(":", 1)[1]))
        via_proxy = dict(real, endpoint_url=f"http://127.0.0.1:{proxy.port}")
        real_url = url
    else:
        server = request.getfixturevalue(kind.replace("-", "_") + "_server")
        real_url, real = server.url.rstrip("/") + "/archive", server.options
        proxy = outage_proxy(server.port)
        url, via_proxy = real_url.replace(f":{server.port}/", f":{proxy.port}/", 1), real
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {url: via_proxy}}))
    env = {"CASTLIB_CONFIG": str(config)}

    def cut_for_two_seconds():
        proxy.cut()
        time.sleep(2)
        proxy.restore()

    sync = run_cli_interrupted("sync", str(src), url, "--transfers", "1", "--json", db=db_url,
                               env=env, ready=lambda: bool(_final_names(real_url, real)),
                               interrupt=cut_for_two_seconds)
    out, err = sync.stdout, sync.stderr
    assert "Traceback" not in err, err
    assert sync.returncode in (0, 1), err
    if sync.returncode:
        assert [l for l in err.splitlines() if l.startswith("castlib:")], err
    # the outage is shorter than the retries' backoff: at most the file in flight is lost,
    # the others go through once the line is back (an SSH connection is made anew)
    assert last_json(out)["failed"] <= 1, err
    landed = files_only(remote_digest(real_url, real))
    for path, digest in landed.items():
        if path.rsplit("/", 1)[-1].startswith("."):   # a temporary file, for the re-run
            continue
        assert digest == hashlib.sha256(files[path]).hexdigest(), path

    rerun = last_json(run_cli("sync", str(src), url, "--json", db=db_url, env=env,
                              check=0).stdout)
    assert rerun["failed"] == 0
    expected = {p: hashlib.sha256(v).hexdigest() for p, v in files.items()}
    assert files_only(remote_digest(real_url, real)) == expected   # temporary files gone too


def test_remote_to_remote_streams_in_bounded_memory_without_a_local_copy(remotes, db_url,
                                                                          tmp_path):
    """S3 to SFTP through castlib: copying a file much larger than castlib's buffers costs
    no more memory than copying a small one, and no temporary copy appears on the local
    disk (TMPDIR stays empty)."""
    src_url, src_opts = remotes("s3")
    dst_url, dst_opts = remotes("sftp")
    (tmp_path / "tmp").mkdir()
    env = dict(remotes.env(), TMPDIR=str(tmp_path / "tmp"))

    def sync_peak_mb() -> float:
        proc = subprocess.run(["/usr/bin/time", "-f", "peak-rss-kb %M",
                               *castlib_command("sync", src_url, dst_url, "--json", db=db_url)],
                              capture_output=True, text=True, env=cli_env(env), timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert last_json(proc.stdout)["copied"] == 1
        return int(proc.stderr.rsplit("peak-rss-kb ", 1)[1].split()[0]) / 1024

    small, big = os.urandom(MIB), os.urandom(MIB) * 192   # need not be random all through
    seed(src_url, src_opts, {"small.raw": small})
    baseline = sync_peak_mb()
    seed(src_url, src_opts, {"big.raw": big})
    peak = sync_peak_mb()
    assert peak - baseline < 64, f"{peak:.0f} MB for 192 MiB against {baseline:.0f} MB for 1 MiB"
    assert list((tmp_path / "tmp").iterdir()) == []
    assert files_only(remote_digest(dst_url, dst_opts)) == {
        "small.raw": hashlib.sha256(small).hexdigest(),
        "big.raw": hashlib.sha256(big).hexdigest()}


# -- servers that refuse what their protocol promises -----------------------------------------
def test_links_to_a_server_that_cannot_hold_them_are_skipped_and_said_once(remotes, db_url):
    """`rclone serve sftp` answers every symlink request SSH_FX_OP_UNSUPPORTED: the sync
    learns it at the first, skips the others without asking, says so once in its summary
    and exits 0; the links stay differences for diff, and the next sync does the same."""
    src_url, _ = remotes("local")
    dst_url, dst_opts = remotes("rclone-sftp")
    make_tree(src_url, {"data/a.raw": b"a", "data/b.raw": b"bb"})
    links = ["data/to-a", "data/to-b", "data/dangling", "absolute"]
    for path, target in zip(links, ["a.raw", "b.raw", "nothing-here", "/etc/hostname"]):
        os.symlink(target, os.path.join(src_url, path))
    env = remotes.env()

    for attempt in range(2):
        proc = run_cli("sync", src_url, dst_url, "--json", db=db_url, env=env)
        assert proc.returncode == 0, proc.stderr
        counts = last_json(proc.stdout)
        assert (counts["copied"], counts["failed"], counts["skipped"],
                counts["links_created"]) == ((2, 0, 4, 0) if attempt == 0 else (0, 0, 4, 0))
        assert "4 links skipped: the server cannot hold links" in proc.stderr
        assert not [l for l in proc.stderr.splitlines() if l.startswith("castlib:")], proc.stderr

        diff = run_cli("diff", src_url, dst_url, "--json", db=db_url, env=env)
        assert diff.returncode == 1
        assert sorted((d["path"], d["kind"]) for d in json_lines(diff.stdout)) == \
            sorted((p, "missing") for p in links)
    assert files_only(remote_digest(dst_url, dst_opts)) == {
        "data/a.raw": hashlib.sha256(b"a").hexdigest(),
        "data/b.raw": hashlib.sha256(b"bb").hexdigest()}


def test_a_server_that_refuses_mtimes_and_posix_rename_still_gets_verified_copies(
        remotes, db_url, sftp_restricted_server):
    """OpenSSH's sftp-server with `-P setstat,posix-rename,...` (a locked-down server):
    times cannot be set (said once, counted, exit 0) and files are replaced through plain
    rename, the old file moved aside first."""
    src_url, _ = remotes("local")
    dst_url, dst_opts = sftp_restricted_server.url + "/archive", sftp_restricted_server.options
    make_tree(src_url, {f"d/{i}.raw": f"first {i}".encode() for i in range(5)})
    for i in range(5):   # times the copies cannot have: they keep the time of the upload
        os.utime(os.path.join(src_url, f"d/{i}.raw"), (1_600_000_000, 1_600_000_000))
    env = {"CASTLIB_CONFIG": str(remotes.env()["CASTLIB_CONFIG"])}
    config = yaml.safe_load(open(env["CASTLIB_CONFIG"]))
    config["storage"][dst_url] = dst_opts
    with open(env["CASTLIB_CONFIG"], "w") as f:
        yaml.safe_dump(config, f)

    first = run_cli("sync", src_url, dst_url, "--json", db=db_url, env=env)
    assert first.returncode == 0, first.stderr
    counts = last_json(first.stdout)
    # five files and their folder: folders get their reference mtime too (rsync -a)
    assert (counts["copied"], counts["failed"], counts["mtime_skipped"]) == (5, 0, 6)
    assert "6 mtimes not set: the server cannot set them" in first.stderr

    make_tree(src_url, {"d/0.raw": b"second version, longer", "d/1.raw": b"v2"})
    second = run_cli("sync", src_url, dst_url, "--json", db=db_url, env=env)
    assert second.returncode == 0, second.stderr
    counts = last_json(second.stdout)
    # the 3 files of other mtime: checksums equal, time refused; the 2 replaced and
    # their folder: refused
    assert (counts["replaced"], counts["failed"], counts["mtime_skipped"]) == (2, 0, 6), \
        second.stderr
    assert "6 mtimes not set: the server cannot set them" in second.stderr
    expected = {f"d/{i}.raw": hashlib.sha256(f"first {i}".encode()).hexdigest() for i in range(5)}
    expected["d/0.raw"] = hashlib.sha256(b"second version, longer").hexdigest()
    expected["d/1.raw"] = hashlib.sha256(b"v2").hexdigest()
    assert files_only(remote_digest(dst_url, dst_opts)) == expected   # nothing set aside left


def test_folder_times_and_bits_a_server_refuses_are_not_counted_as_fixed(
        sftp_restricted_server, tmp_path, monkeypatch):
    """A folder whose mtime or bits differ, to a server that refuses set-stat: counted as
    not set (refused), never also as fixed, as a file's refused mtime is not."""
    import json

    import castlib

    config = tmp_path / "castlib.yaml"
    server = sftp_restricted_server
    config.write_text(json.dumps({"storage": {server.url: server.options}}))
    monkeypatch.setenv("CASTLIB_CONFIG", str(config))
    src = make_tree(tmp_path / "src", {"d/e/f": b"f", "g/h": b"h"})
    db = f"sqlite:///{tmp_path / 'c.db'}"
    first = castlib.sync(str(src), server.url, db=db)
    assert first.exit_code == 0 and first.counts["copied"] == 2, first.errors
    os.chmod(src / "d", 0o750)
    for n, folder in enumerate(("d/e", "d", "g")):   # mtimes the copies do not have
        os.utime(src / folder, (1_500_000_000 + n, 1_500_000_000 + n))
    second = castlib.sync(str(src), server.url, db=db)
    assert second.exit_code == 0, second.errors
    counts = second.counts
    assert (counts["mtime_fixed"], counts["mode_fixed"]) == (0, 0), counts
    assert (counts["mtime_skipped"], counts["mode_skipped"]) == (3, 3), counts
    assert "fixed" not in second.last.summary, second.last.summary


def test_bits_a_server_takes_but_does_not_keep_are_not_counted_fixed_nor_cataloged(
        rclone_sftp_server, tmp_path, monkeypatch):
    """rclone serve sftp answers a set-stat of permissions with OK and keeps nothing (its
    files are 0644, its folders 0755): a sync said "1 permissions fixed" on every run and
    wrote the bits asked for into the catalog, which the next index found changed. Bits
    are looked at once set: those not kept are counted as not set (exit 0), the catalog
    gets what is there, and the next index finds nothing changed."""
    import json

    import castlib

    config = tmp_path / "castlib.yaml"
    server = rclone_sftp_server
    config.write_text(json.dumps({"storage": {server.url: server.options}}))
    monkeypatch.setenv("CASTLIB_CONFIG", str(config))
    src = make_tree(tmp_path / "src", {"tool": b"#!/bin/sh\n", "d/data": b"d", "p/x": b"x"})
    os.chmod(src / "tool", 0o755)
    os.chmod(src / "p", 0o700)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    for run in range(3):
        report = castlib.sync(str(src), server.url, db=db)
        assert report.exit_code == 0, report.errors
        counts = report.counts
        # the first run copies "tool" (its bits not kept) and makes "p" (nor its bits);
        # the next ones set both again, and find them not kept again
        assert (counts["mode_fixed"], counts["mode_skipped"]) == (0, 2), (run, counts)
        assert "fixed" not in report.last.summary, report.last.summary
        assert "2 permissions not set: the server cannot set or keep them" in \
            report.last.summary
        if run:   # the catalog had what the server has: nothing new to list
            index = report.stages[1]
            assert index.spec.params.location == server.url
            assert index.outcome.counts["changed"] == 0, index.outcome.counts
    assert (src / "tool").stat().st_mode & 0o777 == 0o755   # (the reference as it was)


def test_empty_folders_to_s3_are_skipped_and_counted_not_made(remotes, db_url):
    """S3 keeps no folders (empty_dirs False): a folder with files comes with them, an
    empty one is skipped and said so, on every run; none is claimed created, and none is
    a failure."""
    src_url, _ = remotes("local")
    dst_url, dst_opts = remotes("s3")
    make_tree(src_url, {"full/f.txt": b"f", "empty/": None, "deep/er/": None})
    env = remotes.env()
    for _ in range(2):
        proc = run_cli("sync", src_url, dst_url, "--json", db=db_url, env=env, check=0)
        counts = last_json(proc.stdout)
        assert (counts["dirs_created"], counts["skipped"], counts["failed"]) == (0, 3, 0), counts
        assert "3 empty folders skipped: the destination keeps no folders" in proc.stderr + proc.stdout
    assert remote_digest(dst_url, dst_opts) == {
        "full": "dir", "full/f.txt": hashlib.sha256(b"f").hexdigest()}


@pytest.mark.parametrize("server", ["rclone_webdav_server", "webdav_server"])
def test_a_replacing_copy_whose_temporary_vanished_keeps_the_old_file(request, tmp_path, server):
    """The sync's copy of a changed file to WebDAV, its temporary removed by another process
    just before the rename: the copy fails, and the old file is still there, whole. (rclone
    serve webdav removes a MOVE's target before it finds the source missing: castlib must
    not ask it to overwrite.)"""
    from castlib.errors import VerificationFailed
    from castlib.transfer import copy_file

    dav = request.getfixturevalue(server)
    make_tree(tmp_path / "src", {"f.dat": b"new bytes"})
    seed(dav.url, dav.options, {"f.dat": b"the old file"})
    src, dst = open_backend(str(tmp_path / "src")), open_backend(dav.url, dav.options)

    def another_process_removes(tmp):
        dst.delete(tmp)

    with pytest.raises(VerificationFailed, match="removed by another process"):
        copy_file(src, "f.dat", dst, "f.dat", algorithm="adler32", expected_size=9,
                  expected_checksum=None, mtime_ns=None, temp_key=b"k" * 32,
                  before_rename=another_process_removes)
    assert remote_digest(dav.url, dav.options) == {
        "f.dat": hashlib.sha256(b"the old file").hexdigest()}


@pytest.mark.parametrize("dst_kind", ["s3", "webdav"])
def test_a_name_that_is_not_utf8_is_skipped_and_said_not_failed(remotes, db_url, tmp_path,
                                                               dst_kind):
    """A local name that is not UTF-8 has no name on S3 or WebDAV: the sync copies the rest,
    counts that one skipped, names it (its raw bytes shown %XX, as everywhere) and fails
    nothing."""
    src = tmp_path / "src"
    make_tree(src, {"fine.txt": b"fine"})
    (src / os.fsdecode(b"latin1-\xe9t\xe9.txt")).write_bytes(b"caf\xe9")
    dst_url, dst_opts = remotes(dst_kind)
    r = run_cli("sync", str(src), dst_url, "--json", db=db_url, env=remotes.env(), check=0)
    counts = last_json(r.stdout)
    assert (counts["copied"], counts["skipped"], counts["failed"]) == (1, 1, 0), r.stdout
    assert r.returncode == 0, (r.stdout, r.stderr)
    [said] = [line for line in r.stderr.splitlines() if "UTF-8" in line]
    assert said.count("latin1-%E9t%E9.txt") == 2 and "not UTF-8" in said, said
    assert "Traceback" not in r.stderr and "UnicodeEncodeError" not in r.stderr
    assert set(remote_digest(dst_url, dst_opts)) == {"fine.txt"}


@pytest.mark.parametrize("client", ["openssh", "asyncssh"])
def test_a_folder_that_became_a_link_on_the_server_is_not_written_through(
        request, remotes, db_url, client):
    """With the destination trusted from the catalog (--index ref), a folder on the SFTP
    server that became a link to a folder outside the destination is looked at before
    anything is written below it (lstat, a batch in one round trip): no mkdir, copy or
    set-stat goes through it (SFTP's set-stat follows links), one line says why, and the
    rest of the sync is done."""
    server = request.getfixturevalue("sftp_server")
    src_url, _ = remotes("local")
    dst_url, dst_opts = remotes("sftp" if client == "openssh" else "sftp-asyncssh")
    on_disk = server.folder / "archive"   # the server is on this machine
    make_tree(src_url, {"a/f1": b"one", "a/f3": b"three", "keep.dat": b"k"})
    env = remotes.env()
    assert run_cli("sync", src_url, dst_url, db=db_url, env=env).returncode == 0
    outside = make_tree(server.folder / "outside", {"f1": b"theirs", "f3": b"three"})
    os.chown(outside, pwd.getpwnam(server.user).pw_uid, -1)   # writable to the login
    before = tree_digest(outside)
    times = {name: os.lstat(outside / name).st_mtime_ns for name in ("f1", "f3")}
    shutil.rmtree(on_disk / "a")
    os.symlink(outside, on_disk / "a")
    os.symlink(outside, on_disk / "c")   # where the catalog has nothing: made as a folder
    make_tree(src_url, {"a/new/f4": b"four", "a/f5": b"five", "b.dat": b"b",
                        "c/new/f6": b"six"})
    os.utime(os.path.join(src_url, "a", "f3"), (1e9, 1e9))
    os.chmod(os.path.join(src_url, "a", "f1"), 0o700)

    proc = run_cli("sync", "--index", "ref", "--json", src_url, dst_url, db=db_url, env=env)
    assert proc.returncode == 1, proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.startswith("castlib:")] == [
        f"castlib: {name}: a link on the destination now, not a folder: {n} planned entries "
        "below it left alone (the catalog is stale here: list the destination again, e.g. "
        "castlib index DST)" for name, n in (("a", 5), ("c", 2))], proc.stderr
    assert last_json(proc.stdout)["copied"] == 1 and (on_disk / "b.dat").read_bytes() == b"b"
    assert tree_digest(outside) == before
    assert {n: os.lstat(outside / n).st_mtime_ns for n in times} == times
    assert os.lstat(outside / "f1").st_mode & 0o777 == 0o644
