"""The castlib command as a user types it: exit codes, JSON output, errors on one line."""
import os

import pytest

import castlib

from castlib.hosts import local_hostname
from tests.helpers import json_lines, last_json, make_tree, run_cli

HOST = local_hostname()   # local locations name their host: file://HOST/path


def test_diff_exit_codes_and_json_lines(tmp_path, db_url):
    a = make_tree(tmp_path / "a", {"same.dat": b"s", "only-a.dat": b"a", "size.dat": b"12"})
    b = make_tree(tmp_path / "b", {"same.dat": b"s", "only-b.dat": b"b", "size.dat": b"123"})
    os.utime(b / "same.dat", ns=(os.stat(a / "same.dat").st_atime_ns,
                                  os.stat(a / "same.dat").st_mtime_ns))
    out = run_cli("diff", str(a), str(b), "--json", db=db_url, check=1)
    rows = {r["path"]: r for r in json_lines(out.stdout)}
    assert {p: r["kind"] for p, r in rows.items()} == {
        "only-a.dat": "missing", "only-b.dat": "extra", "size.dat": "size"}
    assert rows["size.dat"]["ref"]["size"] == 2 and rows["size.dat"]["dst"]["size"] == 3
    run_cli("diff", str(a), str(a), db=db_url, check=0)
    err = run_cli("diff", str(a), str(tmp_path / "missing"), db=db_url, check=2)
    assert err.stderr.count("\n") >= 1 and "does not exist" in err.stderr


def test_diff_json_keeps_its_type_names(tmp_path, db_url):
    """--json is a format scripts parse: a folder's "type" is "dir" there, as it always
    was, though messages say "folder" (backends.base.KIND_NAMES)."""
    a = make_tree(tmp_path / "a", {"sub/x.dat": b"x"})
    os.symlink("sub/x.dat", a / "ln")
    b = make_tree(tmp_path / "b", {})
    out = run_cli("diff", str(a), str(b), "--json", db=db_url, check=1)
    rows = {r["path"]: r for r in json_lines(out.stdout)}
    assert {p: r["ref"]["type"] for p, r in rows.items()} == {
        "sub": "dir", "sub/x.dat": "file", "ln": "link"}


def test_diff_no_index_uses_the_catalog_as_it_is(tmp_path, db_url):
    a = make_tree(tmp_path / "a", {"x.dat": b"x"})
    run_cli("sync", str(a), str(tmp_path / "b"), db=db_url, check=0)
    (a / "new.dat").write_bytes(b"n")
    run_cli("diff", str(a), str(tmp_path / "b"), "--no-index", db=db_url, check=0)
    run_cli("diff", str(a), str(tmp_path / "b"), db=db_url, check=1)


def test_mtime_tolerance(tmp_path, db_url):
    a = make_tree(tmp_path / "a", {"x.dat": b"x"})
    b = make_tree(tmp_path / "b", {"x.dat": b"x"})
    os.utime(a / "x.dat", ns=(10**18, 10**18))
    os.utime(b / "x.dat", ns=(10**18 + 30 * 10**9, 10**18 + 30 * 10**9))
    out = run_cli("diff", str(a), str(b), "--json", db=db_url, check=1)
    assert json_lines(out.stdout)[0]["kind"] == "mtime"
    run_cli("diff", str(a), str(b), "--mtime-tolerance", "60", db=db_url, check=0)


def test_sync_json_counts_and_exit_codes(tmp_path, db_url):
    a = make_tree(tmp_path / "a", {"x.dat": b"x" * 10, "d/y.dat": b"y"})
    out = run_cli("sync", str(a), str(tmp_path / "b"), "--json", db=db_url, check=0)
    counts = last_json(out.stdout)
    assert {k: counts[k] for k in ("copied", "replaced", "deleted", "failed", "bytes")} == {
        "copied": 2, "replaced": 0, "deleted": 0, "failed": 0, "bytes": 11}
    assert "synced" in out.stderr                   # the summary line
    quiet = run_cli("sync", str(a), str(tmp_path / "b"), "-q", db=db_url, check=0)
    assert quiet.stderr == "" and quiet.stdout == ""


