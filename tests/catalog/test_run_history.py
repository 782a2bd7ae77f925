"""Run history: every sync is recorded with its stages, counts, bytes, errors and duration."""
from castlib.catalog import Catalog
from tests.helpers import make_tree, run_cli


def _last_run(db_url):
    catalog = Catalog(db_url)
    try:
        run = catalog.runs(1)[0]
        return catalog.run_details(run["id"])
    finally:
        catalog.close()


def test_a_sync_run_is_recorded_with_its_stages_counts_and_duration(tmp_path, db_url):
    src = make_tree(tmp_path / "src", {"a.dat": b"aaaa", "d/b.dat": b"bbbbbb"})
    dst = tmp_path / "dst"
    run_cli("sync", str(src), str(dst), db=db_url, check=0)

    run, stages = _last_run(db_url)
    assert run["command"] == "sync" and run["status"] == "ok" and run["error"] is None
    assert run["args"]["ref"] == str(src) and run["args"]["dst"] == str(dst)
    assert run["finished_at"] >= run["started_at"]
    assert [(s["stage"], s["status"]) for s in stages] == [
        ("index", "ok"), ("index", "ok"), ("diff", "ok"), ("sync", "ok")]
    assert stages[0]["counts"]["files"] == 2 and stages[0]["counts"]["bytes"] == 10
    assert stages[2]["counts"]["missing"] == 3            # two files and a folder
    sync = stages[3]
    assert sync["counts"]["copied"] == 2 and sync["counts"]["bytes"] == 10
    assert sync["counts"]["failed"] == 0 and sync["errors"] == []
    assert sync["finished_at"] >= sync["started_at"]

    listing = run_cli("runs", db=db_url, check=0).stdout
    assert f"{run['id']:>5}" in listing and "sync" in listing and "ok" in listing
    shown = run_cli("runs", "show", str(run["id"]), db=db_url, check=0).stdout
    assert "stage 4 sync: ok" in shown and '"copied": 2' in shown


def test_a_failed_copy_is_recorded_with_its_error(tmp_path, db_url):
    src = make_tree(tmp_path / "src", {"a.dat": b"a", "b.dat": b"b"})
    run_cli("index", str(src), db=db_url, check=0)
    (src / "b.dat").unlink()          # the catalog still lists it: its copy must fail
    run_cli("sync", str(src), str(tmp_path / "dst"), "--index", "none", db=db_url, check=1)

    run, stages = _last_run(db_url)
    assert run["status"] == "failed"
    sync = stages[-1]
    assert sync["stage"] == "sync" and sync["status"] == "failed"
    assert sync["counts"]["copied"] == 1 and sync["counts"]["failed"] == 1
    assert len(sync["errors"]) == 1 and "b.dat" in sync["errors"][0]
    shown = run_cli("runs", "show", str(run["id"]), db=db_url, check=0).stdout
    assert "b.dat" in shown


def test_a_refused_sync_is_recorded_with_the_reason(tmp_path, db_url):
    src = make_tree(tmp_path / "src", {"a.dat": b"a"})
    dst = make_tree(tmp_path / "dst", {"a.dat": b"a", "extra.dat": b"x"})
    run_cli("sync", str(src), str(dst), "--delete", "--max-delete", "0", db=db_url, check=2)
    run, _stages = _last_run(db_url)
    assert run["status"] == "error" and "--max-delete" in run["error"]
    assert (dst / "extra.dat").exists()


def test_a_run_killed_midway_is_marked_died_and_the_list_shows_totals(tmp_path, db_url):
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO_ROOT, cli_env

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from castlib.catalog import Catalog; "
         "print(Catalog(sys.argv[1]).start_run('sync'), flush=True); time.sleep(600)", db_url],
        env=cli_env(), stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    killed_id = int(holder.stdout.readline())
    holder.send_signal(signal.SIGKILL)
    holder.wait()

    src = make_tree(tmp_path / "src", {"a.dat": b"aaaa", "b.dat": b"bb"})
    time.sleep(1.2)   # silent longer than the grace a run of this host's name gets (1 s here)
    run_cli("sync", str(src), str(tmp_path / "dst"), db=db_url, check=0,
            env={"CASTLIB_HEARTBEAT_LIMIT": "1"})
    lines = run_cli("runs", db=db_url, check=0).stdout.splitlines()
    assert lines[0].split()[3:5] == ["sync", "ok"]
    assert lines[0].endswith("2 copied, 0 replaced, 0 deleted, 0 failed, 6 B")
    assert f"{killed_id:>5}" in lines[1] and " died " in lines[1]
    assert "the process ended without finishing the run" in lines[1]


