"""One sync per destination at a time: the second refuses at once, or waits with --lock-wait."""
import os
import signal
import subprocess
import threading
import time

from castlib.catalog import Catalog
from castlib.catalog.locks import location_lock
from castlib.transfer import TEMP_MARK
from tests.helpers import castlib_command, cli_env, make_tree, run_cli


def test_second_sync_refuses_before_doing_anything_then_waits_when_asked(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a"})
    dst = tmp_path / "dst"
    catalog = Catalog(db_url)
    loc = catalog.location(str(dst))
    with location_lock(catalog, loc.id, loc.url):
        r = run_cli("sync", str(ref), str(dst), db=db_url, check=2)
        assert "another run is syncing into" in r.stderr
        assert "indexed" not in r.stderr          # refused before listing anything
        assert not dst.exists()

    release = threading.Event()

    def hold():
        with location_lock(catalog, loc.id, loc.url):
            release.wait(20)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.5)
    threading.Timer(1.5, release.set).start()
    started = time.monotonic()
    run_cli("sync", str(ref), str(dst), "--lock-wait", "30", db=db_url, check=0)
    holder.join()
    assert time.monotonic() - started >= 1.0
    assert (dst / "a.dat").read_bytes() == b"a"


def _temporaries(folder):
    return [n for n in os.listdir(folder) if TEMP_MARK in n]


def test_a_sync_into_a_subfolder_waits_for_a_sync_into_its_parent_and_its_temporaries(
        tmp_path, db_url):
    # The first sync is frozen (SIGSTOP) while its temporary file is in D/sub: alive,
    # holding its lock, mid-copy, deterministically. A sync into D/sub then must not take
    # that temporary for an interrupted run's leftover and remove it.
    big = b"castlib!" * (48 * 1024 * 1024 // 8)   # non-zero: written, not left sparse
    make_tree(tmp_path / "X", {"sub/big": big})
    make_tree(tmp_path / "Y", {"yfile": b"y\n"})
    dst = tmp_path / "D"
    (dst / "sub").mkdir(parents=True)
    first = subprocess.Popen(castlib_command("sync", str(tmp_path / "X"), str(dst), db=db_url),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while not _temporaries(dst / "sub"):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first sync never wrote its temporary"
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        temporaries = _temporaries(dst / "sub")

        second = run_cli("sync", str(tmp_path / "Y"), str(dst / "sub"), db=db_url, check=2)
        assert "another run is syncing into a folder containing" in second.stderr
        assert "Traceback" not in second.stderr
        assert _temporaries(dst / "sub") == temporaries   # the live run's file untouched
        assert not (dst / "sub" / "yfile").exists()
    finally:
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (dst / "sub" / "big").read_bytes() == big
    # the parent's sync done, the subfolder's goes ahead
    run_cli("sync", str(tmp_path / "Y"), str(dst / "sub"), db=db_url, check=0)
    assert (dst / "sub" / "yfile").read_bytes() == b"y\n"


def test_nested_destinations_exclude_each_other_either_way_siblings_do_not(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a"})
    dst = tmp_path / "D"
    catalog = Catalog(db_url)
    inner = catalog.location(str(dst / "sub"))
    with location_lock(catalog, inner.id, inner.url):   # a sync into D/sub is running
        r = run_cli("sync", str(ref), str(dst), db=db_url, check=2)
        assert "another run is syncing into" in r.stderr and "folder inside it" in r.stderr
        assert not dst.exists() or not (dst / "a.dat").exists()
        run_cli("sync", str(ref), str(dst / "other"), db=db_url, check=0)   # a sibling
        assert (dst / "other" / "a.dat").read_bytes() == b"a"


def test_a_pipeline_syncing_into_a_folder_and_its_subfolder_locks_once(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a"})
    dst = tmp_path / "D"
    p = tmp_path / "p.yaml"
    p.write_text(f"""
stages:
  - index: {{location: {ref}}}
  - index: {{location: {dst / 'sub'}, missing_ok: true}}
  - diff: {{id: inner, ref: {ref}, dst: {dst / 'sub'}}}
  - sync: {{from: inner}}
  - index: {{location: {dst}, missing_ok: true, ignore: [sub]}}
  - diff: {{id: outer, ref: {ref}, dst: {dst}, ignore: [sub]}}
  - sync: {{from: outer}}
""")
    run_cli("run", str(p), db=db_url, check=0)
    assert (dst / "a.dat").read_bytes() == b"a" and (dst / "sub" / "a.dat").read_bytes() == b"a"
