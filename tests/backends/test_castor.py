"""CASTOR: the parsers of its tools' outputs (recorded formats), its default mode through a
real xrootd server, and its tools mode driving the tools (simulated: CASTOR is retired)
with the bytes moved by the real xrdcp through that real server."""
from __future__ import annotations

import os
import zlib
from datetime import datetime

import pytest
import yaml

from castlib.backends import DIR, FILE, LINK, open_backend
from castlib.backends.castor import (CastorBackend, parse_nsls_line, parse_rfstat,
                                     parse_stager_qry, parse_stager_request, rfstat_mtime_ns)
from castlib.errors import BackendUnavailable, ConfigError, StorageError
from tests.helpers import last_json, make_tree, run_cli, tree_digest

NOW = datetime(2017, 11, 20, 10, 0)


def adler32(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xffffffff:08x}"


# -- parsers, on the tools' recorded output formats ---------------------------------------

def test_nsls_line_of_a_migrated_file_with_only_its_year():
    e = parse_nsls_line("     2 mrw-r--r--   1 na64cdr  vp         1073741824 Jun 13  2017 "
                        "AD 3e1a6b8f cdr01001-000123.dat", NOW)
    assert (e.name, e.kind, e.size, e.adler32) == ("cdr01001-000123.dat", FILE, 1073741824, "3e1a6b8f")
    assert e.migrated and e.file_class == 2 and e.owner == "na64cdr" and e.group == "vp"
    assert e.mode == 0o644
    assert e.mtime_ns is None          # "Jun 13 2017": the day only, so unknown to castlib
    st = e.to_stat("run2017/cdr01001-000123.dat")
    assert st.online is False and st.checksums == {"adler32": "3e1a6b8f"}


def test_nsls_line_of_a_recent_file_on_disk_has_its_minute():
    e = parse_nsls_line("     2 -rw-r--r--   1 na64cdr  vp            5242880 Nov 02 14:07 "
                        "AD 0a1b2c3d cdr01002-000001.dat", NOW)
    assert e.kind == FILE and not e.migrated and e.adler32 == "0a1b2c3d"
    assert e.mtime_ns == int(datetime(2017, 11, 2, 14, 7).timestamp()) * 10**9
    assert e.to_stat("x").online is True


def test_nsls_date_later_than_now_is_last_year():
    e = parse_nsls_line("     2 -rw-r--r--   1 u  g  10 Dec 30 23:59 AD 00000001 late.dat",
                        datetime(2018, 1, 2, 9, 0))
    assert datetime.fromtimestamp(e.mtime_ns / 1e9) == datetime(2017, 12, 30, 23, 59)


def test_nsls_folder_link_deleted_and_names_with_spaces():
    d = parse_nsls_line("     2 drwxr-xr-x   7 na64cdr  vp                  0 Oct 30 09:12 run2017", NOW)
    assert (d.kind, d.name, d.mode, d.adler32) == (DIR, "run2017", 0o755, None)
    f = parse_nsls_line("     2 -rw-r-----   1 na64cdr  vp   12 Oct 30 09:12 AD 1a2b3c4d  two  spaces ",
                        NOW)
    assert f.name == " two  spaces "      # the name is everything after one separator
    link = parse_nsls_line("     0 lrwxrwxrwx   1 na64cdr  vp   9 Oct 30 09:12 latest -> run2017", NOW)
    assert (link.kind, link.name, link.link_target) == (LINK, "latest", "run2017")
    gone = parse_nsls_line("     2 Drw-r--r--   1 na64cdr  vp   9 Oct 30 09:12 AD 0000000a old.dat", NOW)
    assert gone.kind is None


def test_nsls_without_class_or_checksum_columns_and_short_checksums():
    e = parse_nsls_line("-rw-r--r--   1 na64cdr  vp   9 Oct 30 09:12 plain.dat", NOW)
    assert (e.name, e.file_class, e.adler32) == ("plain.dat", None, None)
    e = parse_nsls_line("  2 -rw-r--r--   1 na64cdr  vp   9 Oct 30 09:12 AD 1b2c short.dat", NOW)
    assert e.adler32 == "00001b2c"     # CASTOR prints adler32 without leading zeros
    assert parse_nsls_line("", NOW) is None
    assert parse_nsls_line("total 12", NOW) is None


