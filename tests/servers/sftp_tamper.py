"""A hostile or buggy SFTP server for tests: a real SSH server (asyncssh, any login) whose
sftp subsystem is OpenSSH's own sftp-server, one process a session, with every reply
passed through a function the test sets (`server.tamper`), which may change, split,
repeat, delay or drop it, or answer with bytes of its own.

`tamper(request, reply)` gets the request the reply answers (`Request`: its type, id and
payload after the id; for the INIT, type 1 and the version as id) and the reply, framed
(length, type, id, payload), and returns what the client gets instead: bytes, a list
of bytes (written one by one, each its own channel write), or an awaitable of either.
Returning `reply` leaves the session as OpenSSH's. A test that wants to answer without
sftp-server sees no reply: tamper is only called on replies.
"""
from __future__ import annotations

import asyncio
import inspect
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

SFTP_SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/lib/sftp-server",
                                shutil.which("sftp-server") or "") if p and Path(p).exists()),
                   None)


@dataclass
class Request:
    kind: int
    rid: int
    payload: bytes


def _packets(buf: bytearray):
    """Whole SFTP packets taken off the front of `buf`."""
    out = []
    while len(buf) >= 4:
        (length,) = struct.unpack_from(">I", buf)
        if len(buf) < 4 + length:
            break
        out.append(bytes(buf[:4 + length]))
        del buf[:4 + length]
    return out


class TamperServer:
    def __init__(self, folder: Path):
        import asyncssh

        self.folder = folder
        self.host = "127.0.0.1"
        self.user = "castlib"
        self.tamper = lambda request, reply: reply
        self.sessions = 0   # sftp subsystems started so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        tamper_server = self

        class Session(asyncssh.SSHServerSession):
            """The sftp subsystem: bytes in and out of a channel, relayed (see _relay)."""

            def connection_made(self, chan):
                self.chan, self.incoming = chan, asyncio.Queue()

            def subsystem_requested(self, subsystem):
                return subsystem == "sftp"

            def session_started(self):
                self.task = asyncio.ensure_future(tamper_server._relay(self))

            def data_received(self, data, datatype):
                self.incoming.put_nowait(data)

            def eof_received(self):
                self.incoming.put_nowait(b"")

            def connection_lost(self, exc):
                self.incoming.put_nowait(b"")

        class Server(asyncssh.SSHServer):
            def begin_auth(self, username):
                return False   # no login needed

            def session_requested(self):
                return Session()

        async def start():
            key = asyncssh.generate_private_key("ssh-ed25519")
            return await asyncssh.create_server(Server, self.host, 0, server_host_keys=[key],
                                                encoding=None)

        self._server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(30)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"sftp://{self.user}@{self.host}:{self.port}{self.folder}"

    @property
    def options(self) -> dict:
        return {"known_hosts": None}

    async def _relay(self, session) -> None:
        """One session: the client's bytes to a new sftp-server as they come, its replies
        back through self.tamper."""
        self.sessions += 1
        proc = await asyncio.create_subprocess_exec(
            SFTP_SERVER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        asked: dict[int, Request] = {}

        async def upstream():
            buf = bytearray()
            try:
                while True:
                    data = await session.incoming.get()
                    if not data:
                        break
                    buf += data
                    for packet in _packets(buf):
                        kind, rid = struct.unpack_from(">BI", packet, 4)
                        asked[rid] = Request(kind, rid, packet[9:])
                    proc.stdin.write(data)
                    await proc.stdin.drain()
            except Exception:   # noqa: BLE001 - the server's end went away
                pass
            finally:
                if proc.returncode is None:
                    proc.stdin.close()

        async def downstream():
            buf = bytearray()
            try:
                while True:
                    data = await proc.stdout.read(65536)
                    if not data:
                        break
                    buf += data
                    for packet in _packets(buf):
                        kind, rid = struct.unpack_from(">BI", packet, 4)
                        if kind == 2:   # VERSION answers the INIT, whose "id" is the version
                            request = Request(1, rid, b"")
                        else:
                            request = asked.pop(rid, None)
                        out = self.tamper(request, packet)
                        if inspect.isawaitable(out):
                            out = await out
                        for piece in (out if isinstance(out, list) else [out]):
                            if piece:
                                session.chan.write(piece)
            except Exception:   # noqa: BLE001 - the client went away
                pass

        try:
            await asyncio.gather(upstream(), downstream())
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            session.chan.close()

    def close(self) -> None:
        async def stop():
            self._server.close()
            await self._server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@pytest.fixture
def sftp_tamper_server() -> Iterator[TamperServer]:
    if SFTP_SERVER is None:
        pytest.fail("OpenSSH's sftp-server is not installed (openssh-server)")
    with tempfile.TemporaryDirectory(prefix="castlib-tamper-") as folder:
        server = TamperServer(Path(folder))
        try:
            yield server
        finally:
            server.close()
