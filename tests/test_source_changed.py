"""A source rewritten while castlib reads it: the torn copy is never published, nor its
checksum recorded as the source's; the file is counted `changed_during_copy` (exit 1) and
the next run copies it whole."""
import os
import signal
import subprocess
import time

from castlib.catalog import Catalog
from castlib.checksum import CHUNK_SIZE
from tests.helpers import castlib_command, cli_env, last_json, run_cli

SIZE = 64 * 1024 * 1024


def _temp_files(folder):
    try:
        return [n for n in os.listdir(folder) if ".castlib-part-" in n]
    except FileNotFoundError:
        return []


def _sync_rewriting_midway(src, dst, db_url, new: bytes):
    """Run a sync; once its temporary file holds a first chunk, stop the process (SIGSTOP),
    rewrite the source in place, and let it go on. Stopped, it has read at most one chunk
    more than it wrote: the rest of what it reads is the new content. Returns the
    completed run, or None if the copy got too far before it could be stopped."""
    proc = subprocess.Popen(castlib_command("sync", str(src), str(dst), "--transfers", "1",
                                            "--json", db=db_url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    stopped = False
    try:
        deadline = time.monotonic() + 120
        while True:
            temps = _temp_files(dst)
            if temps:
                try:
                    if os.stat(os.path.join(dst, temps[0])).st_size >= CHUNK_SIZE:
                        break
                except FileNotFoundError:
                    pass
            assert proc.poll() is None, "the sync ended before it could be caught mid-copy"
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = True
        temps = _temp_files(dst)
        written = os.stat(os.path.join(dst, temps[0])).st_size if temps else SIZE
        if written + 2 * CHUNK_SIZE > SIZE:   # too late to tear it: let it finish, try again
            os.kill(proc.pid, signal.SIGCONT)
            proc.communicate(timeout=300)
            return None
        with open(src / "big.dat", "r+b") as f:   # in place, same size: the rsync hole
            f.write(new)
        os.kill(proc.pid, signal.SIGCONT)
        stopped = False
        out, err = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            if stopped:
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_a_source_rewritten_during_its_copy_is_left_for_the_next_run(tmp_path, db_url):
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    for attempt in range(5):   # a fresh pair each time: a late attempt copied the old bytes
        src = tmp_path / f"src{attempt}"
        src.mkdir()
        (src / "big.dat").write_bytes(old)
        os.utime(src / "big.dat", ns=(10**18, 10**18))   # any rewrite moves it
        dst = tmp_path / f"dst{attempt}"
        r = _sync_rewriting_midway(src, dst, db_url, new)
        if r is not None:
            break
    else:
        raise AssertionError("five syncs in a row copied 64 MiB before they could be stopped")

    assert r.returncode == 1, r.stderr
    counts = last_json(r.stdout)
    assert counts["changed_during_copy"] == 1 and counts["copied"] == 0
    assert "big.dat: changed while it was being copied" in r.stderr
    assert "changed during copy" in r.stderr                      # the summary line
    assert os.listdir(dst) == []                                   # nothing torn, no temp file
    catalog = Catalog(db_url)
    try:   # the torn read's checksum is not recorded as the source's
        loc = catalog.find_location(str(src))
        (entry,) = [e for e in catalog.entries(loc.id) if e["path"] == "big.dat"]
        assert entry["adler32"] is None
    finally:
        catalog.close()

    again = run_cli("sync", str(src), str(dst), "--json", db=db_url, check=0)
    assert last_json(again.stdout)["copied"] == 1
    assert (dst / "big.dat").read_bytes() == new
