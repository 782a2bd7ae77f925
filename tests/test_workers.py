"""Several hosts on one machine: a real Redis, a real PostgreSQL catalog, `castlib worker`
processes playing daq01, daq02 and daq03 (CASTLIB_HOSTNAME), a client playing a fourth
machine, and a real XRootD server as the archive. Each stage must run on the worker of the
host that holds its data; the catalog's run record is the truth about every run."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from castlib.catalog import Catalog
from tests.helpers import (castlib_command, cli_env, last_json, make_tree, run_cli,
                           tree_digest)
from tests.servers.postgres import fresh_database
from tests.servers.redis import Worker, worker_env

MIB = 1024 * 1024
TEMP = ".castlib-part-"

# worker start-ups and real copies on a shared machine: more than the suite's 300 s default
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_each_stage_runs_on_the_host_of_its_data(cluster, tmp_path, xrootd_folder):
    """A pipeline typed on a fourth machine: daq01's and daq02's disks indexed each by its
    own worker, then daq01's disk synced into a real XRootD server by daq01's worker; the
    client shows the summaries and the progress fed from the catalog."""
    a = make_tree(tmp_path / "daq01-disk", {f"run{i}.dat": os.urandom(2 * MIB + i)
                                           for i in range(12)} | {"sub/x.txt": b"x"})
    b = make_tree(tmp_path / "daq02-disk", {"other.dat": b"on daq02"})
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"""
workers: true
locations:
  cdr: file://daq01{a}
  spare: file://daq02{b}
  archive: {xrootd_folder.url}/cdr
stages:
  - index: {{location: cdr}}
  - index: {{location: spare}}
  - index: {{location: archive, missing_ok: true}}
  - diff: {{id: plan, ref: cdr, dst: archive}}
  - sync: {{from: plan, transfers: 1}}
