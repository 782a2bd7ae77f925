"""The SFTP back-end over OpenSSH's own `ssh` (ssh_client: openssh, the default where ssh is
installed): what differs from asyncssh's connection. The contract (test_contract.py) and
the SFTP tests (test_sftp.py) run over it too; here: no SSH in Python, one login shared by
the sessions, the sessions a run will use opened at once, and how the client is chosen."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from castlib.backends import open_backend
from castlib.errors import ConfigError
from tests.helpers import make_tree, ssh_processes, wait_for
from tests.helpers import backend_listing as listing
from tests.helpers import backend_read as read
from tests.helpers import backend_write as write

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _established_to(port: int, pids=None) -> int:
    """TCP connections of this machine to 127.0.0.1:`port` (the server side excluded);
    with `pids`, only those of these processes."""
    inodes = None
    if pids is not None:
        inodes = set()
        for pid in pids:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            except OSError:   # ended meanwhile
                continue
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if state == "01" and remote == f"0100007F:{port:04X}" and \
                    (inodes is None or inode in inodes):
                count += 1
    return count


def _ssh_pids(backend) -> list[int]:
    """The ssh processes of a back-end's sessions."""
    return [entry[0]._chan.pid for entry in backend._wires
            if entry[0] is not None]



@pytest.mark.parametrize("kind", ["sftp", "rclone-sftp"])
def test_a_location_over_openssh_never_imports_asyncssh(request, kind, tmp_path):
    """Every call of the back-end (listing, folders, writes and their read-back, renames,
    set-stats, deletes, a large file's md5 on the host) goes through castlib's own SFTP
    client on ssh's pipes: asyncssh and sshfs (0.1-0.2 s of a short run's start) are not
    imported at all."""
    server = request.getfixturevalue(kind.replace("-", "_") + "_server")
    script = """
import json, sys
from castlib.backends import open_backend
from tests.helpers import backend_listing as listing, backend_read as read, backend_write as write
url, options = json.loads(sys.argv[1])
b = open_backend(url, options)
assert b._ssh is not None, "not over OpenSSH"
b.mkdir("a/b")
write(b, "a/b/f", b"hello")
b.rename("a/b/f", "a/g")
b.set_mtime("a/g", 1_000_000_000 * 10**9)
assert read(b, "a/g") == b"hello"
assert [st.path for st in listing(b)] == ["a", "a/b", "a/g"]
b.delete("a/g")
b.delete("a/b")
import hashlib
from castlib.transfer import temp_path
big, data = temp_path("big", b.temp_key), b"x" * (5 << 20)   # verified by md5sum on OpenSSH
write(b, big, data)
assert b.checksum(big, "md5") == hashlib.md5(data).hexdigest()
b.delete(big)
b.close()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("asyncssh", "sshfs"))))
"""
    done = subprocess.run([sys.executable, "-c", script, json.dumps([server.url, server.options])],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_sessions_of_a_location_share_one_login(sftp_server):
    """The first session logs in; the others (one for each transfer thread) are channels
    of its connection (ControlMaster): one TCP connection to the server, however many
    sessions, and the sessions a run asked for are there without a thread waiting."""
    b = open_backend(sftp_server.url, sftp_server.options)
    b.connect_in_background(5)
    assert listing(b) == []
    assert wait_for(lambda: sum(entry[0] is not None for entry in b._wires) == 5), b._wires
    assert len(b._wires) == 5 and all(not entry[0].closed for entry in b._wires)
    pids = _ssh_pids(b)
    assert len(set(pids)) == 5
    assert _established_to(sftp_server.port, pids) == 1
    results = []

    def work(i: int) -> None:
        write(b, f"f{i}", bytes([i]) * 1000)
        results.append(read(b, f"f{i}"))

    import threading

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(bytes([i]) * 1000 for i in range(4))
    assert len(b._wires) == 5   # the threads took the sessions opened for them
    b.close()
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids))


def _sessions_at_a_gate(tmp_path, monkeypatch, first_passes: bool = False):
    """`ssh` on PATH holds the sessions on the login's connection (not the login itself,
    nor `ssh -G` or `ssh -V`) until the returned file exists; with `first_passes`, the
    first of them to start goes on at once."""
    import shutil

    gate = tmp_path / "open"
    hold = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    if first_passes:
        hold = f"mkdir {tmp_path}/first 2>/dev/null || {hold}"
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f"""#!/bin/sh
case " $* " in *ControlMaster=yes*|*" -G "*|*" -V "*) ;;
*) {hold} ;; esac
exec {shutil.which("ssh")} "$@"
""")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    return gate


@pytest.fixture
def sessions_held_at_a_gate(tmp_path, monkeypatch):
    return _sessions_at_a_gate(tmp_path, monkeypatch)