def test_sync_refusals_exit_2(tmp_path, db_url):
    a = make_tree(tmp_path / "a", {"x.dat": b"x"})
    b = make_tree(tmp_path / "b", {"e1": b"1", "e2": b"2"})
    r = run_cli("sync", str(a), str(b), "--delete", "--max-delete", "1", db=db_url, check=2)
    assert "more than --max-delete 1" in r.stderr and (b / "e1").exists()
    r = run_cli("sync", str(a), str(b), "--delete", "--max-delete", "1", "--json", db=db_url,
                check=2)
    answer = last_json(r.stdout)   # a cron job reading --json learns of the refusal too
    assert answer["exit_code"] == 2 and "more than --max-delete 1" in answer["error"]
    r = run_cli("sync", str(a), str(b), "--transfers", "zero", db=db_url, check=2)
    assert "argument --transfers: not a whole number: 'zero'" in r.stderr


def test_sync_failures_exit_1_and_name_the_file(tmp_path, db_url):
    a = make_tree(tmp_path / "a", {"ok.dat": b"o", "gone.dat": b"g"})
    run_cli("index", str(a), db=db_url, check=0)
    (a / "gone.dat").unlink()
    r = run_cli("sync", str(a), str(tmp_path / "b"), "--index", "none", "--json",
                db=db_url, check=1)
    assert last_json(r.stdout)["failed"] == 1
    assert "castlib: gone.dat:" in r.stderr


def test_verify_finds_bit_rot_and_names_the_file(tmp_path, db_url):
    a = make_tree(tmp_path / "a", {"good.dat": b"good", "rot.dat": b"original"})
    run_cli("index", str(a), "--checksum", "adler32", db=db_url, check=0)
    run_cli("verify", str(a), db=db_url, check=0)
    st = os.stat(a / "rot.dat")
    with open(a / "rot.dat", "r+b") as f:      # one flipped byte, size and mtime kept
        f.write(b"O")
    os.utime(a / "rot.dat", ns=(st.st_atime_ns, st.st_mtime_ns))
    r = run_cli("verify", str(a), db=db_url, check=1)
    assert r.stdout.startswith("corrupted  rot.dat: adler32 is")
    assert "good.dat" not in r.stdout
    assert "rot.dat" not in r.stderr            # said once, on stdout
    (a / "good.dat").unlink()
    r = run_cli("verify", str(a), "--json", db=db_url, check=1)
    kinds = {p["path"]: p["kind"] for p in json_lines(r.stdout)}
    assert kinds == {"rot.dat": "corrupted", "good.dat": "missing"}


def test_verify_of_a_location_never_indexed_or_gone_is_an_error(tmp_path, db_url):
    r = run_cli("verify", str(tmp_path / "nowhere"), db=db_url, check=2)
    assert r.stderr.strip().endswith("has never been indexed: there is nothing to verify "
                                     "against (castlib index it first)")
    a = make_tree(tmp_path / "a", {"x.dat": b"x"})
    run_cli("index", str(a), db=db_url, check=0)
    (a / "x.dat").unlink()
    a.rmdir()
    r = run_cli("verify", str(a), db=db_url, check=2)
    assert "does not exist or cannot be reached" in r.stderr and "Traceback" not in r.stderr


def test_verify_without_checksums_records_a_baseline(tmp_path, db_url):
    a = make_tree(tmp_path / "a", {"x.dat": b"x"})
    run_cli("index", str(a), db=db_url, check=0)
    r = run_cli("verify", str(a), db=db_url, check=0)
    assert "1 checksummed for the first time" in r.stderr
    r = run_cli("verify", str(a), db=db_url, check=0)
    assert "1 ok" in r.stderr


def test_stages_lists_every_stage_with_parameters(db_url):
    out = run_cli("stages", db=db_url, check=0).stdout
    for name in ("index", "diff", "sync", "verify", "report"):
        assert f"\n{name} " in "\n" + out
    assert "max_delete" in out and "mtime_tolerance" in out