""")
    r = cluster.cli("-v", "run", str(pipeline), check=0)
    assert "Traceback" not in r.stderr
    assert "run " in r.stderr and "running on daq01" in r.stderr and "running on daq02" in r.stderr
    assert f"indexed cdr" in r.stderr or "indexed file://daq01" in r.stderr, r.stderr
    assert "synced" in r.stderr and "13 copied" in r.stderr, r.stderr
    assert tree_digest(xrootd_folder.path / "cdr") == tree_digest(a)

    run, stages = cluster.run(cluster.last_run_id())
    assert run["status"] == "ok" and run["hostname"] == "daq01"
    assert [(s["stage"], s["hostname"]) for s in stages] == [
        ("index", "daq01"), ("index", "daq02"), ("index", "daq01"), ("diff", "daq01"),
        ("sync", "daq01")]
    listed = cluster.cli("runs", check=0).stdout.splitlines()[0]
    assert " ok " in listed and "daq01" in listed

    # a command with --on-workers: the bare path typed on the client is the client's, so
    # daq01's disk is named by its host; progress comes as log lines with -v (no tty)
    big = make_tree(tmp_path / "daq01-big", {f"f{i:02d}.dat": os.urandom(6 * MIB)
                                             for i in range(30)})
    r = cluster.cli("-v", "sync", "--on-workers", f"file://daq01{big}",
                    f"{xrootd_folder.url}/big", "--transfers", "1", "--json", check=0)
    counts = last_json(r.stdout)
    assert (counts["copied"], counts["failed"]) == (30, 0), r.stderr
    assert "castlib: sync: " in r.stderr and "/30 files" in r.stderr, r.stderr
    assert tree_digest(xrootd_folder.path / "big") == tree_digest(big)
    # diff and verify on the workers: their summary and exit code, as at home
    r = cluster.cli("diff", "--on-workers", f"file://daq01{big}", f"{xrootd_folder.url}/big",
                    check=0)
    assert "identical" in r.stderr, r.stderr
    (big / "f00.dat").write_bytes(b"changed")
    r = cluster.cli("diff", "--on-workers", f"file://daq01{big}", f"{xrootd_folder.url}/big",
                    check=1)
    assert "1 differences (1 size)" in r.stderr, r.stderr
    r = cluster.cli("verify", "--on-workers", f"file://daq02{b}", check=0)
    assert cluster.run(cluster.last_run_id())[1][0]["hostname"] == "daq02"


def test_a_worker_killed_mid_sync_leaves_a_died_run_and_a_rerun_finishes(
        cluster, tmp_path):
    daq03 = cluster.worker("daq03").start()
    try:
        ref = tmp_path / "ref"
        ref.mkdir()
        for i in range(4):
            with open(ref / f"run{i}.dat", "wb") as f:
                for _ in range(48):
                    f.write(os.urandom(MIB))
        dst = tmp_path / "dst"
        args = ["sync", "--on-workers", f"file://daq03{ref}", f"file://daq03{dst}",
                "--transfers", "1", "--json"]
        client = subprocess.Popen(castlib_command(*args), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=cli_env(cluster.client_env()))
        deadline = time.monotonic() + 120
        while not (dst.is_dir() and any(TEMP in n for n in os.listdir(dst))):
            assert client.poll() is None, client.communicate()
            assert time.monotonic() < deadline, "no copy started"
            time.sleep(0.001)
        daq03.kill()
        out, err = client.communicate(timeout=120)
        assert client.returncode == 2, err
        lines = err.strip().splitlines()
        assert "died on daq03" in lines[-1] and "Traceback" not in err, err
        run, _ = cluster.run(cluster.last_run_id())
        assert run["status"] == "died"
        # nothing under a final name is partial
        for name in os.listdir(dst):
            if TEMP not in name:
                assert (dst / name).read_bytes() == (ref / name).read_bytes()

        daq03 = cluster.worker("daq03").start()
        r = cluster.cli(*args, check=0)
        counts = last_json(r.stdout)
        assert counts["failed"] == 0 and counts["temp_removed"] >= 1, counts
        assert tree_digest(dst) == tree_digest(ref)
        assert not any(TEMP in n for n in os.listdir(dst))
    finally:
        daq03.stop()


def test_cancel_stops_the_worker_cleanly(cluster, tmp_path):
    # enough bytes that the run is still copying when the cancel arrives: copies got
    # fast (a 4 MiB file takes ~10 ms), and the cancel is a new castlib process away
    block = os.urandom(4 * MIB)
    ref = make_tree(tmp_path / "ref", {f"f{i:03d}.dat": i.to_bytes(4, "big") + block
                                       for i in range(200)})
    dst = tmp_path / "dst"
    r = cluster.cli("sync", "--on-workers", "--detach", f"file://daq02{ref}",
                    f"file://daq02{dst}", "--transfers", "1", check=0)
    run_id = int(r.stdout.strip())
    deadline = time.monotonic() + 120
    while not (dst.is_dir() and len([n for n in os.listdir(dst) if TEMP not in n]) >= 2):
        assert time.monotonic() < deadline, cluster.run(run_id)
        time.sleep(0.01)
    r = cluster.cli("runs", "cancel", str(run_id), check=0)
    assert f"run {run_id} on daq02: asked to stop" in r.stderr
    deadline = time.monotonic() + 60
    while cluster.run(run_id)[0]["status"] == "running":
        assert time.monotonic() < deadline, "the run did not stop"
        time.sleep(0.2)
    run, stages = cluster.run(run_id)
    assert run["status"] == "cancelled", run
    published = [n for n in os.listdir(dst) if TEMP not in n]
    assert 2 <= len(published) < 200
    assert not any(TEMP in n for n in os.listdir(dst)), "a temporary was left behind"
    for name in published:
        assert (dst / name).read_bytes() == (ref / name).read_bytes()
    assert stages[-1]["stage"] == "sync" and stages[-1]["status"] == "interrupted"
    assert stages[-1]["counts"]["copied"] == len(published)
    listed = cluster.cli("runs", check=0).stdout
    assert any(l.split()[0] == str(run_id) and "cancelled" in l and "daq02" in l
               for l in listed.splitlines())
    # the worker lives on and takes the next run
    r = cluster.cli("index", "--on-workers", f"file://daq02{ref}", check=0)
    assert cluster.run(cluster.last_run_id())[0]["status"] == "ok"


def test_a_worker_refuses_an_sqlite_catalog(tmp_path, redis_url):
    r = run_cli("worker", db=f"sqlite:///{tmp_path}/c.sqlite",
                env={"CASTLIB_BROKER": redis_url}, check=2, timeout=60)
    assert r.stderr.strip() == ("castlib: error: workers need a shared catalog: give --db "
                                "postgresql://... (an SQLite catalog is a file on one machine)")


def test_a_missing_broker_is_one_line(tmp_path, postgres_url):
    from tests.servers.common import free_port

    db = fresh_database(postgres_url)
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    r = run_cli("worker", "--broker", nobody, db=db, check=2, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"castlib: error: cannot reach the broker {nobody}: "), r.stderr
    src = make_tree(tmp_path / "src", {"a": b"a"})
    r = run_cli("index", "--on-workers", "--broker", nobody, str(src), db=db, check=2,
                timeout=60)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the broker" in lines[0], r.stderr
    # on an SQLite catalog nothing is sent: the workers could not read it
    r = run_cli("index", "--on-workers", str(src), db=f"sqlite:///{tmp_path}/c.sqlite",
                check=2, timeout=60)
    assert "needs a catalog the workers share" in r.stderr and "Traceback" not in r.stderr


def test_the_destination_lock_holds_across_hosts(cluster, tmp_path, xrootd_folder):
    """A sync into the archive held by another machine (here: this test's process, as the
    host `client`, through the shared catalog's advisory lock) is refused on daq01's worker;
    once released the same command goes through."""
    from castlib.catalog.locks import location_lock

    src = make_tree(tmp_path / "src", {"a.dat": b"a" * 1000})
    dst = f"{xrootd_folder.url}/locked"
    args = ("sync", "--on-workers", f"file://daq01{src}", dst, "--json")
    with Catalog(cluster.db) as catalog:
        record = catalog.location(dst)
        with location_lock(catalog, record.id, record.url):
            r = cluster.cli(*args, check=2)
    assert "another run is syncing into" in r.stderr.strip().splitlines()[-1], r.stderr
    assert "(run " in r.stderr and "on daq01)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (xrootd_folder.path / "locked" / "a.dat").exists()
    counts = last_json(cluster.cli(*args, check=0).stdout)
    assert counts["copied"] == 1


def test_a_broker_restart_loses_no_finished_result(postgres_url, tmp_path):
    """The broker only carries the order: a run done is in the catalog; after the broker
    restarted (empty: nothing saved), the worker reconnects and takes the next run."""
    from tests.servers.common import free_port
    from tests.servers.redis import redis_server

    db = fresh_database(postgres_url)
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    env = worker_env("client", db, broker)
    src = make_tree(tmp_path / "src", {"a.dat": b"a", "b.dat": b"b"})
    with redis_server(port):
        daq04 = Worker("daq04", worker_env("daq04", db, broker), tmp_path / "w.log").start()
        try:
            r = run_cli("sync", "--on-workers", f"file://daq04{src}",
                        f"file://daq04{tmp_path}/dst1", "--json", env=env, check=0)
            first = int(r.stderr.split("castlib: run ")[1].split()[0])
        except BaseException:
            daq04.stop()
            raise
    try:
        with redis_server(port):   # the same address, nothing of the old one kept
            with Catalog(db) as catalog:
                assert catalog.run_details(first)[0]["status"] == "ok"
            r = run_cli("sync", "--on-workers", f"file://daq04{src}",
                        f"file://daq04{tmp_path}/dst2", "--json", env=env, check=0,
                        timeout=180)
            assert last_json(r.stdout)["copied"] == 2, daq04.log
            assert tree_digest(tmp_path / "dst2") == tree_digest(src)
            assert daq04.proc.poll() is None
    finally:
        daq04.stop()


# -- what the broker carries -------------------------------------------------------------
URL_SECRET = "alice-pw-9d41f"
OPTION_SECRET = "opt-s3cret-77ab"


def _park_a_run(cluster, tmp_path) -> tuple[int, dict]:
    """A run with credentials (in its URL and in its back-end options) queued for a queue
    no worker consumes (`nobody`): its message stays in Redis to be looked at. The run's
    id, and the client's environment."""
    config = tmp_path / "config.yaml"
    config.write_text('queues:\n  "sftp://127.0.0.1:1": nobody\n')
    env = cluster.client_env(CASTLIB_CONFIG=str(config))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"""
workers: true
locations:
  arch: {{url: "sftp://alice:{URL_SECRET}@127.0.0.1:1/data",
          options: {{password: "{OPTION_SECRET}"}}}}
stages:
  - index: {{location: arch}}
""")
    r = run_cli("run", "--on-workers", "--detach", str(pipeline), env=env, check=0)
    return int(r.stdout.strip()), env