def test_the_logins_session_serves_at_once_while_the_others_open(sftp_server,
                                                                 sessions_held_at_a_gate):
    """A thread's first call takes the login's own session as soon as it is up, and does
    not wait for the sessions opened for the transfer threads (a sync's listing of its
    destination used to wait for all of them: ~10 ms of every run's start)."""
    import threading

    gate = sessions_held_at_a_gate
    b = open_backend(sftp_server.url, sftp_server.options)
    try:
        b.connect_in_background(5)
        b.fs   # logged in; the other sessions held at the gate (until the login timeout, 10 s)
        listed = threading.Event()
        threading.Thread(target=lambda: (listing(b), listed.set()), daemon=True).start()
        assert listed.wait(5), "the listing waited for the other sessions"
        assert sum(entry[0] is not None for entry in b._wires) == 1   # the login's alone
    finally:
        gate.touch()
    assert wait_for(lambda: sum(entry[0] is not None for entry in b._wires) == 5), b._wires
    write(b, "f", b"x")
    assert read(b, "f") == b"x"
    b.close()


def test_a_thread_takes_the_first_session_opened_early_not_waiting_for_the_rest(
        sftp_server, tmp_path, monkeypatch):
    """The login's session held (by the thread that connected), a transfer thread takes
    the first session opened early that is up, while the others are still coming: to a
    host whose shell starts slowly, the last of 7 came 0.7 s after the first, and a
    one-file sync's only copy waited for it."""
    import threading

    gate = _sessions_at_a_gate(tmp_path, monkeypatch, first_passes=True)
    b = open_backend(sftp_server.url, sftp_server.options)
    try:
        b.connect_in_background(5)
        assert listing(b) == []   # this thread's: the login's session
        wrote = threading.Event()
        threading.Thread(target=lambda: (write(b, "f", b"x"), wrote.set()), daemon=True).start()
        assert wrote.wait(5), "the copy waited for every session opened early"
        assert sum(entry[0] is not None for entry in b._wires) == 2   # the login's, the first
    finally:
        gate.touch()
    assert wait_for(lambda: sum(entry[0] is not None for entry in b._wires) == 5), b._wires
    assert read(b, "f") == b"x"
    b.close()


def test_a_location_closed_while_its_sessions_open_makes_no_login_more(sftp_server, tmp_path,
                                                                       monkeypatch):
    """A short run (a listing served by the login's session at once, then the end) closes
    its location while the sessions opened early for the transfer threads are still
    starting. Their ssh, coming after the master has gone, found no ControlPath socket
    and logged in to the host on its own (OpenSSH's ssh does so where the master is
    not there), one login more each, only to be closed once up: they are stopped at the
    close instead."""
    import shutil

    gate = tmp_path / "open"
    logs = tmp_path / "logs"
    logs.mkdir()
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    # the sessions on the login's connection start late (a loaded machine), each with
    # its log (-E: not on the stderr castlib reads)
    wrapper.write_text(f"""#!/bin/sh
case " $* " in *ControlMaster=yes*|*" -G "*|*" -V "*) exec {shutil.which("ssh")} "$@" ;; esac
while [ ! -e {gate} ]; do sleep 0.05; done
exec {shutil.which("ssh")} -v -E {logs}/$$ "$@"
""")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    b = open_backend(sftp_server.url, sftp_server.options)
    try:
        b.connect_in_background(5)
        assert listing(b) == []   # served at once, by the login's session
        assert not b._more_coming.is_set()   # the others still starting
        b.close()
    finally:
        gate.touch()
    assert wait_for(b._more_coming.is_set, 30)   # the sessions' opening has ended
    said = "".join(log.read_text() for log in logs.iterdir())
    assert "Authenticated to" not in said and "Connecting to" not in said, said


def test_a_connection_given_up_while_its_sessions_open_leaves_the_next_ones_places(
        sftp_server, sessions_held_at_a_gate):
    """The line drops while the sessions opened early are still coming (a thread's first
    call no longer waits for them), and the retry logs in again at once. The first
    connection's opening, ending as the new login holds the lock, gave up its places by
    value: [None, nobody] is also each of the new connection's places, which went
    instead, and the sessions opened for them served no thread."""
    gate = sessions_held_at_a_gate
    b = open_backend(sftp_server.url, sftp_server.options)
    try:
        b.connect_in_background(5)
        assert listing(b) == []   # the login's session; the others held at the gate
        first = b._fs
        with b._connect_lock:   # as the retry's login holds it
            b._connection_failed(b._generation)   # the line dropped
            assert listing(b) == []   # logged in again; its other sessions at the gate
            assert wait_for(lambda: not first._opening, 10)   # the first's opening ended
            time.sleep(0.2)   # (and waits for the lock)
    finally:
        gate.touch()
    assert wait_for(lambda: sum(entry[0] is not None for entry in b._wires) == 5, 30), \
        b._wires
    write(b, "f", b"x")
    assert read(b, "f") == b"x"
    b.close()


