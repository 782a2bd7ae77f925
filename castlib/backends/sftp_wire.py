"""SFTP v3 requests on a raw channel: castlib's own SFTP client.

Two transports carry it (see sftp.py): a channel of an asyncssh connection (`open_wire`),
on asyncssh's event loop, and the pipes of OpenSSH's own `ssh -s HOST sftp`
(`begin_threaded_wire`), which keeps SSH out of Python altogether (no asyncssh import, the
key exchange and every packet's encryption in C, in a process of its own) and needs no
event loop: the threads that wait for answers read them (see "a session driven by the
threads that wait on it" below).

asyncssh's SFTP client spends ~1.2 ms of the event loop's CPU a small file uploaded and
read back (its reader task, a coroutine and task per request, a packet object per reply,
each request its own SSH packet); the loop is the bottleneck of a many-small-files sync
on a 2-core host. Here the same requests cost ~0.8 ms: each is framed with struct and
buffered, the requests of one batch go to the channel in one write (one SSH packet),
and each reply is parsed as it arrives and settles a plain future (no task).
Requests of a channel are buffered as asyncssh's are: a caller bounds what it has in
flight (sftp.py's pipes: 4 MiB).

The surface is asyncssh's SFTPClient's where they overlap (`open(path, mode)` -> a file
with `read(size, offset)`, `write(data, offset)`, `close()`; `stat`, `lstat`, `setstat`,
`posix_rename`, `rename`, `remove`, `mkdir`, `rmdir`, `readlink`, `symlink`, `readdir`),
so that one helper serves either. Errors are a namespace's (`errors`): on an asyncssh
channel asyncssh's own classes (a status reply becomes the asyncssh.SFTPError subclass
asyncssh raises for its code), on OpenSSH's pipes this module's classes of the same
names (asyncssh is not imported for them). A channel that closes fails every request
waiting with SFTPConnectionLost (or the transport's own error), and a request after that
fails at once. Each call returns a future, the request already buffered: the order of the
calls is the order on the wire; requests made in a batch() go out in one channel write.
On an asyncssh channel, calls are made on the event loop's thread; on ssh's pipes, from
any thread (a request's id and bytes, a batch, are one thread's at a time).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import select
import struct
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # (a threaded session imports no asyncio: see SyncFuture)
    import asyncio

# packet types (draft-ietf-secsh-filexfer-02, SFTP v3)
FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_READ, FXP_WRITE, FXP_LSTAT = 1, 2, 3, 4, 5, 6, 7
FXP_SETSTAT, FXP_OPENDIR, FXP_READDIR, FXP_REMOVE, FXP_MKDIR, FXP_RMDIR = 9, 11, 12, 13, 14, 15
FXP_STAT, FXP_RENAME, FXP_READLINK, FXP_SYMLINK, FXP_EXTENDED = 17, 18, 19, 20, 200
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_NAME, FXP_ATTRS = 101, 102, 103, 104, 105
FXP_EXTENDED_REPLY = 201
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


class SFTPError(Exception):
    """An SFTP request refused, or a session that failed (OpenSSH transport): the classes
    below have asyncssh's names and codes, so that sftp.py and castlib's error translation
    read either kind the same way."""

    code = 4   # FX_FAILURE

    def __init__(self, reason: str = "", lang: str = "", code: int | None = None):
        super().__init__(reason)
        self.reason, self.lang = reason, lang
        if code is not None:
            self.code = code


def _error_class(name: str, code: int) -> type:
    return type(name, (SFTPError,), {"code": code, "__module__": __name__})


# FX_* codes of the SFTP drafts that servers answer a v3 client with (OpenSSH: 1-8)
_BY_CODE = {code: _error_class(name, code) for name, code in (
    ("SFTPEOFError", 1), ("SFTPNoSuchFile", 2), ("SFTPPermissionDenied", 3),
    ("SFTPFailure", 4), ("SFTPBadMessage", 5), ("SFTPNoConnection", 6),
    ("SFTPConnectionLost", 7), ("SFTPOpUnsupported", 8), ("SFTPInvalidHandle", 9),
    ("SFTPNoSuchPath", 10), ("SFTPFileAlreadyExists", 11), ("SFTPWriteProtect", 12),
    ("SFTPNoMedia", 13), ("SFTPNoSpaceOnFilesystem", 14), ("SFTPQuotaExceeded", 15),
    ("SFTPLockConflict", 17), ("SFTPDirNotEmpty", 18), ("SFTPNotADirectory", 19),
    ("SFTPInvalidFilename", 20), ("SFTPLinkLoop", 21), ("SFTPFileIsADirectory", 24))}
globals().update({cls.__name__: cls for cls in _BY_CODE.values()})


class _OwnErrors:
    """This module's classes, for sessions on OpenSSH's pipes."""

    SFTPError = SFTPError

    def __getattr__(self, name):
        try:
            return globals()[name]
        except KeyError:
            raise AttributeError(name) from None

    @staticmethod
    def status_error(payload: bytes, decode_errors: str):
        code = _u32.unpack_from(payload)[0]
        if code == FX_OK:
            return None
        reason = lang = ""
        try:
            n = _u32.unpack_from(payload, 4)[0]
            reason = payload[8:8 + n].decode("utf-8", decode_errors)
            m = _u32.unpack_from(payload, 8 + n)[0]
            lang = payload[12 + n:12 + n + m].decode("ascii", "replace")
        except (struct.error, UnicodeDecodeError):
            pass   # a v3 status may end after its code (draft 02 has no message yet)
        return _BY_CODE.get(code, SFTPError)(reason, lang, code)


class _AsyncsshErrors:
    """asyncssh's classes, for sessions on an asyncssh channel: the same exceptions as
    asyncssh's own client raises there (its fallback sessions share the connection)."""

    def __init__(self):
        import asyncssh
        from asyncssh.packet import PacketDecodeError, SSHPacket

        self._module, self._decode_error, self._packet = asyncssh, PacketDecodeError, SSHPacket

    def __getattr__(self, name):
        return getattr(self._module, name)

    def status_error(self, payload: bytes, decode_errors: str):
        try:
            return self._module.SFTPError.construct(self._packet(payload), decode_errors)
        except self._decode_error:
            return self._module.SFTPBadMessage("Invalid status reply")


