"""`castlib runs cancel ID` on runs that are not a worker's: a run of the command line
stops as a signal stops it and is recorded `cancelled`; a run that ended, or that no
catalog knows, is one line and exit 2, nothing changed."""
import subprocess
import time

import pytest

from castlib.catalog import Catalog
from castlib.catalog.locks import location_lock
from tests.helpers import castlib_command, cli_env, last_json, make_tree, run_cli


def _running_run(catalog: Catalog, proc, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = catalog.runs(1, status="running")
        if rows:
            return rows[0]["id"]
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)


def test_cancel_stops_a_run_of_the_command_line(tmp_path, db_url):
    """The sync waits for its destination's lock (held here): alive, beating, stopped
    nowhere else. The cancel must stop it, not leave it to copy once the lock is free."""
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a" * 1000, "b.dat": b"b"})
    dst = tmp_path / "dst"
    catalog = Catalog(db_url)
    loc = catalog.location(str(dst))
    with location_lock(catalog, loc.id, loc.url):
        proc = subprocess.Popen(castlib_command("sync", str(ref), str(dst), "--lock-wait",
                                                "120", "--json", db=db_url),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=cli_env())
        try:
            run_id = _running_run(catalog, proc)
            r = run_cli("runs", "cancel", str(run_id), db=db_url, check=0)
            assert f"run {run_id} on " in r.stderr and "asked to stop" in r.stderr, r.stderr
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"castlib: cancelled by castlib runs cancel (castlib runs show {run_id})"), err
    assert last_json(out) == {"interrupted": "SIGTERM", "cancelled": True, "exit_code": 143}
    run, _ = catalog.run_details(run_id)
    assert (run["status"], run["error"]) == ("cancelled", "cancelled by castlib runs cancel")
    assert not dst.exists() or not any(dst.iterdir())
    # cancelled once: a second cancel says it has ended, and changes nothing
    r = run_cli("runs", "cancel", str(run_id), db=db_url, check=2)
    assert r.stderr.strip() == f"castlib: error: run {run_id} has ended already (cancelled)"
    catalog.close()


@pytest.mark.parametrize("argv, words", [
    (["runs", "cancel", "999999"], "no run with id 999999"),
    (["runs", "cancel"], "runs cancel needs a run id"),
    (["runs", "cancel", "1; DROP TABLE runs"], "invalid int value"),
    (["runs", "cancel", "../../etc/passwd"], "invalid int value"),
])
def test_cancel_of_no_run_is_one_line(tmp_path, db_url, argv, words):
    make_tree(tmp_path / "t", {"a": b"a"})
    run_cli("index", str(tmp_path / "t"), db=db_url, check=0)
    r = run_cli(*argv, db=db_url, check=2)
    lines = r.stderr.strip().splitlines()
    assert words in lines[-1] and "Traceback" not in r.stderr, r.stderr
    with Catalog(db_url) as catalog:
        assert [x["status"] for x in catalog.runs(5)] == ["ok"]


def test_cancel_of_a_finished_run_changes_nothing(tmp_path, db_url):
    make_tree(tmp_path / "t", {"a": b"a"})
    run_cli("index", str(tmp_path / "t"), db=db_url, check=0)
    with Catalog(db_url) as catalog:
        run_id = catalog.runs(1)[0]["id"]
    r = run_cli("runs", "cancel", str(run_id), db=db_url, check=2)
    assert r.stderr.strip() == f"castlib: error: run {run_id} has ended already (ok)"
    with Catalog(db_url) as catalog:
        run, _ = catalog.run_details(run_id)
    assert run["status"] == "ok" and not run["cancel_requested"]
