"""The SFTP back-end over OpenSSH's `ssh` (the default client) when things go wrong: a
server that lies in its listings, a login script that writes into the SFTP stream, an
ssh process that dies, a location closed while its sessions are still being opened, a
connection that cannot be made. Nothing lands outside the destination, every failure is
one line (and a lost line is tried again), and no ssh process or temporary folder of
castlib's outlives what made it."""
from __future__ import annotations

import os
import signal
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from castlib.backends import open_backend
from castlib.backends.sftp import _NOBODY
from castlib.backends.ssh_command import SshCommand
from castlib.errors import StorageError
from tests.helpers import wait_for
from tests.helpers import backend_listing as listing
from tests.helpers import backend_read as read
from tests.helpers import backend_write as write
from tests.helpers import last_json, make_tree, run_cli

pytestmark = pytest.mark.skipif(SshCommand.available() is None, reason="no ssh here")

FXP_READDIR, FXP_NAME, FXP_DATA = 12, 104, 103


# the ssh children this process had when the test started (other tests' back-ends, not
# closed, keep theirs to the end of the session): not the test's own (see the fixture)
_BEFORE: set[int] = set()


def _ssh_children() -> list[int]:
    """This process's ssh children that the test started (zombies too: one not waited for
    is left behind)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:   # ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if name == "ssh" and ppid == os.getpid() and int(entry) not in _BEFORE:
            found.append(int(entry))
    return found



@pytest.fixture
def own_temp(monkeypatch):
    """A temporary folder of the test's own for castlib's (ssh's socket folder, askpass),
    short enough for a socket path: what is left in it after a test was left behind."""
    folder = tempfile.mkdtemp(prefix="cl-", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", folder)
    yield Path(folder)
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_ssh_left_behind():
    _BEFORE.clear()
    _BEFORE.update(_ssh_children())
    yield
    left = _ssh_children()
    if left and not wait_for(lambda: not _ssh_children(), 10):
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"ssh processes left behind: {left}")


def _first_call_says(url: str, options: dict) -> str:
    """The one line a location's first call fails with (a StorageError's)."""
    b = open_backend(url, options)
    try:
        with pytest.raises(StorageError) as caught:
            b.stat("x")
    finally:
        b.close()
    said = str(caught.value)
    assert "\n" not in said, said
    return said


def _wire_pid(wire) -> int:
    return wire._chan.pid


# -- a server that lies in its listing ----------------------------------------------------
def _renaming_listing(real: bytes, said: bytes):
    """A tamper function: READDIR's replies name `said` where the server has `real` (the
    same length, so the packet's lengths stay right)."""
    assert len(real) == len(said)

    def tamper(request, reply):
        if request is not None and request.kind == FXP_READDIR and reply[4] == FXP_NAME:
            return reply.replace(real, said)
        return reply
    return tamper


@pytest.mark.parametrize("said", [b"../../../../escape", b"/tmp/castlib-escape", b"sub/inside",
                                  b""])
def test_a_listing_name_that_is_a_path_is_refused(sftp_tamper_server, said):
    """A name in a folder's listing is one name: a server that answers with a path
    ("../x", "/x", "a/b") or nothing fails that listing, one line. Taken as it came, a
    sync from it to a local folder wrote outside the destination (os.path.join)."""
    server = sftp_tamper_server
    real = b"n" * len(said) if said else b"empty-name"
    (server.folder / real.decode()).write_bytes(b"payload")
    if not said:   # a zero-length name: the string's length changes with it
        def tamper(request, reply):
            if request is not None and request.kind == FXP_READDIR and reply[4] == FXP_NAME:
                body = reply[4:].replace(struct.pack(">I", len(real)) + real,
                                         struct.pack(">I", 0), 1)
                return struct.pack(">I", len(body)) + body
            return reply
        server.tamper = tamper
    else:
        server.tamper = _renaming_listing(real, said)
    b = open_backend(server.url, server.options)
    assert b._ssh is not None
    try:
        with pytest.raises(StorageError, match="not a name") as caught:
            list(b.walk(lambda path, msg: None))
        assert "\n" not in str(caught.value)
    finally:
        b.close()


