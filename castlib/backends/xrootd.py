"""XRootD storage (root://host:port//abs/path: EOS, CTA, dCache, xrootd) via the XRootD bindings.

Semantics worth knowing:
- XRootD keeps mtimes in whole seconds and cannot set them: set_mtime raises Unsupported.
- rename (mv) replaces an existing target file on xrootd/EOS. A server that refuses is
  handled by moving the target aside first and deleting it only once the source holds
  the final name, so the only verified copy is never lost.
- Names: '?' starts XRootD's opaque (CGI) part and cannot be part of a name; names are
  UTF-8 only: a local name with other bytes cannot be written (Unsupported), and a folder
  on the server holding one cannot be listed by the Python bindings (reported, skipped).
- Third-party copy is used from another XRootD location for files of 16 MiB and more
  (option tpc_min_size, in bytes): XrdCl spends ~2.5 s on any TPC, however small.
- Checksums are the server's (kXR_query checksum). A plain xrootd computes them as jobs
  in a small table and tells one request too many to wait 30 s, so at most
  `checksum_queries` (default 2) are in flight per location, whatever --transfers says.
- Connection timeouts are process-wide XRootD settings; castlib shortens the defaults
  (minutes) to seconds unless XRD_CONNECTIONWINDOW / XRD_CONNECTIONRETRY /
  XRD_REQUESTTIMEOUT are set in the environment.
"""
from __future__ import annotations

import os
import posixpath
import re
import threading
import time
from typing import Iterator

from pydantic import NonNegativeInt, PositiveInt
from XRootD import client
from XRootD.client.flags import (DirListFlags, MkDirFlags, OpenFlags, PrepareFlags,
                                 QueryCode, StatInfoFlags)

from ..checksum import normalise
from ..errors import (NotFound, StorageError, TransientStorageError,
                      Unsupported)
from ..location import redact
from .base import (DIR, FILE, Backend, BackendOptions, Capabilities, ListingErrorHandler, Stat,
                   WriteStream, wait_for_staging, walk_by_folder)

# A dead server is reported after ConnectionWindow x ConnectionRetry seconds, not the
# client's default of 120 s x 5 tries.
_TIMEOUT_DEFAULTS = {"ConnectionWindow": 5, "ConnectionRetry": 1, "RequestTimeout": 300,
                     "StreamErrorWindow": 5}
for _name, _value in _TIMEOUT_DEFAULTS.items():
    if f"XRD_{_name.upper()}" not in os.environ:
        client.EnvPutInt(_name, _value)

# XRootD client status codes (XrdClStatus.hh) that mean "the connection failed", worth a retry
_TRANSIENT_CODES = {101, 102, 103, 104, 105, 107, 108, 109, 206, 207}
_UNREACHED_CODES = {101, 108}   # errInvalidAddr, errConnectionError: no server reached
# server errnos (XProtocol.hh): kXR_NotFound, and the busy/timed-out family
_KXR_NOT_FOUND = 3011
_KXR_TRANSIENT = {3012, 3014, 3020, 3024, 3034, 3035}
_STAGE_POLL_S = 2.0
# XrdCl polls a third-party copy's progress every ~2.5 s, so even a tiny file costs that
# much; below this size streaming through castlib is faster (option "tpc_min_size")
_TPC_MIN_SIZE = 16 * 1024 * 1024
# xrootd runs at most 4 checksum jobs at once (xrootd.chksum max, default 4) and answers
# one more with "wait 30 s": parallel transfers that all verify at once would stall for
# that long. Fewer queries in flight per server (option "checksum_queries") avoid it.
_CHECKSUM_QUERIES = 2


class XRootDOptions(BackendOptions):
    checksum_queries: PositiveInt = _CHECKSUM_QUERIES   # checksum queries in flight a location
    tpc_min_size: NonNegativeInt = _TPC_MIN_SIZE        # bytes: smaller files are streamed


