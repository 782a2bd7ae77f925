"""The bridge to fsspec: any protocol an fsspec file system serves (memory://, gcs://, ...),
and the shared ground of the back-ends built on fsspec libraries (s3.py, sftp.py,
webdav.py): connecting on first use, one-line errors without secrets, streams."""
from __future__ import annotations

import dataclasses
import errno
import logging
import posixpath
import re
import sys
import threading
from datetime import datetime
from typing import BinaryIO, Iterator

from ..catalog.paths import to_catalog
from ..errors import (ConfigError, LocationMissing, NotFound, StorageError,
                      TransientStorageError, Unsupported)
from ..location import LocationURL, redact, secret_values
from .base import (CONNECT_TIMEOUT_S, DIR, FILE, LINK, Backend, Capabilities,
                   ListingErrorHandler, Stat, WriteStream, background_thread, option_error,
                   walk_by_folder)

log = logging.getLogger(__name__)
SECOND_NS = 1_000_000_000

# Options castlib itself reads; every other option goes to the fsspec file system as is.
DEFAULT_BLOCK_SIZE = 8 * 1024 * 1024   # one S3 part / one buffered upload block
READ_TIMEOUT_S = 120


def _fsspec_options():
    """FsspecOptions, the pydantic model of the options, built on first use: options that
    are plainly right (PlainSettings.read) need no model, so that a command on an SFTP
    location starts without importing pydantic."""
    model = globals().get("FsspecOptions")
    if model is not None:
        return model
    from pydantic import ConfigDict, PositiveFloat, PositiveInt

    from .base import BackendOptions

    class FsspecOptions(BackendOptions):
        """What castlib reads itself; any other option goes to the fsspec file system as is."""

        model_config = ConfigDict(extra="allow")
        block_size: PositiveInt = DEFAULT_BLOCK_SIZE   # bytes buffered per upload part
        connect_timeout: PositiveFloat = CONNECT_TIMEOUT_S   # seconds

    FsspecOptions.__module__ = __name__
    globals()["FsspecOptions"] = FsspecOptions
    return FsspecOptions


def __getattr__(name: str):
    if name == "FsspecOptions":   # s3.py's options extend it
        return _fsspec_options()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _LazyOptions:
    """FsspecBackend.Options: the model, built when first asked for (a class attribute)."""

    def __get__(self, obj, owner=None):
        return _fsspec_options()


class PlainSettings:
    """What FsspecOptions makes of options that are plainly right, without pydantic: the
    two castlib reads, and the others (model_extra) for the file system."""

    __slots__ = ("block_size", "connect_timeout", "model_extra")

    def __init__(self, block_size: int, connect_timeout: float, extra: dict):
        self.block_size, self.connect_timeout, self.model_extra = (
            block_size, connect_timeout, extra)

    @classmethod
    def read(cls, options: dict) -> "PlainSettings | None":
        """The settings, when every value is of its exact type and in bounds (what a
        config file that is right gives); else None, and the model checks them (its
        coercions and its error messages stay the one definition)."""
        if not all(type(k) is str for k in options):
            return None
        extra = dict(options)
        block_size = extra.pop("block_size", DEFAULT_BLOCK_SIZE)
        timeout = extra.pop("connect_timeout", CONNECT_TIMEOUT_S)
        if type(block_size) is not int or block_size <= 0:
            return None
        if type(timeout) not in (int, float) or not timeout > 0:
            return None
        if "connect_timeout" in options:   # a value given is a float (the default is not)
            timeout = float(timeout)
        return cls(block_size, timeout, extra)