def test_rfstat_fields_and_mtime():
    fields = parse_rfstat("""Device              : 3a
Inode number        : 123456789
Protection          : -rw-r--r-- (100644)
Hard Links          : 1
Uid                 : 14520 (na64cdr)
Gid                 : 1028 (vp)
Size (bytes)        : 1073741824
Last access         : Tue Jun 13 12:44:10 2017
Last modify         : Tue Jun 13 12:44:10 2017
Last stat. mod.     : Wed Jun 14 08:00:00 2017
""")
    assert fields["Size (bytes)"] == "1073741824" and fields["Uid"] == "14520 (na64cdr)"
    assert rfstat_mtime_ns(fields) == int(datetime(2017, 6, 13, 12, 44, 10).timestamp()) * 10**9
    assert rfstat_mtime_ns({"Last modify": "yesterday"}) is None


def test_stager_qry_states_and_errors():
    q = parse_stager_qry("""/castor/cern.ch/na64/data/cdr01001-000123.dat 2348713@castorns.cern.ch STAGEIN
/castor/cern.ch/na64/data/with space.dat 2348714@castorns.cern.ch STAGED
/castor/cern.ch/na64/data/new.dat 2348715@castorns.cern.ch CANBEMIGR
/castor/cern.ch/na64/data/w.dat 2348716@castorns.cern.ch STAGEOUT
/castor/cern.ch/na64/data/bad.dat 2348717@castorns.cern.ch INVALID
Error 22/Invalid argument (unknown user tag)
""")
    assert q.states == {
        "/castor/cern.ch/na64/data/cdr01001-000123.dat": "STAGEIN",
        "/castor/cern.ch/na64/data/with space.dat": "STAGED",
        "/castor/cern.ch/na64/data/new.dat": "CANBEMIGR",
        "/castor/cern.ch/na64/data/w.dat": "STAGEOUT",
        "/castor/cern.ch/na64/data/bad.dat": "INVALID"}
    assert q.errors == [(22, "Invalid argument (unknown user tag)")]


def test_stager_put_partial_failure():
    r = parse_stager_request("""/castor/cern.ch/na64/a.dat SUBREQUEST_FAILED 16 Another prepareToPut is ongoing for this file
/castor/cern.ch/na64/b.dat SUBREQUEST_READY
Stager request ID: 0c5d1f3e-8f7c-4a61-9b1e-2f4d7b9a0c11
""")
    assert r.failed == {"/castor/cern.ch/na64/a.dat": (16, "Another prepareToPut is ongoing for this file")}
    assert r.ready == ["/castor/cern.ch/na64/b.dat"]
    assert r.request_id == "0c5d1f3e-8f7c-4a61-9b1e-2f4d7b9a0c11"


# -- options ------------------------------------------------------------------------------

def test_default_mode_is_the_xrootd_back_end_on_the_same_host():
    from castlib.backends.xrootd import XRootDBackend

    b = open_backend("castor://castorpublic.cern.ch/castor/cern.ch/na64")
    assert isinstance(b, XRootDBackend)
    assert str(b.url) == "root://castorpublic.cern.ch//castor/cern.ch/na64"


@pytest.mark.parametrize("options,key", [
    ({"mode": "ftp"}, "mode"),
    ({"timeout": 5}, "timeout"),                                   # a tools option in xrootd mode
    ({"mode": "tools", "colour": "blue"}, "colour"),
    ({"mode": "tools", "tools": {"lsit": "nsls {path}"}}, "tools.lsit"),
    ({"mode": "tools", "tools": {"list": "nsls {pth}"}}, "tools.list"),
    ({"mode": "tools", "tools": {"list": "nsls 'unclosed {path}"}}, "tools.list"),
    ({"mode": "tools", "timeout": "soon"}, "timeout"),
])
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ConfigError) as err:
        open_backend("castor://h.example/castor/x", options)
    assert err.value.key == key
    assert key in str(err.value) and "\n" not in str(err.value)   # one line naming it