def test_a_sync_from_a_lying_server_writes_nothing_outside_the_destination(
        sftp_tamper_server, tmp_path):
    """The server lists "../../..(to /)/tmp/<folder>/planted" and serves the file there
    (its own path resolves it): before, the sync wrote it at that path on this machine,
    outside the destination (its final name replaced: a new inode there)."""
    import shutil

    server = sftp_tamper_server
    outside = Path(tempfile.mkdtemp(prefix="castlib-outside-", dir="/tmp"))
    try:
        planted = outside / "planted"
        planted.write_bytes(b"planted")
        inode = planted.stat().st_ino
        dst = tmp_path / "a" / "dst"
        dst.mkdir(parents=True)
        up = "../" * (len(dst.parts) + len(server.folder.parts))   # past / on either side
        said = f"{up}{str(planted).lstrip('/')}".encode()
        (server.folder / ("n" * len(said))).write_bytes(b"decoy!!")   # the size of what it serves there
        (server.folder / "honest").write_bytes(b"honest")
        server.tamper = _renaming_listing(b"n" * len(said), said)
        config = tmp_path / "castlib.yaml"
        config.write_text(yaml.safe_dump({"storage": {server.url: server.options}}))
        done = run_cli("sync", server.url, str(dst), "--json",
                       db=f"sqlite:///{tmp_path / 'c.db'}", env={"CASTLIB_CONFIG": str(config)})
        assert "Traceback" not in done.stderr, done.stderr
        assert sorted(p.name for p in outside.iterdir()) == ["planted"], done.stderr
        assert planted.stat().st_ino == inode, done.stderr   # not replaced by the sync
        assert done.returncode != 0, done.stderr   # the listing it could not take is said
        assert "not a name" in done.stderr, done.stderr
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_a_name_given_twice_in_a_listing_is_refused(sftp_tamper_server):
    """A folder holds a name once: a listing that gives one twice (a link, then a folder
    of the same name, whose content a sync would write through the link) is refused."""
    server = sftp_tamper_server
    (server.folder / "aa").write_bytes(b"1")
    (server.folder / "ab").write_bytes(b"2")
    server.tamper = _renaming_listing(b"ab", b"aa")
    b = open_backend(server.url, server.options)
    try:
        with pytest.raises(StorageError, match="twice"):
            list(b.walk(lambda path, msg: None))
    finally:
        b.close()


# -- a set-stat refused after the server did them -----------------------------------------
FXP_SETSTAT, FXP_STATUS, FX_PERMISSION_DENIED = 9, 101, 3


def _refusing_setstat(request, reply):
    """A tamper function: every SET-STAT answered 'permission denied' (sftp-server did
    it; the client is told it did not)."""
    if request is not None and request.kind == FXP_SETSTAT:
        payload = struct.pack(">II", request.rid, FX_PERMISSION_DENIED) + \
            struct.pack(">I", 6) + b"denied" + struct.pack(">I", 0)
        return struct.pack(">IB", 1 + len(payload), FXP_STATUS) + payload
    return reply


def test_a_deferred_set_stat_refused_fails_the_copy_with_the_verified_bytes_in_place(
        sftp_tamper_server):
    """Once the server has set an mtime, a temporary file's mtime goes out with its
    rename, in one round trip. A set-stat refused there after all fails the copy (never
    said to have times it has not); the rename, sent with it, went through: the file in
    place is the verified one, which the next sync gives its times."""
    from castlib.transfer import temp_path

    server = sftp_tamper_server
    b = open_backend(server.url, server.options)
    try:
        write(b, "first", b"x")
        b.set_mtime("first", 1_600_000_000 * 10**9)   # set-stat works here: learned
        tmp = temp_path("f", b.temp_key)
        write(b, tmp, b"verified bytes")
        b.set_mtime(tmp, 1_500_000_000 * 10**9)   # deferred to the rename
        server.tamper = _refusing_setstat
        with pytest.raises(StorageError, match="denied"):
            b.rename(tmp, "f")
        assert (server.folder / "f").read_bytes() == b"verified bytes"
        assert not (server.folder / tmp).exists()
    finally:
        b.close()


def test_a_copy_whose_deferred_set_stat_was_refused_gets_its_time_from_the_next_sync(
        sftp_tamper_server, tmp_path):
    """One file's deferred set-stat refused (the others' done): that copy counts failed
    (exit 1), the others not; its verified bytes are in place without their time, and
    the next sync sets the time without copying the file again."""
    import asyncio

    server = sftp_tamper_server
    names = [f"f{i:02}" for i in range(20)] + ["z"]   # z last: the set-stat proven by then
    src = make_tree(tmp_path / "src", {name: name.encode() * 3 for name in names})
    for i, name in enumerate(names):
        os.utime(src / name, (1_500_000_000 + i, 1_500_000_000 + i))
    late = []

    def refusing_z(request, reply):
        if request is None or request.kind != FXP_SETSTAT or b"/.z." not in request.payload:
            return reply

        async def undo_when_in_place():   # sftp-server did it: it is undone, as if not
            for _ in range(1000):
                if (server.folder / "z").exists():
                    os.utime(server.folder / "z", (1_700_000_000, 1_700_000_000))
                    return
                await asyncio.sleep(0.01)
        late.append(asyncio.ensure_future(undo_when_in_place()))
        return _refusing_setstat(request, reply)

    server.tamper = refusing_z
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {server.url: server.options}}))
    db, env = f"sqlite:///{tmp_path / 'c.db'}", {"CASTLIB_CONFIG": str(config)}
    first = run_cli("sync", str(src), server.url, "--json", db=db, env=env)
    assert "Traceback" not in first.stderr, first.stderr
    counts = last_json(first.stdout)
    assert (counts["copied"], counts["failed"]) == (len(names) - 1, 1), first.stderr
    assert first.returncode == 1, first.stderr
    assert "z: " in first.stderr and "denied" in first.stderr, first.stderr
    assert wait_for(lambda: (server.folder / "z").stat().st_mtime == 1_700_000_000, 10)
    assert (server.folder / "z").read_bytes() == b"zzz"

    server.tamper = lambda request, reply: reply
    second = run_cli("sync", str(src), server.url, "--json", db=db, env=env, check=0)
    counts = last_json(second.stdout)
    assert (counts["copied"], counts["replaced"], counts["mtime_fixed"]) == (0, 0, 1), \
        second.stderr
    assert (server.folder / "z").stat().st_mtime == 1_500_000_000 + len(names) - 1
    assert run_cli("verify", server.url, "--json", db=db, env=env).returncode == 0