def test_a_session_closed_as_its_reader_ends_it_writes_into_no_other_file(sftp_server,
                                                                         tmp_path):
    """close() wakes the thread that reads a session with a byte on a pipe of the
    session's. A location's sessions are all killed first, then each closed: the thread
    reading one may be ending it by then, its pipe closed, and the pipe's number already
    another file's (a new session's input, the catalog's journal): the byte went there."""
    import threading

    from castlib.backends import sftp_wire

    b = open_backend(sftp_server.url, sftp_server.options)
    listing(b)
    wire = b._wires[0][0]
    pipes = wire._chan
    number = pipes._wake_w
    other = tmp_path / "other"
    opened: list[int] = []
    ending, closed = threading.Event(), threading.Event()

    def meanwhile(_):   # as the reading thread ends the session: other files opened
        while number not in opened and len(opened) < 256:
            opened.append(os.open(other, os.O_WRONLY | os.O_CREAT))
        ending.set()
        closed.wait(10)

    waiting = sftp_wire.SyncFuture(wire)
    waiting.add_done_callback(meanwhile)
    wire._waiting[1 << 30] = (waiting, None)   # a request not answered yet
    reader = threading.Thread(target=lambda: pipes.wait_for(waiting, 30), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: pipes._reading, 10)
        pipes.stop()   # (as _OpensshHost.close: every session killed first)
        assert ending.wait(10)
        assert number in opened   # the pipe's number, now the other file's
        pipes.close()
    finally:
        closed.set()
        reader.join(10)
        for fd in opened:
            os.close(fd)
        b.close()
    assert other.read_bytes() == b""


def test_a_dialer_that_cannot_run_leaves_ssh_to_connect(sftp_server, tmp_path, monkeypatch):
    """sys.executable that is no Python running ssh_dialer.py (an embedded interpreter's
    host program: uWSGI, mod_wsgi): ssh says only "proxy dialer did not pass back a
    connection", and every login failed. The login is made again without the dialer,
    and later ones go without it; a host that refuses is still said as such."""
    from castlib.backends import ssh_command
    from castlib.errors import StorageError
    from tests.servers.common import free_port

    monkeypatch.setattr(ssh_command, "_DIALER_DID_NOT_RUN", [])
    host_program = tmp_path / "uwsgi"
    host_program.write_text("#!/bin/sh\necho 'uwsgi: unknown option -I' >&2\nexit 1\n")
    host_program.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(host_program))
    b = open_backend(sftp_server.url, sftp_server.options)
    write(b, "f", b"through ssh alone")
    assert read(b, "f") == b"through ssh alone"
    assert ssh_command._DIALER_DID_NOT_RUN   # and so for the next logins
    assert ssh_command.SshCommand(b.url, {}, 20).dialer() == []
    b.close()
    refused = open_backend(f"sftp://someone@127.0.0.1:{free_port()}/x", {})
    with pytest.raises(StorageError, match="connection refused"):
        refused.stat("")


def test_a_server_that_opens_few_channels_still_serves_every_thread(sftp_two_sessions_server):
    """A server that opens no more channels a connection (MaxSessions 2) still serves
    every thread of a run that wanted more: they share the sessions it opened, on the one
    login. (OpenSSH's ssh, where its master cannot open a session, logs in anew on its
    own: 7 logins for 8 transfers; castlib's sessions tell it not to, and learn the
    refusal instead.)"""
    from castlib.backends.sftp import MAX_SFTP_SESSIONS

    server = sftp_two_sessions_server
    b = open_backend(server.url, server.options)
    b.connect_in_background(9)
    assert listing(b) == []
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: (write(b, f"f{i}", bytes([i]) * 100), read(b, f"f{i}"))[1],
                            range(8)))
    assert got == [bytes([i]) * 100 for i in range(8)]
    assert 1 <= len(b._wires) <= MAX_SFTP_SESSIONS
    assert {st.path for st in listing(b)} == {f"f{i}" for i in range(8)}
    assert _established_to(server.port) == 1   # the login's: no other ssh logged in
    b.close()


def test_the_ssh_client_is_chosen_by_option_and_by_what_translates(sftp_server, tmp_path,
                                                                   monkeypatch):
    url, options = sftp_server.url, sftp_server.options
    assert open_backend(url, options)._ssh is not None   # the default where ssh is installed
    assert open_backend(url, {**options, "ssh_client": "asyncssh"})._ssh is None
    # an asyncssh option ssh cannot carry: asyncssh connects, unless openssh was asked for
    assert open_backend(url, {**options, "keepalive_interval": 5})._ssh is None
    with pytest.raises(ConfigError, match="cannot carry the option keepalive_interval"):
        open_backend(url, {**options, "keepalive_interval": 5, "ssh_client": "openssh"})
    with pytest.raises(ConfigError, match="ssh_client must be one of openssh, asyncssh"):
        open_backend(url, {**options, "ssh_client": "putty"})
    # no ssh on PATH: asyncssh, unless openssh was asked for
    monkeypatch.setenv("PATH", str(tmp_path))
    assert open_backend(url, options)._ssh is None
    with pytest.raises(ConfigError, match="needs the ssh command"):
        open_backend(url, {**options, "ssh_client": "openssh"})