OWN_ERRORS = _OwnErrors()
_ASYNCSSH_ERRORS: list = []


def _asyncssh_errors() -> _AsyncsshErrors:
    if not _ASYNCSSH_ERRORS:
        _ASYNCSSH_ERRORS.append(_AsyncsshErrors())
    return _ASYNCSSH_ERRORS[0]


class WireAttrs:
    """A v3 ATTRS block, with asyncssh SFTPAttrs's field names (None where absent);
    `permissions` is the whole mode, file type bits included, as asyncssh gives it."""

    __slots__ = ("size", "uid", "gid", "permissions", "atime", "mtime")

    def __init__(self):
        self.size = self.uid = self.gid = self.permissions = self.atime = self.mtime = None


def decode_attrs(data: bytes, offset: int = 0, errors=OWN_ERRORS) -> WireAttrs:
    flags = _u32.unpack_from(data, offset)[0]
    offset += 4
    if flags & ATTR_ACMODTIME:
        flags &= ~_ATTR_MODIFYTIME_V4
    if flags & ~_ATTR_V3:
        raise errors.SFTPBadMessage(f"Unsupported attribute flags: 0x{flags & ~_ATTR_V3:08x}")
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
        raise errors.SFTPBadMessage("Incomplete attributes") from None
    return attrs   # extended attributes, last in the block, are of no use here


def decode_attrs_at(data: bytes, offset: int, errors=OWN_ERRORS) -> tuple[WireAttrs, int]:
    """The attributes at `offset` and where they end (a name list has more after them)."""
    attrs = decode_attrs(data, offset, errors)
    flags = _u32.unpack_from(data, offset)[0]
    offset += 4
    offset += 8 if flags & ATTR_SIZE else 0
    offset += 8 if flags & ATTR_UIDGID else 0
    offset += 4 if flags & ATTR_PERMISSIONS else 0
    offset += 8 if flags & ATTR_ACMODTIME else 0
    if flags & ATTR_EXTENDED:
        count = _u32.unpack_from(data, offset)[0]
        offset += 4
        for _ in range(count * 2):   # name and value, each a string
            offset += 4 + _u32.unpack_from(data, offset)[0]
    if offset > len(data):
        raise errors.SFTPBadMessage("Incomplete attributes")
    return attrs, offset


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


class SftpLimits:
    """The server's limits (asyncssh SFTPLimits's field names)."""

    __slots__ = ("max_packet_len", "max_read_len", "max_write_len", "max_open_handles")

    def __init__(self, max_packet_len: int, max_read_len: int, max_write_len: int,
                 max_open_handles: int):
        self.max_packet_len, self.max_read_len = max_packet_len, max_read_len
        self.max_write_len, self.max_open_handles = max_write_len, max_open_handles


