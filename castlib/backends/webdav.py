"""WebDAV servers (webdav://, dav:// over http; webdavs://, davs:// over https), through
webdav4's client: listings by PROPFIND through its fsspec file system, data by streamed GET
and PUT requests of castlib's own.

Options (from the config file's `storage:` or a pipeline's `locations:`): `user`,
`password` (or in the URL), `verify` (a CA file or folder for https); `block_size` and
`connect_timeout` as for every fsspec location; any other goes to webdav4 as it is.
"""
from __future__ import annotations

import errno
import os
import queue
import ssl
import threading
import time
from typing import BinaryIO, Callable, Iterator
from urllib.parse import quote

from ..checksum import CHUNK_SIZE
from ..errors import NotFound
from .base import DIR, Capabilities, ListingErrorHandler, Stat, WriteStream
from ..transfer import is_temp_name, temp_path
from .fsspec import READ_TIMEOUT_S, SECOND_NS, FsspecBackend, _HTTPStatus, _Reader

_HTTPS_SCHEMES = {"webdavs", "davs"}
# What a server may misread in a MOVE's Destination header: WsgiDAV unquotes the header
# before it parses it as a URL, so '?' and ';' end the path there, and Python's URL parser
# drops tabs and line breaks from it (the parent folder is then not found: 409 Conflict).
_DESTINATION_UNSAFE = frozenset("?;\t\r\n")