def _queued_bodies(broker: str, queue: str) -> list[tuple[dict, bytes]]:
    """The messages waiting in a Redis queue: (the kombu envelope, its decoded body)."""
    import base64
    import json

    import redis

    out = []
    for raw in redis.Redis.from_url(broker).lrange(queue, 0, -1):
        envelope = json.loads(raw)
        body = envelope["body"].encode()
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        out.append((envelope, body))
    return out


def _drop_queue(cluster, queue: str, run_id: int, env: dict) -> None:
    import redis

    run_cli("runs", "cancel", str(run_id), env=env, check=None)   # cleaning up only
    redis.Redis.from_url(cluster.broker).delete(queue)


def test_a_task_message_carries_no_credentials(cluster, tmp_path):
    """Whoever reads the broker (an open Redis, `celery inspect`, a monitor showing task
    arguments) must not find the password of a URL or of a back-end option."""
    run_id, env = _park_a_run(cluster, tmp_path)
    try:
        messages = _queued_bodies(cluster.broker, "nobody")
        assert len(messages) == 1
        envelope, body = messages[0]
        import json

        seen = body + json.dumps(envelope).encode()
        assert b"run_segment" in seen   # the message looked at is castlib's
        for secret in (URL_SECRET, OPTION_SECRET):
            assert secret.encode() not in seen
        run, _ = cluster.run(run_id)
        assert URL_SECRET not in json.dumps(run["args"]) + (run["pipeline"] or "")
        assert OPTION_SECRET not in json.dumps(run["args"]) + (run["pipeline"] or "")
    finally:
        _drop_queue(cluster, "nobody", run_id, env)


