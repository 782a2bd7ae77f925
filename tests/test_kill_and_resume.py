"""A sync killed at any moment (SIGKILL) publishes nothing partial; the next run finishes."""
import os
import signal
import subprocess
import time

import pytest

from tests.helpers import (castlib_command, cli_env, last_json, run_cli, run_cli_interrupted,
                           tree_digest)

MiB = 1024 * 1024


def test_sigkill_mid_transfer_then_resume(tmp_path, db_url):
    ref = tmp_path / "ref"
    dst = tmp_path / "dst"
    ref.mkdir()
    for i in range(4):
        with open(ref / f"run{i}.dat", "wb") as f:
            for _ in range(48):
                f.write(os.urandom(MiB))
    proc = subprocess.Popen(castlib_command("-q", "sync", str(ref), str(dst), "--transfers", "1",
                                            db=db_url),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    deadline = time.monotonic() + 60
    seen_temp = False
    while time.monotonic() < deadline and proc.poll() is None:
        if dst.is_dir() and any(".castlib-part-" in n for n in os.listdir(dst)):
            seen_temp = True
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seen_temp, "the sync ended before a transfer could be interrupted"

    # nothing under a final name is partial: each published file equals its reference
    published = [n for n in os.listdir(dst) if ".castlib-part-" not in n]
    for name in published:
        assert (dst / name).read_bytes() == (ref / name).read_bytes()
    assert len(published) < 4

    result = run_cli("sync", str(ref), str(dst), "--json", db=db_url, check=0)
    assert '"failed": 0' in result.stdout
    assert tree_digest(dst) == tree_digest(ref)
    assert not any(".castlib-part-" in n for n in os.listdir(dst))


def _published(folder) -> dict[str, bytes]:
    """The files under a final name in a flat destination (none if it does not exist)."""
    if not folder.is_dir():
        return {}
    return {n: (folder / n).read_bytes() for n in os.listdir(folder) if ".castlib-part-" not in n}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_copies_and_records_what_was_done(tmp_path, db_url, signum):
    """Ctrl-C or SIGTERM during a sync: no copy starts after it, those in flight end within
    seconds, the run is recorded 'interrupted' with the copies really made (stage counts
    and catalog entries), and the exit code is the shell's 128 + signal."""
    from castlib.catalog import Catalog

    ref, dst = tmp_path / "ref", tmp_path / "dst"
    ref.mkdir()
    total = 60
    for i in range(total):
        (ref / f"f{i:02d}.dat").write_bytes(os.urandom(4 * MiB))
    result = run_cli_interrupted(
        "sync", str(ref), str(dst), "--transfers", "2", "--json", db=db_url,
        ready=lambda: len(_published(dst)) >= 3, interrupt=signum, timeout=120)
    took = result.ended_after
    name = signal.Signals(signum).name
    assert result.returncode == 128 + signum, result.stderr
    assert took < 15, f"the run took {took:.1f} s to stop"
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"castlib: interrupted by {name}")

    landed = _published(dst)
    copied = len(landed)
    assert 3 <= copied < total, f"{copied} of {total}: the copies queued after the signal were made"
    assert not [n for n in os.listdir(dst) if ".castlib-part-" in n]   # the aborted ones' too
    for n, data in landed.items():
        assert data == (ref / n).read_bytes()

    last = last_json(result.stdout)
    assert last["interrupted"] == name and last["copied"] == len(landed)
    catalog = Catalog(db_url)
    try:
        run, stages = catalog.run_details(1)
        assert run["status"] == "interrupted" and name in run["error"]
        sync = [s for s in stages if s["stage"] == "sync"][0]
        assert sync["status"] == "interrupted" and sync["counts"]["copied"] == len(landed)
        assert sync["counts"]["failed"] == 0
        location = catalog.find_location(str(dst))
        entries = {e["path"]: e["size"] for e in catalog.entries(location.id)}
        assert entries == {n: 4 * MiB for n in landed}
    finally:
        catalog.close()
    listing = run_cli("runs", db=db_url, check=0).stdout
    assert " interrupted " in listing and f"{len(landed)} copied" in listing

    again = run_cli("sync", str(ref), str(dst), "--json", db=db_url, check=0)
    assert last_json(again.stdout)["copied"] == total - len(landed)
    assert tree_digest(dst) == tree_digest(ref)


def test_ctrl_c_in_a_notebook_stops_a_sync_the_same_way(tmp_path, db_url):
    """castlib.sync() from Python, Ctrl-C (a KeyboardInterrupt, no handler of castlib's):
    the copies stop, the run is recorded 'interrupted' with what was copied, and the
    KeyboardInterrupt reaches the caller."""
    import threading

    from castlib import api
    from castlib.catalog import Catalog

    ref, dst = tmp_path / "ref", tmp_path / "dst"
    ref.mkdir()
    for i in range(40):
        (ref / f"f{i:02d}.dat").write_bytes(os.urandom(4 * MiB))

    def press_ctrl_c():
        deadline = time.monotonic() + 60
        while len(_published(dst)) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt) as info:
        api.sync(str(ref), str(dst), db=db_url, transfers=2, quiet=True)
    landed = sorted(_published(dst))
    assert 2 <= len(landed) < 40, f"{len(landed)} of 40 copied"
    assert info.value.report.counts["copied"] == len(landed)
    catalog = Catalog(db_url)
    try:
        run, stages = catalog.run_details(info.value.report.run_id)
        assert run["status"] == "interrupted" and "SIGINT" in run["error"]
        assert stages[-1]["counts"]["copied"] == len(landed)
        location = catalog.find_location(str(dst))
        assert {e["path"] for e in catalog.entries(location.id)} == set(landed)
    finally:
        catalog.close()