def test_a_small_file_read_back_changed_is_never_published_and_its_group_is(
        sftp_tamper_server, tmp_path):
    """Small files are copied a few at once over ssh. The server's read-back of one of
    them differs from what was sent (a byte flipped in its DATA reply): that file fails
    its verification, which is its outcome as its own copy's would be (not a transient
    error: not copied again), and it is never put in place; the others of its group are,
    each verified; no temporary file is left."""
    server = sftp_tamper_server
    files = {f"f{n:02}": f"file {n:02} ".encode() * 20 for n in range(24)}
    files["f05"] = b"BAD!" * 50
    src = make_tree(tmp_path / "src", files)
    reads_of_bad: list[int] = []

    def flipping(request, reply):
        if reply[4] == FXP_DATA and b"BAD!" in reply:
            reads_of_bad.append(1)
            return reply.replace(b"BAD!", b"BAD?", 1)
        return reply

    server.tamper = flipping
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {server.url: server.options}}))
    db, env = f"sqlite:///{tmp_path / 'c.db'}", {"CASTLIB_CONFIG": str(config)}
    run = run_cli("sync", str(src), server.url, "--json", "--transfers", "1", db=db, env=env,
                  check=1)
    assert "Traceback" not in run.stderr, run.stderr
    counts = last_json(run.stdout)
    assert (counts["copied"], counts["failed"]) == (23, 1), run.stderr
    assert "f05" in run.stderr and "!=" in run.stderr, run.stderr
    assert len(reads_of_bad) == 1   # in its group only
    on_disk = {p.name: p.read_bytes() for p in server.folder.iterdir()}
    del files["f05"]
    assert on_disk == files


def test_a_group_of_small_files_on_a_server_that_stops_answering_fails_in_one_timeout(
        sftp_tamper_server, monkeypatch):
    """A group of small files written together (write_files) to a server that answers
    their opens, then nothing more (a hung disk): the group fails once the read timeout
    has passed, each file with a transient error (copied again on its own, on a new
    session), not after a timeout more for each file of the group (32 files: over an
    hour at the default 120 s); the next write goes through a new session."""
    import castlib.backends.sftp as sftp

    server = sftp_tamper_server
    monkeypatch.setattr(sftp, "READ_TIMEOUT_S", 2)
    b = open_backend(server.url, server.options)
    try:
        assert b.writes_files_together
        b.stat("x")   # (the session's own requests answered)
        answered: list[int] = []

        def hung_after_the_opens(request, reply):
            answered.append(1)
            return reply if len(answered) <= 10 else b""

        server.tamper = hung_after_the_opens
        started = time.monotonic()
        outcomes = b.write_files([(f".f{n}.castlib-part-{n:028x}", b"x" * n)
                                  for n in range(1, 11)])
        assert time.monotonic() - started < 7, time.monotonic() - started
        assert all(isinstance(o, StorageError) and o.transient for o in outcomes), outcomes
        server.tamper = lambda request, reply: reply
        write(b, "after", b"data")
        assert read(b, "after") == b"data"
    finally:
        b.close()


# -- a login script that writes into the stream -------------------------------------------
def test_a_login_script_that_prints_is_named(sftp_chatty_server):
    """A host whose shell writes to stdout before the subsystem starts (a .bashrc that
    echoes) corrupts SFTP's stream: said as such, with what it wrote, not as an "invalid
    response length"."""
    said = _first_call_says(sftp_chatty_server.url, sftp_chatty_server.options)
    assert "Welcome to the machine" in said and "prints" in said, said