def test_a_folder_of_many_entries_is_listed_whole(sftp_server):
    """OpenSSH answers a folder's listing 100 names at a time: every batch is read."""
    b = open_backend(sftp_server.url, sftp_server.options)
    for i in range(250):
        (sftp_server.folder / f"n{i:03d}").write_bytes(b"x" * (i % 7))
    entries = listing(b)
    assert [st.path for st in entries] == [f"n{i:03d}" for i in range(250)]
    assert [st.size for st in entries] == [i % 7 for i in range(250)]
    b.close()


def test_a_link_made_over_openssh_points_where_it_was_told(sftp_server):
    """OpenSSH's sftp-server takes SYMLINK's two paths the other way round from the
    draft: told by its extensions (no version string comes through ssh's pipes)."""
    b = open_backend(sftp_server.url, sftp_server.options)
    write(b, "target", b"t")
    b.symlink("link", "target")
    assert os.readlink(sftp_server.folder / "link") == "target"
    assert not os.path.islink(sftp_server.folder / "target")
    st = b.stat("link")
    assert st.link_target == "target"
    b.close()


def test_a_server_that_greets_then_stalls_fails_within_the_login_timeout():
    """ssh's ConnectTimeout bounds the TCP connection and the banner, not the key exchange:
    a server that greets and then says nothing more fails the call within three connect
    timeouts, as "timed out", and leaves no ssh process behind."""
    import socket
    import threading

    from castlib.errors import StorageError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    held = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-stalling\r\n")
            held.append(conn)   # and never a word more

    threading.Thread(target=serve, daemon=True).start()
    b = open_backend(f"sftp://someone@127.0.0.1:{port}/x",
                     {"known_hosts": None, "connect_timeout": 1})
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match="timed out"):
            b.stat("")
        assert time.monotonic() - started < 10
    finally:
        b.close()
        listener.close()
        for conn in held:
            conn.close()
    assert wait_for(lambda: _established_to(port) == 0)


def test_an_ssh_that_ends_at_once_is_explained_by_what_it_said_every_time():
    """A refused connection ends ssh before castlib has widened its pipes or sent INIT:
    the error is still ssh's own ("connection refused"), never the closed pipe's
    ("I/O operation on closed file", 1 run in 3 before)."""
    from castlib.errors import StorageError

    for _ in range(20):
        b = open_backend("sftp://someone@127.0.0.1:9/x", {"known_hosts": None})
        with pytest.raises(StorageError) as info:
            b.stat("")
        b.close()
        assert "connection refused" in str(info.value), str(info.value)


# -- a write announced: its open goes out with the rename before it (expect_write) ----------
@pytest.mark.parametrize("kind", ["sftp", "rclone-sftp"])
def test_a_write_announced_is_opened_with_the_rename_before_it(request, kind):
    """expect_write(next): the next temporary file is opened with this thread's next rename
    (a round trip less for each small file) and its write takes that open; one announced
    and opened that no write takes is closed and removed at expect_write(None)."""
    from castlib.transfer import temp_path

    server = request.getfixturevalue(kind.replace("-", "_") + "_server")
    b = open_backend(server.url, server.options)
    try:
        first, second, third = (temp_path(name, b.temp_key) for name in ("a", "b", "c"))
        write(b, first, b"one")
        b.expect_write(second)
        assert b.stat(second) is None   # not sent yet: it goes with the rename
        b.rename(first, "a")
        made = b.stat(second)
        assert made is not None and made.size == 0   # opened with the rename
        write(b, second, b"two")   # through that open
        assert getattr(b._ahead, "opened", None) is None   # taken
        b.expect_write(third)
        b.rename(second, "b")
        assert b.stat(third) is not None
        b.expect_write(None)   # never written: undone
        assert b.stat(third) is None
        assert read(b, "a") == b"one" and read(b, "b") == b"two"
        assert [st.path for st in listing(b)] == ["a", "b"]
    finally:
        b.close()


def _channel_writes(monkeypatch) -> list:
    """A list that gets an entry for each channel write of every threaded SFTP session
    (one SSH packet and one wake-up of ssh, the server and castlib each)."""
    from castlib.backends.sftp_wire import _ThreadPipes

    writes: list = []
    real = _ThreadPipes.write

    def counted(self, data):
        writes.append(len(data))
        return real(self, data)

    monkeypatch.setattr(_ThreadPipes, "write", counted)
    return writes