class SftpWire:
    """One SFTP session on its own channel (see the module's docstring). Made by
    open_wire(); `posix_rename_supported` and `limits_told`, `limits` (max_read_len,
    max_write_len) as the server's VERSION and limits told."""

    def __init__(self, path_encoding: str = "utf-8", path_errors: str = "surrogateescape",
                 utf8_decode_errors: str = "strict", errors=OWN_ERRORS, new_future=None):
        self.errors = errors   # the exception classes raised (see the module's docstring)
        # a request's future: of the running event loop, or of the threads that wait on
        # them (a SyncFuture: see open_threaded_wire)
        if new_future is None:
            import asyncio   # (only a loop's sessions: see SyncFuture)

            self._new_future = asyncio.get_running_loop().create_future
        else:
            self._new_future = functools.partial(new_future, self)
        # a request's id and bytes, and a batch, are one thread's at a time (threads that
        # share a threaded session); on a loop, there is one thread
        self._send_lock = threading.RLock() if new_future else contextlib.nullcontext()
        self._chan = None
        self._in = bytearray()
        self._waiting: dict[int, tuple] = {}   # request id -> (future, reply parser)
        self._next_id = 1
        self._out: list[bytes] = []
        self._batching = 0
        self._lost: BaseException | None = None
        self._encoding = (path_encoding, path_errors)
        self._decode_errors = utf8_decode_errors
        self.version = self._new_future()
        self.extensions: dict[bytes, bytes] = {}
        self.posix_rename_supported = False
        self.limits_told = False
        self.openssh_symlink_order = self.openssh_server = False
        self._greeted = False   # the VERSION came (see _not_a_version)
        self.limits = SftpLimits(0, _DEFAULT_READ_LEN, _DEFAULT_WRITE_LEN, 0)

    # -- the channel -------------------------------------------------------------------
    def connection_made(self, chan) -> None:
        self._chan = chan

    def connection_lost(self, exc) -> None:
        self._fail(exc or self.errors.SFTPConnectionLost("Connection closed"))

    # (the rest of what asyncssh's channel tells a session: nothing to do here)
    def session_started(self) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def xon_xoff_requested(self, client_can_restart: bool) -> None:
        pass

    def exit_status_received(self, status: int) -> None:
        pass

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        pass

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

    def stop(self) -> None:
        """A threaded session's close() without the wait for its end (_ThreadPipes.stop)."""
        if self._chan is not None:
            self._chan.stop()

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
        if not self._greeted and len(buf) >= 5 and self._not_a_version(buf):
            return
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
                raise self.errors.SFTPBadMessage("Invalid data reply")
            result = parse(kind, payload)
        except struct.error:   # a reply shorter than its type says
            future.set_exception(self.errors.SFTPBadMessage("Truncated response"))
        except Exception as exc:   # noqa: BLE001 - the request's own error
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _not_a_version(self, buf: bytearray) -> bool:
        """Whether what came first is not the server's VERSION: then the session fails,
        saying what came. Most often a login script of the host's (a .bashrc that
        echoes) whose words went into the stream, as the subsystem runs through the
        user's shell; its bytes read as a length would fail as "Invalid response
        length", which tells nobody what to mend."""
        length, kind = _u32.unpack_from(buf)[0], buf[4]
        if kind == FXP_VERSION and 5 <= length <= _MAX_REPLY_LEN:
            self._greeted = True
            return False
        text = bytes(buf[:400]).decode("utf-8", "replace")
        said = " ".join("".join(itertools.takewhile(lambda c: c.isprintable() or c in "\t\r\n",
                                                    text)).split())[:100]
        self._greeted = True   # (said once; what comes after is not read)
        del buf[:]
        exc = self.errors.SFTPBadMessage(
            f"the host sent {said!r} where the SFTP server's first reply goes: a login "
            "script (.bashrc, .profile) that prints to its output, or no SFTP server there")
        exc.castlib_kind = "not an SFTP stream"
        self._fail(exc)
        self.close()
        return True

    def _close_late_handle(self, payload: bytes) -> None:
        """The handle of an open nobody waits for any more: closed, not left open on the
        server for the session's life (the answer, whatever it is, goes unread)."""
        if len(payload) >= 4 and _u32.unpack_from(payload)[0] == len(payload) - 4:
            self._request(FXP_CLOSE, payload, self._expect_status)

    def _protocol_error(self, why: str) -> None:
        self._fail(self.errors.SFTPBadMessage(why))
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
            self.version.set_exception(self.errors.SFTPBadMessage(
                f"Unsupported version: {version}"))
            return
        self.posix_rename_supported = self.extensions.get(b"posix-rename@openssh.com") == b"1"
        # OpenSSH's sftp-server (rclone's, asyncssh's and Go's name none of these two)
        self.openssh_server = self.openssh_symlink_order = \
            b"limits@openssh.com" in self.extensions or b"lsetstat@openssh.com" in self.extensions
        self.limits_told = self.extensions.get(b"limits@openssh.com") == b"1"
        self.version.set_result(version)

    # -- requests ----------------------------------------------------------------------
    def _path(self, path) -> bytes:
        """The name's bytes. One with a NUL is refused: a server in C (OpenSSH's) takes
        the name up to it, so "a\\0b" would write, or rename over, another file, "a"."""
        name = path if isinstance(path, bytes) else path.encode(*self._encoding)
        if b"\0" in name:
            raise self.errors.SFTPInvalidFilename(f"Name contains a NUL byte: {path!r}")
        return name

    def _request(self, kind: int, payload: bytes, parse, data=b"") -> asyncio.Future:
        """Send `payload` (then `data`, a write's bytes, not copied to be joined to it)."""
        future = self._new_future()
        if self._lost is not None:
            future.set_exception(self._lost)
            return future
        with self._send_lock:
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
                self._fail(self.errors.SFTPConnectionLost(str(exc) or "Connection closed"))

    def _extended(self, name: bytes, payload: bytes, parse) -> asyncio.Future:
        return self._request(FXP_EXTENDED, _string(name) + payload, parse)

    def _expect_status(self, kind: int, payload: bytes):
        if kind != FXP_STATUS:
            raise self._unexpected(kind)
        exc = self.errors.status_error(payload, self._decode_errors)
        if exc is not None:
            raise exc

    def _expect(self, wanted: int, kind: int, payload: bytes):
        if kind == FXP_STATUS:
            exc = self.errors.status_error(payload, self._decode_errors)
            raise exc if exc is not None else self.errors.SFTPBadMessage(
                "Unexpected FX_OK response")
        if kind != wanted:
            raise self._unexpected(kind)

    def _unexpected(self, kind: int) -> Exception:
        return self.errors.SFTPBadMessage(f"Unexpected response type: {kind}")

    def _attrs_reply(self, kind: int, payload: bytes) -> WireAttrs:
        self._expect(FXP_ATTRS, kind, payload)
        return decode_attrs(payload, 0, self.errors)

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
            future = self._new_future()
            future.set_exception(self.errors.SFTPOpUnsupported("POSIX rename not supported"))
            return future
        return self._extended(b"posix-rename@openssh.com",
                              _string(self._path(src)) + _string(self._path(dst)),
                              self._expect_status)

    def utime(self, path, times) -> asyncio.Future:
        """asyncssh's utime: (atime, mtime) set, as v3 has them, both."""
        attrs = WireAttrs()
        attrs.atime, attrs.mtime = times
        return self.setstat(path, attrs)

    def rename(self, src, dst) -> asyncio.Future:
        """SFTP v3's rename (which refuses an existing target on OpenSSH)."""
        return self._request(FXP_RENAME, _string(self._path(src)) + _string(self._path(dst)),
                             self._expect_status)

    def remove(self, path) -> asyncio.Future:
        return self._request(FXP_REMOVE, _string(self._path(path)), self._expect_status)

    def rmdir(self, path) -> asyncio.Future:
        return self._request(FXP_RMDIR, _string(self._path(path)), self._expect_status)

    def mkdir(self, path, attrs=None) -> asyncio.Future:
        return self._request(FXP_MKDIR, _string(self._path(path)) +
                             (encode_attrs(attrs) if attrs is not None else _NO_ATTRS),
                             self._expect_status)

    def readlink(self, path) -> asyncio.Future:
        """The link's target, as a str (names decoded as paths are). One that no link
        can hold (empty, a NUL in it) is a server that lies: SFTPBadMessage, not a
        target that a sync would fail to make (os.symlink: "embedded null byte")."""
        def parse(kind, payload):
            names = self._names(kind, payload)
            if len(names) != 1:
                raise self.errors.SFTPBadMessage("Too many names returned")
            target = names[0][0]
            if not target or "\0" in target:
                raise self.errors.SFTPBadMessage(f"the link's target {target!r} is not a path")
            return target
        return self._request(FXP_READLINK, _string(self._path(path)), parse)

    def symlink(self, target, path) -> asyncio.Future:
        """A link at `path` to `target` (asyncssh's argument order). OpenSSH's server takes
        the two the other way round from the draft; so does any server that speaks
        OpenSSH's extensions (the limits): told by the VERSION, as no server version
        string comes through OpenSSH's pipes."""
        first, second = _string(self._path(target)), _string(self._path(path))
        if not self.openssh_symlink_order:
            first, second = second, first
        return self._request(FXP_SYMLINK, first + second, self._expect_status)

    async def readdir(self, path) -> list[tuple[str, WireAttrs]]:
        """Every (name, attributes) of the folder, "." and ".." left out. A name that is
        not one (empty, a '/' in it: "../x", "/etc/x") or one given twice is a server
        that lies, refused with SFTPBadMessage: a listing's names become paths below
        the destination of a sync, which os.path.join would have taken out of it."""
        handle = await self._request(FXP_OPENDIR, _string(self._path(path)), self._handle)
        entries, seen = [], set()
        try:
            while True:
                names = await self._request(FXP_READDIR, handle, self._names_or_end)
                if names is None:
                    break
                for name, attrs in names:
                    if name in (".", ".."):
                        continue
                    if not name or "/" in name or "\0" in name:
                        raise self.errors.SFTPBadMessage(
                            f"the server's listing of {path!r} holds {name!r}, which is "
                            "not a name")
                    if name in seen:
                        raise self.errors.SFTPBadMessage(
                            f"the server's listing of {path!r} holds {name!r} twice")
                    seen.add(name)
                    entries.append((name, attrs))
        finally:
            await self._request(FXP_CLOSE, handle, self._expect_status)
        return entries

    def _handle(self, kind: int, payload: bytes) -> bytes:
        self._expect(FXP_HANDLE, kind, payload)
        n = _u32.unpack_from(payload)[0]
        return _string(payload[4:4 + n])

    def _names_or_end(self, kind: int, payload: bytes):
        if kind == FXP_STATUS:
            exc = self.errors.status_error(payload, self._decode_errors)
            if isinstance(exc, self.errors.SFTPEOFError):
                return None
        return self._names(kind, payload)

    def _names(self, kind: int, payload: bytes) -> list[tuple[str, WireAttrs]]:
        self._expect(FXP_NAME, kind, payload)
        count, offset = _u32.unpack_from(payload)[0], 4
        if count > len(payload) // 12:   # each takes 12 bytes at least: not a count
            raise self.errors.SFTPBadMessage("Invalid name count")
        names = []
        for _ in range(count):
            n = _u32.unpack_from(payload, offset)[0]
            name = payload[offset + 4:offset + 4 + n]
            if len(name) != n:
                raise struct.error("name")
            offset += 4 + n
            offset += 4 + _u32.unpack_from(payload, offset)[0]   # the long name, unused
            attrs, offset = decode_attrs_at(payload, offset, self.errors)
            names.append((name.decode(*self._encoding), attrs))
        return names


