"""The lean SFTP session (castlib/backends/sftp_wire.py) against a hostile or buggy server:
OpenSSH's sftp-server behind a real SSH server that changes its replies (see
tests/servers/sftp_tamper.py). Whatever the server answers, a read never yields bytes
the file does not hold, no request waits for ever, nothing raises in asyncssh's
callbacks, and a session that broke is replaced, not kept."""
from __future__ import annotations

import asyncio
import time
import os
import struct

import asyncssh
import pytest

from castlib.backends import open_backend, sftp_wire
from castlib.backends.sftp import _sftp_write_limit
from castlib.errors import StorageError

FXP_INIT, FXP_VERSION, FXP_CLOSE, FXP_READ, FXP_OPEN, FXP_STAT = 1, 2, 4, 5, 3, 17
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_EXTENDED = 101, 102, 103, 200


def _connect(server):
    return asyncssh.connect(server.host, port=server.port, username=server.user,
                            **server.options)


def _run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _frame(kind: int, rid: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", len(payload) + 5, kind, rid) + payload


def _kind(reply: bytes) -> int:
    return reply[4]


def _rid(reply: bytes) -> int:
    return struct.unpack_from(">I", reply, 5)[0]


def _data(reply: bytes) -> bytes:
    return reply[13:]


async def _read_file(server, name: str, size: int) -> bytes:
    async with _connect(server) as conn:
        wire = await sftp_wire.open_wire(conn)
        f = await wire.open(f"{server.folder}/{name}", "rb")
        try:
            return await asyncio.wait_for(f.read(size, 0), 10)
        finally:
            wire.close()


def test_hostile_data_reply_longer_than_asked_is_refused(sftp_tamper_server):
    """A DATA reply with more bytes than the read asked for is a broken server, not a
    file: taken as it is, a read pipe would count those bytes as the next request's and
    a copy from that server would carry bytes the file does not hold (and verify, as
    the hash is of what was read)."""
    server = sftp_tamper_server
    (server.folder / "f").write_bytes(os.urandom(5000))

    def longer(request, reply):
        if request.kind == FXP_READ and _kind(reply) == FXP_DATA:
            data = _data(reply) + b"\0" * 100
            return _frame(FXP_DATA, _rid(reply), struct.pack(">I", len(data)) + data)
        return reply
    server.tamper = longer
    with pytest.raises(asyncssh.SFTPBadMessage):
        _run(_read_file(server, "f", 1000))


def test_hostile_data_reply_longer_than_asked_fails_the_backend_read(sftp_tamper_server):
    """The same through the back-end: reading a file of several requests fails, never
    returns other bytes than the file's."""
    server = sftp_tamper_server
    data = os.urandom(300_000)
    (server.folder / "f").write_bytes(data)
    served = []

    def longer(request, reply):
        if request.kind == FXP_READ and _kind(reply) == FXP_DATA and len(_data(reply)) > 4:
            served.append(1)
            more = _data(reply) + _data(reply)[:7]
            return _frame(FXP_DATA, _rid(reply), struct.pack(">I", len(more)) + more)
        return reply
    server.tamper = longer
    b = open_backend(server.url, server.options)
    try:
        with b.open_read("f") as f:
            outcome = f.read()
    except Exception as exc:   # noqa: BLE001 - what the back-end raised, checked below
        outcome = exc
    finally:
        b.close()
    assert served
    # before: 300 000 bytes, not the file's (each request's 7 more taken as the next's)
    assert isinstance(outcome, (StorageError, asyncssh.SFTPBadMessage)), \
        (type(outcome), outcome == data)


@pytest.mark.parametrize("how", ["inner length past the packet", "inner length short",
                                 "packet shorter than a DATA"])
def test_hostile_malformed_data_reply_is_refused(sftp_tamper_server, how):
    """A DATA reply whose own length does not match its packet's, or a packet too short
    to hold one, fails the read: it is not data (before: the bytes there were taken, the
    length's own bytes included)."""
    server = sftp_tamper_server
    (server.folder / "f").write_bytes(b"x" * 5000)

    def malformed(request, reply):
        if request.kind != FXP_READ or _kind(reply) != FXP_DATA:
            return reply
        data = _data(reply)
        if how == "inner length past the packet":
            return _frame(FXP_DATA, _rid(reply), struct.pack(">I", len(data) + 50) + data)
        if how == "inner length short":
            return _frame(FXP_DATA, _rid(reply), struct.pack(">I", len(data) - 50) + data)
        return _frame(FXP_DATA, _rid(reply), b"ab")
    server.tamper = malformed
    with pytest.raises(asyncssh.SFTPBadMessage):
        _run(_read_file(server, "f", 1000))


def test_hostile_replies_split_into_single_bytes_and_joined(sftp_tamper_server):
    """Replies that come a byte a channel write, and several in one write, are read as
    the same replies."""
    server = sftp_tamper_server
    data = os.urandom(3000)
    (server.folder / "f").write_bytes(data)
    held = []

    def split(request, reply):
        if request.kind == FXP_READ:
            return [reply[i:i + 1] for i in range(len(reply))]
        if request.kind == FXP_STAT:   # the first two stats go out in one write
            held.append(reply)
            if len(held) < 2:
                return b""
            out, held[:] = b"".join(held), []
            return out
        return reply
    server.tamper = split

    async def main():
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            f = await wire.open(f"{server.folder}/f", "rb")
            back = await asyncio.wait_for(f.read(5000, 0), 20)
            stats = await asyncio.wait_for(asyncio.gather(
                wire.stat(f"{server.folder}/f"), wire.stat(str(server.folder))), 10)
            return back, [s.size for s in stats]

    back, sizes = _run(main())
    assert back == data
    assert sizes[0] == 3000 and sizes[1] is not None


def test_hostile_reply_length_of_4_gib_fails_at_once(sftp_tamper_server):
    """A reply whose length field says 4 GiB: the request fails at once, as asyncssh's
    client does (past its largest packet), instead of waiting while the session buffers
    up to 4 GiB of whatever comes."""
    server = sftp_tamper_server

    def huge(request, reply):
        if request.kind == FXP_STAT:
            return struct.pack(">IBI", 0xfffffff0, FXP_DATA, _rid(reply)) + b"\0" * 64
        return reply
    server.tamper = huge

    async def main():
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            with pytest.raises(asyncssh.SFTPBadMessage):
                await asyncio.wait_for(wire.stat(str(server.folder)), 5)
            # the session is beyond repair: later requests fail at once too
            with pytest.raises(asyncssh.SFTPBadMessage):
                await asyncio.wait_for(wire.stat(str(server.folder)), 5)

    _run(main())


def test_hostile_truncated_status_is_a_bad_message(sftp_tamper_server):
    """A STATUS too short for its code fails the request with asyncssh's SFTPBadMessage
    (an SFTP error the back-end's paths know), not asyncssh's internal decode error."""
    server = sftp_tamper_server

    def truncated(request, reply):
        if request.kind == FXP_STAT:
            return _frame(FXP_STATUS, _rid(reply), b"\0\0")
        return reply
    server.tamper = truncated

    async def main():
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            with pytest.raises(asyncssh.SFTPBadMessage):
                await asyncio.wait_for(wire.stat(str(server.folder)), 5)

    _run(main())


def test_hostile_absurd_limits_are_capped(sftp_tamper_server):
    """Limits of 2**63 bytes a request: the session keeps asyncssh's largest (4 MiB), so a
    file is not sent as one request of its whole size (held whole in memory by the write
    pipe, past what the server takes); limits of 0 leave the defaults."""
    server = sftp_tamper_server
    told = {}

    def absurd(request, reply):
        if request.kind == FXP_EXTENDED and b"limits@openssh.com" in request.payload:
            return _frame(201, _rid(reply), struct.pack(">QQQQ", *told["limits"]))
        return reply
    server.tamper = absurd

    async def limits(values):
        told["limits"] = values
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            assert wire.limits_told
            return wire.limits.max_read_len, _sftp_write_limit(wire)

    assert _run(limits((2**63, 2**63, 2**63, 0))) == (4 * 1024 * 1024, 4 * 1024 * 1024)
    assert _run(limits((0, 0, 0, 0))) == (16 * 1024, 16 * 1024)


@pytest.mark.parametrize("version", [2, 4, 0xffffffff])
def test_hostile_version_other_than_3_is_refused_at_once(sftp_tamper_server, version):
    server = sftp_tamper_server

    def other(request, reply):
        if request.kind == FXP_INIT:
            return _frame(FXP_VERSION, version, reply[9:])
        return reply
    server.tamper = other

    async def main():
        async with _connect(server) as conn:
            with pytest.raises(asyncssh.SFTPBadMessage, match="version"):
                await asyncio.wait_for(sftp_wire.open_wire(conn), 10)

    _run(main())


def test_hostile_duplicate_reply_settles_nothing_else(sftp_tamper_server):
    """A reply sent twice: the first answers its request; the second (an id nobody waits
    for) settles no other request with its contents: the requests still out fail, as
    on a session beyond repair (asyncssh's rule), and nothing raises in asyncssh's
    callbacks (the loop's exception handler sees nothing)."""
    server = sftp_tamper_server
    (server.folder / "f").write_bytes(b"12345")

    def twice(request, reply):
        if request.kind == FXP_STAT and b"/f" in request.payload:
            return reply + reply
        return reply
    server.tamper = twice

    async def main():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            first = wire.stat(f"{server.folder}/f")
            other = wire.stat(str(server.folder))
            assert (await asyncio.wait_for(first, 5)).size == 5
            result = await asyncio.wait_for(asyncio.gather(other, return_exceptions=True), 5)
            # answered before the duplicate came, or failed by it: never the file's attrs
            assert isinstance(result[0], asyncssh.SFTPBadMessage) or result[0].size != 5
        return errors

    assert _run(main()) == []


def test_hostile_broken_session_is_replaced_for_the_thread(sftp_tamper_server):
    """A thread's lean session broken by the server (a reply twice: beyond repair) is not
    kept: the thread's next request gets a new session (before, every later copy of that
    thread failed with 'Invalid response id' to the end of the run)."""
    server = sftp_tamper_server
    (server.folder / "poison").write_bytes(b"p")
    (server.folder / "fine").write_bytes(b"fine")

    def twice(request, reply):
        if request.kind in (7, FXP_STAT) and b"poison" in request.payload:
            return reply + reply
        return reply
    server.tamper = twice
    b = open_backend(server.url, server.options)
    try:
        wire = b._wire()
        assert b.stat("poison").size == 1
        time.sleep(0.5)   # the duplicate has come by now (read by the next call)
        assert b.stat("fine").size == 4
        assert b._wire() is not wire
        with b.open_read("fine") as f:
            assert f.read() == b"fine"
    finally:
        b.close()


def test_hostile_late_handle_of_a_cancelled_open_is_closed(sftp_tamper_server):
    """An open whose wait was given up (cancelled, as _on_sftp does at its timeout) and
    whose HANDLE comes late: the handle is closed, not left open on the server for the
    session's life (one file descriptor of the server's each)."""
    server = sftp_tamper_server
    (server.folder / "f").write_bytes(b"x")
    closes = []

    async def late(request, reply):
        if request.kind == FXP_OPEN:
            await asyncio.sleep(1)
        if request.kind == FXP_CLOSE:
            closes.append(request.payload)
        return reply
    server.tamper = late

    async def main():
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(wire.open(f"{server.folder}/f", "rb"), 0.2)
            await asyncio.sleep(2)
            assert (await wire.stat(f"{server.folder}/f")).size == 1   # still serves

    _run(main())
    assert len(closes) == 1


def test_hostile_names_with_nul_are_refused_not_cut(sftp_tamper_server):
    """A name with a NUL byte: OpenSSH's sftp-server takes the name up to the NUL, so
    "a\\0b" would write (and rename over) "a", another file. Refused before it leaves."""
    server = sftp_tamper_server
    (server.folder / "a").write_bytes(b"user data")

    async def main():
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            for call in (lambda: wire.open(f"{server.folder}/a\0b", "wb"),
                         lambda: wire.stat(f"{server.folder}/a\0b"),
                         lambda: wire.posix_rename(f"{server.folder}/x", f"{server.folder}/a\0")):
                with pytest.raises(asyncssh.SFTPInvalidFilename):
                    f = await call()
                    await asyncio.gather(f.write(b"other", 0), f.close())
            # newlines, bytes that are not UTF-8 and long names go out as they are
            for name in ("line\nbreak", "caf\udce9", "n" * 250):
                f = await wire.open(f"{server.folder}/{name}", "wb")
                await asyncio.gather(f.write(b"ok", 0), f.close())
            with pytest.raises(asyncssh.SFTPError):
                await wire.open(f"{server.folder}/{'n' * 4096}", "wb")

    _run(main())
    assert (server.folder / "a").read_bytes() == b"user data"
    assert sorted(os.listdir(os.fsencode(server.folder))) == sorted(
        [b"a", b"line\nbreak", b"caf\xe9", b"n" * 250])


def test_hostile_request_after_close_fails_at_once(sftp_tamper_server):
    """A request made after the session was closed (by castlib, before the channel has
    said so) fails at once; so do requests waiting in a batch not yet sent."""
    server = sftp_tamper_server

    async def main():
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            with wire.batch():
                batched = wire.stat(str(server.folder))
                wire.close()
            with pytest.raises(asyncssh.SFTPError):
                await asyncio.wait_for(batched, 5)
            with pytest.raises(asyncssh.SFTPError):
                await asyncio.wait_for(wire.stat(str(server.folder)), 5)

    _run(main())


def _read_offset(request) -> int:
    (handle_len,) = struct.unpack_from(">I", request.payload)
    return struct.unpack_from(">Q", request.payload, 4 + handle_len)[0]


def _read_through_backend(server, name: str):
    b = open_backend(server.url, server.options)
    try:
        with b.open_read(name) as f:
            return f.read()
    finally:
        b.close()


def test_hostile_short_reads_in_the_middle_are_asked_again(sftp_tamper_server):
    """A server answering every read with half the bytes asked: the rest is asked for
    again, never taken as the file's end (the bytes come whole, in order)."""
    server = sftp_tamper_server
    data = os.urandom(700_000)
    (server.folder / "f").write_bytes(data)
    halved = []

    def half(request, reply):
        if request.kind == FXP_READ and _kind(reply) == FXP_DATA and len(_data(reply)) > 1:
            part = _data(reply)[:len(_data(reply)) // 2]
            halved.append(1)
            return _frame(FXP_DATA, _rid(reply), struct.pack(">I", len(part)) + part)
        return reply
    server.tamper = half
    assert _read_through_backend(server, "f") == data
    assert len(halved) > 3


def test_hostile_end_of_file_in_the_middle_reads_only_what_was_given(sftp_tamper_server):
    """A server saying end-of-file at a non-zero offset before the size its stat gave (a
    file truncated under the read, or a lying server): the read ends there, short, so
    that its checksum is not the source's and the copy fails verification; nothing is
    made up to fill the size."""
    server = sftp_tamper_server
    data = os.urandom(700_000)
    (server.folder / "f").write_bytes(data)
    cut = 300_000

    def eof(request, reply):
        if request.kind == FXP_READ and _read_offset(request) >= cut:
            return _frame(FXP_STATUS, _rid(reply), struct.pack(">I", 1) +
                          struct.pack(">I", 3) + b"EOF" + struct.pack(">I", 0))
        if request.kind == FXP_READ and _kind(reply) == FXP_DATA:
            part = _data(reply)[:max(0, cut - _read_offset(request))]
            return _frame(FXP_DATA, _rid(reply), struct.pack(">I", len(part)) + part)
        return reply
    server.tamper = eof
    back = _read_through_backend(server, "f")
    assert back == data[:cut]


def test_hostile_unanswered_request_leaves_no_session_waiting(sftp_tamper_server, monkeypatch):
    """A request the server never answers: the wait ends at the timeout (transient: the
    engine reconnects), and the connection given up is closed, so that the sessions on
    it fail what they still wait for and end, rather than waiting (and holding the
    server's processes) to the end of the run."""
    import castlib.backends.sftp as sftp_module
    from castlib.errors import TransientStorageError

    server = sftp_tamper_server
    (server.folder / "stuck").write_bytes(b"s")
    (server.folder / "fine").write_bytes(b"fine")

    async def never(request, reply):
        if request.kind in (7, FXP_STAT) and b"stuck" in request.payload:
            await asyncio.sleep(3600)
        return reply
    server.tamper = never
    monkeypatch.setattr(sftp_module, "READ_TIMEOUT_S", 2)
    b = open_backend(server.url, server.options)
    try:
        wire = b._wire()
        with pytest.raises(TransientStorageError, match="timed out"):
            b.stat("stuck")
        for _ in range(50):
            if wire.closed:
                break
            b._on_sftp(asyncio.sleep, 0.1)
        assert wire.closed
        assert b.stat("fine").size == 4   # a new connection serves
    finally:
        b.close()


def test_hostile_reply_of_the_wrong_type_fails_its_request(sftp_tamper_server):
    """A DATA reply to a WRITE, a HANDLE to a STAT: the request fails (never a write
    taken as done, or a handle as attributes), and the session serves on."""
    server = sftp_tamper_server
    wrong = {6: _frame(FXP_DATA, 0, struct.pack(">I", 2) + b"ok"),
             FXP_STAT: _frame(FXP_HANDLE, 0, struct.pack(">I", 1) + b"h")}

    def swap(request, reply):
        if request.kind in wrong and b"victim" in (request.payload + b"victim"
                                                    if request.kind == 6 else request.payload):
            return wrong[request.kind][:5] + reply[5:9] + wrong[request.kind][9:]
        return reply
    server.tamper = swap

    async def main():
        async with _connect(server) as conn:
            wire = await sftp_wire.open_wire(conn)
            f = await wire.open(f"{server.folder}/victim", "wb")
            written, closed = await asyncio.wait_for(
                asyncio.gather(f.write(b"data", 0), f.close(), return_exceptions=True), 10)
            assert isinstance(written, asyncssh.SFTPBadMessage), written
            assert closed is None
            with pytest.raises(asyncssh.SFTPBadMessage):
                await asyncio.wait_for(wire.stat(f"{server.folder}/victim"), 10)
            assert (await wire.lstat(f"{server.folder}/victim")).size == 4

    _run(main())


def test_hostile_backend_refuses_names_with_nul_and_leaves_the_other_file(sftp_tamper_server):
    """Through the back-end (a name from another store, S3's keys may hold a NUL): the
    upload, its publication and a deletion each fail with one clear line, and "a", the
    file OpenSSH would have taken the name for, is untouched (before: the upload
    truncated and wrote it)."""
    server = sftp_tamper_server
    (server.folder / "a").write_bytes(b"user data")
    (server.folder / "x").write_bytes(b"x")
    b = open_backend(server.url, server.options)
    try:
        with pytest.raises(StorageError, match="NUL"):
            w = b.open_write("a\0b")
            w.write(b"other")
            w.close()
        with pytest.raises(StorageError, match="NUL"):
            b.rename("x", "a\0b")
        with pytest.raises(StorageError, match="NUL"):
            b.delete("a\0b")
    finally:
        b.close()
    assert (server.folder / "a").read_bytes() == b"user data"
    assert (server.folder / "x").read_bytes() == b"x"