class XRootDBackend(Backend):
    description = "XRootD servers: EOS, CTA tape, dCache, xrootd"
    capabilities = Capabilities(
        set_mtime=False, server_checksums=frozenset({"adler32"}),
        mtime_precision_ns=1_000_000_000, symlinks=False, empty_dirs=True,
        third_party_copy=True, tape=True,
    )

    Options = XRootDOptions

    def __init__(self, url, options=None):
        super().__init__(url, options)
        user = f"{url.user}@" if url.user else ""   # XRootD takes no password in the URL
        self._server = f"{url.scheme}://{user}{url.host}/"
        self._fs = client.FileSystem(self._server)
        self._checksum_slots = threading.BoundedSemaphore(
            self.settings.checksum_queries)

    def _abs(self, path: str) -> str:
        if "?" in path:   # the server would cut the name there and act on another file
            raise Unsupported(f"XRootD names cannot contain '?': {path!r}", path=path)
        if not path.isascii():
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:   # a local name's raw bytes, kept as surrogates
                raise Unsupported(f"XRootD names must be UTF-8: {path!r}", path=path) from None
        return posixpath.join(self.url.path, path) if path else self.url.path

    def _full_url(self, path: str) -> str:
        return self._server + self._abs(path)

    def _where(self, path: str) -> str:
        """The path as a user would type it, without credentials, for messages."""
        return f"{self.url.scheme}://{self.url.host}/{self._abs(path)}"

    # -- listing -----------------------------------------------------------------------
    def walk(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        return walk_by_folder(self._list_folder, on_error,
                              f"folder does not exist: {self._where('')}")

    def _list_folder(self, rel: str) -> list[Stat]:
        """One dirlist with STAT: names, sizes, mtimes, flags in one round trip."""
        try:
            status, listing = self._fs.dirlist(self._abs(rel), DirListFlags.STAT)
        except (SystemError, UnicodeDecodeError):
            # the bindings cannot decode a name that is not UTF-8: report the folder
            raise StorageError(f"cannot list {self._where(rel)}: it holds a name that is not "
                               "UTF-8, which the XRootD Python client cannot read",
                               path=rel) from None
        if not status.ok:
            raise _storage_error(status, "cannot list", self._where(rel))
        entries = []
        for entry in listing:
            path = f"{rel}/{entry.name}" if rel else entry.name
            if entry.statinfo is not None:
                entries.append(_to_stat(path, entry.statinfo))
            else:   # the server could not stat this one along with the listing
                st = self.stat(path)
                if st is not None:
                    entries.append(st)
        return entries

    def stat(self, path: str) -> Stat | None:
        status, info = self._fs.stat(self._abs(path))
        if not status.ok:
            error = _storage_error(status, "cannot stat", self._where(path))
            if isinstance(error, NotFound):
                return None
            raise error
        return _to_stat(path, info)

    # -- data ----------------------------------------------------------------------------
    def open_read(self, path: str):
        return _XRootDReader(self._open(path, OpenFlags.READ), self._where(path))

    def open_write(self, path: str):
        # DELETE: create or truncate; MAKEPATH: create missing parent folders
        return _XRootDWriter(self, path, self._open(path, OpenFlags.DELETE | OpenFlags.MAKEPATH))

    def _open(self, path: str, flags: int) -> client.File:
        handle = client.File()
        status, _ = handle.open(self._full_url(path), flags)
        if not status.ok:
            raise _storage_error(status, "cannot open", self._where(path))
        return handle

    def checksum(self, path: str, algorithm: str) -> str:
        if algorithm != "adler32":
            return super().checksum(path, algorithm)
        with self._checksum_slots:
            status, response = self._fs.query(QueryCode.CHECKSUM, self._abs(path))
        if not status.ok:
            raise _storage_error(status, "cannot get the checksum of", self._where(path))
        # "adler32 0a1b2c3d\0"
        words = response.decode(errors="replace").strip("\0 \n").split()
        if len(words) != 2 or words[0].lower() != "adler32":
            raise StorageError(f"unexpected checksum answer {words!r} for {self._where(path)}",
                               path=path)
        return normalise("adler32", words[1])

    # -- namespace -----------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        status, _ = self._fs.mkdir(self._abs(path), MkDirFlags.MAKEPATH)
        if not status.ok:
            st = self.stat(path)   # an existing folder is no error
            if st is None or st.kind != DIR:
                raise _storage_error(status, "cannot create folder", self._where(path))

    def rename(self, src: str, dst: str) -> None:
        status, _ = self._fs.mv(self._abs(src), self._abs(dst))
        if status.ok:
            return
        target = self.stat(dst)
        if target is None or target.kind != FILE or self.stat(src) is None:
            raise _storage_error(status, f"cannot rename {self._where(src)} to", self._abs(dst))
        # A server that will not replace: move the target aside, then delete it only once
        # the source holds the final name; if that fails, put the target back.
        aside = f"{dst}.castlib-replaced-{os.getpid()}-{time.monotonic_ns()}"
        self._mv(dst, aside)
        try:
            self._mv(src, dst)
        except StorageError:
            self._mv(aside, dst)
            raise
        self.delete(aside)

    def _mv(self, src: str, dst: str) -> None:
        status, _ = self._fs.mv(self._abs(src), self._abs(dst))
        if not status.ok:
            raise _storage_error(status, f"cannot rename {self._where(src)} to", self._abs(dst))

    def delete(self, path: str) -> None:
        st = self.stat(path)
        if st is None:
            raise NotFound(f"no such file or folder: {self._where(path)}", path=path)
        if st.kind == DIR:
            status, _ = self._fs.rmdir(self._abs(path))
        else:
            status, _ = self._fs.rm(self._abs(path))
        if not status.ok:
            raise _storage_error(status, "cannot delete", self._where(path))

    # -- tape and third-party copy ---------------------------------------------------------
    def stage(self, paths: list[str], timeout_s: float) -> None:
        """Ask the server to bring nearline files to disk, then wait until all are online."""
        offline = [p for p in paths if not self._is_online(p)]
        if not offline:
            return
        status, _ = self._fs.prepare([self._abs(p) for p in offline], PrepareFlags.STAGE)
        if not status.ok:
            raise _storage_error(status, f"cannot request staging of {len(offline)} file(s) in",
                                 self._where(""))
        wait_for_staging(offline, lambda ps: [p for p in ps if not self._is_online(p)],
                         timeout_s, _STAGE_POLL_S, self._where)

    def _is_online(self, path: str) -> bool:
        st = self.stat(path)
        return st is None or st.online is not False   # a vanished file is the copy's problem

    def copy_from(self, source: Backend, src_path: str, dst_path: str) -> bool:
        """Server-to-server copy between XRootD servers; False when the servers cannot."""
        if not isinstance(source, XRootDBackend):
            return False
        src_stat = source.stat(src_path)
        if src_stat is None:
            raise NotFound(f"no such file: {source._where(src_path)}", path=src_path)
        if src_stat.size < self.settings.tpc_min_size:
            return False
        process = client.CopyProcess()
        process.add_job(source._full_url(src_path), self._full_url(dst_path), force=True,
                        mkdir=True, thirdparty="only")
        status = process.prepare()
        if status.ok:
            status, results = process.run()
            if status.ok and results:
                status = results[0].get("status", status)
        if status.ok:
            return True
        error = _storage_error(status, f"third-party copy of {source._where(src_path)} to",
                               self._where(dst_path))
        if error.transient or isinstance(error, NotFound):
            raise error
        # anything else (no TPC on either side, a refusal): the caller streams instead,
        # and will meet any real problem itself
        return False

    def close(self) -> None:
        self._fs = None


class _XRootDReader:
    """Streams a remote file in the sizes asked for, keeping only one chunk in memory."""

    def __init__(self, handle: client.File, where: str):
        self._handle, self._where, self._offset = handle, where, 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(8 * 1024 * 1024):
                chunks.append(chunk)
            return b"".join(chunks)
        status, data = self._handle.read(self._offset, size)
        if not status.ok:
            raise _storage_error(status, "cannot read", self._where)
        self._offset += len(data)
        return data

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()   # a failed close of a read changes nothing worth reporting

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _XRootDWriter(WriteStream):
    """Writes sequentially; the commit syncs and closes, and raises if the server did not
    take every byte, so a failed write is never published. An abort closes the file and
    removes what was written."""

    def __init__(self, backend: "XRootDBackend", path: str, handle: client.File):
        self._backend, self._path, self._handle, self._offset = backend, path, handle, 0
        self._where = backend._where(path)

    def _write(self, data) -> int:
        size = memoryview(data).nbytes   # the bindings take any buffer: no copy
        status, _ = self._handle.write(data, self._offset)
        if not status.ok:
            raise _storage_error(status, "cannot write", self._where)
        self._offset += size
        return size

    def _commit(self) -> None:
        status, _ = self._handle.sync()
        close_status, _ = self._handle.close()
        for s in (status, close_status):
            if not s.ok:
                raise _storage_error(s, "cannot finish writing", self._where)

    def _abort(self) -> None:
        self._handle.close()
        self._backend._fs.rm(self._backend._abs(self._path))


def _to_stat(path: str, info) -> Stat:
    flags = info.flags
    kind = DIR if flags & StatInfoFlags.IS_DIR else FILE
    online = not flags & StatInfoFlags.OFFLINE
    return Stat(path, kind, 0 if kind == DIR else info.size, info.modtime * 1_000_000_000,
                online=online)


_MESSAGE_NOISE = re.compile(r"^\[(?:ERROR|FATAL)\]\s*(?:Server responded with an error:\s*)?"
                            r"(?:\[\d+\]\s*)?")


def _one_line(message: str) -> str:
    return redact(" ".join(_MESSAGE_NOISE.sub("", message or "").split())) or "unknown error"


def _storage_error(status, what: str, where: str) -> StorageError:
    """castlib's error for a failed XRootDStatus: what failed, on which path, why."""
    message = f"{what} {where}: {_one_line(status.message)}"
    if status.errno == _KXR_NOT_FOUND or "no such file" in status.message.lower():
        return NotFound(message, path=where)
    if status.code in _TRANSIENT_CODES or status.errno in _KXR_TRANSIENT:
        return TransientStorageError(message, path=where,
                                     unreached=status.code in _UNREACHED_CODES)
    return StorageError(message, path=where)
