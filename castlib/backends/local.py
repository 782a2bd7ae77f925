"""Local file systems (`file://` URLs and bare paths), through os.scandir."""
from __future__ import annotations

import dataclasses
import errno
import functools
import os
import re
import stat as statmod
import threading
from typing import BinaryIO, Iterator

from ..errors import LocationMissing, NotFound, StorageError, TransientStorageError
from ..hosts import elsewhere, is_here, local_hostname
from ..location import LocationURL
from .base import (DIR, FILE, LINK, Backend, Capabilities, ListingErrorHandler, Stat,
                   WriteStream)

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.EIO}


def storage_error(exc: OSError, path: str) -> StorageError:
    """Translate an OSError into castlib's error types, keeping the message short."""
    # the root itself ("") is named by the location in the caller's message
    msg = f"{exc.strerror or exc}: {path!r}" if path else f"{exc.strerror or exc}"
    if exc.errno == errno.ELOOP:   # (O_NOFOLLOW's refusal: see LocalBackend._at)
        msg = (f"{exc.filename or path!r}: a link now, where a file or folder was: nothing "
               "is written through it")
    if isinstance(exc, FileNotFoundError):
        return NotFound(msg, path=path)
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientStorageError(msg, path=path)
    return StorageError(msg, path=path)


_PATH_MAX, _NAME_MAX = 4096, 255   # Linux's (limits.h), as the C accelerator's walk takes them

# (the C accelerator's words for the same: _accel.c)
_REPLACED = ("replaced while the index ran (a link or another folder in its path now): "
             "not listed")

_SPECIAL_KINDS = {statmod.S_IFIFO: "fifo", statmod.S_IFSOCK: "socket",
                  statmod.S_IFCHR: "character device", statmod.S_IFBLK: "block device"}