# -- an ssh that dies ------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["master", "another session"])
def test_an_ssh_killed_under_a_copy_is_a_lost_connection_tried_anew(sftp_server, which):
    """The ssh of a session killed mid-copy (the OOM killer, an admin's kill): the copy
    fails as a lost connection, which the engine tries again, and the next call connects
    anew (before: 'remote command failed (ended by signal 9)', not tried again)."""
    b = open_backend(sftp_server.url, sftp_server.options)
    outcome = []

    def copy() -> None:
        try:
            with b.open_write("big") as f:
                f.write(os.urandom(4 * 1024 * 1024))
                f.write(os.urandom(1024 * 1024))   # opened: its requests on this session
                wire = b._wire()
                victim = wire if which != "master" else b._sftp
                os.kill(_wire_pid(victim), signal.SIGKILL)
                assert wait_for(lambda: wire.closed)
                for _ in range(8):
                    f.write(os.urandom(1024 * 1024))
        except Exception as exc:   # noqa: BLE001 - what the copy raised, checked below
            outcome.append(exc)
        else:
            outcome.append(None)

    try:
        write(b, "f", b"data")
        if which == "master":   # the first session, this thread's: the copy on it
            copy()
        else:                   # another thread's session (a channel of the master's)
            t = threading.Thread(target=copy)
            t.start()
            t.join(120)
        error = outcome[0]
        assert isinstance(error, StorageError), repr(error)
        assert error.transient, error
        assert "connection lost" in str(error), error
        assert read(b, "f") == b"data"   # connected anew
    finally:
        b.close()


# -- a child of ssh's that outlives it -------------------------------------------------------
# A ProxyCommand that carries ssh's connection and leaves a helper behind that keeps the
# stderr it inherited from ssh (ssh ends the proxy at its exit, not the proxy's children)
_LINGERING_PROXY = """\
import os, socket, subprocess, sys, threading
helper = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
with open(sys.argv[3], "a") as f:
    f.write(f"{helper.pid}\\n")
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
"""


@pytest.fixture
def ssh_with_lingering_proxy(tmp_path, monkeypatch):
    """`ssh` on PATH is OpenSSH's through a ProxyCommand whose helper holds ssh's stderr
    for 30 s after ssh ended (killed when the test ends)."""
    import shutil
    import sys

    real = shutil.which("ssh")
    proxy, helpers = tmp_path / "proxy.py", tmp_path / "helpers"
    proxy.write_text(_LINGERING_PROXY)
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {real} -o 'ProxyCommand={sys.executable} {proxy} "
                       f"%h %p {helpers}' \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    yield
    for pid in (helpers.read_text().split() if helpers.exists() else []):
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_refused_login_is_said_at_once_when_ssh_leaves_a_child_with_its_stderr(
        sftp_server, ssh_with_lingering_proxy):
    """ssh refused (a key the server does not take) and ended; its stderr is still open
    in the proxy's helper: the refusal is said as soon as ssh ended, its own line (before:
    after the login timeout, 30 s, when castlib gave up waiting for the pipe's end)."""
    b = open_backend(sftp_server.url, {"known_hosts": None,
                                       "client_keys": [sftp_server.client_key + ".pub"]})
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match="authentication failed"):
            b.stat("x")
    finally:
        b.close()
    assert time.monotonic() - started < 10


def test_a_killed_ssh_that_left_a_child_with_its_stderr_is_a_connection_lost_at_once(
        sftp_server, ssh_with_lingering_proxy):
    """The master's ssh killed with a request in flight; the proxy's helper keeps its
    stderr: the request fails as soon as ssh ended, its session lost, and the next call
    connects anew (before: the request waited for the helper's end, 30 s)."""
    from castlib.backends import sftp_wire

    b = open_backend(sftp_server.url, sftp_server.options)
    try:
        write(b, "f", b"data")
        wire = b._sftp
        started = time.monotonic()
        os.kill(_wire_pid(wire), signal.SIGKILL)
        asked = wire.lstat(f"{sftp_server.folder}/f")   # sent before the end is seen
        try:
            asked.result(20)
            said = "answered"
        except sftp_wire.WaitTimeout:
            said = "no answer"
        except Exception as exc:   # noqa: BLE001 - checked below
            said = str(exc)
        assert "the session's ssh ended" in said, said
        assert time.monotonic() - started < 10
        assert read(b, "f") == b"data"   # connected anew
    finally:
        b.close()


def test_a_refusal_after_much_said_on_stderr_is_still_said(sftp_server, tmp_path,
                                                           monkeypatch):
    """Lines on ssh's stderr before its own (a ProxyCommand's chatter, LogLevel DEBUG in
    ~/.ssh/config: 8 KiB already for one refused login at DEBUG3): ssh's last words, why
    it ended, are the ones kept (before: the first 8 KiB, and the refusal said as
    'connection lost (debug1: ...)')."""
    import shutil

    real = shutil.which("ssh")
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    noise = "debug1: a line of what comes before the words of ssh\\n"
    wrapper.write_text(f"#!/bin/sh\nfor i in $(seq 400); do printf '{noise}' >&2; done\n"
                       f"exec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    said = _first_call_says(sftp_server.url, {"known_hosts": None,
                                              "client_keys": [sftp_server.client_key + ".pub"]})
    assert "authentication failed (Permission denied (publickey))" in said, said