def test_ls_and_locations(tmp_path, db_url):
    a = make_tree(tmp_path / "a", {"run1/x.dat": b"x", "run2/y.dat": b"yy"})
    run_cli("index", str(a), "--checksum", "adler32", db=db_url, check=0)
    out = run_cli("ls", str(a), db=db_url, check=0).stdout
    assert "run1/x.dat" in out and "run2/y.dat" in out
    sub = run_cli("ls", str(a / "run2"), db=db_url, check=0).stdout
    assert "run2/y.dat" in sub and "run1" not in sub
    r = run_cli("ls", str(tmp_path / "unknown"), db=db_url, check=2)
    assert "no location in the catalog holds" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["index", "s3:/bucket"], "malformed location URL"),
    (["index", "root:///x"], "has no host"),
    (["index", "gopher://host/x"], "no back-end for URL scheme gopher://"),
    (["index", "/does/not/exist"], "does not exist"),
    (["index", ".", "--checksum", "crc32"], "checksum"),
    (["sync", "a", "b", "--index", "sometimes"], "invalid choice"),
    (["sync", "a", "b", "--transfers", "0"], "argument --transfers: must be 1 or more, not 0"),
    (["sync", "a", "b", "--max-delete", "-1"], "argument --max-delete: must be 0 or more"),
    (["sync", "a", "b", "--lock-wait", "soon"], "argument --lock-wait: not a number of seconds"),
    (["diff", "a", "b", "--mtime-tolerance", "-5"], "argument --mtime-tolerance: must be 0 or"),
    (["verify", "a", "--checksum", "crc32"], "argument --checksum: invalid choice: 'crc32'"),
    (["sync", "a", "b", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["sync", "sftp://[::1", "./q"], "malformed location URL 'sftp://[::1': an IPv6 address"),
    (["index", "sftp://u:p@ss/w@rd@host/x"], "location 'sftp://***@host/x' is ambiguous: "
                                             "percent-encode"),
    (["sync", "/etc/passwd", "./q"], f"location file://{HOST}/etc/passwd is a file, not a folder"),
    (["index", "/dev/null"], f"location file://{HOST}/dev/null is a file, not a folder"),
    (["sync", ".", "~castlib-no-such-user/x"], "location '~castlib-no-such-user/x': no user "
                                               "'castlib-no-such-user' whose home ~ could mean"),
    (["sync", ".", "new\nline"], "line' (in the pipeline, the configuration or the catalog)"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, db_url, args, message):
    r = run_cli(*args, db=db_url, check=2, cwd=str(tmp_path))
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("castlib: error: ")


def test_bad_arguments_to_the_python_api_name_the_argument(tmp_path, db_url):
    from castlib.errors import ConfigError

    with pytest.raises(ConfigError, match="^transfers: Input should be greater than") as err:
        castlib.sync(str(tmp_path / "a"), str(tmp_path / "b"), db=db_url, transfers=0)
    assert err.value.key == "transfers" and err.value.file is None


@pytest.mark.parametrize("command", ["index", "diff", "sync", "verify"])
def test_the_cli_offers_every_checksum_castlib_computes(command):
    from castlib.checksum import ALGORITHMS
    from castlib.cli import _parser

    parser = _parser()
    parser.parse_args([command, "a", "b"][:3 if command in ("diff", "sync") else 2])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    checksum = next(a for a in sub._actions if a.dest == "checksum")
    assert tuple(checksum.choices) == ALGORITHMS


def test_bad_database_url_is_one_line(tmp_path):
    r = run_cli("locations", db=str(tmp_path / "no" / "such" / "dir" / "c.sqlite"), check=2)
    assert "catalog folder does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("locations", db="postgresql://nobody@127.0.0.1:1/none", check=2)
    assert "cannot open catalog" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    r = run_cli("locations", db=str(tmp_path / "notes.txt"), check=2)
    assert r.stderr == (f"castlib: error: cannot open catalog sqlite:///{tmp_path}/notes.txt: "
                        "file is not a database\n")


def test_a_destination_that_cannot_be_created_is_named(tmp_path, db_url):
    src = make_tree(tmp_path / "src", {"a.dat": b"a"})
    r = run_cli("sync", str(src), "/proc/1/q", db=db_url, check=2)   # /proc takes no folder
    assert r.stderr.strip().splitlines()[-1] == (
        f"castlib: error: cannot create destination file://{HOST}/proc/1/q: "
        "No such file or directory"), r.stderr


@pytest.mark.parametrize("db", ["", " "])
def test_an_empty_db_is_refused_not_the_default_catalog(tmp_path, db):
    """--db "$DB" with DB unset must not index into, and sync from, the default catalog."""
    src = make_tree(tmp_path / "src", {"a.dat": b"a"})
    home = tmp_path / "home"
    r = run_cli("--db", db, "sync", str(src), str(tmp_path / "dst"), check=2, cwd=str(tmp_path),
                env={"HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "CASTLIB_DB": ""})
    assert r.stderr.startswith("castlib: error: --db is empty") and r.stderr.count("\n") == 1
    assert not (tmp_path / "dst").exists() and not (home / "data").exists()


def test_an_unsupported_catalog_database_is_named(tmp_path):
    r = run_cli("locations", db="mysql://root:pw@127.0.0.1/castlib", check=2)
    assert r.stderr == ("castlib: error: catalog 'mysql://***@127.0.0.1/castlib': only "
                        "sqlite:// and postgresql:// catalogs are supported\n")


def test_a_type_clash_names_the_kinds_that_clash(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"target.dat": b"t", "sub/x.dat": b"x"})
    os.symlink("target.dat", ref / "ln")
    dst = make_tree(tmp_path / "dst", {"ln": b"a file", "sub": b"a file too"})
    r = run_cli("sync", str(ref), str(dst), db=db_url, check=1)
    assert ("2 type conflicts, reference vs destination (1 folder vs file, 1 link vs file: "
            "--delete resolves)") in r.stderr, r.stderr


def test_an_ambiguous_password_is_neither_shown_nor_stored(tmp_path, db_url):
    r = run_cli("sync", "sftp://u:p@ss/w@rd4@127.0.0.1:1/x", str(tmp_path / "q"), db=db_url,
                check=2)
    assert "rd4" not in r.stderr and "ss/" not in r.stderr and "%40" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    from castlib.catalog import Catalog

    catalog = Catalog(db_url)
    assert all("rd4" not in loc["url"] and "ss/" not in loc["url"]
               for loc in catalog.locations())
    history = run_cli("runs", db=db_url, check=0).stdout
    assert "rd4" not in history


def test_credentials_never_reach_the_catalog_or_messages(tmp_path, db_url):
    r = run_cli("index", "sftp://alice:hunter2@127.0.0.1:1/data", db=db_url)
    assert r.returncode == 2 and "hunter2" not in r.stderr
    from castlib.catalog import Catalog

    assert all("hunter2" not in loc["url"] for loc in Catalog(db_url).locations())


def test_python_api_is_usable_from_a_notebook(tmp_path, db_url):
    import castlib

    a = make_tree(tmp_path / "a", {"x.dat": b"x"})
    report = castlib.sync(str(a), str(tmp_path / "b"), db=db_url)
    assert report.counts["copied"] == 1 and report.exit_code == 0
    report = castlib.diff(str(a), str(tmp_path / "b"), db=db_url)
    assert report.value.differences == []


def test_help_and_version():
    out = run_cli("--help", check=0).stdout
    assert "sync" in out and "Exit codes" in out
    assert run_cli("--version", check=0).stdout.startswith("castlib ")


def test_a_command_ends_without_the_final_collections_and_loses_nothing(tmp_path):
    """At exit the heap is frozen for the collector (finalization skips its full
    collections, ~0.1 s of a sync to SFTP); the run is in the catalog (committed, the
    SQLite journal folded back: closed), the summary and a log line of the end are out,
    and the exit code is the command's."""
    import sqlite3
    import subprocess
    import sys

    from tests.helpers import cli_env

    src = make_tree(tmp_path / "src", {"a.dat": b"a", "sub/b.dat": b"bb"})
    db = tmp_path / "c.sqlite"
    probe = ("import atexit, gc, logging, sys\n"
             # registered first, so run last: after castlib's own exit handler
             "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
             "atexit.register(lambda: logging.getLogger('castlib').warning('last words'))\n"
             "from castlib.cli import main\n"
             "sys.argv[0] = 'castlib'\n"
             "sys.exit(main())\n")

    def castlib(*args):
        return subprocess.run([sys.executable, "-c", probe, "--db", f"sqlite:///{db}", *args],
                              capture_output=True, text=True, env=cli_env({}))

    r = castlib("sync", str(src), str(tmp_path / "dst"), "--json")
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout.rsplit("frozen at exit", 1)[0])["copied"] == 2
    assert r.stdout.endswith("frozen at exit: True\n") and "last words" in r.stderr
    assert (tmp_path / "dst" / "sub" / "b.dat").read_bytes() == b"bb"
    assert not os.path.exists(f"{db}-wal")   # the catalog was closed, its journal folded
    assert sqlite3.connect(db).execute("SELECT command, status, finished_at IS NOT NULL "
                                       "FROM runs").fetchall() == [("sync", "ok", 1)]
    r = castlib("sync", str(src), str(tmp_path / "missing" / "x"), "--index", "none",
                "--no-such-option")
    assert r.returncode == 2 and "unrecognized arguments: --no-such-option" in r.stderr
    r = castlib("verify", str(tmp_path / "never-indexed"))
    assert r.returncode == 2 and r.stdout.endswith("frozen at exit: True\n")
    assert r.stderr.startswith("castlib: error: ") and "last words" in r.stderr
    assert sqlite3.connect(db).execute("SELECT command, status FROM runs WHERE id = 2"
                                       ).fetchall() in ([], [("verify", "error")])


def test_the_command_collects_less_often_and_the_library_as_python_does(tmp_path, db_url):
    """The command line raises the collector's first threshold (its start allocates
    objects that all live: castlib._fewer_collections), `python -m castlib` before its
    imports; castlib used as a library leaves the threshold as it was."""
    import subprocess
    import sys

    src = make_tree(tmp_path / "src", {"a": b"1"})
    probe = ("import gc, sys, castlib.api, castlib.cli\n"
             "before = gc.get_threshold()[0]\n"
             "castlib.api.sync(sys.argv[1], sys.argv[2] + '-api', db=sys.argv[3], quiet=True)\n"
             "library = gc.get_threshold()[0]\n"
             "castlib.cli.main(['--db', sys.argv[3], '-q', 'sync', sys.argv[1], sys.argv[2]])\n"
             "print(before, library, gc.get_threshold()[0])\n")
    out = subprocess.run([sys.executable, "-c", probe, str(src), str(tmp_path / "dst"), db_url],
                         capture_output=True, text=True, check=True).stdout.split()
    default, library, command = map(int, out)   # (Python's default: 700, 2000 since 3.14)
    assert default < 50_000 and library == default and command == 50_000, out
    # `python -m castlib`: the threshold raised before the CLI's imports begin (whether
    # anything collects before that depends on what is compiled already: not asserted)
    module = subprocess.run([sys.executable, "-c", "import gc, runpy, sys; sys.argv = ["
                             "'castlib', '--version']; sys.addaudithook(lambda event, args: "
                             "print('importing cli at', gc.get_threshold()[0]) if event == "
                             "'import' and args[0] == 'castlib.cli' else None); "
                             "runpy.run_module('castlib', run_name='__main__')"],
                            capture_output=True, text=True)
    assert "importing cli at 50000" in module.stdout and module.returncode == 0, module.stdout


def test_a_bare_word_that_names_no_location_and_no_folder_is_refused(tmp_path, db_url):
    """`castlib sync /data/cdr archiv` (a location name mistyped): refused with one line,
    nothing copied, no ./archiv made; ./archiv makes the folder, a bare word that is a
    folder here or a configured location's name is taken as such."""
    make_tree(tmp_path / "src", {"a.dat": b"a"})
    config = tmp_path / "castlib.yaml"
    config.write_text(f"locations:\n  archive: {tmp_path / 'the-archive'}\n")
    env = {"CASTLIB_CONFIG": str(config)}
    r = run_cli("sync", "src", "archiv", db=db_url, cwd=str(tmp_path), env=env, check=2)
    assert r.stderr == ("castlib: error: no location named 'archiv' (in the pipeline, the "
                        "configuration or the catalog) and no folder of that name here (a new "
                        "local folder is written './archiv')\n")
    assert not (tmp_path / "archiv").exists()
    run_cli("sync", "src", "archive", db=db_url, cwd=str(tmp_path), env=env, check=0)
    assert (tmp_path / "the-archive" / "a.dat").read_bytes() == b"a"
    run_cli("sync", "src", "./archiv", db=db_url, cwd=str(tmp_path), env=env, check=0)
    assert (tmp_path / "archiv" / "a.dat").read_bytes() == b"a"
    (tmp_path / "src" / "b.dat").write_bytes(b"b")
    run_cli("sync", "src", "archiv", db=db_url, cwd=str(tmp_path), env=env, check=0)
    assert (tmp_path / "archiv" / "b.dat").read_bytes() == b"b"