class _Batch:
    __slots__ = ("_wire",)

    def __init__(self, wire: SftpWire):
        self._wire = wire

    def __enter__(self):
        self._wire._send_lock.__enter__()
        self._wire._batching += 1

    def __exit__(self, *exc):
        try:
            self._wire._batching -= 1
            if not self._wire._batching:
                self._wire._flush()
        finally:
            self._wire._send_lock.__exit__(None, None, None)


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
                    raise self._wire.errors.SFTPBadMessage("Data reply longer than asked for")
                return payload
            if kind == FXP_STATUS:
                exc = self._wire.errors.status_error(payload, self._wire._decode_errors)
                if isinstance(exc, self._wire.errors.SFTPEOFError):
                    return b""
                raise exc if exc is not None else self._wire.errors.SFTPBadMessage(
                    "Unexpected FX_OK response")
            raise self._wire._unexpected(kind)
        return self._request(FXP_READ, self._handle + _read_args.pack(offset, size), parse)

    def write(self, data, offset: int) -> asyncio.Future:
        return self._request(FXP_WRITE, self._handle + _u64.pack(offset) + _u32.pack(len(data)),
                             self._wire._expect_status, data)

    def close(self) -> asyncio.Future:
        """Closes the handle; a second close does nothing, as asyncssh's."""
        handle, self._handle = self._handle, None
        if handle is None:
            future = self._wire._new_future()
            future.set_result(None)
            return future
        return self._wire._request(FXP_CLOSE, handle, self._wire._expect_status)

    def _request(self, kind: int, payload: bytes, parse, data=b"") -> asyncio.Future:
        if self._handle is None:
            future = self._wire._new_future()
            future.set_exception(ValueError("I/O operation on closed file"))
            return future
        return self._wire._request(kind, payload, parse, data)