# -- sessions still being opened at close ----------------------------------------------------
def test_sessions_opened_after_close_are_closed_not_left_running(sftp_server, own_temp):
    """close() while the sessions a run asked for are still being opened (a short run, an
    early error): those that come after it are closed, not left running (ssh processes
    and logins on the server for the life of a worker)."""
    b = open_backend(sftp_server.url, sftp_server.options)
    assert listing(b) == []
    host, generation = b.fs, b._generation
    b.close()
    places = [[None, _NOBODY] for _ in range(3)]
    started = []
    watching = threading.Event()

    def watch() -> None:   # no ssh is even started: each would be a login of its own
        while not watching.is_set():
            started.extend(_ssh_children())
            time.sleep(0.001)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        b._open_more_wires(host, places, generation)   # as its thread does when close came first
    finally:
        watching.set()
        watcher.join()
    assert started == []
    assert wait_for(lambda: not _ssh_children()), _ssh_children()
    assert all(p[0] is None or p[0].closed for p in places)
    assert list(own_temp.iterdir()) == []


def test_close_waits_for_the_thread_opening_sessions(sftp_server, tmp_path, monkeypatch):
    """A short run (a no-op sync) closes its location while the sessions it asked for
    ahead are still being opened: close() returns with no thread of the location left
    running (before: they ran on into the interpreter's exit, and a no-op sync that had
    printed its whole report once exited with SIGSEGV)."""
    import shutil

    real = shutil.which("ssh")
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    # the sessions on the master's connection (ControlMaster=no) but the first (the
    # listing's) start late: they are still coming when the location is closed
    first = tmp_path / "first"
    wrapper.write_text("#!/bin/sh\ncase \"$*\" in *ControlMaster=no*) "
                       f"mkdir {first} 2>/dev/null || sleep 3;; esac\nexec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    b = open_backend(sftp_server.url, sftp_server.options)
    b.connect_in_background(8)
    assert listing(b) == []
    opening = [t for t in threading.enumerate() if t.name.startswith("castlib-sftp-session")]
    assert opening, "the sessions came before the close: nothing tested"
    b.close()
    assert not [t for t in opening if t.is_alive()]
    assert wait_for(lambda: not _ssh_children()), _ssh_children()


@pytest.mark.parametrize("waited_by", ["pidfd", "thread"])
def test_sessions_given_up_as_they_start_leave_no_zombie(sftp_server, waited_by, monkeypatch):
    """Sessions whose time is up as their ssh has just started (a timeout that fires
    while its pipes are being attached to the loop; a run ending does the same): each
    ssh is killed and waited for (before: left a zombie for the rest of the run, a
    process table entry each), by a pidfd or, where there is none, a thread."""
    if waited_by == "thread":   # (as on Linux < 5.3, or another Unix)
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    b = open_backend(sftp_server.url, sftp_server.options)
    try:
        b.stat("x")
        master = _wire_pid(b._sftp)
        for timeout in (0.0001, 0.001, 0.003, 0.01) * 2:
            for wire in b.fs.open_wires(4, timeout):   # (any that made it: closed)
                b.fs._wires.remove(wire)
                wire.close()
        assert wait_for(lambda: _ssh_children() == [master], 10), _ssh_children()
    finally:
        b.close()


def test_close_during_the_early_sessions_leaves_nothing(sftp_server, own_temp):
    b = open_backend(sftp_server.url, sftp_server.options)
    b.connect_in_background(9)
    assert wait_for(lambda: b._fs is not None or b._early is None, 60)
    b.close()
    assert wait_for(lambda: not _ssh_children(), 30), _ssh_children()
    time.sleep(1)   # any session still coming has come by now
    assert not _ssh_children()
    assert wait_for(lambda: list(own_temp.iterdir()) == [], 10), list(own_temp.iterdir())


# -- connections that cannot be made -------------------------------------------------------
def test_a_connection_that_fails_leaves_no_socket_folder(sftp_server, own_temp):
    """A login refused, a port closed: the private folder made for the shared connection's
    socket goes with the attempt (a cron job against a host that is down made one a try)."""
    from tests.servers.common import free_port

    url = sftp_server.url.replace(f":{sftp_server.port}/", f":{free_port()}/", 1)
    for options in ({**sftp_server.options, "connect_timeout": 5}, ):
        b = open_backend(url, options)
        with pytest.raises(StorageError, match="connection refused"):
            b.stat("x")
        b.close()
    b = open_backend(sftp_server.url, {"known_hosts": None,
                                       "client_keys": [sftp_server.client_key + ".pub"]})
    with pytest.raises(StorageError):
        b.stat("x")
    b.close()
    assert list(own_temp.iterdir()) == []


def test_sync_to_a_host_that_is_down_says_one_line_and_leaves_nothing(sftp_server, tmp_path,
                                                                      own_temp):
    from tests.servers.common import free_port

    src = make_tree(tmp_path / "src", {"a": b"a"})
    url = sftp_server.url.replace(f":{sftp_server.port}/", f":{free_port()}/", 1)
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {url: {**sftp_server.options,
                                                        "connect_timeout": 3}}}))
    done = run_cli("sync", str(src), url, "--json", db=f"sqlite:///{tmp_path / 'c.db'}",
                   env={"CASTLIB_CONFIG": str(config), "TMPDIR": str(own_temp)})
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("castlib:")]
    assert lines and "connection refused" in lines[-1], done.stderr
    assert done.returncode != 0
    assert list(own_temp.iterdir()) == []
    assert last_json(done.stdout) is not None


