"""SFTP v3 requests on a raw SSH channel: the small-file hot path of sftp.py.

asyncssh's SFTP client spends ~1.2 ms of the event loop's CPU a small file uploaded and
read back (its reader task, a coroutine and task per request, a packet object per reply,
each request its own SSH packet); the loop is the bottleneck of a many-small-files sync
on a 2-core host. Here the same requests cost ~0.8 ms: each is framed with struct and
buffered, the requests of one batch go to the channel in one write (one SSH packet),
and each reply is parsed as it arrives and settles a plain future (no task). Only the
requests sftp.py's per-file helpers make are here (open, read, write, close, stat, lstat,
setstat, posix-rename, the limits); everything else stays with asyncssh's client.
Requests of a channel are buffered as asyncssh's are: a caller bounds what it has in
flight (sftp.py's pipes: 4 MiB).

The surface is asyncssh's where they overlap (`open(path, mode)` -> a file with
`read(size, offset)`, `write(data, offset)`, `close()`; `stat`, `lstat`, `setstat`,
`posix_rename`), so that one helper serves either, and errors are the same: a status
reply becomes the asyncssh.SFTPError subclass asyncssh raises for its code (built by
asyncssh's own SFTPError.construct), a channel or connection that closes fails every
request waiting with SFTPConnectionLost (or the connection's own error), and a request
after that fails at once. Each call returns a future, the request already buffered: the
order of the calls is the order on the wire; requests made in a batch() go out in one
channel write. Calls are made on the event loop's thread.
"""
from __future__ import annotations

import asyncio
import struct

import asyncssh
from asyncssh.packet import PacketDecodeError, SSHPacket

# packet types (draft-ietf-secsh-filexfer-02, SFTP v3)
FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_READ, FXP_WRITE, FXP_LSTAT = 1, 2, 3, 4, 5, 6, 7
FXP_SETSTAT, FXP_STAT, FXP_EXTENDED = 9, 17, 200
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_ATTRS, FXP_EXTENDED_REPLY = 101, 102, 103, 105, 201
FX_OK = 0
FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 1, 2, 4, 8, 0x10, 0x20
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 1, 2, 4, 8
ATTR_EXTENDED = 0x80000000
_ATTR_MODIFYTIME_V4 = 0x20   # sent by some v3 servers with ACMODTIME; asyncssh drops it too
_ATTR_V3 = ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME | ATTR_EXTENDED

# asyncssh's open modes (binary only: the helpers read and write bytes)
_OPEN_FLAGS = {
    "rb": FXF_READ, "wb": FXF_WRITE | FXF_CREAT | FXF_TRUNC,
    "ab": FXF_WRITE | FXF_CREAT | FXF_APPEND, "xb": FXF_WRITE | FXF_CREAT | FXF_EXCL,
    "r+b": FXF_READ | FXF_WRITE, "w+b": FXF_READ | FXF_WRITE | FXF_CREAT | FXF_TRUNC,
}

_u32 = struct.Struct(">I")
_u64 = struct.Struct(">Q")
_header = struct.Struct(">IBI")       # length, type, request id
_read_args = struct.Struct(">QI")     # offset, length
_NO_ATTRS = _u32.pack(0)

# asyncssh's defaults where the server names no limits (SFTPLimits)
_DEFAULT_READ_LEN = _DEFAULT_WRITE_LEN = 16 * 1024
# The most a request carries or asks for, whatever limits the server names, and the
# longest reply taken: asyncssh's own (its client refuses a longer packet). A server's
# limits of 2**63 would otherwise have a whole file sent as one request (and held whole
# in memory by the write pipe), and a length field of 4 GiB have the session buffer
# whatever comes until then, its requests waiting.
_MAX_READ_LEN = _MAX_WRITE_LEN = 4 * 1024 * 1024
_MAX_REPLY_LEN = _MAX_WRITE_LEN + 1024
_BAD_DATA = -1   # a DATA reply whose own length is not its packet's (see data_received)


def _string(data: bytes) -> bytes:
    return _u32.pack(len(data)) + data