async def open_wire(conn, path_encoding: str = "utf-8",
                    path_errors: str = "surrogateescape") -> SftpWire:
    """A new SFTP session on `conn` (an asyncssh SSHClientConnection), initialised: the
    version agreed, the server's limits asked for when it offers the extension."""
    decode_errors = getattr(conn, "_utf8_decode_errors", "strict")
    errors = _asyncssh_errors()
    chan, wire = await conn.create_session(
        lambda: SftpWire(path_encoding, path_errors, decode_errors, errors),
        subsystem="sftp", encoding=None)
    try:
        chan.write(_header.pack(5, FXP_INIT, 3))   # INIT carries the version where an id goes
        await wire.version
        if wire.limits_told:
            await wire.request_limits()
    except BaseException:
        chan.close()
        raise
    return wire


# -- a session driven by the threads that wait on it ----------------------------------------
# Over OpenSSH's ssh, a session's pipes need no event loop: the thread that waits for an
# answer reads ssh's stdout itself, and settles whichever requests the replies answer
# (its own and those of any thread sharing the session). A small file's copy is then no
# hand-over between a transfer thread and a loop thread at each of its round trips (two
# thread switches and the loop's tasks, gathers and call-soons: ~0.14 s of CPU for 300
# small files, a third of the process's), and a command over SFTP imports no asyncio.
class SyncFuture:
    """A request's answer, as asyncio's futures give it (done, result, exception,
    add_done_callback, await), settled by whichever thread reads the reply. Waiting for
    it (result(), or `await` in a coroutine driven without a loop: see drive) reads the
    session's replies until it is settled; an `await` in a turn of drive_together yields
    it instead, to be waited for once the turn's requests are sent."""

    __slots__ = ("_wire", "_done", "_result", "_exception", "_callbacks")

    def __init__(self, wire: SftpWire):
        self._wire = wire   # (its channel, a _ThreadPipes, reads the replies)
        self._done = False
        self._result = None
        self._exception: BaseException | None = None
        self._callbacks: list | None = None

    def done(self) -> bool:
        return self._done

    @staticmethod
    def cancelled() -> bool:
        return False

    def exception(self) -> BaseException | None:
        if not self._done:
            raise RuntimeError("the answer has not come")
        return self._exception

    def result(self, timeout: float | None = None):
        if not self._done:
            self._wire._chan.wait_for(self, timeout)
        if self._exception is not None:
            raise self._exception
        return self._result

    def __await__(self):
        if not self._done and _grouped.active:
            yield self   # (to drive_together, which sends the group's requests first)
        return self.result(self._wire._chan.wait_timeout)

    def set_result(self, value) -> None:
        self._result = value
        self._settle()

    def set_exception(self, exc: BaseException) -> None:
        self._exception = exc
        self._settle()

    def add_done_callback(self, callback) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks = (self._callbacks or []) + [callback]

    def _settle(self) -> None:
        self._done = True
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback(self)


