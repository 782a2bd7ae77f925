"""Local file systems (`file://` URLs and bare paths), through os.scandir."""
from __future__ import annotations

import errno
import os
import stat as statmod
from typing import BinaryIO, Iterator

from ..errors import LocationMissing, NotFound, StorageError, TransientStorageError
from .base import DIR, FILE, LINK, Backend, Capabilities, ListingErrorHandler, Stat

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.EIO}


def storage_error(exc: OSError, path: str) -> StorageError:
    """Translate an OSError into castlib's error types, keeping the message short."""
    msg = f"{exc.strerror or exc}: {path!r}"
    if isinstance(exc, FileNotFoundError):
        return NotFound(msg, path=path)
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientStorageError(msg, path=path)
    return StorageError(msg, path=path)


class LocalBackend(Backend):
    schemes = ("file",)
    description = "local or mounted file system"
    capabilities = Capabilities(
        set_mtime=True, atomic_rename=True, mtime_precision_ns=1, symlinks=True,
        empty_dirs=True,
    )

    def __init__(self, url, options=None):
        super().__init__(url, options)
        self.root = url.path

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    # -- listing -----------------------------------------------------------------------
    def walk(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        if not os.path.isdir(self.root):
            raise LocationMissing(f"folder does not exist: {self.root}", path="")
        # An explicit stack instead of recursion: deep trees, and one tight loop.
        stack = [("", self.root)]
        # file types compared as numbers: S_ISDIR() and friends are calls, once per entry
        IFMT, IFDIR, IFLNK, IFREG = 0o170000, statmod.S_IFDIR, statmod.S_IFLNK, statmod.S_IFREG
        while stack:
            rel, absdir = stack.pop()
            try:
                it = os.scandir(absdir)
            except OSError as exc:
                on_error(rel, exc.strerror or str(exc))
                continue
            subdirs = []
            with it:
                while True:
                    try:
                        entry = next(it)
                    except StopIteration:
                        break
                    except OSError as exc:
                        on_error(rel, exc.strerror or str(exc))
                        break
                    name = entry.name
                    path = f"{rel}/{name}" if rel else name
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:   # gone since the folder was read (a
                        continue                # sync renamed its temporary file): not there
                    except OSError as exc:
                        on_error(path, exc.strerror or str(exc))
                        continue
                    mode = st.st_mode
                    file_type = mode & IFMT
                    if file_type == IFREG:
                        yield Stat(path, FILE, st.st_size, st.st_mtime_ns, mode & 0o7777)
                    elif file_type == IFDIR:
                        yield Stat(path, DIR, 0, st.st_mtime_ns, mode & 0o7777)
                        subdirs.append((path, entry.path))
                    elif file_type == IFLNK:
                        try:
                            target = os.readlink(entry.path)
                        except OSError:
                            target = None
                        yield Stat(path, LINK, st.st_size, st.st_mtime_ns, mode & 0o7777, target)
                    # sockets, fifos and devices are not data: not catalogued
            stack.extend(reversed(subdirs))

    def stat(self, path: str) -> Stat | None:
        try:
            st = os.lstat(self._abs(path))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as exc:
            raise storage_error(exc, path) from None
        mode = st.st_mode
        if statmod.S_ISDIR(mode):
            return Stat(path, DIR, 0, st.st_mtime_ns, mode & 0o7777)
        if statmod.S_ISLNK(mode):
            try:
                target = os.readlink(self._abs(path))
            except OSError:
                target = None
            return Stat(path, LINK, st.st_size, st.st_mtime_ns, mode & 0o7777, target)
        return Stat(path, FILE, st.st_size, st.st_mtime_ns, mode & 0o7777)

    # -- data ----------------------------------------------------------------------------
    def open_read(self, path: str) -> BinaryIO:
        try:
            return open(self._abs(path), "rb", buffering=0)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def open_write(self, path: str) -> BinaryIO:
        try:
            return _DurableFile(self._abs(path))
        except OSError as exc:
            raise storage_error(exc, path) from None

    # -- namespace -----------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        try:
            os.makedirs(self._abs(path), exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def rename(self, src: str, dst: str) -> None:
        try:
            os.replace(self._abs(src), self._abs(dst))
        except OSError as exc:
            raise storage_error(exc, src) from None

    def delete(self, path: str) -> None:
        p = self._abs(path)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            else:
                os.unlink(p)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def set_mtime(self, path: str, mtime_ns: int) -> None:
        try:
            os.utime(self._abs(path), ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def symlink(self, path: str, target: str) -> None:
        try:
            os.symlink(target, self._abs(path))
        except OSError as exc:
            raise storage_error(exc, path) from None


class _DurableFile:
    """A file opened for writing whose close() flushes it to disk (fsync) before returning,
    so that a verified rename never publishes bytes still in flight."""

    def __init__(self, path: str):
        self._f = open(path, "wb", buffering=0)

    def write(self, data) -> int:
        view, total = memoryview(data), len(data)
        written = self._f.write(view)
        while written < total:  # raw writes may be partial
            written += self._f.write(view[written:])
        return total

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is not None:
            self._f.close()
        else:
            self.close()