@pytest.mark.parametrize("kind", ["sftp", "rclone-sftp"])
def test_small_files_are_copied_a_few_at_once_in_a_few_round_trips(request, kind, tmp_path,
                                                                   monkeypatch):
    """Over ssh, a transfer thread claims up to 32 small files at once and copies them as
    one (transfer.copy_files_together): their opens in one channel write, then their
    writes with the read-backs' opens, their reads, their renames. 66 files with one
    thread: fewer channel writes than files, where each file alone took three; every
    file in place with its bytes and its mtime, no temporary file left, and a verify
    from the catalog finds each as it was copied."""
    import castlib

    server = request.getfixturevalue(kind.replace("-", "_") + "_server")
    _configure(server, tmp_path, monkeypatch)
    files = {f"d{n % 4}/f{n:02}": os.urandom(n * 37) for n in range(64)}
    for n in (40_000, 65_536):   # more than one write request, or one read, carries
        files[f"d0/s{n}"] = os.urandom(n)
    src = make_tree(tmp_path / "src", files)
    for n, name in enumerate(sorted(files)):
        os.utime(src / name, ns=(1_600_000_000 * 10**9 + n * 10**9,) * 2)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    castlib.index(str(src), db=db)
    castlib.index(server.url, db=db)
    writes = _channel_writes(monkeypatch)
    report = castlib.sync(str(src), server.url, db=db, transfers=1, index="none")
    assert report.exit_code == 0 and report.counts["copied"] == 66, report.errors
    assert len(writes) < 66, len(writes)
    monkeypatch.undo()
    folder = server.path if kind == "rclone-sftp" else server.folder
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name
        assert (folder / name).stat().st_mtime_ns == (src / name).stat().st_mtime_ns
    assert not [p for p in folder.rglob("*") if ".castlib-part-" in p.name]
    _configure(server, tmp_path, monkeypatch)
    assert castlib.verify(server.url, db=db, checksum="md5").exit_code == 0


def test_a_group_of_small_files_whose_line_drops_is_copied_file_by_file(sftp_server,
                                                                         tmp_path,
                                                                         monkeypatch):
    """The connection lost as a group of small files is written (its master ssh killed
    as the group's requests go out): each file of the group fails there, and is copied
    again on its own, with the engine's retries on a new login; the sync ends with every
    file in place and nothing else there."""
    import signal

    import castlib
    from castlib.backends import sftp_wire
    from castlib.backends.sftp import SftpBackend
    from castlib.errors import StorageError

    _configure(sftp_server, tmp_path, monkeypatch)
    files = {f"f{n:02}": os.urandom(100 + n) for n in range(32)}
    src = make_tree(tmp_path / "src", files)
    real_write, real_drive = SftpBackend.write_files, sftp_wire.drive_together
    groups: list[list] = []   # each group's outcomes, as write_files gave them
    dropping: list = []

    def losing_the_line(self, batch):
        if len(groups) == 1:   # the first group is in place: the second meets the drop
            dropping.append(self._sftp._chan.pid)
        try:
            outcomes = real_write(self, batch)
        finally:
            dropping.clear()
        groups.append(outcomes)
        return outcomes

    def dropped(awaitables, wire):
        if dropping:
            os.kill(dropping.pop(), signal.SIGKILL)
        return real_drive(awaitables, wire)

    monkeypatch.setattr(SftpBackend, "write_files", losing_the_line)
    monkeypatch.setattr(sftp_wire, "drive_together", dropped)
    report = castlib.sync(str(src), sftp_server.url, db=f"sqlite:///{tmp_path / 'c.db'}",
                          transfers=1)
    assert report.exit_code == 0 and report.counts["copied"] == 32, report.errors
    assert len(groups) >= 2 and len(groups[1]) > 1, groups
    assert all(outcome is None for outcome in groups[0]), groups[0]
    assert all(isinstance(outcome, StorageError) for outcome in groups[1]), groups[1]
    on_disk = {p.name: p.read_bytes() for p in sftp_server.folder.iterdir()}
    assert on_disk == files


def test_a_group_whose_line_dropped_leaves_the_connection_made_since(sftp_server,
                                                                     monkeypatch):
    """The line drops under a group of small files (write_files), and another transfer
    thread, which met the drop first, connects anew while the group is still settling.
    The group's files fail (each is copied again on its own), and the connection they
    give up is the one they used: the other thread's new one stays open, not closed
    under its copies (each then failed, tried again, and closed the next one in turn)."""
    import signal
    import threading

    from castlib.backends import sftp_wire

    b = open_backend(sftp_server.url, sftp_server.options)
    try:
        write(b, "seed", b"seed")
        real = sftp_wire.drive_together
        others: list = []

        def dropped_then_reconnected(awaitables, wire):
            os.kill(b._sftp._chan.pid, signal.SIGKILL)
            assert wait_for(lambda: b._sftp.closed)
            out = real(awaitables, wire)

            def another_thread():
                try:
                    b.stat("seed")   # meets the drop: that connection is given up
                except Exception:  # noqa: BLE001
                    pass
                assert b.stat("seed") is not None   # and a new one is made
                others.append((b._generation, b._wire()))
            thread = threading.Thread(target=another_thread)
            thread.start()
            thread.join()
            return out

        monkeypatch.setattr(sftp_wire, "drive_together", dropped_then_reconnected)
        outcomes = b.write_files([(f".f{n}.castlib-part-{n:028x}", b"x" * n)
                                  for n in range(1, 5)])
        monkeypatch.undo()
        assert all(o is not None and o.transient for o in outcomes), outcomes
        ((generation, wire),) = others
        assert b._generation == generation and not wire.closed
        assert read(b, "seed") == b"seed"
    finally:
        b.close()