class WebdavBackend(FsspecBackend):
    """One folder on a WebDAV server."""

    description = "WebDAV servers (webdav4); webdavs:// and davs:// over https"
    capabilities = Capabilities(set_mtime=False, mtime_precision_ns=SECOND_NS, empty_dirs=True)
    utf8_names_only, protocol_name = True, "WebDAV"

    def __init__(self, url, options: dict | None = None):
        super().__init__(url, options)
        self._dav = None

    def _root_path(self) -> str:
        return self.url.path.rstrip("/") or "/"

    def _connect(self):
        import httpx
        from webdav4.fsspec import WebdavFileSystem

        opts = dict(self._storage_options)
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
        fs = WebdavFileSystem(f"{http}://{self.url.host}", skip_instance_cache=True, **opts)
        self._dav = fs.client
        return fs

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
        return quote(super()._full(path), safe="/")   # webdav4 joins paths into URLs unquoted

    def _relative(self, name: str) -> str:
        # names come relative to the server's root
        return super()._relative("/" + name.rstrip("/").lstrip("/"))

    # -- listing ---------------------------------------------------------------------------
    def walk(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        return self._walk_by_folder(on_error)

    def _child(self, folder: str, info: dict) -> str:
        return self._relative(info["name"])

    def _stat_from_info(self, path: str, info: dict) -> Stat:
        if path == "":   # the root is a folder, whatever the server says of it
            info = dict(info, type="directory")
        return super()._stat_from_info(path, info)

    # -- data ------------------------------------------------------------------------------
    def open_read(self, path: str) -> BinaryIO:
        with self._errors(path):
            client = self.fs.client
            request = client.http.build_request("GET", client.join_url(self._full(path)))
            response = client.http.send(request, stream=True)
            if response.status_code >= 400:
                response.close()
                raise _HTTPStatus(response.status_code, response.reason_phrase)
            return _Reader(self, path, _IterStream(response.iter_bytes(CHUNK_SIZE),
                                                   response.close))

    def open_write(self, path: str) -> WriteStream:
        """A PUT broken off (an abort) may still be stored by the server, in part, and only
        once it notices the connection gone, which can be later than any look for it
        (rclone serve webdav under load: over a second). So only a castlib temporary name
        ever takes a PUT: a copy's own (the engine writes under one), else one made here,
        renamed to `path` when the upload is committed. What a broken-off upload leaves
        is then at most a temporary, which the next sync removes, never a partial file
        under the name written."""
        if is_temp_name(path.rpartition("/")[2], self.temp_key):
            return self._upload(path)
        tmp = temp_path(path, self.temp_key)
        return self._upload(tmp, publish=lambda: self.rename(tmp, path))

    def _upload(self, path: str, publish: Callable[[], None] | None = None) -> WriteStream:
        with self._errors(path):
            client, target = self.fs.client, self._full(path)

            def send(body: Iterator[bytes]) -> None:
                # A new connection per upload: a server that refuses a PUT without reading
                # its body (WsgiDAV on cheroot does) would otherwise leave the rest of the
                # body on a pooled connection, to be misread as the next request.
                response = client.http.request("PUT", client.join_url(target), content=body,
                                               headers={"Connection": "close"})
                if response.status_code >= 400:
                    raise _HTTPStatus(response.status_code, response.reason_phrase)

            return _StreamingUpload(self, path, send, publish=publish)

    # -- namespace -------------------------------------------------------------------------
    def rename(self, src: str, dst: str) -> None:
        """Every MOVE goes with Overwrite: F, so no server ever removes anything for it.
        With Overwrite: T some servers (rclone serve webdav, any on golang.org/x/net/webdav)
        remove the target before they find the source missing: a rename of a vanished
        temporary would lose the file it was to replace. An existing target is moved aside
        to a castlib temporary name first, and back if the rename fails."""
        with self._errors(src):
            if self.stat(src) is None:
                raise NotFound(f"{self._where(src)}: not found", path=src)
            target = self.stat(dst)
            if target is None or target.kind == DIR:   # a folder: the server refuses (412)
                return self._move(src, dst)
            folder, _, name = dst.rpartition("/")
            safe = "".join("_" if c in _DESTINATION_UNSAFE else c for c in name)
            # a castlib temporary name: a run killed in between leaves nothing a next
            # sync would not recognise (and no '?' or ';' for a Destination header)
            aside = temp_path(f"{folder}/{safe}" if folder else safe, self.temp_key)
            self._move(dst, aside)
            try:
                self._move(src, dst)
            except BaseException:
                self._move(aside, dst)
                raise
            self.delete(aside)

    def _move(self, src: str, dst: str) -> None:
        # the location's own folder counts too: a '?' there cut every MOVE's destination
        # short (a sync into webdav://host/a%3Fb put its files beside the folder, as "a")
        if _DESTINATION_UNSAFE.intersection(dst) or _DESTINATION_UNSAFE.intersection(self.root):
            return self._copy_and_delete(src, dst)
        self.fs.client.move(self._full(src), self._full(dst), overwrite=False)

    def _copy_and_delete(self, src: str, dst: str) -> None:
        """Rename by streaming the bytes through: WsgiDAV (and others) unquote a MOVE's
        Destination header before parsing it, so a '?' or ';' there would move the file
        to a shorter, wrong name (and a tab or line break is dropped from it). The target
        is free (rename moved it aside), and written directly (open_write would write a
        temporary and MOVE it, the very request that cannot carry this name): an upload
        that fails is removed; one a server stores only after that look (see open_write)
        is a file of the wrong size there, which the next sync's index sees and replaces."""
        if self.stat(dst) is not None:
            raise FileExistsError(errno.EEXIST, "target exists")
        with self.open_read(src) as reader, self._upload(dst) as writer:
            while chunk := reader.read(CHUNK_SIZE):
                writer.write(chunk)
        self.delete(src)

    def delete(self, path: str) -> None:
        st = self.stat(path)
        if st is None:
            raise NotFound(f"{self._where(path)}: not found", path=path)
        with self._errors(path):
            # DELETE on a collection removes its content too: refuse unless empty
            if st.kind == DIR and self.fs.ls(self._full(path), detail=False):
                raise OSError(errno.ENOTEMPTY, "folder not empty")
            self.fs.client.remove(self._full(path))


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


class _StreamingUpload(WriteStream):
    """A file whose bytes go out as the body of one streamed PUT.

    write() hands chunks through a small bounded queue to a thread that sends the request
    (memory stays constant, nothing is staged on disk); the commit ends the body, waits
    for the server's answer and raises what the sending thread raised. An abort breaks the
    body off (the request fails, so the server has no complete body to store) and removes
    whatever the server kept of it."""

    _END = object()
    _ABORT = object()

    def __init__(self, backend: WebdavBackend, path: str,
                 send: Callable[[Iterator[bytes]], None], depth: int = 2,
                 publish: Callable[[], None] | None = None):
        self._backend, self._path = backend, path
        self._publish = publish   # after the server took the whole body (a rename)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
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

    def _write(self, data) -> int:
        if data:
            with self._backend._errors(self._path):
                self._put(bytes(data))
        return len(data)

    def _commit(self) -> None:
        with self._backend._errors(self._path):
            if self._thread.is_alive():
                self._put(self._END)
            self._thread.join()
            if self._error is not None:
                raise self._error
        if self._publish is not None:   # a failure here aborts: the temporary goes
            self._publish()

    def _abort(self) -> None:
        if self._thread.is_alive():
            try:
                self._queue.put(self._ABORT, timeout=1)
            except queue.Full:
                pass
            self._thread.join(5)
        # A server may keep the partial body, and may write it only after it noticed the
        # connection go (wsgidav under load: a moment after this stat found nothing):
        # looked for again over a second. Only ever a temporary of castlib (a copy is
        # written under its temporary name), so a late one is also cleaned by the next sync.
        for attempt in range(6):
            if self._backend.stat(self._path) is not None:
                self._backend.delete(self._path)
                return
            if attempt < 5:
                time.sleep(0.2)