def test_a_missing_tool_is_one_clear_error():
    b = open_backend("castor://h.example/castor/x",
                     {"mode": "tools", "tools": {"stat": "castlib-no-such-nsls -ld {path}"}})
    with pytest.raises(BackendUnavailable, match="'castlib-no-such-nsls' .*not installed"):
        b.stat("a")


def test_a_tool_that_hangs_times_out():
    b = open_backend("castor://h.example/castor/x",
                     {"mode": "tools", "timeout": 0.3, "tools": {"stat": "sh -c 'sleep 5' {path}"}})
    with pytest.raises(StorageError, match="timed out after 0.3 s") as err:
        b.stat("a")
    assert err.value.transient


# -- the default mode against a real xrootd server -------------------------------------------

def test_cli_sync_to_castor_over_xrootd_then_no_op(xrootd_folder, tmp_path, db_url):
    src = make_tree(tmp_path / "cdr", {"run1/a.dat": os.urandom(70_000), "b.dat": b"b",
                                       "empty/": None})
    url = "castor://" + xrootd_folder.url[len("root://"):].replace("//", "/", 1)
    r = run_cli("sync", str(src), url, "--json", db=db_url, check=0)
    assert last_json(r.stdout)["copied"] == 2
    assert tree_digest(xrootd_folder.path) == tree_digest(src)
    r = run_cli("sync", str(src), url, "--json", db=db_url, check=0)
    assert last_json(r.stdout)["copied"] == 0
    locations = run_cli("locations", db=db_url, check=0).stdout
    assert url in locations


# -- the tools mode: simulated tools, real xrdcp, real xrootd -------------------------------

@pytest.fixture
def tools_backend(castor_tools, xrootd_folder):
    b = open_backend(castor_tools.url_of(xrootd_folder.path), castor_tools.options())
    yield b
    b.close()


def no_listing_errors(path, message):
    pytest.fail(f"cannot list {path}: {message}")


def test_tools_walk_stat_and_checksums(tools_backend, xrootd_folder, castor_tools):
    assert isinstance(tools_backend, CastorBackend)
    make_tree(xrootd_folder.path, {"run 1/a b.dat": b"abc" * 1000, "run 1/empty/": None,
                                   "-dash.dat": b"d"})
    entries = {st.path: st for st in tools_backend.walk(no_listing_errors)}
    assert {p: st.kind for p, st in entries.items()} == {
        "run 1": DIR, "run 1/a b.dat": FILE, "run 1/empty": DIR, "-dash.dat": FILE}
    f = entries["run 1/a b.dat"]
    assert f.size == 3000 and f.checksums == {"adler32": adler32(b"abc" * 1000)}
    local = os.stat(xrootd_folder.path / "run 1/a b.dat").st_mtime_ns
    assert f.mtime_ns == local // (60 * 10**9) * (60 * 10**9)    # to the minute, as nsls shows
    assert tools_backend.stat("run 1/a b.dat").size == 3000
    assert tools_backend.stat("nope") is None
    # the checksum is the name server's, not a download
    before = len(castor_tools.calls())
    assert tools_backend.checksum("-dash.dat", "adler32") == adler32(b"d")
    assert [c[0] for c in castor_tools.calls()[before:]] == ["nsls"]


def test_tools_read_of_a_missing_file_fails_cleanly(tools_backend):
    with pytest.raises(StorageError, match="cannot read castor://.*gone.dat: xrdcp failed"):
        with tools_backend.open_read("gone.dat") as r:
            r.read(1024)


def test_tools_missing_root_says_so(castor_tools, xrootd_folder):
    b = open_backend(castor_tools.url_of(xrootd_folder.path / "not-there"), castor_tools.options())
    with pytest.raises(StorageError, match="folder does not exist"):
        list(b.walk(no_listing_errors))


def test_tools_staging_recalls_migrated_files_before_reading(tools_backend, xrootd_folder,
                                                             castor_tools):
    make_tree(xrootd_folder.path, {"old.dat": b"old", "new.dat": b"new"})
    castor_tools.set_tape_state(xrootd_folder.path / "old.dat", "tape")
    entries = {st.path: st for st in tools_backend.walk(no_listing_errors)}
    assert entries["old.dat"].online is False and entries["new.dat"].online is True
    tools_backend.stage(["old.dat", "new.dat"], timeout_s=10)
    gets = [c for c in castor_tools.calls() if c[0] == "stager_get"]
    assert gets == [["stager_get", "-M", str(xrootd_folder.path / "old.dat")]]