def test_a_small_file_written_to_while_its_group_reads_it_is_changed_during_copy(
        sftp_server, tmp_path, monkeypatch):
    """A source appended to while its group reads it (copy_files_together) is what a
    source written to during its own copy is: counted changed_during_copy and left for
    the next run, as copy_file leaves it, not copied again on its own, whose read would
    then fail as a file changed since it was indexed, a failure like any other."""
    import castlib
    from castlib import transfer

    _configure(sftp_server, tmp_path, monkeypatch)
    files = {f"f{n:02}": os.urandom(100 + n) for n in range(24)}
    src = make_tree(tmp_path / "src", files)
    real = transfer._read_whole
    appended: list[str] = []

    def read_then_append(src_backend, src_path, *args):
        out = real(src_backend, src_path, *args)
        if src_path == "f05" and not appended:   # a log written to as it is read
            appended.append(src_path)
            with open(src / "f05", "ab") as f:
                f.write(b"more")
        return out

    monkeypatch.setattr(transfer, "_read_whole", read_then_append)
    report = castlib.sync(str(src), sftp_server.url, db=f"sqlite:///{tmp_path / 'c.db'}",
                          transfers=1)
    assert appended == ["f05"]
    assert (report.counts["copied"], report.counts["changed_during_copy"],
            report.counts["failed"]) == (23, 1, 0), report.errors
    assert [e for e in report.errors if e.startswith("f05: changed while it was being copied")]
    assert sorted(p.name for p in sftp_server.folder.iterdir()) == \
        sorted(n for n in files if n != "f05")


def _configure(server, tmp_path, monkeypatch) -> None:
    """A configuration file with the server's options, for the commands and the API."""
    config = tmp_path / "castlib.yaml"
    config.write_text(json.dumps({"storage": {server.url: server.options}}))
    monkeypatch.setenv("CASTLIB_CONFIG", str(config))


def test_a_sync_leaves_no_file_it_opened_ahead_for_a_copy_that_failed(sftp_server, tmp_path,
                                                                      monkeypatch):
    """One transfer thread: each copy's rename opens the next copy's temporary file. A
    source that vanished after it was indexed fails its copy before it is written: the
    file opened for it is removed; the other copies are in place, and nothing else."""
    import castlib

    _configure(sftp_server, tmp_path, monkeypatch)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c", "d"):
        (src / name).write_bytes(name.encode() * 100)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    castlib.index(str(src), db=db)
    (src / "b").unlink()
    report = castlib.sync(str(src), sftp_server.url, db=db, index="none", transfers=1)
    assert report.counts["copied"] == 3 and report.counts["failed"] == 1, report.counts
    on_disk = sorted(p.name for p in sftp_server.folder.iterdir())
    assert on_disk == ["a", "c", "d"], on_disk


def test_a_sync_that_names_no_number_copies_8_files_at_once_to_sftp_4_elsewhere(
        sftp_server, tmp_path, monkeypatch):
    """Backend.default_transfers: a small file's copy over SFTP is mostly waits on round
    trips, and 8 at once beat 4 (BENCHMARKS.md); between local folders, 4 as before; a
    number the user names wins either way."""
    import threading

    import castlib
    import castlib.stages.sync as sync_stage

    _configure(sftp_server, tmp_path, monkeypatch)
    src = tmp_path / "src"
    src.mkdir()
    for n in range(24):
        (src / f"f{n}").write_bytes(b"x" * n)
    copying: set[str] = set()
    real_copy = sync_stage.copy_file

    def copy_file(*args, **kwargs):
        copying.add(threading.current_thread().name)
        time.sleep(0.1)   # every thread has claimed a copy before the first one ends
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(sync_stage, "copy_file", copy_file)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    for dst, transfers, threads in ((f"{sftp_server.url}/a", None, 8),
                                    (str(tmp_path / "local"), None, 4),
                                    (f"{sftp_server.url}/b", 2, 2)):
        copying.clear()
        options = {} if transfers is None else {"transfers": transfers}
        report = castlib.sync(str(src), dst, db=db, **options)
        assert report.counts["copied"] == 24 and report.exit_code == 0, report.errors
        assert len(copying) == threads, (dst, sorted(copying))