class _Grouped(threading.local):
    active = False   # whether this thread is driving a group (drive_together)


_grouped = _Grouped()


def drive_together(awaitables: list, wire: SftpWire) -> list:
    """Run several coroutines like drive, in turns, so that what each asks for next goes
    out in one channel write with what the others ask for next: the copies of a few small
    files, each a coroutine of three round trips, take three round trips together, not
    three each. Returns each one's value, or the exception it ended with.

    A turn steps every coroutine, inside one batch of `wire` (each stops at its first
    unanswered request: see SyncFuture.__await__), then waits until the requests they
    wait for are answered. The session runs the requests in the order they came, so
    each coroutine's own requests keep their order."""
    results: list = [None] * len(awaitables)
    waiting: dict[int, SyncFuture | None] = dict.fromkeys(range(len(awaitables)))
    while waiting:
        _grouped.active = True
        try:
            with wire.batch():
                for i in list(waiting):
                    try:
                        waiting[i] = awaited = awaitables[i].send(None)
                        if not isinstance(awaited, SyncFuture):
                            awaitables[i].close()
                            raise RuntimeError("a threaded SFTP session awaited something "
                                               "that needs an event loop")
                    except StopIteration as done:
                        results[i] = done.value
                        del waiting[i]
                    except BaseException as exc:   # noqa: BLE001 - that one's outcome
                        results[i] = exc
                        del waiting[i]
        finally:
            _grouped.active = False
        try:
            for future in waiting.values():   # (answered in the order sent: the last
                if not future.done():          # comes last, and each turn is whole)
                    future._wire._chan.wait_for(future, future._wire._chan.wait_timeout)
        except BaseException as exc:   # noqa: BLE001 - no answer: each ends with it
            # The session is given up (as a call's timeout gives it up): the rest of the
            # group's requests fail now, not after a timeout more for each of its copies.
            wire._fail(exc)
            for i in list(waiting):
                results[i] = _thrown(awaitables[i], exc)
                del waiting[i]
    return results


def _thrown(awaitable, exc: BaseException):
    """What a coroutine ends with when `exc` is raised where it waits, and again at each
    unanswered request it waits for after that (its cleanup's, say): the session
    answered none in time, and a wait of its own for each would be a timeout each, one
    coroutine after another. Its value if it ends well after all (as under drive)."""
    grouped, _grouped.active = _grouped.active, True   # (an unanswered one is yielded)
    try:
        awaited = awaitable.throw(exc)
        while isinstance(awaited, SyncFuture):
            awaited = awaitable.send(None) if awaited.done() else awaitable.throw(exc)
    except StopIteration as done:
        return done.value
    except BaseException as raised:   # noqa: BLE001 - its outcome
        return raised
    finally:
        _grouped.active = grouped
    awaitable.close()
    return RuntimeError("a threaded SFTP session awaited something that needs an event loop")


def drive(awaitable):
    """The value of a coroutine whose awaits are all SyncFutures (or coroutines awaiting
    them): run to its end in the calling thread, no event loop."""
    grouped, _grouped.active = _grouped.active, False   # (its awaits never suspend)
    try:
        awaitable.send(None)
    except StopIteration as done:
        return done.value
    finally:
        _grouped.active = grouped
    awaitable.close()
    raise RuntimeError("a threaded SFTP session awaited something that needs an event loop")


