"""The lean SFTP session (castlib/backends/sftp_wire.py) against real servers: OpenSSH's
sftp-server and `rclone serve sftp`. It must answer as asyncssh's own client does (the
same results, the same exception classes and messages), and never leave a request
waiting on a session or connection that went away."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from urllib.parse import urlparse

import asyncssh
import pytest

from castlib.backends import sftp_wire
from castlib.backends.fsspec import _classify

KINDS = ["sftp", "rclone-sftp"]


def _server(request, kind):
    return request.getfixturevalue(kind.replace("-", "_") + "_server")


def _disk_folder(server) -> Path:
    """Where the test's SFTP folder is on this machine's disk."""
    return getattr(server, "path", None) or server.folder


def _sftp_folder(server) -> str:
    """The test's folder as the server names it."""
    return urlparse(server.url).path


def _connect(server, port: int | None = None):
    return asyncssh.connect(server.host, port=port or server.port, username=server.user,
                            **server.options)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("kind", KINDS)
def test_wire_upload_read_back_and_publish_as_asyncssh_does(request, kind):
    """A small file's requests: open, write, close, open, read (one byte more: the end
    shows), close, set-stat, posix-rename, lstat; what lands on disk, and the attributes
    the wire decodes, are asyncssh's."""
    server = _server(request, kind)
    folder = _sftp_folder(server)
    data = os.urandom(5000)

    async def main():
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            sftp = await conn.start_sftp_client()
            f = await wire.open(f"{folder}/t", "wb")
            assert await asyncio.gather(f.write(data, 0), f.close()) == [None, None]
            f = await wire.open(f"{folder}/t", "rb")
            back, eof, _ = await asyncio.gather(f.read(len(data) + 1, 0),
                                                f.read(10, len(data)), f.close())
            assert (back, eof) == (data, b"")
            attrs = asyncssh.SFTPAttrs(permissions=0o640, atime=1_600_000_000,
                                       mtime=1_600_000_000)
            await wire.setstat(f"{folder}/t", attrs)
            await wire.posix_rename(f"{folder}/t", f"{folder}/final")
            mine, theirs = await wire.lstat(f"{folder}/final"), await sftp.lstat(f"{folder}/final")
            for field in sftp_wire.WireAttrs.__slots__:
                assert getattr(mine, field) == getattr(theirs, field), field
            assert (mine.size, mine.mtime) == (len(data), 1_600_000_000)
            stat = await wire.stat(f"{folder}/final")
            assert stat.size == len(data)
            wire.close()

    _run(main())
    assert (_disk_folder(server) / "final").read_bytes() == data
    assert sorted(os.listdir(_disk_folder(server))) == ["final"]


@pytest.mark.parametrize("kind", KINDS)
def test_wire_errors_are_asyncssh_s_for_the_same_request(request, kind):
    """A refusal comes out as the asyncssh.SFTPError subclass, code and message asyncssh's
    client raises for the same request on the same server: what castlib's error paths
    and learned refusals look for."""
    server = _server(request, kind)
    folder = _sftp_folder(server)
    (_disk_folder(server) / "sub").mkdir()

    def failures(client):
        missing = f"{folder}/missing"
        return [client.stat(missing), client.lstat(missing), client.open(missing, "rb"),
                client.open(f"{missing}/x", "wb"), client.open(f"{folder}/sub", "wb"),
                client.posix_rename(missing, f"{folder}/other"),
                client.setstat(missing, asyncssh.SFTPAttrs(permissions=0o600))]

    async def outcome(calls):   # (rclone takes a set-stat of a missing file: "ok")
        results = await asyncio.gather(*calls, return_exceptions=True)
        return [(type(r), r.code, str(r)) if isinstance(r, BaseException) else "ok"
                for r in results]

    async def main():
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            sftp = await conn.start_sftp_client()
            return await outcome(failures(wire)), await outcome(failures(sftp))

    mine, theirs = _run(main())
    assert mine == theirs
    assert mine[0][0] is asyncssh.SFTPNoSuchFile
    assert sum(r != "ok" for r in mine) >= 6, mine


