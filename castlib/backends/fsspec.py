"""Object stores and remote file systems through fsspec: S3, SFTP, WebDAV, memory and the rest."""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import posixpath
import queue
import socket
import ssl
import threading
from datetime import datetime
from http import HTTPStatus
from typing import BinaryIO, Callable, Iterator
from urllib.parse import quote

import fsspec
import fsspec.asyn

from ..checksum import CHUNK_SIZE
from ..errors import NotFound, StorageError, TransientStorageError, Unsupported
from ..location import LocationURL, redact, secret_values
from .base import (DIR, FILE, LINK, Backend, Capabilities, ListingErrorHandler, Stat,
                   walk_by_folder)

log = logging.getLogger(__name__)
SECOND_NS = 1_000_000_000

# What each protocol can do. S3 keeps no folders and no settable mtimes; its ETag is the
# md5 of a single-part upload (a "-" marks a multipart one, which is not an md5).
CAPABILITIES: dict[str, Capabilities] = {
    "s3": Capabilities(set_mtime=False, atomic_rename=False, server_checksums=frozenset({"md5"}),
                       mtime_precision_ns=SECOND_NS, empty_dirs=False),
    # SFTP v3 sets permission bits and folder mtimes; a link's own mtime needs an OpenSSH
    # extension (lsetstat), and owners need root on the far side: not claimed
    "sftp": Capabilities(set_mtime=True, atomic_rename=True, mtime_precision_ns=SECOND_NS,
                         symlinks=True, empty_dirs=True, permissions=True, dir_mtimes=True),
    "webdav": Capabilities(set_mtime=False, atomic_rename=False, mtime_precision_ns=SECOND_NS,
                           empty_dirs=True),
    "memory": Capabilities(set_mtime=False, atomic_rename=False, empty_dirs=True),
    "other": Capabilities(set_mtime=False, atomic_rename=False, mtime_precision_ns=SECOND_NS,
                          empty_dirs=False),
}

_PROTOCOL = {"s3": "s3", "sftp": "sftp", "ssh": "sftp", "webdav": "webdav", "dav": "webdav",
             "webdavs": "webdav", "davs": "webdav", "memory": "memory"}
_HTTPS_SCHEMES = {"webdavs", "davs"}
_DESTINATION_UNSAFE = frozenset("?;")

# Options castlib itself reads; every other option goes to the fsspec file system as is.
DEFAULT_BLOCK_SIZE = 8 * 1024 * 1024   # one S3 part / one buffered upload block
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 120