def test_a_sync_opens_as_many_sessions_as_it_copies_files_at_once(sftp_server, tmp_path,
                                                                    monkeypatch):
    """Each session is an ssh process (~10 ms of CPU) and a channel of the server's 10: the
    login opens the run's own; the transfer threads' are opened once the plan says how
    many files there are (Backend.sessions_needed). A one-file sync opens one more, not
    seven; 24 files, the seven of 8 threads; a sync with nothing to copy, none. A verify
    and an index with checksums ask for their readers' as they know their files."""
    import shutil

    import castlib

    _configure(sftp_server, tmp_path, monkeypatch)
    calls = tmp_path / "ssh-calls"
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
exec {shutil.which("ssh")} "$@"
""")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")

    def sessions_opened(*args, command=castlib.sync, **params) -> tuple[int, int]:
        calls.write_text("")
        report = command(*args, db=f"sqlite:///{tmp_path / 'c.db'}", **params)
        assert report.exit_code == 0, report.errors
        lines = calls.read_text().splitlines()
        logins = [line for line in lines if "ControlMaster=yes" in line]
        more = [line for line in lines if " -s " in line and line not in logins]
        return len(logins), len(more)

    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir()
    (one / "f").write_bytes(b"one file")
    many.mkdir()
    for n in range(24):
        (many / f"f{n}").write_bytes(b"x" * n)
    assert sessions_opened(str(one), f"{sftp_server.url}/one") == (1, 1)
    assert sessions_opened(str(many), f"{sftp_server.url}/many") == (1, 7)
    assert sessions_opened(str(many), f"{sftp_server.url}/many") == (1, 0)   # nothing to copy
    assert sessions_opened(f"{sftp_server.url}/one", command=castlib.verify,
                           checksum="md5") == (1, 1)
    assert sessions_opened(f"{sftp_server.url}/many", command=castlib.verify, checksum="md5",
                           workers=3) == (1, 3)
    assert sessions_opened(f"{sftp_server.url}/many", command=castlib.index,
                           checksum="sha256", workers=2) == (1, 2)
    # the catalog has them all now: nothing is hashed again, no reader is needed
    assert sessions_opened(f"{sftp_server.url}/many", command=castlib.index,
                           checksum="sha256") == (1, 0)
    assert sorted(os.listdir(sftp_server.folder / "many")) == \
        sorted(f"f{n}" for n in range(24))


def test_sessions_that_cannot_be_opened_ahead_are_opened_by_their_threads(sftp_server,
                                                                         monkeypatch):
    """No thread to be had for opening the sessions ahead (a process at its thread
    limit): the threads that copy open their own, at once, not after waiting for the
    sessions promised for the login's timeout (the promise was kept, the opener never
    ran)."""
    import threading

    real_start = threading.Thread.start

    def start(thread):
        if thread.name == "castlib-sftp-sessions":
            raise RuntimeError("can't start new thread")
        return real_start(thread)

    b = open_backend(sftp_server.url, {**sftp_server.options, "connect_timeout": 20})
    assert listing(b) == []
    monkeypatch.setattr(threading.Thread, "start", start)
    b.sessions_needed(4)
    assert b._more_coming.is_set() and len(b._wires) == 1
    started = time.monotonic()

    def work(i: int) -> None:
        write(b, f"f{i}", bytes([i]) * 100)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        real_start(t)
    for t in threads:
        t.join(60)
    assert time.monotonic() - started < 20   # (the login's timeout is 3 x 20 s)
    assert sorted(os.listdir(sftp_server.folder)) == ["f0", "f1", "f2"]
    b.close()


def test_a_line_that_drops_before_the_first_listing_is_tried_again(sftp_server, tmp_path,
                                                                     monkeypatch):
    """The login's connection lost just before the index's first call (does the root
    exist?): a sync ended at once with exit 2 ("connection lost"), where a line that
    drops during a listing or a copy is tried again. That first call is tried again on a
    new login too; a host not reached at all still fails at once (test_connect_early)."""
    import signal

    import castlib
    from castlib.backends.sftp import SftpBackend

    _configure(sftp_server, tmp_path, monkeypatch)
    src = make_tree(tmp_path / "src", {f"f{n}": b"x" * n for n in range(5)})
    real, cut = SftpBackend.root_exists, []

    def root_exists(self):
        if not cut:
            self.fs   # logged in; then the master's ssh is killed (the line drops)
            for pid in ssh_processes(sftp_server.port, masters_only=True):
                os.kill(pid, signal.SIGKILL)
                cut.append(pid)
        return real(self)

    monkeypatch.setattr(SftpBackend, "root_exists", root_exists)
    report = castlib.sync(str(src), f"{sftp_server.url}/d", db=f"sqlite:///{tmp_path / 'c.db'}")
    assert cut, "no master was running"
    assert report.exit_code == 0 and report.counts["copied"] == 5, report.errors
    assert sorted(os.listdir(sftp_server.folder / "d")) == [f"f{n}" for n in range(5)]


def test_hash_commands_leave_the_connection_no_more_channels_than_openssh_opens(
        sftp_server, tmp_path, monkeypatch):
    """A large file is verified by cksum on the host, a channel of the connection that
    also carries the 8 transfer threads' SFTP sessions: OpenSSH opens 10 a connection,
    and beyond them ssh logs in again for each command. The commands take turns: never
    more than the two channels the sessions leave."""
    import castlib
    from castlib.backends import sftp

    _configure(sftp_server, tmp_path, monkeypatch)
    src = tmp_path / "src"
    src.mkdir()
    for n in range(16):
        (src / f"f{n}").write_bytes(os.urandom(sftp.READ_BACK_MAX + 1) * 2)
    def commands() -> int:   # this process's ssh carrying a cksum (not another run's)
        at_once = 0
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    words = f.read().split(b"\0")
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            at_once += (parent == os.getpid() and words[0].endswith(b"ssh")
                        and any(b"cksum" in w or b"md5sum" in w for w in words))
        return at_once

    report, most = _most_while(commands, lambda: castlib.sync(
        str(src), sftp_server.url, db=f"sqlite:///{tmp_path / 'c.db'}"))
    assert report.counts["copied"] == 16 and report.exit_code == 0, report.errors
    assert 1 <= most <= 10 - sftp.MAX_SFTP_SESSIONS, most   # (OpenSSH opens 10)


def _most_while(count, action):
    """action()'s result, and the most count() said while it ran (asked every 2 ms)."""
    import threading

    most, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            most[0] = max(most[0], count())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return action(), most[0]
    finally:
        done.set()
        sampler.join()


