"""A back-end whose connection is a handshake (SFTP) starts connecting when the run
starts (RunContext.connect_early), so that the wait overlaps the run's other work; the
first call then uses that connection, or raises that attempt's error: one attempt, never
two."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from castlib.backends import open_backend
from castlib.backends.base import DIR
from castlib.errors import StorageError
from tests.helpers import ssh_processes, wait_for
from tests.helpers import backend_read as read
from tests.helpers import backend_write as write
from tests.helpers import run_cli


class _SilentServer:
    """Accepts TCP connections and never says a word (a host whose sshd hangs): counts
    the connections it was asked for."""

    def __init__(self):
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)

    def close(self) -> None:
        self._listener.close()
        for conn in self._held:
            conn.close()


@pytest.fixture
def silent_server():
    server = _SilentServer()
    yield server
    server.close()



def test_sftp_connects_in_the_background_and_the_first_call_uses_it(sftp_server, outage_proxy):
    proxy = outage_proxy(sftp_server.port)
    url = sftp_server.url.replace(f":{sftp_server.port}/", f":{proxy.port}/", 1)
    b = open_backend(url, sftp_server.options)
    b.connect_in_background()
    # the connection is made with no call on the back-end waiting for it
    assert wait_for(lambda: proxy.accepted == 1)
    st = b.stat("")
    assert st is not None and st.kind == DIR
    write(b, "f", b"early")
    assert read(b, "f") == b"early"
    assert proxy.accepted == 1   # the same connection, not a second one
    b.close()


def test_a_failed_background_connect_is_the_first_calls_error_once(silent_server, sftp_server):
    b = open_backend(f"sftp://{sftp_server.user}@127.0.0.1:{silent_server.port}/x",
                     {**sftp_server.options, "connect_timeout": 1})
    b.connect_in_background()
    with pytest.raises(StorageError):
        b.stat("x")
    assert silent_server.accepted == 1   # the call waited for that attempt: no second one
    with pytest.raises(StorageError):    # a later call (the engine's retry) tries anew
        b.stat("x")
    assert silent_server.accepted == 2
    b.close()


def test_sync_to_a_host_that_never_answers_fails_once_in_one_line(silent_server, sftp_server,
                                                                  tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    config = tmp_path / "castlib.yaml"
    dst = f"sftp://{sftp_server.user}@127.0.0.1:{silent_server.port}/x"
    config.write_text(f"storage:\n  '{dst}':\n    connect_timeout: 1\n    known_hosts: null\n")
    r = run_cli("sync", str(src), dst, db=f"sqlite:///{tmp_path}/c.db",
                env={"CASTLIB_CONFIG": str(config)})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("castlib:")]
    assert len(errors) == 1 and f"127.0.0.1:{silent_server.port}" in errors[0], r.stderr
    assert silent_server.accepted == 1, r.stderr


def test_close_does_not_wait_for_a_connection_still_being_made(silent_server, sftp_server):
    b = open_backend(f"sftp://{sftp_server.user}@127.0.0.1:{silent_server.port}/x",
                     {**sftp_server.options, "connect_timeout": 20})
    b.connect_in_background()
    assert wait_for(lambda: silent_server.accepted == 1)
    started = time.monotonic()
    b.close()   # the run ends: its end is not held for the connect timeout
    assert time.monotonic() - started < 10


def test_a_closed_backends_late_connection_is_closed_by_its_thread(sftp_server, outage_proxy):
    proxy = outage_proxy(sftp_server.port)
    url = sftp_server.url.replace(f":{sftp_server.port}/", f":{proxy.port}/", 1)
    b = open_backend(url, sftp_server.options)
    b.connect_in_background()
    b.close()   # at once: the connection comes after
    b._early.join(30)
    assert b._fs is None   # closed by the thread that made it


def test_a_diff_from_the_catalog_alone_connects_to_nothing(silent_server, sftp_server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    dst = f"sftp://{sftp_server.user}@127.0.0.1:{silent_server.port}/x"
    r = run_cli("diff", "--no-index", str(src), dst, db=f"sqlite:///{tmp_path}/c.db")
    assert "Traceback" not in r.stderr
    assert silent_server.accepted == 0, r.stderr


def test_the_run_starts_the_login_of_each_location_its_stages_touch_once():
    """Stage.connects_to: every location whose storage a stage reads or writes, once
    however many stages touch it, as they name it; a stage that uses several sessions
    asks for them later (Backend.sessions_needed: test_sftp_openssh)."""
    from castlib.pipeline import Pipeline

    pipeline = Pipeline.from_stages([
        ("index", {"location": "sftp://h/src"}),
        ("index", {"location": "sftp://h/dst", "checksum": "adler32", "workers": 2}),
        ("diff", {"ref": "sftp://h/src", "dst": "sftp://h/dst", "id": "d"}),
        ("sync", {"from": "d", "transfers": 6}),
        ("verify", {"location": "sftp://h/other", "workers": 3}),
    ])
    assert pipeline._connected_locations() == ["sftp://h/src", "sftp://h/dst",
                                               "sftp://h/other"]
    pipeline = Pipeline.from_stages([
        ("diff", {"ref": "/data", "dst": "sftp://h/dst", "id": "d"}),
        ("sync", {"from": "d", "dry_run": True})])
    assert pipeline._connected_locations() == []   # a dry run's plan comes from the catalog


# -- a login started ahead of the command's engine (backends.connect_ahead) ----------------
def _via(proxy, server) -> str:
    return server.url.replace(f":{server.port}/", f":{proxy.port}/", 1)


def test_the_back_end_takes_the_login_started_ahead_for_its_options(sftp_server,
                                                                    outage_proxy):
    from castlib.backends import ssh_command
    from castlib.location import parse_location

    proxy = outage_proxy(sftp_server.port)
    url = _via(proxy, sftp_server)
    ssh_command.start_ahead(parse_location(url), sftp_server.options)
    assert wait_for(lambda: proxy.accepted == 1)   # logging in, before any back-end
    b = open_backend(url, sftp_server.options)
    write(b, "f", b"ahead")
    assert read(b, "f") == b"ahead"
    assert proxy.accepted == 1   # that login, not a second one
    assert not ssh_command._AHEAD
    b.close()
    assert wait_for(lambda: not ssh_processes(proxy.port))


def test_a_login_started_ahead_that_no_back_end_takes_is_stopped_at_exit(
        sftp_server, outage_proxy, tmp_path):
    """Started for other options than the back-end's (here another connect timeout, so
    another ssh command line), it is not used, and ends with the process, leaving no
    ssh and no socket folder."""
    import json
    import subprocess
    import sys

    from tests.helpers import cli_env

    proxy = outage_proxy(sftp_server.port)
    url = _via(proxy, sftp_server)
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = """
import json, sys
from castlib.backends import open_backend, ssh_command
from castlib.location import parse_location
from tests.helpers import backend_listing as listing
url, options = json.loads(sys.argv[1])
ssh_command.start_ahead(parse_location(url), {**options, "connect_timeout": 7})
b = open_backend(url, options)
assert listing(b) == []
assert len(ssh_command._AHEAD) == 1
b.close()
"""
    r = subprocess.run([sys.executable, "-c", script, json.dumps([url, sftp_server.options])],
                       capture_output=True, text=True, timeout=120,
                       env=cli_env({"TMPDIR": str(temp)}))
    assert r.returncode == 0, r.stderr
    assert proxy.accepted == 2
    assert wait_for(lambda: not ssh_processes(proxy.port))
    assert list(temp.iterdir()) == []


def test_a_sync_to_sftp_logs_in_once_its_login_started_ahead(sftp_server, outage_proxy,
                                                             tmp_path):
    from tests.helpers import make_tree

    proxy = outage_proxy(sftp_server.port)
    dst = _via(proxy, sftp_server)
    src = tmp_path / "src"
    make_tree(src, {"a": b"a", "d/b": b"bb"})
    config = tmp_path / "castlib.yaml"
    config.write_text(f"storage:\n  '{dst}':\n    client_keys: ['{sftp_server.client_key}']\n"
                      "    known_hosts: null\n")
    r = run_cli("sync", str(src), dst, db=f"sqlite:///{tmp_path}/c.db",
                env={"CASTLIB_CONFIG": str(config)})
    assert r.returncode == 0, r.stderr
    assert (sftp_server.folder / "d" / "b").read_bytes() == b"bb"
    assert proxy.accepted == 1, r.stderr   # the login started ahead is the run's one
    assert wait_for(lambda: not ssh_processes(proxy.port))


def test_a_sync_run_on_workers_starts_no_login_here(sftp_server, outage_proxy, tmp_path):
    from tests.servers.common import free_port

    proxy = outage_proxy(sftp_server.port)
    src = tmp_path / "src"
    src.mkdir()
    r = run_cli("sync", str(src), _via(proxy, sftp_server), "--on-workers",
                "--broker", f"redis://127.0.0.1:{free_port()}/0", db=f"sqlite:///{tmp_path}/c.db",
                timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert proxy.accepted == 0