def test_tools_staging_gives_up_after_its_timeout(tools_backend, xrootd_folder, castor_tools):
    make_tree(xrootd_folder.path, {"stuck.dat": b"s"})
    castor_tools.set_tape_state(xrootd_folder.path / "stuck.dat", "stuck")
    with pytest.raises(StorageError, match=r"still on tape after 0.5 s of staging: .*stuck.dat"):
        tools_backend.stage(["stuck.dat"], timeout_s=0.5)


def test_tools_stager_refusal_names_the_file_and_errno(castor_tools, xrootd_folder):
    b = open_backend(castor_tools.url_of(xrootd_folder.path),
                     castor_tools.options(tools={"stage_put": "stager_put -M {paths}"}))
    castor_tools.set_tape_state(xrootd_folder.path / "busy.dat", "put-busy")
    with pytest.raises(StorageError, match="refused .*busy.dat: Another prepareToPut is "
                                           r"ongoing for this file \(errno 16\)") as err:
        b.open_write("busy.dat")
    assert err.value.transient       # worth a retry
    with b.open_write("free.dat") as w:
        w.write(b"x")
    assert ["stager_put", "-M", str(xrootd_folder.path / "free.dat")] in castor_tools.calls()


def _tools_config(tmp_path, castor_tools, **extra) -> dict:
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {
        castor_tools.url_of("/"): castor_tools.options(**extra)}}))
    return {"CASTLIB_CONFIG": str(config)}


def test_cli_sync_local_to_castor_tools_and_back(castor_tools, xrootd_folder, tmp_path, db_url):
    files = {"run 2017/cdr01001-000123.dat": os.urandom(300_000), "notes it's.txt": b"n",
             "-dash": b"-", "ünï/cödé.dat": "ü".encode(), "empty/": None}
    src = make_tree(tmp_path / "cdr", files)
    url = castor_tools.url_of(xrootd_folder.path)
    env = _tools_config(tmp_path, castor_tools,
                        tools={"set_mtime": "nstouch -m -t {stamp} {path}"})
    r = run_cli("sync", str(src), url, "--json", db=db_url, env=env, check=0)
    assert last_json(r.stdout)["copied"] == 4
    assert tree_digest(xrootd_folder.path) == tree_digest(src)
    # the catalog holds the name server's adler32 of each copy
    r = run_cli("diff", str(src), url, "--checksum", "adler32", db=db_url, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    # mtimes were set (to the minute): a second sync has nothing to do
    r = run_cli("sync", str(src), url, "--json", db=db_url, env=env, check=0)
    counts = last_json(r.stdout)
    assert counts["copied"] == counts["replaced"] == counts["mtime_fixed"] == 0

    # and back, with one file on tape: recalled, then copied
    castor_tools.set_tape_state(xrootd_folder.path / "run 2017/cdr01001-000123.dat", "tape")
    restore = tmp_path / "restore"
    r = run_cli("sync", url, str(restore), "--json", db=db_url, env=env, check=0)
    assert last_json(r.stdout)["copied"] == 4
    assert tree_digest(restore) == tree_digest(src)
    tools = [c[0] for c in castor_tools.calls()]
    assert "stager_get" in tools


def test_cli_tools_mode_with_a_missing_tool_is_one_line(castor_tools, xrootd_folder, tmp_path,
                                                        db_url):
    src = make_tree(tmp_path / "cdr", {"a.dat": b"a"})
    env = _tools_config(tmp_path, castor_tools, tools={"list": "castlib-no-nsls -l {path}"})
    r = run_cli("sync", str(src), castor_tools.url_of(xrootd_folder.path), db=db_url, env=env,
                check=2)
    errors = [l for l in r.stderr.splitlines() if l.startswith("castlib: error")]
    assert len(errors) == 1 and "'castlib-no-nsls'" in errors[0] and "Traceback" not in r.stderr
    assert list(xrootd_folder.path.iterdir()) == []