class LocalBackend(Backend):
    description = "local or mounted file system"
    capabilities = Capabilities(
        set_mtime=True, mtime_precision_ns=1, symlinks=True,
        empty_dirs=True, permissions=True, dir_mtimes=True, link_mtimes=True, owner=False,
        hard_links=True,
    )

    @classmethod
    def capabilities_for(cls, scheme: str) -> Capabilities:
        """Owners can be given away by root only (chown(2)): asked of this process."""
        return dataclasses.replace(cls.capabilities, owner=os.geteuid() == 0)

    def __init__(self, url, options=None):
        if not is_here(url):   # another machine's disk: its worker reads it (README)
            raise elsewhere(url)
        super().__init__(url, options)
        self.root = url.path
        self.capabilities = self.capabilities_for(url.scheme)
        self._held = threading.local()   # each thread's folders kept open (see _at)
        self._generation = 0   # counts this back-end's changes to folders (see _at)
        self._private = set()   # files open_write made 0600, not chmod-ed since (see rename)

    # -- identity: what a root is, whatever its spelling ----------------------------------
    @classmethod
    def identity(cls, url: LocationURL) -> str:
        """The host, then the file system and the path inside it: device numbers repeat
        from machine to machine, and the lock of daq01's /data is not daq02's. Another
        host's folder is named by its path (this machine cannot stat it)."""
        if not is_here(url):
            return f"file://{url.host}:{url.path}"
        return f"file://{url.host or local_hostname()}:" + file_system_identity(url.path)

    @classmethod
    def identities_above(cls, url: LocationURL) -> list[str]:
        """The folders the root is really in (links resolved), each by its identity."""
        out = []
        path = os.path.realpath(url.path) if is_here(url) else url.path
        while path != "/":
            path = os.path.dirname(path)
            out.append(cls.identity(dataclasses.replace(url, path=path)))
        return out[::-1]

    @classmethod
    def overlaps(cls, a: LocationURL, b: LocationURL) -> bool:
        """Through links (real paths) and bind mounts, or two mounts of one file system
        (the path inside the file system, and the (device, inode) of every existing
        ancestor compared with the other root), even for a root not created yet."""
        if (a.host or local_hostname()) != (b.host or local_hostname()):
            return False   # two machines' disks
        if not is_here(a):
            return a.path == b.path or _inside(a.path, b.path) or _inside(b.path, a.path)
        ida, idb = file_system_identity(a.path), file_system_identity(b.path)
        if _inside(ida, idb) or _inside(idb, ida):
            return True
        return _ancestor_is(a.path, b.path) or _ancestor_is(b.path, a.path)

    @classmethod
    def mount_overlap(cls, a: LocationURL, b: LocationURL) -> str | None:
        """A mount point below root `a` whose source overlaps root `b`: `mount --bind D R/sub`
        puts the destination D inside the reference R under a path that neither the real
        paths nor the ancestors' (device, inode) show, so a sync of R into D would copy D
        into itself (D/sub/sub/...) and --delete would remove D's files, which are R's. The
        source of a mount is its device and the folder inside that file system it shows
        (as file_system_identity gives for `b`); an overlay also shows its lower and upper
        folders. The mount table is read once per call."""
        table = _mount_table()
        if not table or not is_here(a) or not is_here(b):
            return None
        real_a = os.path.realpath(a.path)
        id_b = file_system_identity(b.path, table)
        below = real_a.rstrip("/") + "/"
        for device, root, point, fstype, options in table:
            if not point.startswith(below):
                continue
            sources = [f"{device}:{root}"]
            if fstype == "overlay":
                sources += [file_system_identity(d, table) for d in _overlay_dirs(options)]
            for src in sources:
                if _inside(src, id_b) or _inside(id_b, src):
                    return f"{point} ({fstype} {src})"
        return None

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    # -- listing -----------------------------------------------------------------------
    def walk(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        if not os.path.isdir(self.root):
            raise LocationMissing(f"folder does not exist: {self.root}", path="")
        # An explicit stack instead of recursion: deep trees, and one tight loop. Each
        # folder below the root with (device, inode) as its parent's listing saw it: the
        # folder opened by its path must be that one (as the C accelerator's walk: a
        # folder swapped for a link, or a parent of it, would lead the listing out of
        # the tree, and put what is there in the catalog as if it were here)
        stack = [("", self.root, None)]
        self.specials_skipped = []
        while stack:
            rel, absdir, seen = stack.pop()
            try:
                fd = os.open(absdir, _FOLDER if seen is None else _FOLDER | os.O_NOFOLLOW)
            except OSError as exc:
                on_error(rel, _REPLACED if seen is not None and exc.errno in (
                    errno.ENOTDIR, errno.ELOOP) else exc.strerror or str(exc))
                continue
            try:
                yield from self._list_folder(fd, rel, absdir, seen, stack, on_error)
            finally:
                os.close(fd)

    def _list_folder(self, fd: int, rel: str, absdir: str, seen: tuple | None,
                     stack: list, on_error: ListingErrorHandler) -> Iterator[Stat]:
        """The entries of the folder open as `fd` (see walk); its folders go on `stack`."""
        # file types compared as numbers: S_ISDIR() and friends are calls, once per entry
        IFMT, IFDIR, IFLNK, IFREG = 0o170000, statmod.S_IFDIR, statmod.S_IFLNK, statmod.S_IFREG
        if seen is not None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != seen:
                on_error(rel, _REPLACED)
                return
        try:
            it = os.scandir(fd)
        except OSError as exc:
            on_error(rel, exc.strerror or str(exc))
            return
        subdirs = []
        # a path too long for the kernel is an error of its entry, as when entries were
        # stat'ed by their joined paths (the C walk says the same); names are 255 bytes
        # at most: only a folder near the limit has its names measured
        room = _PATH_MAX - len(os.fsencode(absdir)) - 1
        near = room <= _NAME_MAX
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
                if near and len(os.fsencode(name)) >= room:
                    on_error(path, os.strerror(errno.ENAMETOOLONG))
                    continue
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
                    yield Stat(path, FILE, st.st_size, st.st_mtime_ns, mode & 0o7777,
                               inode=(st.st_dev, st.st_ino) if st.st_nlink > 1 else None)
                elif file_type == IFDIR:
                    yield Stat(path, DIR, 0, st.st_mtime_ns, mode & 0o7777)
                    subdirs.append((path, os.path.join(absdir, name),
                                    (st.st_dev, st.st_ino)))
                elif file_type == IFLNK:
                    try:
                        target = os.readlink(name, dir_fd=fd)
                    except OSError:
                        target = None
                    yield Stat(path, LINK, st.st_size, st.st_mtime_ns, mode & 0o7777, target)
                else:   # sockets, fifos and devices are not data: not catalogued,
                    # but said (rsync -a would recreate them)
                    self.specials_skipped.append((path, _SPECIAL_KINDS.get(
                        file_type, "special")))
        stack.extend(reversed(subdirs))

    def stat(self, path: str) -> Stat | None:
        """What is at `path`, reached as reads and writes are (_at): the root itself may
        be a link to a folder, and is followed; below it, links are entries of their own
        and never followed, the last name's nor a folder's on the way (a folder swapped
        for a link since it was listed: the link refused, not what it points to told)."""
        folder = None
        try:
            if not path:
                st = os.stat(self.root)
            else:
                folder, name = self._at(path)
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as exc:
            raise storage_error(exc, path) from None
        mode = st.st_mode
        if statmod.S_ISDIR(mode):
            return Stat(path, DIR, 0, st.st_mtime_ns, mode & 0o7777, uid=st.st_uid,
                        gid=st.st_gid)
        if statmod.S_ISLNK(mode):
            try:
                target = os.readlink(name, dir_fd=folder)
            except OSError:
                target = None
            return Stat(path, LINK, st.st_size, st.st_mtime_ns, mode & 0o7777, target,
                        uid=st.st_uid, gid=st.st_gid)
        return Stat(path, FILE, st.st_size, st.st_mtime_ns, mode & 0o7777, uid=st.st_uid,
                    gid=st.st_gid, inode=(st.st_dev, st.st_ino) if st.st_nlink > 1 else None)

    # -- reading and writing below the root, never through a link ----------------------
    # Each change is made in its folder, reached from the root one name at a time with
    # O_NOFOLLOW, and on the last name itself without following it. The sync looks for
    # links where the catalog has folders before it writes (sync.py, _keep_out_of_links),
    # but a folder of the destination swapped for a link after that look (by whoever can
    # write there: with --owner as root, the owners of the files synced) would have had
    # the copies, renames and chmods that follow land where the link points: outside the
    # destination, over files of root's. The root itself may be a link (it was named).
    #
    # A thread keeps the last two folders it reached open (a copy's write, checks, times,
    # bits and rename are all in one folder; a thread's next copy is often there too): a
    # walk per call cost a copy of 1,000 files 0.1 s, its threads waking each other at
    # every system call. A folder kept open is the one that was reached: a link put at
    # its path later changes nothing for it. This back-end's removal or rename of a
    # folder makes every thread reach its folders afresh.
    def _at(self, path: str) -> tuple[int, str]:
        """(a descriptor of the folder that holds `path`, kept open by this thread: not
        to be closed; the last name of `path`)."""
        folder, _, name = path.rpartition("/")
        held = self._held.__dict__.setdefault("folders", [])
        for entry in held:
            if entry.path == folder and entry.generation == self._generation:
                if entry is not held[-1]:
                    held.remove(entry)
                    held.append(entry)
                return entry.fd, name
        entry = _Folder(folder, self._reach(folder), self._generation)
        held.append(entry)
        if len(held) > 2:   # (a rename holds two: the older of three goes)
            held.pop(0).close()
        return entry.fd, name

    def _reach(self, folder: str, make: bool = False) -> int | None:
        """A new descriptor of `folder`, reached from the root without following a link;
        with `make`, the root and the folders on the way made where missing (as
        os.makedirs), and None if the last one is there as a link (as mkdir -p finds it:
        the caller looks at what it is)."""
        try:
            fd = os.open(self.root, _FOLDER)
        except FileNotFoundError:
            if not make:
                raise
            os.makedirs(self.root, exist_ok=True)   # a new destination: the root as named
            fd = os.open(self.root, _FOLDER)
        try:
            parts = folder.split("/") if folder else []
            for depth, part in enumerate(parts, 1):
                if make:
                    try:
                        os.mkdir(part, dir_fd=fd)
                    except FileExistsError:
                        if depth == len(parts) and statmod.S_ISLNK(
                                os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                            os.close(fd)
                            return None
                below = _folder_below(fd, part, "/".join(parts[:depth]))
                os.close(fd)
                fd = below
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _folders_changed(self) -> None:
        self._generation += 1

    def close(self) -> None:
        for entry in self._held.__dict__.pop("folders", []):
            entry.close()

    # -- data ----------------------------------------------------------------------------
    def open_read(self, path: str) -> BinaryIO:
        """The file's bytes, reached as writes are (_at): a source folder swapped for a
        link, or a file for one, after it was listed is not read through (a root-run
        sync would have read what the link points to, under the name of a file of the
        one who swapped it)."""
        try:
            folder, name = self._at(path)
            fd = os.open(name, _TO_READ, dir_fd=folder)
            try:
                kind = os.fstat(fd).st_mode
                if statmod.S_ISDIR(kind):   # (as open() says it)
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
                if not statmod.S_ISREG(kind):   # a fifo swapped in: its open would have
                    raise StorageError(          # waited for a writer, the sync hung
                        f"a {_SPECIAL_KINDS.get(statmod.S_IFMT(kind), 'special file')} "
                        "now, where a file was: not read", path=path)
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
            return open(fd, "rb", buffering=0)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def checksum(self, path: str, algorithm: str) -> str:
        """Read the file once through one reused buffer of checksum.READ_SIZE (no bytes
        object per read; the bytes still in the CPU cache when hashed), telling the kernel
        the read is sequential (a larger read-ahead on a disk)."""
        from ..checksum import READ_SIZE, checksum_stream

        with self.open_read(path) as stream:
            try:
                os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (AttributeError, OSError):   # not on this system or file system: a hint
                pass
            digests, _ = checksum_stream(stream, (algorithm,), READ_SIZE)
        return digests[algorithm]

    def open_write(self, path: str) -> BinaryIO:
        """The file, made or emptied; never the target of a link of that name."""
        try:
            folder, name = self._at(path)
            # 0600: others may list the folder while the bytes go in (a file only its
            # owner may read, in a temporary of 0644, was theirs to read); the bits it
            # is given come before its rename, or the default ones at it (see rename)
            fd = os.open(name, _TO_WRITE, 0o600, dir_fd=folder)
            self._private.add(path)
            return _DurableFile(fd, os.dup(folder), name)
        except OSError as exc:
            raise storage_error(exc, path) from None

    # -- namespace -----------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        """The folder and those above it that are missing, the root too (as
        os.makedirs), each below the root made in the one above, none reached through a
        link."""
        try:
            fd = self._reach(path, make=True)
        except OSError as exc:
            raise storage_error(exc, path) from None
        if fd is not None:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        try:
            src_folder, src_name = self._at(src)
            dst_folder, dst_name = self._at(dst)
            moved = os.stat(src_name, dir_fd=src_folder, follow_symlinks=False)
            if src in self._private:   # no bits asked for (--no-perms): a new file's own
                self._private.discard(src)
                if statmod.S_ISREG(moved.st_mode):
                    _chmod_not_a_link(src_folder, src_name, 0o666 & ~_umask())
            os.replace(src_name, dst_name, src_dir_fd=src_folder, dst_dir_fd=dst_folder)
            if statmod.S_ISDIR(moved.st_mode):
                self._folders_changed()
        except OSError as exc:
            raise storage_error(exc, src) from None

    def delete(self, path: str) -> None:
        self._private.discard(path)   # (gone already, as an aborted write's temporary is)
        try:
            folder, name = self._at(path)
            if statmod.S_ISDIR(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
                os.rmdir(name, dir_fd=folder)
                self._folders_changed()
            else:
                os.unlink(name, dir_fd=folder)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def set_mtime(self, path: str, mtime_ns: int) -> None:
        try:
            if not path:
                os.utime(self.root, ns=(mtime_ns, mtime_ns))
                return
            folder, name = self._at(path)
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=folder, follow_symlinks=False)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def symlink(self, path: str, target: str) -> None:
        try:
            folder, name = self._at(path)
            os.symlink(target, name, dir_fd=folder)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def chmod(self, path: str, mode: int) -> None:
        """The bits of the file or folder itself: a link there now is refused, its target
        left as it is (Linux has no lchmod: the entry is opened without following it,
        then changed through /proc)."""
        try:
            if not path:
                os.chmod(self.root, mode & 0o7777)
                return
            folder, name = self._at(path)
            _chmod_not_a_link(folder, name, mode & 0o7777)
            self._private.discard(path)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def chown(self, path: str, uid: int | None, gid: int | None, *,
              was: Stat | None = None, mode: int | None = None) -> None:
        """Owner and group of the entry itself (a link's own), held open from the look to
        the last change, so that a file swapped in under its name meanwhile is never the
        one changed. `was`: the entry as the caller saw it when it decided (Stat): if what
        is there now differs (kind, owner, group, bits, size, mtime), nothing is changed.
        `mode`: bits set again after the chown (which clears the set-ID bits), on that
        same entry."""
        owner = (-1 if uid is None else uid, -1 if gid is None else gid)
        try:
            if not _held_entries():   # (not Linux)
                self._chown_by_name(path, owner, was, mode)
                return
            if not path:
                folder, name, fd = None, "", os.open(self.root, os.O_PATH | os.O_CLOEXEC)
            else:
                folder, name = self._at(path)
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            try:
                st = os.fstat(fd)
                _refuse_if_not_as_seen(st, was, path)
                if statmod.S_ISLNK(st.st_mode):
                    _chown_link_held(fd, folder, name, owner)
                    return
                os.chown(f"/proc/self/fd/{fd}", *owner)   # (this inode, whatever its name)
                if mode is not None:
                    os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)
            finally:
                os.close(fd)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def _chown_by_name(self, path: str, owner: tuple, was: Stat | None,
                       mode: int | None) -> None:
        """chown where there is no O_PATH and /proc: looked at, then changed, by name."""
        if not path:
            _refuse_if_not_as_seen(os.stat(self.root), was, path)
            os.chown(self.root, *owner)
            if mode is not None:
                os.chmod(self.root, mode & 0o7777)
            return
        folder, name = self._at(path)
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
        _refuse_if_not_as_seen(st, was, path)
        os.chown(name, *owner, dir_fd=folder, follow_symlinks=False)
        if mode is not None and not statmod.S_ISLNK(st.st_mode):
            _chmod_not_a_link(folder, name, mode & 0o7777)

    def hard_link(self, path: str, existing: str) -> None:
        try:
            existing_folder, existing_name = self._at(existing)
            folder, name = self._at(path)
            os.link(existing_name, name, src_dir_fd=existing_folder, dst_dir_fd=folder,
                    follow_symlinks=False)
        except OSError as exc:
            raise storage_error(exc, path) from None


_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_fchmodat2 = None   # the accelerator's chmod_nofollow, False where there is none (see below)
_TO_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK   # (a fifo: see open_read)
_TO_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class _Folder:
    """A folder a thread keeps open (LocalBackend._at), closed when it is let go."""

    __slots__ = ("path", "fd", "generation")

    def __init__(self, path: str, fd: int, generation: int):
        self.path, self.fd, self.generation = path, fd, generation

    def close(self, _close=os.close) -> None:   # (os may be gone when it runs at exit)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close(fd)

    __del__ = close   # (a thread that ended: its folders go with its local storage)


def _a_link(place: str | None = None) -> OSError:
    """The refusal of a link where a file or folder is to be (storage_error words it)."""
    return OSError(errno.ELOOP, os.strerror(errno.ELOOP), place)


def _folder_below(fd: int, name: str, place: str) -> int:
    """A descriptor of the folder `name` in the folder `fd`, opened without following a
    link (one there: ELOOP, naming `place`, its path below the root)."""
    try:
        return os.open(name, _FOLDER | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):   # (O_DIRECTORY's, for a link)
            raise
        try:
            link = statmod.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
        except OSError:
            raise exc from None
        if not link:
            raise
        raise _a_link(place) from None


_UMASK = None


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it: another thread
    making a file meanwhile would get the wrong bits)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status", "rb") as f:
                _UMASK = next(int(line.split()[1], 8) for line in f
                              if line.startswith(b"Umask:"))
        except (OSError, StopIteration, ValueError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def _refuse_if_not_as_seen(st: os.stat_result, was: Stat | None, path: str) -> None:
    """StorageError if the entry `st` is not the one `was` describes (its kind, owner,
    group and bits; a file's size, mtime and other names too): another swapped in under
    its name. (A hard link swapped in may match all the rest: a file of root's that the
    user may write, linked in for the copy, made like it.)"""
    if was is None:
        return
    kind = (DIR if statmod.S_ISDIR(st.st_mode) else
            LINK if statmod.S_ISLNK(st.st_mode) else FILE)
    seen = (was.kind, was.uid, was.gid, was.mode)
    now = (kind, st.st_uid if was.uid is not None else None,
           st.st_gid if was.gid is not None else None,
           st.st_mode & 0o7777 if was.mode is not None else None)
    if kind == FILE:
        seen += (was.size, was.mtime_ns, was.inode)
        now += (st.st_size if was.size is not None else None,
                st.st_mtime_ns if was.mtime_ns is not None else None,
                (st.st_dev, st.st_ino) if st.st_nlink > 1 else None)   # (as stat() has it)
    if seen != now:
        raise StorageError("another entry is there now than the one looked at a moment "
                           "ago (swapped in since?): left as it is", path=path)


@functools.lru_cache(maxsize=None)
def _held_entries() -> bool:
    """Whether an entry can be held without following it (O_PATH) and changed through
    what holds it (/proc/self/fd): Linux. Elsewhere it is looked at, then changed, by
    name."""
    return hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd")


_chown_fd = None   # the accelerator's chown_fd, False where there is none (see below)


def _chown_link_held(fd: int, folder: int | None, name: str, owner: tuple) -> None:
    """chown of the link an O_PATH descriptor holds: in one system call through castlib's
    C accelerator (fchownat with AT_EMPTY_PATH), else by its name, not followed."""
    global _chown_fd
    if _chown_fd is None:
        try:
            from .._accel import chown_fd as _chown_fd
        except ImportError:
            _chown_fd = False
    if _chown_fd:
        try:
            return _chown_fd(fd, *owner)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _chown_fd = False
    os.chown(name, *owner, dir_fd=folder, follow_symlinks=False)


def _chmod_not_a_link(folder: int, name: str, mode: int) -> None:
    """chmod of `name` in the folder `folder`, refused (ELOOP) if it is a link: in one
    system call where the kernel has one for it (fchmodat2, through castlib's C
    accelerator), else opened without following it and changed through /proc (four)."""
    global _fchmodat2
    if _fchmodat2 is None:
        try:
            from .._accel import chmod_nofollow as _fchmodat2
        except ImportError:
            _fchmodat2 = False
    if _fchmodat2:
        try:
            return _fchmodat2(folder, os.fsencode(name), mode)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:   # (its answer for a link)
                raise _a_link() from None
            if exc.errno == errno.ENOSYS:   # this kernel has none: the way below from now on
                _fchmodat2 = False
            elif exc.errno != errno.EPERM:   # (a sandbox's filter's, or the file's: the
                raise                        # way below tells which)
    if not _held_entries():   # (not Linux: looked at first)
        if statmod.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
            raise _a_link()
        os.chmod(name, mode, dir_fd=folder)
        return
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    try:
        if statmod.S_ISLNK(os.fstat(fd).st_mode):
            raise _a_link()
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def file_system_identity(path: str, table: list | None = None) -> str:
    """Where a local path really is: its file system (device numbers) and its path inside
    that file system. Links resolve (os.path.realpath), and the mount table maps every
    mount of one file system, bind mounts too, to the same answer. A path that does not
    exist yet is its nearest existing ancestor's identity plus the rest, which is what it
    will have once created: a lock keyed on it stays the same lock across the creation.
    Without a mount table (not Linux) the real path is the answer. `table`: the mount
    table already read (_mount_table), to read it once for many paths."""
    real = os.path.realpath(path)
    mount = _mount_of(real, _mount_table() if table is None else table)
    if mount is None:
        return real
    device, point, root = mount
    rest = "" if real == point else real[len(point):].lstrip("/")
    inside = os.path.join(root, rest) if rest else root
    return f"{device}:{inside}"


def _mount_table() -> list[tuple[str, str, str, str, str]]:
    """/proc/self/mountinfo as (device, root inside the fs, mount point, fs type, super
    options), in mount order; empty where there is none (not Linux)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return []
    table = []
    for line in lines:
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        try:   # optional fields, then "-", fs type, source, super options
            dash = fields.index(b"-", 6)
            fstype = _unescape(fields[dash + 1])
            options = _unescape(fields[dash + 3]) if len(fields) > dash + 3 else ""
        except (ValueError, IndexError):
            fstype = options = ""
        table.append((_unescape(fields[2]), _unescape(fields[3]), _unescape(fields[4]),
                      fstype, options))
    return table


def _mount_of(real: str, table: list) -> tuple[str, str, str] | None:
    """(device, mount point, root inside the file system) of the mount holding `real`:
    the longest mount point above it, the last mounted where several share one."""
    best = None
    for device, root, point, _fstype, _options in table:
        if point == real or real.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best[1]):
                best = (device, point, root)
    return best


def _overlay_dirs(options: str) -> list[str]:
    """The lower and upper folders an overlay mount shows (lowerdir=a:b,upperdir=c): a
    ',' or ':' inside one of them is written with a backslash."""
    dirs = []
    for opt in re.split(r"(?<!\\),", options):
        key, _, value = opt.partition("=")
        if key in ("lowerdir", "upperdir", "lowerdir+"):
            dirs += [re.sub(r"\\(.)", r"\1", d) for d in re.split(r"(?<!\\):", value) if d]
    return dirs


def _unescape(field: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040...)."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _ancestor_is(path: str, other: str) -> bool:
    """Whether `other` (if it exists) is `path` or one of the folders above it, compared
    by (st_dev, st_ino): what a bind mount cannot disguise."""
    try:
        st = os.stat(other)
    except OSError:
        return False
    target = (st.st_dev, st.st_ino)
    current = os.path.realpath(path)
    while True:
        try:
            here = os.stat(current)
            if (here.st_dev, here.st_ino) == target:
                return True
        except OSError:   # not created yet: look further up
            pass
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


class _DurableFile(WriteStream):
    """A file opened for writing whose close() flushes it to disk (fsync) before returning,
    so that a verified rename never publishes bytes still in flight.

    All-zero blocks are not written but seeked over, and the size is set at close (as
    `cp --sparse` and `rsync --sparse` do): a sparse file (a disk image, a preallocated
    run file) keeps its holes instead of growing to its full size on disk. Holes read as
    zeros, so the bytes, and the read-back verification, are the same."""

    def __init__(self, fd: int, folder: int, name: str):
        self._f = open(fd, "wb", buffering=0)
        self._folder, self._name = folder, name   # where it was made (see _abort)
        # a hole can only be as fine as the file system's block
        self._block = max(512, min(os.fstat(self._f.fileno()).st_blksize or 4096, 1 << 20))
        self._zero = bytes(self._block)
        self._pos = 0               # where the next byte goes
        self._hole_at_end = False   # the last bytes were skipped: close() sets the size

    def _write(self, data) -> int:
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        if self._zero not in data:   # no block of zeros at all: the usual case, one write
            self._put(memoryview(data))
            return len(data)
        view, n, block, zero = memoryview(data), len(data), self._block, self._zero
        run = 0      # start of the data not yet written
        i = 0
        while i < n:
            end = min(n, i + block - (self._pos + i) % block)   # up to the next block boundary
            if end - i == block and data.startswith(zero, i):
                if run < i:
                    self._put(view[run:i])
                self._skip(block)
                run = end
            i = end
        if run < n:
            self._put(view[run:n])
        return n

    def _put(self, view: memoryview) -> None:
        total = len(view)
        written = self._f.write(view)
        while written < total:  # raw writes may be partial
            written += self._f.write(view[written:])
        self._pos += total
        self._hole_at_end = False

    def _skip(self, length: int) -> None:
        self._f.seek(length, os.SEEK_CUR)
        self._pos += length
        self._hole_at_end = True

    def _commit(self) -> None:
        try:
            if self._hole_at_end:   # a seek alone does not make the file longer
                os.ftruncate(self._f.fileno(), self._pos)
            os.fsync(self._f.fileno())
        finally:
            self._f.close()
        os.close(self._folder)   # (on a failure, _abort removes the file, then closes it)

    def _abort(self) -> None:
        """Close and remove the half-written file: no partial file stays under its name
        (removed in the folder it was made in, whatever is at that folder's path now)."""
        try:
            self._f.close()
            os.unlink(self._name, dir_fd=self._folder)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._folder)