def test_a_forged_or_altered_task_is_refused(cluster, tmp_path):
    """A writer of the broker who knows a queued run's id sends daq01's worker orders of
    their own under it (here an index of another folder; a sync --delete as well): the
    worker refuses them, the run stays as it was, nothing is read or written."""
    import json

    from castlib.worker import TASK_NAME, make_app

    victim = make_tree(tmp_path / "victim", {"keep.dat": b"keep"})
    run_id, env = _park_a_run(cluster, tmp_path)
    try:
        forged = {"run_id": run_id, "command": "run",
                  "stages": [["index", {"location": f"file://daq01{victim}"}]],
                  "locations": {}, "location_options": {}, "positions": [0], "last": True,
                  "next_queue": None, "dry_run": False, "force": False}
        (envelope, body), = _queued_bodies(cluster.broker, "nobody")
        real = json.loads(body)[0][0]
        altered = dict(real)
        if "sealed" in altered:   # the true orders with one character changed
            s = altered["sealed"]
            altered["sealed"] = s[:40] + ("A" if s[40] != "A" else "B") + s[41:]
        daq01 = cluster.workers["daq01"]
        app = make_app(cluster.broker)
        for orders in (forged, altered):
            before = daq01.log.count(f"run {run_id}: ")
            app.send_task(TASK_NAME, args=(orders,), queue="daq01")
            deadline = time.monotonic() + 90
            while (daq01.log.count(f"run {run_id}: ") == before
                   and cluster.run(run_id)[0]["status"] == "queued"):
                assert time.monotonic() < deadline, daq01.log[-3000:]
                time.sleep(0.2)
            run, stages = cluster.run(run_id)
            assert run["status"] == "queued" and stages == [], (run, stages)
            assert "refused" in daq01.log.split(f"run {run_id}: ")[-1].splitlines()[0]
        with Catalog(cluster.db) as catalog:
            assert catalog.find_location(f"file://daq01{victim}") is None
    finally:
        _drop_queue(cluster, "nobody", run_id, env)