# -- a server that stops answering ---------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _sftp_servers_of(server) -> set[int]:
    """The sftp-server processes the fixture's sshd runs now."""
    sshd = int((Path(server.client_key).parent / "sshd.pid").read_text())
    out = set()
    for pid in _descendants(sshd):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sftp-server":
                out.add(pid)
        except OSError:
            continue
    return out


def test_a_server_that_stops_answering_fails_in_bounded_time_and_is_left(sftp_server,
                                                                        monkeypatch):
    """The host's sftp-server stopped (SIGSTOP: a hung disk, a frozen VM): the call fails
    once the read timeout has passed, as a line that is gone (tried again), the session's
    ssh is ended, and the next call connects anew."""
    import castlib.backends.sftp as sftp

    before = _sftp_servers_of(sftp_server)
    b = open_backend(sftp_server.url, sftp_server.options)
    stopped = set()
    try:
        write(b, "f", b"data")
        stopped = _sftp_servers_of(sftp_server) - before
        assert len(stopped) == 1, stopped
        monkeypatch.setattr(sftp, "READ_TIMEOUT_S", 3)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        old = _ssh_children()
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            b.stat("other")   # (not "f": its stat came with its rename, and is kept)
        assert time.monotonic() - started < 15
        assert caught.value.transient, caught.value
        assert wait_for(lambda: not set(old) & set(_ssh_children()), 10)
        assert read(b, "f") == b"data"
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        b.close()


# -- castlib killed mid-sync ---------------------------------------------------------------
def test_sigkill_mid_sync_over_ssh_then_rerun_is_exact_and_leaves_nothing(sftp_server,
                                                                         tmp_path):
    """castlib killed (SIGKILL) while copying to an SSH host over ssh: its ssh processes
    end with it (their input closes), nothing under a final name is partial, and a re-run
    finishes the job byte for byte, its temporary files gone."""
    import hashlib
    import subprocess

    from tests.helpers import castlib_command, cli_env

    files = {f"d{i % 3}/f{i:02d}.bin": os.urandom(1024 * 1024 + i) for i in range(24)}
    src = make_tree(tmp_path / "src", files)
    url = sftp_server.url.rstrip("/") + "/dst"
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {url: sftp_server.options}}))
    env = {"CASTLIB_CONFIG": str(config)}
    db = f"sqlite:///{tmp_path / 'c.db'}"
    dst = sftp_server.folder / "dst"
    proc = subprocess.Popen(castlib_command("-q", "sync", str(src), url, "--transfers", "8",
                                            db=db),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=cli_env(env))
    try:
        def landed() -> int:
            return sum(1 for p in dst.rglob("f*.bin")) if dst.is_dir() else 0
        assert wait_for(lambda: landed() >= 2 or proc.poll() is not None, 120)
        assert proc.poll() is None, "the sync ended before it could be killed"
        ssh = [p for p in _descendants(proc.pid)
               if Path(f"/proc/{p}/comm").exists() and
               Path(f"/proc/{p}/comm").read_text().strip() == "ssh"]
        assert ssh
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    assert wait_for(lambda: not any(alive(p) for p in ssh), 30), [p for p in ssh if alive(p)]
    for path in dst.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            rel = str(path.relative_to(dst))
            assert path.read_bytes() == files[rel], rel

    rerun = run_cli("sync", str(src), url, "--json", db=db, env=env, check=0)
    assert last_json(rerun.stdout)["failed"] == 0
    got = {str(p.relative_to(dst)): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in dst.rglob("*") if p.is_file()}
    assert got == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


# -- an ssh that ends by itself ------------------------------------------------------------
def test_an_ssh_that_ended_just_before_its_session_closed_is_not_reaped_twice(sftp_server,
                                                                              caplog):
    """A session closed just after its ssh ended (a dropped line, a killed ssh, then the
    run closing): once, the transport's close() polled the process and reaped it under
    asyncio's child watcher, which wrote "Unknown child process pid N, will report
    returncode 255" on the user's terminal (one session in six here). Each session now
    waits for its own ssh; none is left, nothing said."""
    import logging

    b = open_backend(sftp_server.url, sftp_server.options)
    caplog.set_level(logging.WARNING, logger="asyncio")
    try:
        b.stat("x")
        host = b.fs
        killed = 0
        for _ in range(6):
            wires = host.open_wires(7, 60)
            assert wires

            def kill_and_close() -> None:
                for wire in wires:
                    pid = _wire_pid(wire)
                    os.kill(pid, signal.SIGKILL)
                    while True:   # until it is a zombie: ended, not yet waited for
                        try:
                            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
                        except OSError:
                            break
                        if state.split()[0] == "Z":
                            break
                    wire.close()

            kill_and_close()
            killed += len(wires)
        assert wait_for(lambda: len(_ssh_children()) == 1)   # the first session's
    finally:
        b.close()
    assert killed >= 30
    assert [r.getMessage() for r in caplog.records if "Unknown child" in r.getMessage()] == []