@pytest.mark.parametrize("kind", KINDS)
def test_wire_names_that_are_not_utf8_round_trip(request, kind):
    """A name that is not UTF-8 goes out as the bytes it stood for (surrogate escapes,
    as local names and asyncssh's client with path_errors=surrogateescape have them)."""
    server = _server(request, kind)
    folder = _sftp_folder(server)
    name, renamed = "caf\udce9-\udcff", "r\udce9sum\udce9"

    async def main():
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            f = await wire.open(f"{folder}/{name}", "wb")
            await asyncio.gather(f.write(b"bytes", 0), f.close())
            assert (await wire.stat(f"{folder}/{name}")).size == 5
            await wire.posix_rename(f"{folder}/{name}", f"{folder}/{renamed}")
            f = await wire.open(f"{folder}/{renamed}", "rb")
            data, _ = await asyncio.gather(f.read(100, 0), f.close())
            return data

    assert _run(main()) == b"bytes"
    assert os.listdir(os.fsencode(_disk_folder(server))) == [b"r\xe9sum\xe9"]


def _sftp_servers_of(sshd_pid: int) -> set[int]:
    """The sftp-server processes below sshd `sshd_pid` (one per session it serves)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() != "sftp-server":
                continue
            pid = int(entry)
            while pid > 1:
                stat = Path(f"/proc/{pid}/stat").read_text()
                pid = int(stat.rsplit(")", 1)[1].split()[1])   # the parent
                if pid == sshd_pid:
                    found.add(int(entry))
                    break
        except (OSError, ValueError, IndexError):   # gone meanwhile
            continue
    return found


def test_wire_request_fails_when_the_server_ends_the_session_mid_request(sftp_server_session):
    """The server's side of the session ends while a request waits for its answer (here:
    its sftp-server killed, stopped before it could answer): the request fails with
    asyncssh's SFTPConnectionLost, at once, not at a timeout; so do later ones."""
    server = sftp_server_session
    sshd_pid = int((server.folder / "sshd.pid").read_text())

    async def main():
        async with _connect(server) as conn:
            before = _sftp_servers_of(sshd_pid)
            wire = await sftp_wire.open_wire(conn)
            ours = _sftp_servers_of(sshd_pid) - before
            assert len(ours) == 1, ours
            pid = ours.pop()
            os.kill(pid, signal.SIGSTOP)
            try:
                waiting = wire.stat("/")
                await asyncio.sleep(0.3)
                assert not waiting.done()
            finally:
                os.kill(pid, signal.SIGKILL)
            with pytest.raises(asyncssh.SFTPConnectionLost):
                await asyncio.wait_for(waiting, 10)
            with pytest.raises(asyncssh.SFTPConnectionLost):
                await asyncio.wait_for(wire.stat("/"), 1)
            # the connection itself lives on: another session serves
            sftp = await conn.start_sftp_client()
            assert (await sftp.stat("/")).permissions is not None

    _run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_wire_requests_fail_when_the_connection_drops(request, kind, outage_proxy):
    """The line drops with requests sent and unanswered: every one fails (asyncssh's
    connection-lost error), none waits for ever."""
    server = _server(request, kind)
    proxy = outage_proxy(server.port)

    async def main():
        async with _connect(server, proxy.port) as conn:
            wire = await sftp_wire.open_wire(conn)
            assert (await wire.stat(_sftp_folder(server))).size is not None
            # the line cut first, the requests made before the loop runs again (so before
            # it reads the line's end): they go out into a line no answer can come back
            # on. The other way round, the proxy's threads could carry them, and the
            # server answer, before the cut (seen once, on a machine running two suites).
            proxy.cut()
            waiting = [wire.stat(_sftp_folder(server)) for _ in range(3)]
            results = await asyncio.wait_for(
                asyncio.gather(*waiting, return_exceptions=True), 20)
            # what castlib calls a lost connection (transient: the engine reconnects)
            assert [_classify(r)[0] for r in results] == ["connection lost"] * 3, results

    _run(main())
