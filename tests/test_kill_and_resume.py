"""A sync killed at any moment (SIGKILL) publishes nothing partial; the next run finishes."""
import os
import signal
import subprocess
import time

from tests.helpers import castlib_command, cli_env, run_cli, tree_digest

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
