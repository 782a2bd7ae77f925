"""Progress shows on a terminal only; transient failures are retried with backoff."""
import os
import pty
import subprocess

import pytest

from castlib.errors import StorageError, TransientStorageError
from castlib.transfer import with_retries
from tests.helpers import castlib_command, cli_env, make_tree, run_cli


def test_progress_line_on_a_terminal_and_none_in_a_pipe(tmp_path, db_url):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.dat").write_bytes(os.urandom(8 * 1024 * 1024))
    master, slave = pty.openpty()
    proc = subprocess.Popen(castlib_command("sync", str(src), str(tmp_path / "dst"), db=db_url),
                            stdin=slave, stdout=slave, stderr=slave, env=cli_env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:     # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait()
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "sync: 3/3 files" in screen and "MiB/s" in screen
    piped = run_cli("sync", str(src), str(tmp_path / "dst2"), db=db_url, check=0)
    assert "\r" not in piped.stderr and "sync: " not in piped.stderr and "ETA" not in piped.stderr


def test_transient_errors_are_retried_then_succeed():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TransientStorageError("connection reset")
        return "done"

    assert with_retries(flaky, retries=3, backoff_s=0.01, describe="f") == "done"
    assert len(calls) == 3


def test_retries_give_up_and_permanent_errors_are_not_retried():
    calls = []

    def always(exc):
        def action():
            calls.append(1)
            raise exc
        return action

    with pytest.raises(TransientStorageError):
        with_retries(always(TransientStorageError("timeout")), retries=2, backoff_s=0.01,
                     describe="f")
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(StorageError):
        with_retries(always(StorageError("permission denied")), retries=5, backoff_s=0.01,
                     describe="f")
    assert len(calls) == 1


def test_a_plugin_backend_is_found_through_its_entry_point(tmp_path, db_url):
    plugin = tmp_path / "plugin"
    dist = plugin / "castlib_demo-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: castlib-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[castlib.backends]\ndemo = castlib_demo:DemoBackend\n")
    (plugin / "castlib_demo.py").write_text(
        "from castlib.backends.local import LocalBackend\n"
        "from castlib.location import LocationURL\n\n"
        "class DemoBackend(LocalBackend):\n"
        "    '''demo:// serves a local folder, to prove plugins plug in.'''\n"
        "    schemes = ('demo',)\n"
        "    description = 'demo plugin'\n\n"
        "    def __init__(self, url, options=None):\n"
        "        super().__init__(LocationURL('file', '', url.path), options)\n")
    data = make_tree(tmp_path / "data", {"x.dat": b"x"})
    env = {"PYTHONPATH": f"{plugin}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = run_cli("sync", f"demo://localhost{data}", str(tmp_path / "copy"), "--json",
                  db=db_url, env=env, check=0)
    assert '"copied": 1' in out.stdout
    assert "demo plugin" in run_cli("backends", env=env, check=0).stdout


def test_backoff_is_capped_and_jittered(monkeypatch):
    """--retries 20 with a 1 s backoff once waited 2**19 s (six days) before its last try:
    each wait is now at most MAX_BACKOFF_S, and jittered so that threads meeting one outage
    do not all retry at the same instant."""
    import castlib.transfer as transfer

    waits: list[float] = []
    monkeypatch.setattr(transfer.time, "sleep", waits.append)   # the clock, not a server
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= 20:
            raise TransientStorageError("connection reset")
        return "done"

    assert with_retries(flaky, retries=20, backoff_s=1.0, describe="f") == "done"
    assert len(waits) == 20
    assert max(waits) <= transfer.MAX_BACKOFF_S
    assert min(waits[10:]) >= transfer.MAX_BACKOFF_S / 2      # capped, not shrunk
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0   # exponential below the cap
    assert len(set(waits[10:])) > 1                             # jittered