class FsspecBackend(Backend):
    """One location on a protocol fsspec serves. Options (from the config file's `storage:`
    or a pipeline's `locations:`) go to the fsspec file system as they are, except:

    - all: `block_size` (bytes buffered per upload part, default 8 MiB), `connect_timeout` (s)
    - s3: `key`, `secret`, `endpoint_url`, `client_kwargs`, ... (s3fs; the AWS_* environment
      variables work too); `etag_is_md5: false` for stores whose ETag is no md5 (SSE-KMS)
    - sftp: see castlib/backends/sftp.py (SftpBackend builds on this class)
    - webdav/davs: `user`, `password` (or in the URL), `verify` (a CA file for https)
    """

    schemes = ("s3", "webdav", "webdavs", "dav", "davs", "memory")
    description = "S3, WebDAV and any other fsspec protocol"
    extra = "fsspec"

    @classmethod
    def capabilities_for(cls, scheme: str) -> Capabilities:
        """What a URL scheme's back-end can do (for `castlib backends`)."""
        return CAPABILITIES[_PROTOCOL.get(scheme, "other")]

    def __init__(self, url: LocationURL, options: dict | None = None):
        super().__init__(url, options)
        self.protocol = _PROTOCOL.get(url.scheme, "other")
        self.capabilities = self.capabilities_for(url.scheme)   # per protocol, not per class
        opts = dict(self.options)
        self.block_size = int(opts.pop("block_size", DEFAULT_BLOCK_SIZE))
        self.etag_is_md5 = bool(opts.pop("etag_is_md5", True))
        self.connect_timeout = float(opts.pop("connect_timeout", CONNECT_TIMEOUT_S))
        self._storage_options = opts
        # Values that must never show in a message, whatever a library puts in its own.
        self._secrets = secret_values(self.options, url)
        self._fs = None
        self._generation = 0   # counts the connections made: which one a failure was on
        self._connect_lock = threading.RLock()   # a failed connect reports through _connection_failed
        self._dav = None
        self.root = self._root_path()

    # -- connecting ------------------------------------------------------------------------
    def _root_path(self) -> str:
        path = self.url.path.rstrip("/")
        if self.protocol == "s3":
            return self.url.host + path
        if self.protocol in ("sftp", "webdav"):
            return path or "/"
        if self.protocol == "memory":
            return posixpath.normpath("/" + self.url.host + path) if (self.url.host or path) else "/"
        fs_cls = fsspec.get_filesystem_class(self.url.scheme)
        return fs_cls._strip_protocol(f"{self.url.scheme}://{self.url.host}{path}")

    @property
    def fs(self):
        """The fsspec file system, connected on first use (a back-end object costs nothing
        until it is used)."""
        if self._fs is None:
            with self._connect_lock:   # parallel transfers share one back-end object
                if self._fs is None:
                    with self._errors(""):
                        self._fs = self._connect()
        return self._fs

    def _connect(self):
        _quiet_background_errors(fsspec.asyn.get_loop())
        opts = dict(self._storage_options)
        if self.protocol == "s3":
            import s3fs

            if self.url.user and "key" not in opts:   # s3://KEY:SECRET@bucket, if a user must
                opts["key"], opts["secret"] = self.url.user, self.url.password
            config = dict(opts.pop("config_kwargs", None) or {})
            config.setdefault("connect_timeout", self.connect_timeout)
            config.setdefault("read_timeout", READ_TIMEOUT_S)
            config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                   config_kwargs=config, **opts)
            # botocore already retries once; s3fs's own loop on top would multiply the wait
            # on an unreachable endpoint, and the sync engine retries transient errors itself
            fs.retries = 1
            return fs
        if self.protocol == "webdav":
            import httpx
            from webdav4.fsspec import WebdavFileSystem

            user = opts.pop("user", None) or opts.pop("username", None) or self.url.user
            password = opts.pop("password", None) or self.url.password
            opts.setdefault("auth", (user, password or "") if user else None)
            opts.setdefault("timeout", httpx.Timeout(READ_TIMEOUT_S, connect=self.connect_timeout))
            opts.setdefault("retry", False)   # the sync engine retries transient errors itself
            if isinstance(opts.get("verify"), str):   # a CA file or folder from a config file
                ca = os.path.expanduser(opts["verify"])
                opts["verify"] = (ssl.create_default_context(capath=ca) if os.path.isdir(ca)
                                  else ssl.create_default_context(cafile=ca))
            http = "https" if self.url.scheme in _HTTPS_SCHEMES else "http"
            # paths go below the server's root, not into the base URL: webdav4 rebuilds
            # URLs from the base's decoded path, and a '#' or '?' there breaks them
            base = f"{http}://{self.url.host}"
            fs = WebdavFileSystem(base, skip_instance_cache=True, **opts)
            self._dav = fs.client
            return fs
        if self.protocol == "memory":
            return fsspec.filesystem("memory")
        return fsspec.filesystem(self.url.scheme, skip_instance_cache=True, **opts)

    def _connection_failed(self, generation: int) -> None:
        """A connection that dropped (SFTP's, which stays dropped: see sftp.py); HTTP
        clients reconnect by themselves."""

    def close(self) -> None:
        self._fs = None
        try:
            if self._dav is not None:
                self._dav.http.close()
        except Exception:  # closing is best effort: the connection may be gone already
            pass
        self._dav = None

    # -- paths -----------------------------------------------------------------------------
    def _full(self, path: str) -> str:
        """The file system's path of a location-relative path."""
        full = self.root if not path else (
            f"{self.root.rstrip('/')}/{path}" if self.root != "/" else f"/{path}")
        if self.protocol == "webdav":
            return quote(full, safe="/")   # webdav4 joins paths into URLs without quoting
        return full

    def _relative(self, name: str) -> str:
        name = name.rstrip("/")
        if self.protocol == "webdav":   # names come relative to the server's root
            name = "/" + name.lstrip("/")
        root = self.root.rstrip("/")
        if name == root:
            return ""
        if name.startswith(root + "/"):
            return name[len(root) + 1:]
        return name.lstrip("/")

    def _where(self, path: str = "") -> str:
        """The location (and path) for a message: user shown, password never."""
        user = f"{self.url.user}@" if self.url.user else ""
        where = f"{self.url.scheme}://{user}{self.url.host}{self.url.path}"
        if path:
            where = where.rstrip("/") + "/" + path
        return where

    # -- errors ----------------------------------------------------------------------------
    def _errors(self, path: str):
        return _Translate(self, path)

    def translate(self, exc: BaseException, path: str) -> StorageError:
        """One castlib error, one line, no secrets, for whatever a library raised."""
        if isinstance(exc, StorageError):
            return exc
        where = self._where(path)
        kind, detail = _classify(exc)
        detail = self._scrub(detail)
        if self.protocol == "s3" and kind == "permission denied" and detail in ("Forbidden", ""):
            # a HEAD request's 403 has no body to say why
            kind, detail = "access denied (wrong credentials, or no permission)", ""
        message = f"{where}: {kind}" + (f" ({detail})" if detail and detail != kind else "")
        if kind == "not found":
            return NotFound(message, path=path)
        if kind == "operation unsupported":
            return Unsupported(message, path=path)
        if kind in _TRANSIENT_KINDS:
            return TransientStorageError(message, path=path)
        return StorageError(message, path=path)

    def _scrub(self, text: str) -> str:
        return redact(" ".join(str(text).split()), self._secrets)[:300]

    # -- listing ---------------------------------------------------------------------------
    def walk(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        if self.protocol in ("sftp", "webdav"):
            yield from self._walk_by_folder(on_error)
        elif self.protocol == "s3":
            yield from self._walk_s3(on_error)
        else:
            yield from self._walk_by_find(on_error)

    def _walk_s3(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        """The whole prefix in pages of 1000 keys, with no delimiter: one request per
        thousand objects, whatever the depth. Folders are made up from the keys, each
        named just before its first entry; only their names are kept in memory."""
        bucket, _, prefix = self.root.partition("/")
        pages = self.fs._iterdir(bucket, delimiter="", prefix=f"{prefix}/" if prefix else "")
        folders: set[str] = set()
        while True:
            try:
                with self._errors(""):
                    batch = fsspec.asyn.sync(self.fs.loop, _next_items, pages, 1000)
            except StorageError as exc:
                on_error("", str(exc))
                return
            if not batch:
                return
            for info in batch:
                rel = self._relative(info["name"])
                if not rel:
                    continue
                parts = rel.split("/")
                for depth in range(1, len(parts) + 1):
                    folder = "/".join(parts[:depth])
                    is_marker = depth == len(parts) and info["name"].endswith("/")
                    if depth < len(parts) or is_marker:   # "x/" keys are folder markers
                        if folder not in folders:
                            folders.add(folder)
                            yield Stat(folder, DIR, 0)
                if not info["name"].endswith("/"):
                    yield self._stat_from_info(rel, info)

    def _walk_by_find(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        """Any other fsspec protocol: one recursive listing, sorted by path components so
        that parents come first."""
        try:
            with self._errors(""):
                found = self.fs.find(self.root, withdirs=True, detail=True)
        except StorageError as exc:
            on_error("", str(exc))
            return
        entries = []
        for name, info in found.items():
            rel = self._relative(name)
            if rel:
                entries.append(self._stat_from_info(rel, info))
        entries.sort(key=lambda st: st.path.split("/"))
        yield from entries

    def _walk_by_folder(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        return walk_by_folder(self._list_folder, on_error,
                              f"folder does not exist: {self._where()}")

    def _list_folder(self, folder: str) -> list[Stat]:
        """One listing request for a folder, its entries in path order."""
        with self._errors(folder):
            infos = self.fs.ls(self._full(folder), detail=True)
            entries = [self._stat_from_info(self._child(folder, info), info) for info in infos]
        entries.sort(key=lambda st: st.path)
        return entries

    def _child(self, folder: str, info: dict) -> str:
        name = info["name"].rstrip("/")
        if self.protocol == "webdav":
            return self._relative(name)
        return f"{folder}/{posixpath.basename(name)}" if folder else posixpath.basename(name)

    def _stat_from_info(self, rel: str, info: dict) -> Stat:
        kind = {"directory": DIR, "file": FILE, "link": LINK}.get(info.get("type"), FILE)
        size = 0 if kind == DIR else info.get("size")
        mode = info.get("permissions")
        checksums = None
        if self.protocol == "s3" and kind == FILE and self.etag_is_md5:
            md5 = _etag_md5(info.get("ETag"))
            checksums = {"md5": md5} if md5 else None
        return Stat(rel, kind, size, _mtime_ns(info), mode & 0o7777 if mode else None,
                    checksums=checksums)

    def stat(self, path: str) -> Stat | None:
        try:
            with self._errors(path):
                info = self.fs.info(self._full(path))
        except NotFound:
            if path == "" and self.protocol == "s3":
                return self._bucket_root()
            return None
        if self.protocol == "webdav" and path == "":
            info = dict(info, type="directory")
        return self._stat_from_info(path, info)

    def _bucket_root(self) -> Stat | None:
        """An object store's location root exists as soon as its bucket does: an empty
        prefix is an empty folder, not a missing one."""
        bucket = self.url.host
        with self._errors(""):
            exists = self.fs.exists(bucket)
        return Stat("", DIR, 0) if exists else None

    # -- data ------------------------------------------------------------------------------
    def open_read(self, path: str) -> BinaryIO:
        with self._errors(path):
            if self.protocol == "webdav":
                return _Reader(self, path, self._dav_get(path))
            if self.protocol == "s3":
                # no read-ahead cache: each read(n) is one ranged GET of n bytes
                f = self.fs.open(self._full(path), "rb", block_size=self.block_size,
                                 cache_type="none")
            else:
                f = self.fs.open(self._full(path), "rb", block_size=self.block_size)
            return _Reader(self, path, f)

    def open_write(self, path: str) -> BinaryIO:
        with self._errors(path):
            if self.protocol == "webdav":
                return _Writer(self, path, self._dav_put(path))
            f = self.fs.open(self._full(path), "wb", block_size=self.block_size)
            return _Writer(self, path, f)

    def _dav_get(self, path: str):
        client = self.fs.client
        request = client.http.build_request("GET", client.join_url(self._full(path)))
        response = client.http.send(request, stream=True)
        if response.status_code >= 400:
            response.close()
            raise _HTTPStatus(response.status_code, response.reason_phrase)
        return _IterStream(response.iter_bytes(CHUNK_SIZE), response.close)

    def _dav_put(self, path: str):
        client, target = self.fs.client, self._full(path)

        def send(body: Iterator[bytes]) -> None:
            # A new connection per upload: a server that refuses a PUT without reading its
            # body (WsgiDAV on cheroot does) would otherwise leave the rest of the body on
            # a pooled connection, to be misread as the next request.
            response = client.http.request("PUT", client.join_url(target), content=body,
                                           headers={"Connection": "close"})
            if response.status_code >= 400:
                raise _HTTPStatus(response.status_code, response.reason_phrase)

        return _StreamingUpload(send)

    def checksum(self, path: str, algorithm: str) -> str:
        if self.protocol == "s3" and algorithm == "md5" and self.etag_is_md5:
            with self._errors(path):
                info = self.fs.info(self._full(path))
            md5 = _etag_md5(info.get("ETag"))
            if md5:
                return md5
        return super().checksum(path, algorithm)

    # -- namespace -------------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        if self.protocol == "s3":
            return   # no folders on an object store: a key's prefix is its folder
        with self._errors(path):
            self.fs.makedirs(self._full(path), exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        with self._errors(src):
            if self.protocol == "webdav":
                if _DESTINATION_UNSAFE.intersection(dst):
                    return self._dav_copy_and_delete(src, dst)
                self.fs.client.move(self._full(src), self._full(dst), overwrite=True)
            else:
                # copy + delete, file by file: fs.mv would read "?" and "[" as glob patterns
                self.fs.cp_file(self._full(src), self._full(dst))
                self.fs.rm_file(self._full(src))

    def _learn_refusal(self, capability: str, what: str) -> None:
        """A server refused what the protocol's capabilities promised: this location does
        without it from now on (the sync engine asks the capabilities, and skips)."""
        if getattr(self.capabilities, capability):
            log.info("%s: the server refuses %s; doing without", self._where(), what)
            self.capabilities = dataclasses.replace(self.capabilities, **{capability: False})

    def _dav_copy_and_delete(self, src: str, dst: str) -> None:
        """Rename by streaming the bytes through: WsgiDAV (and others) unquote a MOVE's
        Destination header before parsing it, so a '?' or ';' there would move the file
        to a shorter, wrong name."""
        with self.open_read(src) as reader, self.open_write(dst) as writer:
            while chunk := reader.read(CHUNK_SIZE):
                writer.write(chunk)
        self.delete(src)

    def delete(self, path: str) -> None:
        st = self.stat(path)
        if st is None:
            raise NotFound(f"{self._where(path)}: not found", path=path)
        with self._errors(path):
            if st.kind != DIR:
                if self.protocol == "webdav":
                    self.fs.client.remove(self._full(path))
                else:
                    self.fs.rm_file(self._full(path))
                return
            if self.protocol == "s3":
                if self.fs.ls(self._full(path)):
                    raise OSError(errno.ENOTEMPTY, "folder not empty")
                return   # a folder with no keys below it is already gone
            if self.protocol == "webdav":
                # DELETE on a collection removes its content too: refuse unless empty
                if self.fs.ls(self._full(path), detail=False):
                    raise OSError(errno.ENOTEMPTY, "folder not empty")
                self.fs.client.remove(self._full(path))
                return
            self.fs.rmdir(self._full(path))


# -- errors ------------------------------------------------------------------------------------
_TRANSIENT_KINDS = {"connection refused", "timed out", "connection lost", "server busy",
                    "host unreachable", "server error"}


class _HTTPStatus(Exception):
    def __init__(self, status: int, reason: str = ""):
        self.status = status
        super().__init__(f"HTTP {status} {reason}".strip())


def _classify(exc: BaseException) -> tuple[str, str]:
    """(what happened, the library's own words) for an exception of any library."""
    detail = str(exc) or type(exc).__name__
    status = _http_status(exc)
    if status is not None:
        if status == 401:
            return "authentication failed", detail
        if status == 403:
            return "permission denied", detail
        if status == 404:
            return "not found", ""
        if status == 409:
            return "conflict (is the parent folder missing?)", ""
        if status == 507:
            return "insufficient storage", detail
        if status in (408, 429) or status >= 500:
            return "server error" if status >= 500 else "server busy", detail
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        return f"HTTP {status} {phrase}".strip(), ""
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if isinstance(exc, (FileNotFoundError,)) or name in ("SFTPNoSuchFile", "ResourceNotFound"):
        return "not found", detail if "bucket" in detail.lower() else ""
    if module.startswith("asyncssh"):
        if name in ("PermissionDenied",):
            return "authentication failed", ""
        if name == "HostKeyNotVerifiable":
            return "host key not trusted (add it to known_hosts, or set the known_hosts option)", ""
        if name in ("ConnectionLost", "DisconnectError", "ChannelOpenError", "SFTPConnectionLost",
                    "SFTPNoConnection"):
            return "connection lost", detail
        if name == "SFTPPermissionDenied":
            return "permission denied", detail
        if name == "SFTPNoSpaceOnFilesystem":
            return "no space left", detail
        if name == "SFTPOpUnsupported":
            return "operation unsupported", detail
    if isinstance(exc, PermissionError):
        if module.startswith("sshfs") or "Permission denied for user" in detail:
            return "authentication failed", ""
        lowered = detail.lower()
        if any(w in lowered for w in ("signature", "access key", "credential", "token")):
            return "authentication failed", detail
        return "permission denied", detail
    if "CERTIFICATE_VERIFY_FAILED" in detail or isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate not trusted (set the verify option to its CA file)", ""
    if isinstance(exc, ssl.SSLError):
        return "TLS error", detail
    if isinstance(exc, ConnectionRefusedError) or name in ("EndpointConnectionError",
                                                            "ConnectError"):
        return "connection refused", detail
    if isinstance(exc, (TimeoutError, socket.timeout, asyncio.TimeoutError)) or "Timeout" in name:
        return "timed out", detail
    if isinstance(exc, socket.gaierror):
        return "host unreachable", detail
    if isinstance(exc, ConnectionError) or name in ("RemoteProtocolError", "ReadError",
                                                    "WriteError", "HTTPClientError"):
        return "connection lost", detail
    if isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY,):
        return "folder not empty", ""
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "host unreachable", detail
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return exc.strerror.lower(), ""
    return name, detail


def _http_status(exc: BaseException) -> int | None:
    if isinstance(exc, _HTTPStatus):
        return exc.status
    for attr in ("status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


class _Translate:
    """Context manager: any library exception leaves as a castlib error, the original
    chained out of sight (the user sees one line)."""

    __slots__ = ("backend", "path", "generation")

    def __init__(self, backend: FsspecBackend, path: str):
        self.backend, self.path = backend, path

    def __enter__(self):
        self.generation = self.backend._generation   # which connection this call used
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, StorageError):
            return False
        error = self.backend.translate(exc, self.path)
        if error.transient:
            self.backend._connection_failed(self.generation)
        raise error from None


async def _next_items(agen, count: int) -> list:
    """Up to `count` more items of an async generator ([] once it is exhausted)."""
    items = []
    async for item in agen:
        items.append(item)
        if len(items) >= count:
            break
    return items


# -- helpers ----------------------------------------------------------------------------------
def _quiet_background_errors(loop) -> None:
    """When a connection drops, the library's own background tasks (asyncssh's pipelined
    requests) end with errors nobody awaits, and asyncio prints each with a traceback when
    it is collected. The failure that matters has already reached castlib through the
    call that saw it: those go to the debug log, not to the user's terminal."""
    def handler(loop, context):
        log.debug("background error in a storage library: %s (%r)", context.get("message"),
                  context.get("exception"))

    loop.set_exception_handler(handler)

def _etag_md5(etag: str | None) -> str | None:
    """The md5 an S3 ETag stands for, when it stands for one (single-part uploads)."""
    if not etag:
        return None
    value = etag.strip('"').lower()
    if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def _mtime_ns(info: dict) -> int | None:
    for key in ("mtime", "LastModified", "modified", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return int(value.timestamp()) * SECOND_NS + value.microsecond * 1000
        if isinstance(value, (int, float)):
            return int(value * SECOND_NS)
    return None


class _Reader:
    """A back-end's readable stream: library errors become castlib errors."""

    def __init__(self, backend: FsspecBackend, path: str, stream):
        self._backend, self._path, self._stream = backend, path, stream

    def read(self, size: int = -1) -> bytes:
        with self._backend._errors(self._path):
            return self._stream.read(size)

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:  # nothing was promised by a reader: closing is best effort
            pass

    @property
    def closed(self) -> bool:
        return bool(getattr(self._stream, "closed", False))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Writer:
    """A back-end's writable stream: close() returns only once the bytes are stored, and
    raises a castlib error if they are not. Leaving a `with` block on an error aborts the
    upload instead of publishing half a file."""

    def __init__(self, backend: FsspecBackend, path: str, stream):
        self._backend, self._path, self._stream = backend, path, stream
        self._closed = False

    def write(self, data) -> int:
        with self._backend._errors(self._path):
            self._stream.write(data)
        return len(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._backend._errors(self._path):
            self._stream.close()

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        discard = getattr(self._stream, "discard", None) or getattr(self._stream, "abort", None)
        try:
            (discard or self._stream.close)()
        except Exception:  # the error that made us abort is the one to report
            pass

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class _IterStream:
    """read(n) over an iterator of byte chunks (a streamed HTTP response body)."""

    def __init__(self, chunks: Iterator[bytes], on_close: Callable[[], None]):
        self._chunks, self._on_close = chunks, on_close
        self._buffer = bytearray()
        self._done = False
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            try:
                self._buffer += next(self._chunks)
            except StopIteration:
                self._done = True
        if size < 0 or size >= len(self._buffer):
            out, self._buffer = bytes(self._buffer), bytearray()
        else:
            out = bytes(self._buffer[:size])
            del self._buffer[:size]
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._on_close()


class _StreamingUpload:
    """A writable stream whose bytes go out as the body of one streamed request.

    write() hands chunks through a small bounded queue to a thread that sends the request
    (memory stays constant, nothing is staged on disk); close() ends the body, waits for
    the server's answer and raises what the sending thread raised."""

    _END = object()
    _ABORT = object()

    def __init__(self, send: Callable[[Iterator[bytes]], None], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.closed = False
        self._thread = threading.Thread(target=self._run, args=(send,), daemon=True,
                                        name="castlib-upload")
        self._thread.start()

    def _body(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if item is self._ABORT:
                raise ConnectionAbortedError("upload aborted")
            yield item

    def _run(self, send) -> None:
        try:
            send(self._body())
        except BaseException as exc:  # handed to the writing thread, raised there
            self._error = exc

    def _put(self, item) -> None:
        while True:
            if self._error is not None:
                raise self._error
            if not self._thread.is_alive():
                raise ConnectionAbortedError("upload ended early")
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def write(self, data) -> int:
        if data:
            self._put(bytes(data))
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._thread.is_alive():
            self._put(self._END)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._queue.put(self._ABORT, timeout=1)
        except queue.Full:
            pass
        self._thread.join(5)