def test_a_run_of_this_hosts_name_whose_pid_is_not_here_is_not_died_while_it_beats(
        tmp_path, db_url):
    """Two machines with one name (cloned, a configuration's `hostname:` copied), or a
    container of the host's name in a PID namespace of its own: the other's run has a
    pid this machine does not have. While it beats, a command here does not mark it died
    (it was, at once: its waiting client failed, its hand-over to the next host too); once
    silent a few beats, it is."""
    import subprocess
    import sys
    import time

    from tests.helpers import REPO_ROOT, cli_env

    other = subprocess.run(
        [sys.executable, "-c", "import sys; from castlib.catalog import Catalog; "
         "c = Catalog(sys.argv[1]); r = c.start_run('sync'); c.heartbeat(r, None); "
         "c.close(); print(r)", db_url],   # its process ends; its run says nothing more
        env=cli_env(), capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    other_id = int(other.stdout)

    def status() -> str:
        catalog = Catalog(db_url)
        try:
            return catalog.run_details(other_id)[0]["status"]
        finally:
            catalog.close()

    src = make_tree(tmp_path / "src", {"a.dat": b"aaaa"})
    run_cli("sync", str(src), str(tmp_path / "dst"), db=db_url, check=0)
    assert status() == "running"
    time.sleep(1.2)
    run_cli("sync", str(src), str(tmp_path / "dst"), db=db_url, check=0,
            env={"CASTLIB_HEARTBEAT_LIMIT": "1"})   # (the grace: the smaller of 10 s and it)
    assert status() == "died"


def test_the_default_catalog_dies_a_run_of_this_host_silent_beyond_the_limit(tmp_path):
    """The SQLite catalog (the default) marks a run of this host died once its beats are
    older than the limit even if a process has its pid: after a machine stopped, its pid
    may be another process's by the time a command looks (it always did; kept when the
    grace for a gone pid came)."""
    import sqlite3
    import subprocess
    import sys
    from datetime import timedelta

    from castlib.catalog.lite import stamp
    from castlib.catalog.records import utcnow
    from tests.helpers import REPO_ROOT, cli_env

    db = tmp_path / "catalog.sqlite"
    holder = subprocess.Popen(   # alive all along: its pid exists
        [sys.executable, "-c", "import sys, time; from castlib.catalog import Catalog; "
         "print(Catalog(sys.argv[1]).start_run('sync'), flush=True); time.sleep(600)",
         f"sqlite:///{db}"], env=cli_env(), stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        run_id = int(holder.stdout.readline())
        with sqlite3.connect(db) as conn:   # its last beat, long ago
            conn.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ?",
                         (stamp(utcnow() - timedelta(hours=1)), run_id))
        src = make_tree(tmp_path / "src", {"a.dat": b"a"})
        run_cli("sync", str(src), str(tmp_path / "dst"), db=f"sqlite:///{db}", check=0)
        catalog = Catalog(f"sqlite:///{db}")
        try:
            assert catalog.run_details(run_id)[0]["status"] == "died"
        finally:
            catalog.close()
    finally:
        holder.kill()
        holder.wait()


def test_a_run_whose_pid_a_later_process_has_is_marked_died(tmp_path, db_url):
    """A run of this host whose process was killed a minute ago, its pid now another
    process's (after a reboot, or pids wrapping round): that process started after the
    run's last beat, so is not the run's. Before, a live pid kept the run 'running' on
    PostgreSQL for good (the SQLite catalog waited out the heartbeat limit)."""
    import subprocess
    from datetime import timedelta

    from castlib.catalog.records import utcnow
    from castlib.catalog.schema import Run

    catalog = Catalog(db_url)
    later = subprocess.Popen(["sleep", "60"])   # started now: after the run's last beat
    try:
        run_id = catalog.start_run("sync")
        ours = catalog.start_run("sync")   # a live run of this process: it stays running
        minute_ago = utcnow() - timedelta(minutes=1)
        with catalog.engine.begin() as conn:
            conn.execute(Run.__table__.update().where(Run.__table__.c.id == run_id).values(
                pid=later.pid, started_at=minute_ago, heartbeat_at=minute_ago))
        catalog.mark_dead_runs()
        assert catalog.run_details(run_id)[0]["status"] == "died"
        assert catalog.run_details(ours)[0]["status"] == "running"
    finally:
        later.kill()
        later.wait()
        catalog.close()


def test_a_process_that_seems_to_start_in_the_future_is_not_taken_for_another(monkeypatch):
    """A boot time that puts a live process's start after now (a /proc/stat whose btime
    a container's lxcfs virtualised while the processes' start times were not: lxcfs
    2.0.x did, and processes all seemed to start days ahead) says nothing of pid reuse:
    a live run silent a while (stopped with Ctrl-Z) is not marked died for it."""
    import os
    from datetime import timedelta

    from castlib.catalog import records

    now = records.utcnow()
    monkeypatch.setattr(records, "_process_started_at", lambda pid: now + timedelta(days=4))
    assert not records.run_seems_dead("here", os.getpid(), now - timedelta(minutes=5),
                                      now - timedelta(hours=1), "here", now)