class _ThreadPipes:
    """A started ssh (ssh_command.start_ssh) as a threaded wire's channel: requests are
    written to its stdin by the thread that makes them (whole, under a lock: a batch is
    one write), replies read from its stdout by one waiting thread at a time while the
    others wait for it to settle their futures. Writes cannot wait on reads: castlib's
    requests are small but for writes, whose replies are small (a pipe fills only with
    one kind of large message, in one direction). The session is lost once ssh's outputs
    are at their end (`failure` explains why), or when it is closed: ssh is killed then,
    and not waited on for the end of its outputs, which a session on a ControlMaster's
    connection shares with the master (ssh hands them over), and which end only once the
    master has let go of the channel."""

    _STDERR_KEPT = 8192
    _READ_BYTES = 1 << 20
    _LINGER_S = 1.0   # what ssh's outputs may still hold after it ended: read that long
    wait_timeout: float | None = None   # an await's bound (a session's user sets it)

    def __init__(self, wire: SftpWire, proc, failure):
        self._wire = wire
        self._proc = proc
        self._failure = failure
        self._stdin = proc.stdin.fileno()
        self._stdout = proc.stdout.fileno()
        self._stderr_fd = proc.stderr.fileno()
        self._stderr = bytearray()
        self._write_lock = threading.Lock()
        self._turn = threading.Condition()   # who reads; woken when a read settled some
        self._reading = False
        self._closing = False
        self._close_done = False
        self._ended = False
        # a byte written here wakes the thread that reads (close)
        self._wake_r, self._wake_w = os.pipe()
        self._poll = select.poll()
        for fd in (self._stdout, self._stderr_fd, self._wake_r):
            self._poll.register(fd, select.POLLIN)
        self._open_outputs = 2
        # ssh's end, seen even while its outputs stay open (a ProxyCommand's helper that
        # inherited them lives on): a pidfd, readable once it ended; where there is none,
        # a look at it every second the reading thread waits
        try:
            self._pidfd: int | None = os.pidfd_open(proc.pid)
            self._poll.register(self._pidfd, select.POLLIN)
        except (AttributeError, OSError):
            self._pidfd = None
        self._exited_at: float | None = None   # when ssh was seen to have ended

    @property
    def pid(self) -> int:
        return self._proc.pid

    # -- what SftpWire asks of its channel ----------------------------------------------
    def write(self, data: bytes) -> None:
        if self._closing or self._ended:
            raise ConnectionResetError("ssh's input is closed")
        view = memoryview(data)
        with self._write_lock:
            try:
                while view:
                    view = view[os.write(self._stdin, view):]
            except BrokenPipeError:
                # ssh ended (or is ending): the requests fail as its end is read, with
                # why it ended (what waits for them reads it), not "broken pipe"
                return
            except OSError as exc:   # (EBADF: closed meanwhile)
                raise ConnectionResetError(f"ssh's input is closed ({exc.strerror})") from None

    def stop(self) -> None:
        """close()'s first half: the session is closing, its ssh killed, and not waited
        for (a connection's sessions are all stopped, then each closed: they end
        together, not one after the other)."""
        if self._closing:
            return
        self._closing = True
        if self._proc.poll() is None:
            from .ssh_command import kill   # (with its dialer, if it still connects)

            kill(self._proc)

    def close(self) -> None:
        """Ends the session: ssh is killed (every request was answered or is given up),
        what waits on it fails: at once here if no thread reads, else by that thread,
        woken for it."""
        if self._close_done:
            return
        self._close_done = True
        self.stop()
        if not self._while_nobody_reads(self._end):
            # under _turn, as _end closes the pipe: a number it closed may be another
            # file's by now (a new session's input, the catalog's journal)
            with self._turn:
                if self._wake_w is not None:   # (None: that thread is ending the session)
                    try:
                        os.write(self._wake_w, b"x")
                    except OSError:
                        pass

    def is_closing(self) -> bool:
        """Whether the session is gone: closed, ended, or (read now, what came while
        nobody waited) broken by what its server sent since (a reply twice)."""
        if not (self._closing or self._ended):
            self._catch_up()
        return self._closing or self._ended or self._proc.poll() is not None

    def _catch_up(self) -> None:
        """Read what has come, without waiting, if no thread is reading."""
        self._while_nobody_reads(lambda: self._read_some(0))

    def _while_nobody_reads(self, action) -> bool:
        """Do `action` as the reading thread if no thread reads now; whether it was done."""
        with self._turn:
            if self._reading:
                return False
            self._reading = True
        try:
            action()
        finally:
            with self._turn:
                self._reading = False
                self._turn.notify_all()
        return True

    # -- reading ---------------------------------------------------------------------------
    def wait_for(self, future: SyncFuture, timeout: float | None) -> None:
        """Read replies (or wait for the thread that does) until `future` is settled;
        TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._turn:
            while not future.done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WaitTimeout(f"no answer within {timeout:g} s")
                if self._reading:
                    self._turn.wait(left)
                    continue
                if self._ended:   # (its futures were failed at the end: not this one?)
                    future.set_exception(self._wire._lost or self._wire.errors.
                                         SFTPConnectionLost("Connection closed"))
                    break
                self._reading = True
                self._turn.release()
                try:
                    self._read_some(left)
                finally:
                    self._turn.acquire()
                    self._reading = False
                    self._turn.notify_all()

    def _read_some(self, timeout: float | None) -> None:
        """One wait for ssh's outputs, and what they have read (the replies settle their
        futures), or the end of the session."""
        if self._ended:
            return
        if self._exited_at is None and self._pidfd is None:
            timeout = 1.0 if timeout is None else min(timeout, 1.0)
        elif self._exited_at is not None:   # what its outputs still hold: a second more
            timeout = max(0.0, self._exited_at + self._LINGER_S - time.monotonic())
        ready = self._poll.poll(None if timeout is None else
                                int(timeout * 1000) + 1 if timeout > 0 else 0)
        if self._exited_at is None and (
                any(fd == self._pidfd for fd, _ in ready) or
                (self._pidfd is None and self._proc.poll() is not None)):
            self._exited_at = time.monotonic()
            if self._pidfd is not None:
                self._poll.unregister(self._pidfd)
        for fd, _ in ready:
            if fd == self._pidfd:
                continue
            if fd == self._wake_r or self._closing:
                break   # closed (by another thread, or by a reply it could not take)
            try:
                data = os.read(fd, self._READ_BYTES)
            except OSError:
                data = b""
            if fd == self._stdout:
                if data:
                    self._wire.data_received(data, None)
                    continue
            elif data:
                self._keep_stderr(data)
                continue
            self._poll.unregister(fd)
            self._open_outputs -= 1
        if self._closing or not self._open_outputs or (
                self._exited_at is not None and
                time.monotonic() >= self._exited_at + self._LINGER_S):
            self._end()

    def _keep_stderr(self, data: bytes) -> None:
        """The last _STDERR_KEPT bytes of ssh's stderr, from a line's start: ssh says why
        it ended last, after whatever came before (a ProxyCommand's chatter, LogLevel
        DEBUG: 8 KiB for one refused login at DEBUG3)."""
        self._stderr += data
        if len(self._stderr) > self._STDERR_KEPT:
            tail = self._stderr[-self._STDERR_KEPT:]
            start = tail.find(b"\n")
            self._stderr = tail[start + 1:] if start >= 0 else tail

    def _end(self) -> None:
        """The session's end (its outputs at their end, or closed): ssh is waited for (it
        ends with them, or is made to), its pipes closed, the session's requests failed
        with why it ended. By the thread whose turn it is to read."""
        if self._ended:
            return
        try:
            returncode = self._proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - an ssh that closed its outputs and lingers
            self._proc.kill()
            returncode = self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        with self._turn:   # (not while close() writes to it)
            wake, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), None, None
        for fd in (*wake, self._pidfd):
            if fd is not None:
                os.close(fd)
        self._ended = True
        exc = None if self._closing else self._failure(returncode, bytes(self._stderr))
        self._wire.connection_lost(exc)


class WaitTimeout(TimeoutError):
    """No answer in time on a threaded session."""


def begin_threaded_wire(proc, failure, wait_timeout: float | None = None,
                        path_encoding: str = "utf-8",
                        path_errors: str = "surrogateescape") -> SftpWire:
    """A new SFTP session over the pipes of an ssh started by ssh_command.start_ssh,
    driven by the threads that use it (_ThreadPipes), its INIT sent: finish_threaded_wire
    waits for the server's VERSION (several sessions begun first are opened together).
    An `await` of one of its answers waits `wait_timeout` seconds at most."""
    wire = SftpWire(path_encoding, path_errors, new_future=SyncFuture)
    pipes = _ThreadPipes(wire, proc, failure)
    pipes.wait_timeout = wait_timeout
    wire.connection_made(pipes)
    try:
        pipes.write(_header.pack(5, FXP_INIT, 3))
    except ConnectionResetError:
        pass   # ssh ended already (a refused connection): why is what it said (finish)
    return wire


def finish_threaded_wire(wire: SftpWire, timeout: float) -> SftpWire:
    """The session begun, initialised: the version agreed, the server's limits asked for,
    within `timeout` seconds; else closed, and why raised."""
    deadline = time.monotonic() + timeout
    try:
        wire.version.result(timeout)
        if wire.limits_told:
            wire.request_limits().result(max(0.0, deadline - time.monotonic()))
    except BaseException:
        wire.close()
        raise
    return wire