class WireAttrs:
    """A v3 ATTRS block, with asyncssh SFTPAttrs's field names (None where absent);
    `permissions` is the whole mode, file type bits included, as asyncssh gives it."""

    __slots__ = ("size", "uid", "gid", "permissions", "atime", "mtime")

    def __init__(self):
        self.size = self.uid = self.gid = self.permissions = self.atime = self.mtime = None


def decode_attrs(data: bytes, offset: int = 0) -> WireAttrs:
    flags = _u32.unpack_from(data, offset)[0]
    offset += 4
    if flags & ATTR_ACMODTIME:
        flags &= ~_ATTR_MODIFYTIME_V4
    if flags & ~_ATTR_V3:
        raise asyncssh.SFTPBadMessage(f"Unsupported attribute flags: 0x{flags & ~_ATTR_V3:08x}")
    attrs = WireAttrs()
    try:
        if flags & ATTR_SIZE:
            attrs.size = _u64.unpack_from(data, offset)[0]
            offset += 8
        if flags & ATTR_UIDGID:
            attrs.uid, attrs.gid = struct.unpack_from(">II", data, offset)
            offset += 8
        if flags & ATTR_PERMISSIONS:
            attrs.permissions = _u32.unpack_from(data, offset)[0] & 0xffff
            offset += 4
        if flags & ATTR_ACMODTIME:
            attrs.atime, attrs.mtime = struct.unpack_from(">II", data, offset)
    except struct.error:
        raise asyncssh.SFTPBadMessage("Incomplete attributes") from None
    return attrs   # extended attributes, last in the block, are of no use here


def encode_attrs(attrs) -> bytes:
    """ATTRS for a set-stat, from anything with SFTPAttrs's field names (asyncssh's
    SFTPAttrs, WireAttrs): size, uid and gid, permissions, atime and mtime (both or
    neither, as v3 has them)."""
    flags, parts = 0, []
    if getattr(attrs, "size", None) is not None:
        flags |= ATTR_SIZE
        parts.append(_u64.pack(attrs.size))
    uid, gid = getattr(attrs, "uid", None), getattr(attrs, "gid", None)
    if uid is not None and gid is not None:
        flags |= ATTR_UIDGID
        parts.append(struct.pack(">II", uid, gid))
    if getattr(attrs, "permissions", None) is not None:
        flags |= ATTR_PERMISSIONS
        parts.append(_u32.pack(attrs.permissions))
    atime, mtime = getattr(attrs, "atime", None), getattr(attrs, "mtime", None)
    if atime is not None and mtime is not None:
        flags |= ATTR_ACMODTIME
        parts.append(struct.pack(">II", int(atime), int(mtime)))
    return _u32.pack(flags) + b"".join(parts)


def _status_error(payload: bytes, errors: str) -> asyncssh.SFTPError | None:
    """The exception asyncssh raises for this STATUS (None for OK); a STATUS too short
    for its code is a bad message (asyncssh's packet decoder raises its own ValueError,
    which no SFTP error path knows)."""
    try:
        return asyncssh.SFTPError.construct(SSHPacket(payload), errors)
    except PacketDecodeError:
        return asyncssh.SFTPBadMessage("Invalid status reply")


# What a reply carries, per request: a function of (type, payload after the id; a DATA
# reply's data alone) that gives the result or raises. `_expect_status` for requests
# answered by a status alone.

def _unexpected(kind: int) -> asyncssh.SFTPError:
    return asyncssh.SFTPBadMessage(f"Unexpected response type: {kind}")