def _writes_to_ssh(monkeypatch) -> list[int]:
    """The sizes of the writes to the sessions' ssh from now on (a round trip's requests
    go in one write: see sftp_wire)."""
    from castlib.backends import sftp_wire

    writes: list[int] = []
    real_write = sftp_wire._ThreadPipes.write

    def write(pipes, data):
        writes.append(len(data))
        return real_write(pipes, data)

    monkeypatch.setattr(sftp_wire._ThreadPipes, "write", write)
    return writes


def test_the_folders_of_one_depth_are_made_in_one_round_trip(sftp_server, monkeypatch):
    """Backend.make_folders over ssh: each depth's mkdirs and lstats go out in one write,
    answered before the next depth's; a folder that cannot be made (a file in its place)
    says why, made one by one; one that is there already is no error."""
    from castlib.backends.base import DIR
    from castlib.errors import StorageError

    (sftp_server.folder / "in-the-way").write_bytes(b"a file")
    (sftp_server.folder / "there").mkdir()
    b = open_backend(sftp_server.url, sftp_server.options)
    try:
        b.stat("")   # connected
        writes = _writes_to_ssh(monkeypatch)
        folders = ([f"d{n}" for n in range(10)] + [f"d{n}/e" for n in range(10)]
                   + ["d0/e/f", "there"])
        made = dict(b.make_folders(folders))
        assert len(writes) == 3, writes
        assert all(made[p].kind == DIR for p in folders), made
        assert all((sftp_server.folder / p).is_dir() for p in folders)
        made = dict(b.make_folders(["in-the-way", "next"]))
        assert isinstance(made["in-the-way"], StorageError), made
        assert "in-the-way" in str(made["in-the-way"]) and made["next"].kind == DIR
    finally:
        b.close()


def test_the_folders_of_one_depth_get_their_bits_and_mtimes_in_one_round_trip(
        sftp_server, monkeypatch):
    """Backend.set_folder_metadata over ssh: the first folder one by one (chmod, then
    set_mtime: whether the server refuses either is learned there), then one set-stat
    a folder with both, each depth's sent together, the deepest first."""
    b = open_backend(sftp_server.url, sftp_server.options)
    try:
        folders = [f"d{n}" for n in range(10)] + [f"d{n}/e" for n in range(10)]
        dict(b.make_folders(folders))   # (the server's user's: it may set their bits)
        writes = _writes_to_ssh(monkeypatch)
        asked = [(path, 0o750 + n % 2, (1_600_000_000 + n) * 10**9)
                 for n, path in enumerate(sorted(folders, reverse=True))]
        done = dict(b.set_folder_metadata(asked))
        assert len(writes) == 4, writes
        assert done == {path: (True, True) for path in folders}, done
        for path, mode, mtime_ns in asked:
            st = os.stat(sftp_server.folder / path)
            assert (st.st_mode & 0o7777, st.st_mtime_ns) == (mode, mtime_ns), path
        assert dict(b.set_folder_metadata([("d0", None, 10**18), ("d1", 0o700, None)])) == {
            "d0": (None, True), "d1": (True, None)}
    finally:
        b.close()


def test_a_host_that_opens_few_sessions_gets_one_login_and_every_copy_verified(
        sftp_two_sessions_server, tmp_path, monkeypatch):
    """MaxSessions 2 and a sync of large files with 8 transfers: the SFTP sessions the host
    refused are shared, md5sum finds no session (asked again, then the file is read
    back): every copy verified, on one TCP connection all along."""
    import castlib
    from castlib.backends import sftp

    server = sftp_two_sessions_server
    _configure(server, tmp_path, monkeypatch)
    src = tmp_path / "src"
    src.mkdir()
    for n in range(4):
        (src / f"f{n}").write_bytes(os.urandom(sftp.READ_BACK_MAX + 1) * 2)
    report, most = _most_while(lambda: _established_to(server.port), lambda: castlib.sync(
        str(src), server.url, db=f"sqlite:///{tmp_path / 'c.db'}"))
    assert report.counts["copied"] == 4 and report.exit_code == 0, report.errors
    assert all((server.folder / f"f{n}").read_bytes() == (src / f"f{n}").read_bytes()
               for n in range(4))
    assert most == 1, most