BROKER_SECRET = "topsecret"


def test_a_broker_password_is_never_shown(postgres_url, tmp_path):
    """A password holding a raw '/', '?' or '#' cannot be told from the host and path:
    refused in one line that shows none of it (the broker library's error quoted a piece
    of it: "Port could not be cast to integer value as 'topsecret'"); an '@' in it works,
    and is shown nowhere either."""
    from tests.servers.common import free_port
    from tests.servers.redis import redis_server

    db = fresh_database(postgres_url)
    src = make_tree(tmp_path / "src", {"a.dat": b"a"})
    port = free_port()
    for broker in (f"redis://:{BROKER_SECRET}/x@127.0.0.1:{port}/0",
                   f"redis://:12/{BROKER_SECRET}@127.0.0.1:{port}/0",
                   f"redis://:p@{BROKER_SECRET}#x@127.0.0.1:{port}/0",
                   f"redis://u:{BROKER_SECRET}?x@127.0.0.1:{port}/0"):
        for argv in (["worker", "--broker", broker],
                     ["index", "--on-workers", "--broker", broker, str(src)],
                     ["web", "--broker", broker, "--port", str(free_port())]):
            r = run_cli(*argv, db=db, check=2, timeout=60)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "the broker URL is ambiguous" in lines[0], (argv,
                                                                                r.stderr)
            assert BROKER_SECRET not in r.stderr + r.stdout, (argv, r.stderr)
        r = run_cli("index", "--on-workers", str(src), db=db, check=2, timeout=60,
                    env={"CASTLIB_BROKER": broker})
        assert BROKER_SECRET not in r.stderr and "ambiguous" in r.stderr, r.stderr

    password = f"p@{BROKER_SECRET}:w@x"   # the last '@' ends it
    with redis_server(port, password=password):
        broker = f"redis://:{password}@127.0.0.1:{port}/0"
        daq05 = Worker("daq05", worker_env("daq05", db, broker), tmp_path / "w.log").start()
        try:
            r = run_cli("-v", "index", "--on-workers", f"file://daq05{src}", env=worker_env(
                "client", db, broker), check=0, timeout=180)
            assert "running on daq05" in r.stderr, r.stderr
            assert BROKER_SECRET not in r.stderr + r.stdout
        finally:
            daq05.stop()
        assert "ready." in daq05.log and BROKER_SECRET not in daq05.log, daq05.log
        # a wrong password: one line, none of either password
        wrong = f"redis://:x@{BROKER_SECRET}@127.0.0.1:{port}/0"
        r = run_cli("worker", "--broker", wrong, db=db, check=2, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot reach the broker redis://***@127.0.0.1" in lines[0]
        assert BROKER_SECRET not in r.stderr, r.stderr


def test_one_task_delivered_to_two_workers_at_once_runs_once(cluster, tmp_path):
    """The broker redelivers (a visibility timeout, a replay): the same sealed task reaches
    daq01's and daq02's workers at once. The catalog's claim lets one of them run it."""
    import json

    from castlib.worker import TASK_NAME, make_app

    run_id, env = _park_a_run(cluster, tmp_path)
    try:
        (_, body), = _queued_bodies(cluster.broker, "nobody")
        orders = json.loads(body)[0][0]
        logs = {name: cluster.workers[name].log.count(f"run {run_id}: ")
                for name in ("daq01", "daq02")}
        app = make_app(cluster.broker)
        for name in ("daq01", "daq02"):
            app.send_task(TASK_NAME, args=(orders,), queue=name)
        deadline = time.monotonic() + 120
        while not all(cluster.workers[n].log.count(f"run {run_id}: ") > logs[n]
                      for n in logs):
            assert time.monotonic() < deadline, {n: cluster.workers[n].log[-2000:]
                                                 for n in logs}
            time.sleep(0.2)
        said = [cluster.workers[n].log.split(f"run {run_id}: ", 1 + logs[n])[-1]
                .splitlines()[0] for n in logs]
        assert sorted("not mine to run" in s for s in said) == [False, True], said
        deadline = time.monotonic() + 120
        while cluster.run(run_id)[0]["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        run, stages = cluster.run(run_id)
        assert len(stages) == 1 and stages[0]["stage"] == "index", stages
    finally:
        _drop_queue(cluster, "nobody", run_id, env)


def test_a_worker_refuses_the_queue_of_another_host(cluster, tmp_path):
    """A service file copied from daq01 to daq03 with its `--queue daq01`: daq03's worker
    would take the stages of daq01's disks, fail them ("is on daq01"), and daq01's worker
    would miss them. Refused at start, in one line."""
    src = make_tree(tmp_path / "src", {"a.dat": b"a"})
    cluster.cli("index", "--on-workers", f"file://daq01{src}", check=0)
    env = worker_env("daq03", cluster.db, cluster.broker)
    r = run_cli("worker", "--queue", "eos", "--queue", "daq01", env=env, check=2, timeout=60)
    assert r.stderr.strip().splitlines() == [
        "castlib: error: --queue daq01: that is the queue of host daq01's worker (the "
        "catalog has local locations of daq01); this host is daq03, which cannot read "
        "daq01's disks"], r.stderr


def test_orders_a_worker_cannot_build_end_the_run_in_error(cluster, tmp_path):
    """A client newer than the worker (a stage, or a parameter, this worker does not
    know): the run it claimed must end 'error' with the reason, not stay 'running' on a
    live worker process for ever (its host never finds it dead: the pid lives)."""
    import json

    from castlib.catalog.settings import message_key
    from castlib.worker import TASK_NAME, make_app, seal

    run_id, env = _park_a_run(cluster, tmp_path)
    try:
        orders = {"run_id": run_id, "command": "run",
                  "stages": [["index", {"location": f"file://daq01{tmp_path}",
                                        "from_the_future": 1}]],
                  "locations": {}, "location_options": {}, "positions": [0], "last": True,
                  "next_queue": None, "dry_run": False, "force": False}
        with Catalog(cluster.db) as catalog:
            sealed = seal(message_key(catalog), orders)
        make_app(cluster.broker).send_task(TASK_NAME, args=({"run_id": run_id,
                                                             "sealed": sealed},),
                                           queue="daq01")
        deadline = time.monotonic() + 30
        while cluster.run(run_id)[0]["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, (cluster.run(run_id)[0],
                                                 cluster.workers["daq01"].log[-3000:])
            time.sleep(0.2)
        run, _ = cluster.run(run_id)
        assert run["status"] == "error" and "from_the_future" in run["error"], run
        assert run["error"].startswith("daq01 cannot run this run's stages: "), run
        assert "Traceback" not in cluster.workers["daq01"].log.split(f"run {run_id}: ")[-1]
    finally:
        _drop_queue(cluster, "nobody", run_id, env)