class SftpWire(asyncssh.SSHClientSession):
    """One SFTP session on its own channel (see the module's docstring). Made by
    open_wire(); `posix_rename_supported` and `limits_told`, `limits` (max_read_len,
    max_write_len) as the server's VERSION and limits told."""

    def __init__(self, path_encoding: str = "utf-8", path_errors: str = "surrogateescape",
                 utf8_decode_errors: str = "strict"):
        self._loop = asyncio.get_running_loop()
        self._chan = None
        self._in = bytearray()
        self._waiting: dict[int, tuple] = {}   # request id -> (future, reply parser)
        self._next_id = 1
        self._out: list[bytes] = []
        self._batching = 0
        self._lost: BaseException | None = None
        self._encoding = (path_encoding, path_errors)
        self._decode_errors = utf8_decode_errors
        self.version: asyncio.Future = self._loop.create_future()
        self.extensions: dict[bytes, bytes] = {}
        self.posix_rename_supported = False
        self.limits_told = False
        self.limits = asyncssh.SFTPLimits(0, _DEFAULT_READ_LEN, _DEFAULT_WRITE_LEN, 0)

    # -- the channel -------------------------------------------------------------------
    def connection_made(self, chan) -> None:
        self._chan = chan

    def connection_lost(self, exc) -> None:
        self._fail(exc or asyncssh.SFTPConnectionLost("Connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self._lost is None:
            self._lost = exc
        waiting, self._waiting, self._out = self._waiting, {}, []
        if not self.version.done():
            self.version.set_exception(exc)
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(exc)

    def close(self) -> None:
        if self._chan is not None:
            self._chan.close()

    @property
    def closed(self) -> bool:
        """Whether the session is gone for good (closed, lost, or broken by a reply it
        could not take): every request fails at once, and a new session must serve."""
        return self._lost is not None or (self._chan is not None and self._chan.is_closing())

    def data_received(self, data, datatype) -> None:
        """Whole replies, each copied out of the buffer once: a DATA reply's payload is its
        bytes alone (a read of 255 KiB from OpenSSH was four copies, ~10 % slower than
        asyncssh over a 256 MiB file), any other's what follows the request id."""
        buf = self._in
        buf += data
        start, end, replies = 0, len(buf), []
        with memoryview(buf) as view:
            while end - start >= 9:
                length, kind, rid = _header.unpack_from(buf, start)   # VERSION: rid = version
                if length < 5 or length > _MAX_REPLY_LEN:
                    replies.append((None, 0, b""))
                    start = end
                    break
                if end - start - 4 < length:
                    break
                if kind == FXP_DATA:   # its string must fill the packet: else not data
                    if length < 9 or _u32.unpack_from(buf, start + 9)[0] != length - 9:
                        kind, payload = _BAD_DATA, b""
                    else:
                        payload = bytes(view[start + 13:start + 4 + length])
                else:
                    payload = bytes(view[start + 9:start + 4 + length])
                replies.append((kind, rid, payload))
                start += 4 + length
        del buf[:start]
        for kind, rid, payload in replies:
            self._reply(kind, rid, payload)

    def _reply(self, kind: int | None, rid: int, payload: bytes) -> None:
        if kind is None:
            return self._protocol_error("Invalid response length")
        if kind == FXP_VERSION:
            return self._version(rid, payload)
        entry = self._waiting.pop(rid, None)
        if entry is None:   # as asyncssh does: the session is beyond repair
            return self._protocol_error("Invalid response id")
        future, parse = entry
        if future.done():   # cancelled (a wait that timed out)
            if kind == FXP_HANDLE and parse.__name__ == "opened":
                self._close_late_handle(payload)
            return
        try:
            if kind == _BAD_DATA:
                raise asyncssh.SFTPBadMessage("Invalid data reply")
            result = parse(kind, payload)
        except struct.error:   # a reply shorter than its type says
            future.set_exception(asyncssh.SFTPBadMessage("Truncated response"))
        except Exception as exc:   # noqa: BLE001 - the request's own error
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _close_late_handle(self, payload: bytes) -> None:
        """The handle of an open nobody waits for any more: closed, not left open on the
        server for the session's life (the answer, whatever it is, goes unread)."""
        if len(payload) >= 4 and _u32.unpack_from(payload)[0] == len(payload) - 4:
            self._request(FXP_CLOSE, payload, self._expect_status)

    def _protocol_error(self, why: str) -> None:
        self._fail(asyncssh.SFTPBadMessage(why))
        self.close()

    def _version(self, version: int, payload: bytes) -> None:
        if self.version.done():
            return self._protocol_error("Unexpected version")
        try:
            offset = 0
            while offset < len(payload):
                n = _u32.unpack_from(payload, offset)[0]
                name = payload[offset + 4:offset + 4 + n]
                offset += 4 + n
                n = _u32.unpack_from(payload, offset)[0]
                self.extensions[name] = payload[offset + 4:offset + 4 + n]
                offset += 4 + n
        except struct.error:
            return self._protocol_error("Invalid version reply")
        if version != 3:
            self.version.set_exception(asyncssh.SFTPBadMessage(
                f"Unsupported version: {version}"))
            return
        self.posix_rename_supported = self.extensions.get(b"posix-rename@openssh.com") == b"1"
        self.limits_told = self.extensions.get(b"limits@openssh.com") == b"1"
        self.version.set_result(version)

    # -- requests ----------------------------------------------------------------------
    def _path(self, path) -> bytes:
        """The name's bytes. One with a NUL is refused: a server in C (OpenSSH's) takes
        the name up to it, so "a\\0b" would write, or rename over, another file, "a"."""
        name = path if isinstance(path, bytes) else path.encode(*self._encoding)
        if b"\0" in name:
            raise asyncssh.SFTPInvalidFilename(f"Name contains a NUL byte: {path!r}")
        return name

    def _request(self, kind: int, payload: bytes, parse, data=b"") -> asyncio.Future:
        """Send `payload` (then `data`, a write's bytes, not copied to be joined to it)."""
        future = self._loop.create_future()
        if self._lost is not None:
            future.set_exception(self._lost)
            return future
        rid = self._next_id
        self._next_id = (rid + 1) & 0xffffffff
        self._waiting[rid] = (future, parse)
        self._out.append(_header.pack(len(payload) + len(data) + 5, kind, rid))
        self._out.append(payload)
        if data:
            self._out.append(data)
        if not self._batching:
            self._flush()
        return future

    def batch(self) -> "_Batch":
        """A context in which requests wait, to go out together in one channel write (one
        SSH packet, one encryption) when it ends, in the order made. Outside one, each
        goes at once: a read pipe's next request must not wait for a later loop turn (a
        256 MiB read from OpenSSH was ~10 % slower that way)."""
        return _Batch(self)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._lost is None:
            try:
                self._chan.write(b"".join(out))
            except Exception as exc:   # noqa: BLE001 - a channel closed under us
                self._fail(asyncssh.SFTPConnectionLost(str(exc) or "Connection closed"))

    def _extended(self, name: bytes, payload: bytes, parse) -> asyncio.Future:
        return self._request(FXP_EXTENDED, _string(name) + payload, parse)

    def _expect_status(self, kind: int, payload: bytes):
        if kind != FXP_STATUS:
            raise _unexpected(kind)
        exc = _status_error(payload, self._decode_errors)
        if exc is not None:
            raise exc

    def _expect(self, wanted: int, kind: int, payload: bytes):
        if kind == FXP_STATUS:
            exc = _status_error(payload, self._decode_errors)
            raise exc if exc is not None else asyncssh.SFTPBadMessage("Unexpected FX_OK response")
        if kind != wanted:
            raise _unexpected(kind)

    def _attrs_reply(self, kind: int, payload: bytes) -> WireAttrs:
        self._expect(FXP_ATTRS, kind, payload)
        return decode_attrs(payload)

    def request_limits(self) -> asyncio.Future:
        def parse(kind, payload):
            self._expect(FXP_EXTENDED_REPLY, kind, payload)
            _, read_len, write_len, _ = struct.unpack_from(">QQQQ", payload)
            if read_len:
                self.limits.max_read_len = min(read_len, _MAX_READ_LEN)
            if write_len:
                self.limits.max_write_len = min(write_len, _MAX_WRITE_LEN)
        return self._extended(b"limits@openssh.com", b"", parse)

    def open(self, path, mode: str = "rb", block_size: int = 0) -> asyncio.Future:
        """The file (a WireFile), opened; `block_size` is asyncssh's, and must be 0 here
        (one request a call)."""
        if block_size != 0 or mode not in _OPEN_FLAGS:
            raise ValueError(f"SftpWire.open: mode {mode!r}, block size {block_size}")

        def opened(kind, payload):   # (the name tells _reply an open's answer)
            self._expect(FXP_HANDLE, kind, payload)
            n = _u32.unpack_from(payload)[0]
            return WireFile(self, payload[4:4 + n])
        return self._request(FXP_OPEN, _string(self._path(path)) +
                             _u32.pack(_OPEN_FLAGS[mode]) + _NO_ATTRS, opened)

    def stat(self, path) -> asyncio.Future:
        return self._request(FXP_STAT, _string(self._path(path)), self._attrs_reply)

    def lstat(self, path) -> asyncio.Future:
        return self._request(FXP_LSTAT, _string(self._path(path)), self._attrs_reply)

    def setstat(self, path, attrs) -> asyncio.Future:
        return self._request(FXP_SETSTAT, _string(self._path(path)) + encode_attrs(attrs),
                             self._expect_status)

    def posix_rename(self, src, dst) -> asyncio.Future:
        """OpenSSH's posix-rename; refused here, as asyncssh does, when the server did not
        offer it."""
        if not self.posix_rename_supported:
            future = self._loop.create_future()
            future.set_exception(asyncssh.SFTPOpUnsupported("POSIX rename not supported"))
            return future
        return self._extended(b"posix-rename@openssh.com",
                              _string(self._path(src)) + _string(self._path(dst)),
                              self._expect_status)


class _Batch:
    __slots__ = ("_wire",)

    def __init__(self, wire: SftpWire):
        self._wire = wire

    def __enter__(self):
        self._wire._batching += 1

    def __exit__(self, *exc):
        self._wire._batching -= 1
        if not self._wire._batching:
            self._wire._flush()


class WireFile:
    """An open handle: asyncssh SFTPClientFile's read, write and close with block size 0
    (one request each, at the offset given), each a future."""

    __slots__ = ("_wire", "_handle")

    def __init__(self, wire: SftpWire, handle: bytes):
        self._wire = wire
        self._handle = _string(handle)

    def read(self, size: int, offset: int) -> asyncio.Future:
        """Up to `size` bytes at `offset`; b"" at the end of the file."""
        def parse(kind, payload):
            if kind == FXP_DATA:   # its bytes alone (see SftpWire.data_received)
                if len(payload) > size:   # not this file's bytes at this offset
                    raise asyncssh.SFTPBadMessage("Data reply longer than asked for")
                return payload
            if kind == FXP_STATUS:
                exc = _status_error(payload, self._wire._decode_errors)
                if isinstance(exc, asyncssh.SFTPEOFError):
                    return b""
                raise exc if exc is not None else asyncssh.SFTPBadMessage(
                    "Unexpected FX_OK response")
            raise _unexpected(kind)
        return self._request(FXP_READ, self._handle + _read_args.pack(offset, size), parse)

    def write(self, data, offset: int) -> asyncio.Future:
        return self._request(FXP_WRITE, self._handle + _u64.pack(offset) + _u32.pack(len(data)),
                             self._wire._expect_status, data)

    def close(self) -> asyncio.Future:
        """Closes the handle; a second close does nothing, as asyncssh's."""
        handle, self._handle = self._handle, None
        if handle is None:
            future = self._wire._loop.create_future()
            future.set_result(None)
            return future
        return self._wire._request(FXP_CLOSE, handle, self._wire._expect_status)

    def _request(self, kind: int, payload: bytes, parse, data=b"") -> asyncio.Future:
        if self._handle is None:
            future = self._wire._loop.create_future()
            future.set_exception(ValueError("I/O operation on closed file"))
            return future
        return self._wire._request(kind, payload, parse, data)


async def open_wire(conn, path_encoding: str = "utf-8",
                    path_errors: str = "surrogateescape") -> SftpWire:
    """A new SFTP session on `conn` (an asyncssh SSHClientConnection), initialised: the
    version agreed, the server's limits asked for when it offers the extension."""
    errors = getattr(conn, "_utf8_decode_errors", "strict")
    chan, wire = await conn.create_session(
        lambda: SftpWire(path_encoding, path_errors, errors), subsystem="sftp", encoding=None)
    try:
        chan.write(_header.pack(5, FXP_INIT, 3))   # INIT carries the version where an id goes
        await wire.version
        if wire.limits_told:
            await wire.request_limits()
    except BaseException:
        chan.close()
        raise
    return wire