@pytest.mark.parametrize("says", [b"", b"SSH-2.0-OpenSSH_9.2\r\n"])
def test_a_host_that_does_not_answer_is_said_with_why(says):
    """A port that takes the connection and says nothing (ssh gives up on its banner
    after connect_timeout), or only its banner (castlib gives up on the login after
    three times it): 'timed out' with ssh's words or the seconds waited (before: 'timed
    out (FSTimeoutError)', fsspec's sync having made a bare error of either)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def answer():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:   # closed: the test is over
                return
            conn.sendall(says)
            held.append(conn)

    threading.Thread(target=answer, daemon=True).start()
    port = listener.getsockname()[1]
    b = open_backend(f"sftp://nobody@127.0.0.1:{port}/x",
                     {"known_hosts": None, "connect_timeout": 1})
    started = time.monotonic()
    try:
        with pytest.raises(StorageError) as caught:
            b.stat("y")
    finally:
        b.close()
        listener.close()
        for conn in held:
            conn.close()
    said = str(caught.value)
    assert time.monotonic() - started < 20
    assert "FSTimeoutError" not in said, said
    wanted = "timed out during banner exchange" if not says else "no login within 3 s"
    assert "timed out (" in said and wanted in said, said
    assert "\n" not in said


def test_a_refused_connection_is_said_as_such_every_time(sftp_server):
    """ssh that ends before castlib writes its first request (a refused connection ends
    it in a millisecond): its own reason is said, not "ssh's input is closed" (one try
    in twenty here)."""
    from tests.servers.common import free_port

    said = []
    for _ in range(30):
        url = sftp_server.url.replace(f":{sftp_server.port}/", f":{free_port()}/", 1)
        b = open_backend(url, {**sftp_server.options, "connect_timeout": 5})
        try:
            b.stat("x")
        except StorageError as exc:
            said.append(str(exc))
        finally:
            b.close()
    assert len(said) == 30
    assert [s for s in said if "connection refused" not in s] == []


def test_an_option_ssh_refuses_is_said_with_its_location(sftp_server):
    """A key file that is not there: the one line names the location as well as the
    option (before: 'client_keys: no key file ...', of no location)."""
    from castlib.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        open_backend(sftp_server.url, {"client_keys": ["/no/such/key"], "known_hosts": None})
    said = str(caught.value)
    assert said.startswith(f"sftp://{sftp_server.user}@127.0.0.1:{sftp_server.port}/"), said
    assert "client_keys: no key file '/no/such/key'" in said


def test_a_sync_whose_master_ssh_is_killed_is_retried_to_an_exact_tree(sftp_server, tmp_path):
    """The shared connection's ssh killed mid-sync (8 transfers): every copy in flight
    is tried again on a new connection, the run ends with nothing failed, no warning of
    asyncio's, and the tree is exact (before: 'remote command failed (ended by signal
    9)' for the copy on the master's own session, exit 1, and an 'Unknown child
    process' warning)."""
    import subprocess

    from tests.helpers import castlib_command, cli_env

    files = {f"f{i:02d}.bin": os.urandom(2 * 1024 * 1024 + i) for i in range(40)}
    src = make_tree(tmp_path / "src", files)
    url = sftp_server.url.rstrip("/") + "/dst"
    dst = sftp_server.folder / "dst"
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {url: sftp_server.options}}))
    proc = subprocess.Popen(castlib_command("sync", str(src), url, "--transfers", "8", "--json",
                                            db=f"sqlite:///{tmp_path / 'c.db'}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env({"CASTLIB_CONFIG": str(config)}))
    try:
        def landed() -> int:
            return len([p for p in dst.iterdir() if not p.name.startswith(".")]) \
                if dst.is_dir() else 0
        assert wait_for(lambda: landed() >= 3 or proc.poll() is not None, 120)
        assert proc.poll() is None, "the sync ended before its ssh could be killed"
        masters = [p for p in _descendants(proc.pid)
                   if b"ControlMaster=yes" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(masters) == 1, masters
        os.kill(masters[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert last_json(out)["failed"] == 0, err
    assert "Unknown child process" not in err and "Traceback" not in err, err
    got = {p.name: p.read_bytes() for p in dst.iterdir()}
    assert got == files   # every file, byte for byte, and no temporary one left


def test_a_link_target_with_a_nul_fails_that_link_not_the_run(sftp_tamper_server, tmp_path):
    """A server that answers READLINK with a NUL in the target: before, the sync ended
    with 'internal error: ValueError: embedded null byte' (exit 2) when it made the
    link; now that link is not made (its target unread) and the rest is copied."""
    server = sftp_tamper_server
    os.symlink("aaaa", server.folder / "lnk")
    (server.folder / "f").write_bytes(b"x")

    def nul_in_target(request, reply):
        if request is not None and request.kind == 19 and reply[4] == FXP_NAME:   # READLINK
            return reply.replace(b"aaaa", b"a\0aa")
        return reply
    server.tamper = nul_in_target
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {server.url: server.options}}))
    dst = tmp_path / "dst"
    done = run_cli("sync", server.url, str(dst), "--json", db=f"sqlite:///{tmp_path / 'c.db'}",
                   env={"CASTLIB_CONFIG": str(config)})
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr
    assert (dst / "f").read_bytes() == b"x"
    assert not os.path.lexists(dst / "lnk")
    assert last_json(done.stdout)["failed"] == 1


@pytest.mark.parametrize("client", ["asyncssh", "openssh"])
def test_a_listed_folder_named_a_slash_dotdot_is_refused_over_either_client(
        sftp_tamper_server, client):
    """A folder listed as 'a/..': through asyncssh (sshfs joins the name to the folder,
    castlib took its last part) it became '..', and the walk listed the location's
    parent ('../secret', then '../srv/..', for ever): a sync from it wrote above its
    destination. Over either client it is now refused."""
    import itertools

    server = sftp_tamper_server
    (server.folder / "dddd").mkdir()
    server.tamper = _renaming_listing(b"dddd", b"a/..")
    b = open_backend(server.url, {**server.options, "ssh_client": client})
    try:
        with pytest.raises(StorageError, match="not a name"):
            list(itertools.islice(b.walk(lambda path, msg: None), 50))
    finally:
        b.close()


# -- what a killed run leaves in /tmp -------------------------------------------------------
def test_a_killed_runs_socket_folder_is_swept_by_the_next_run_and_nothing_else(
        tmp_path, sftp_server):
    """kill -9 runs no cleanup: the run's private folder for ssh's socket stays in the
    temporary folder. The next run that logs in removes it: a folder of this user named
    by a pid this machine has no process of, empty or holding a socket nobody answers on.
    A live process's folder, a folder with anything else in it, a link, a live socket
    (a process of another pid namespace sharing /tmp), a folder made in the last minute
    (such a process's, before its socket is made) stay."""
    import socket
    import subprocess
    import sys

    from tests.helpers import castlib_command, cli_env

    temp = Path(tempfile.mkdtemp(prefix="cl-", dir="/tmp"))
    try:
        config = tmp_path / "castlib.yaml"
        config.write_text(yaml.safe_dump({"storage": {sftp_server.url: sftp_server.options}}))
        env = {"CASTLIB_CONFIG": str(config), "TMPDIR": str(temp)}
        src = make_tree(tmp_path / "src", {f"f{i:03}": os.urandom(64 * 1024) for i in range(200)})
        killed = subprocess.Popen(
            castlib_command("sync", str(src), sftp_server.url + "/first",
                            db=f"sqlite:///{tmp_path / 'c.db'}"),
            env=cli_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        left = f"castlib-ssh-{killed.pid}-"
        assert wait_for(lambda: any((temp / n / "m").exists() for n in os.listdir(temp)
                                    if n.startswith(left)), 60)
        killed.kill()
        killed.wait()
        assert wait_for(lambda: all(not (temp / n / "m").exists() or not _listening(temp / n / "m")
                                    for n in os.listdir(temp)), 10)
        gone = subprocess.Popen([sys.executable, "-c", ""])
        gone.wait()
        dead = gone.pid
        for name, content in (("empty", None), ("other", "a file"), ("linked", "link")):
            folder = temp / f"castlib-ssh-{dead}-{name}"
            if content == "link":
                folder.symlink_to(temp / f"castlib-ssh-{dead}-other")
                continue
            folder.mkdir()
            if content:
                (folder / "keep").write_text(content)
        (temp / f"castlib-ssh-{os.getpid()}-alive").mkdir()   # this process lives
        live = temp / f"castlib-ssh-{dead}-listening"
        live.mkdir()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(live / "m"))
        listener.listen()
        a_while_ago = time.time() - 120
        for name in os.listdir(temp):   # all left a while ago, but one just made
            os.utime(temp / name, (a_while_ago, a_while_ago), follow_symlinks=False)
        (temp / f"castlib-ssh-{dead}-new").mkdir()
        try:
            run_cli("sync", str(src), sftp_server.url + "/second",
                    db=f"sqlite:///{tmp_path / 'c.db'}", env=env, check=0)
        finally:
            listener.close()
        assert sorted(os.listdir(temp)) == sorted(
            f"castlib-ssh-{p}-{n}" for p, n in ((dead, "other"), (dead, "linked"),
                                                 (os.getpid(), "alive"), (dead, "listening"),
                                                 (dead, "new")))
        assert (temp / f"castlib-ssh-{dead}-other" / "keep").read_text() == "a file"
    finally:
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _listening(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