class FsspecBackend(Backend):
    """One location on a protocol an fsspec file system serves, when no back-end of its
    own does. Options (from the config file's `storage:` or a pipeline's `locations:`)
    go to the file system as they are, except `block_size` (bytes buffered per upload
    part, default 8 MiB) and `connect_timeout` (s).

    The back-ends built on it (S3, SFTP, WebDAV) override what their protocol does
    otherwise: the root path, the connection, the walk, the streams."""

    description = "any other protocol fsspec knows (its file system as is)"
    # no settable mtimes and no folders of their own, as on most object stores fsspec serves
    capabilities = Capabilities(set_mtime=False, mtime_precision_ns=SECOND_NS, empty_dirs=False)
    Options = _LazyOptions()   # FsspecOptions
    utf8_names_only = False   # names are UTF-8 text (S3 keys, WebDAV URLs): others refused
    protocol_name = "this back-end"

    @classmethod
    def _plain_settings(cls, options: dict):
        # only for the model of its own: a subclass's (S3Options) checks more
        if next(k.__dict__["Options"] for k in cls.__mro__ if "Options" in k.__dict__
                ).__class__ is _LazyOptions:
            return PlainSettings.read(options)
        return None

    def __init__(self, url: LocationURL, options: dict | None = None):
        super().__init__(url, options)
        self.block_size = self.settings.block_size
        self.connect_timeout = self.settings.connect_timeout
        self._storage_options = dict(self.settings.model_extra or {})
        # Values that must never show in a message, whatever a library puts in its own.
        self._secrets = secret_values(self.options, url)
        self._fs = None
        self._generation = 0   # counts the connections made: which one a failure was on
        self._connect_lock = threading.RLock()   # a failed connect reports through _connection_failed
        self._early: threading.Thread | None = None   # see connect_in_background
        self._early_error: BaseException | None = None
        self._abandoned = False   # closed before an early connection came (see close)
        self._sessions_wanted = 1   # see connect_in_background
        self.root = self._root_path()

    # -- connecting ------------------------------------------------------------------------
    def _root_path(self) -> str:
        import fsspec   # (not with this module: a back-end of its own may not need it)

        fs_cls = fsspec.get_filesystem_class(self.url.scheme)
        path = self.url.path.rstrip("/")
        return fs_cls._strip_protocol(f"{self.url.scheme}://{self.url.host}{path}") or "/"

    @property
    def fs(self):
        """The fsspec file system, connected on first use (a back-end object costs nothing
        until it is used)."""
        if self._fs is None:
            self._await_early_connect()
            with self._connect_lock:   # parallel transfers share one back-end object
                if self._fs is None:
                    with self._errors(""):
                        try:
                            self._fs = self._connect()
                        except TypeError as exc:
                            raise self._unknown_option(exc) or exc
        return self._fs

    def _unknown_option(self, exc: TypeError) -> ConfigError | None:
        """An option of the configuration that the library's constructor does not take
        (the options castlib does not read itself go to it as they are: a typo reached
        it as a TypeError of its own), said as the option it is; None for another
        TypeError."""
        found = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        if found is None or found[1] not in self._storage_options:
            return None
        return self._unknown_option_error(found[1])

    def _refuse_options_not_in(self, *signatures) -> None:
        """For a library that takes any keyword and hands on those it does not know
        (s3fs: a misspelt `endpoint_url` failed only at the first request, as a TypeError
        of aiobotocore's): an option that none of these callables names is refused
        before anything connects."""
        import inspect

        known = {name for fn in signatures
                 for name, p in inspect.signature(fn).parameters.items()
                 if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        unknown = sorted(set(self._storage_options) - known)
        if unknown:
            raise self._unknown_option_error(unknown[0])

    def _unknown_option_error(self, name: str) -> ConfigError:
        return option_error(self.url, name, "unknown option (not one castlib reads, nor one "
                            f"its {self.url.scheme}:// library takes)", self._options_set)

    # whether making the file system object is a handshake worth overlapping (SSH); an
    # HTTP client connects on its first request anyway
    connect_is_handshake = False

    def connect_in_background(self, sessions: int = 1) -> None:
        self._sessions_wanted = max(self._sessions_wanted, sessions)
        if not self.connect_is_handshake or self._fs is not None or self._early is not None:
            return

        def connect() -> None:
            try:
                self.fs
            except BaseException as exc:  # noqa: BLE001 - raised by the first call (fs)
                self._early_error = exc
                return
            if self._abandoned:   # closed while this connected: what it made goes too
                self.close()

        self._early = background_thread(connect, name=f"castlib-connect-{self.url.scheme}")

    def _await_early_connect(self) -> None:
        """Wait for a connection started by connect_in_background, and raise its error
        once, as this call's own: one attempt, not a second one after it failed (a host
        that does not answer would cost its timeout twice)."""
        early = self._early
        if early is None or early is threading.current_thread():
            return
        early.join()
        self._early = None
        error, self._early_error = self._early_error, None
        if error is not None:
            raise error

    def _connect(self):
        import fsspec.asyn

        _quiet_background_errors(fsspec.asyn.get_loop())
        return fsspec.filesystem(self.url.scheme, skip_instance_cache=True,
                                 **self._storage_options)

    def _connection_failed(self, generation: int) -> None:
        """A connection that dropped (SFTP's, which stays dropped: see sftp.py); HTTP
        clients reconnect by themselves."""

    def close(self) -> None:
        self._abandon_early_connect()
        self._fs = None

    def _abandon_early_connect(self) -> None:
        """Closing does not wait for a connection still being made (a host that does not
        answer would hold the end of a run for its timeout): its thread closes what it
        made, if it comes after this (`_fs` is set before it looks, this looks before it
        closes `_fs`: one of the two closes it)."""
        early = self._early
        if early is not None and early is not threading.current_thread():
            self._abandoned = True

    # -- paths -----------------------------------------------------------------------------
    def _full(self, path: str) -> str:
        """The file system's path of a location-relative path."""
        if self.utf8_names_only and not path.isascii():
            self._check_utf8(path)
        full = self.root if not path else (
            f"{self.root.rstrip('/')}/{path}" if self.root != "/" else f"/{path}")
        return full

    def _check_utf8(self, path: str) -> None:
        """A local name that is not UTF-8 (its raw bytes kept as surrogate escapes) has
        no name on a protocol whose names are UTF-8 text: refused, said as such, before
        a library fails on it with an encoding error."""
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            # shown as the catalog and every listing show it: each raw byte as %XX
            raise Unsupported(f"{self._where(to_catalog(path))}: name is not UTF-8 ({self.protocol_name} "
                              "holds UTF-8 names only)", path=path) from None

    def _relative(self, name: str) -> str:
        name = name.rstrip("/")
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
        kind, detail = self._describe(kind, self._scrub(detail))
        message = f"{where}: {kind}" + (f" ({detail})" if detail and detail != kind else "")
        if kind == "not found":
            return NotFound(message, path=path)
        if kind == "operation unsupported":
            return Unsupported(message, path=path)
        if kind in _TRANSIENT_KINDS:
            return TransientStorageError(message, path=path, unreached=kind in _UNREACHED)
        return StorageError(message, path=path)

    def _describe(self, kind: str, detail: str) -> tuple[str, str]:
        """What a protocol says better than the library did (S3's bare 403)."""
        return kind, detail

    def _scrub(self, text: str) -> str:
        return redact(" ".join(str(text).split()), self._secrets)[:300]

    # -- listing ---------------------------------------------------------------------------
    def walk(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        return self._walk_by_find(on_error)

    def _walk_by_find(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        """One recursive listing, sorted by path components so
        that parents come first."""
        try:
            with self._errors(""):
                found = self.fs.find(self.root, withdirs=True, detail=True)
        except StorageError as exc:
            on_error("", str(exc))
            return
        if not found and self.capabilities.empty_dirs and self.stat("") is None:
            # find() lists a missing folder as an empty one (memory://): a root that is
            # not there is said, as every back-end that keeps folders says it
            raise LocationMissing(f"folder does not exist: {self._where()}", path="")
        entries = []
        for name, info in found.items():
            rel = self._relative(name)
            if rel:
                entries.append(self._stat_from_info(rel, info))
        entries.sort(key=lambda st: st.path.split("/"))
        yield from entries

    def _walk_by_folder(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        """For the protocols that list folder by folder (SFTP, WebDAV)."""
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
        return f"{folder}/{posixpath.basename(name)}" if folder else posixpath.basename(name)

    def _stat_from_info(self, rel: str, info: dict) -> Stat:
        kind = {"directory": DIR, "file": FILE, "link": LINK}.get(info.get("type"), FILE)
        size = 0 if kind == DIR else info.get("size")
        mode = info.get("permissions")
        return Stat(rel, kind, size, _mtime_ns(info), mode & 0o7777 if mode else None)

    def stat(self, path: str) -> Stat | None:
        try:
            with self._errors(path):
                info = self.fs.info(self._full(path))
        except NotFound:
            return None
        return self._stat_from_info(path, info)

    # -- data ------------------------------------------------------------------------------
    def open_read(self, path: str) -> BinaryIO:
        with self._errors(path):
            return _Reader(self, path, self.fs.open(self._full(path), "rb",
                                                    block_size=self.block_size))

    def open_write(self, path: str) -> WriteStream:
        with self._errors(path):
            f = self.fs.open(self._full(path), "wb", block_size=self.block_size)
            return _Writer(self, path, f)

    # -- namespace -------------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        with self._errors(path):
            self.fs.makedirs(self._full(path), exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        with self._errors(src):
            # copy + delete, file by file: fs.mv would read "?" and "[" as glob patterns
            self.fs.cp_file(self._full(src), self._full(dst))
            self.fs.rm_file(self._full(src))

    def _learn_refusal(self, capability: str, what: str) -> None:
        """A server refused what the protocol's capabilities promised: this location does
        without it from now on (the sync engine asks the capabilities, and skips)."""
        if getattr(self.capabilities, capability):
            log.info("%s: the server refuses %s; doing without", self._where(), what)
            self.capabilities = dataclasses.replace(self.capabilities, **{capability: False})

    def delete(self, path: str) -> None:
        st = self.stat(path)
        if st is None:
            raise NotFound(f"{self._where(path)}: not found", path=path)
        with self._errors(path):
            if st.kind != DIR:
                self.fs.rm_file(self._full(path))
            else:
                self.fs.rmdir(self._full(path))


class MemoryBackend(FsspecBackend):
    """fsspec's in-memory file system: one per process, for tests and notebooks."""

    description = "fsspec's in-memory file system (this process only)"
    capabilities = Capabilities(set_mtime=False, empty_dirs=True)


# -- errors ------------------------------------------------------------------------------------
_TRANSIENT_KINDS = {"connection refused", "timed out", "connection lost", "server busy",
                    "host unreachable", "server error"}
_UNREACHED = {"connection refused", "timed out", "host unreachable"}


class _HTTPStatus(Exception):
    def __init__(self, status: int, reason: str = ""):
        self.status = status
        super().__init__(f"HTTP {status} {reason}".strip())


def _classify(exc: BaseException) -> tuple[str, str]:
    """(what happened, the library's own words) for an exception of any library."""
    detail = str(exc) or type(exc).__name__
    kind = getattr(exc, "castlib_kind", None)
    if isinstance(kind, str):   # an error that says what it is (ssh_command's, from stderr)
        return kind, detail
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
            from http import HTTPStatus   # (only to word an error)

            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        return f"HTTP {status} {phrase}".strip(), ""
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if isinstance(exc, (FileNotFoundError,)) or name in ("SFTPNoSuchFile", "ResourceNotFound"):
        return "not found", detail if "bucket" in detail.lower() else ""
    if module.startswith("asyncssh") or module == "castlib.backends.sftp_wire":
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
    # an error of asyncio, ssl or socket comes from a library that imported them: this
    # module does not (~20 ms of a command's start, where SFTP over ssh needs none)
    asyncio, ssl, socket = (sys.modules.get(name) for name in ("asyncio", "ssl", "socket"))
    if "CERTIFICATE_VERIFY_FAILED" in detail or (
            ssl is not None and isinstance(exc, ssl.SSLCertVerificationError)):
        return "TLS certificate not trusted (set the verify option to its CA file)", ""
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return "TLS error", detail
    if isinstance(exc, ConnectionRefusedError) or name in ("EndpointConnectionError",
                                                            "ConnectError"):
        # httpx's and botocore's word for any connect() that failed: the error they wrap
        # says which (a name not found is no refusal)
        cause = _cause_of(exc)
        if cause is not None and _classify(cause)[0] in ("host unreachable", "timed out"):
            return _classify(cause)[0], detail
        return "connection refused", detail
    if isinstance(exc, TimeoutError) or "Timeout" in name or (   # (asyncio's, on 3.10)
            asyncio is not None and isinstance(exc, asyncio.TimeoutError)):
        return "timed out", detail
    if socket is not None and isinstance(exc, socket.gaierror):
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


def _cause_of(exc: BaseException) -> OSError | None:
    """The innermost OSError that `exc` was raised from (or while handling), if any."""
    found, seen = None, set()
    exc = exc.__cause__ or exc.__context__
    while exc is not None and id(exc) not in seen and len(seen) < 10:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            found = exc
        exc = exc.__cause__ or exc.__context__
    return found


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
        if exc is None or not isinstance(exc, Exception) or \
                isinstance(exc, (StorageError, ConfigError)):
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
def _buffered_file_class() -> type:
    from fsspec.spec import AbstractBufferedFile

    return AbstractBufferedFile


def _quiet_background_errors(loop) -> None:
    """When a connection drops, the library's own background tasks (asyncssh's pipelined
    requests) end with errors nobody awaits, and asyncio prints each with a traceback when
    it is collected. The failure that matters has already reached castlib through the
    call that saw it: those go to the debug log, not to the user's terminal."""
    def handler(loop, context):
        log.debug("background error in a storage library: %s (%r)", context.get("message"),
                  context.get("exception"))

    loop.set_exception_handler(handler)

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


class _Writer(WriteStream):
    """A back-end's writable stream over an fsspec file: the commit returns only once the
    bytes are stored, and raises a castlib error if they are not. An abort discards the
    upload (s3fs aborts its multipart upload) and removes whatever the file system kept
    under the name (those that create the file at open, as memory:// and SFTP do)."""

    def __init__(self, backend: FsspecBackend, path: str, stream):
        self._backend, self._path, self._stream = backend, path, stream

    def _write(self, data) -> int:
        with self._backend._errors(self._path):
            self._stream.write(data)
        return len(data)

    def _commit(self) -> None:
        with self._backend._errors(self._path):
            self._stream.close()

    def _abort(self) -> None:
        discard = getattr(self._stream, "discard", None) or getattr(self._stream, "abort", None)
        try:
            (discard or self._stream.close)()
            if discard is not None and isinstance(self._stream, _buffered_file_class()):
                # discarded: its buffer is gone, and a close (at garbage collection
                # too) would try to upload it
                self._stream.closed = True
        finally:
            if self._backend.stat(self._path) is not None:
                self._backend.delete(self._path)
