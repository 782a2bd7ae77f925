"""The contract every storage back-end implements, and the capabilities it declares as data."""
from __future__ import annotations

import atexit
import logging
import os
import posixpath
import threading
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import BinaryIO, Callable, ClassVar, Iterator

from ..checksum import CHUNK_SIZE, checksum_stream
from ..errors import ConfigError, LocationMissing, NotFound, StorageError, Unsupported
from ..location import LocationURL

FILE, DIR, LINK = "f", "d", "l"
# The one word for each kind in messages ("folder", never "dir"). JSON output spells a
# folder "dir" (Difference.as_dict): a format users parse, kept as it is.
KIND_NAMES = {FILE: "file", DIR: "folder", LINK: "link"}

# How long a network back-end waits for a connection (its `connect_timeout` option's
# default, s): here, where what starts a connection ahead of its back-end reads it too
# (ssh_command.start_ahead)
CONNECT_TIMEOUT_S = 10

# The back-ends' threads of their own (a login made ahead of the first call, SFTP sessions
# being opened): daemons, so that a host that does not answer never holds the end of a
# run. At exit each is given a moment to end, once what it waits on has been stopped (the
# ssh still running are killed just before: ssh_command imports this module, so its exit
# handler runs first). A daemon thread still running Python when the interpreter tears
# itself down can crash it: a no-op sync to SFTP that had printed its whole report once
# exited with SIGSEGV, the threads opening its early sessions still alive after main.
_BACKGROUND: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()
BACKGROUND_END_S = 2.0   # the most the end of a run waits for them, all together


def background_thread(target: Callable, *args, name: str) -> threading.Thread:
    """A daemon thread running target(*args), started, and waited for at exit (a
    moment: see _end_background)."""
    thread = threading.Thread(target=target, args=args, daemon=True, name=name)
    _BACKGROUND.add(thread)
    thread.start()
    return thread


def _end_background() -> None:
    deadline = time.monotonic() + BACKGROUND_END_S
    for thread in list(_BACKGROUND):
        # (one that could not be started, no thread to be had, is not waited for)
        if thread is not threading.current_thread() and thread.ident is not None:
            thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(_end_background)

ListingErrorHandler = Callable[[str, str], None]
"""Called as on_error(relative_path, message) for a folder that could not be listed."""


@dataclass(slots=True)
class Stat:
    """What a listing or a stat says of one entry. Paths are relative POSIX paths below the
    location root (`""` is the root itself); non-UTF-8 bytes of local names are kept as
    surrogate escapes (os.fsdecode), so a name round-trips byte-exact."""

    path: str
    kind: str                      # FILE, DIR or LINK
    size: int | None = None
    mtime_ns: int | None = None
    mode: int | None = None
    link_target: str | None = None
    checksums: dict[str, str] | None = None   # provided by the server with the listing
    online: bool | None = None     # False: on tape only (nearline), must be staged to read
    inode: tuple | None = None     # (device, inode) of a file with several names (hard links)
    uid: int | None = None         # owner and group, where the back-end tells them
    gid: int | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Capabilities:
    """What a back-end can do. The sync engine asks these; it never tests the scheme."""

    set_mtime: bool = False
    server_checksums: frozenset[str] = frozenset()  # computed by the server, no download
    mtime_precision_ns: int = 1          # 60e9 for storage that keeps minutes only
    symlinks: bool = False
    empty_dirs: bool = True              # folders exist on their own (not on object stores):
                                         # else the sync makes none, and skips empty ones
    third_party_copy: bool = False       # copy_from can have servers move the bytes directly
    tape: bool = False                   # files may be nearline and need staging
    # Metadata rsync -a keeps, where the back-end can hold it (the sync sets only these):
    permissions: bool = False            # keeps permission bits, and can set them (chmod)
    dir_mtimes: bool = False             # can set the mtime of a folder
    link_mtimes: bool = False            # can set the mtime of a link itself (lutimes)
    owner: bool = False                  # can set owner and group (local: only as root)
    hard_links: bool = False             # tells which files share one inode, and can link them

    def as_dict(self) -> dict:
        return {
            "set_mtime": self.set_mtime,
            "server_checksums": sorted(self.server_checksums),
            "mtime_precision_s": self.mtime_precision_ns / 1e9,
            "symlinks": self.symlinks,
            "empty_dirs": self.empty_dirs,
            "third_party_copy": self.third_party_copy,
            "tape": self.tape,
            "permissions": self.permissions,
            "dir_mtimes": self.dir_mtimes,
            "link_mtimes": self.link_mtimes,
            "owner": self.owner,
            "hard_links": self.hard_links,
        }


# a folder's listing that failed for a transient reason (a line that dropped, a server
# that restarted) is asked again this many times, after 0.5-1, 1-2 and 2-4 s, before the
# folder is reported unlisted (the root: the index fails)
LISTING_RETRIES = 3


def walk_by_folder(list_folder: Callable[[str], list["Stat"]], on_error: ListingErrorHandler,
                   missing_root: str) -> Iterator["Stat"]:
    """Every entry below a root, one listing a folder, depth first, each folder before its
    content: what Backend.walk promises, for a back-end that lists folder by folder.
    list_folder(rel) returns a folder's entries or raises a StorageError. A folder below the
    root that cannot be listed goes to on_error and the walk goes on; for the root itself,
    NotFound becomes LocationMissing(missing_root), anything else is raised."""
    from ..transfer import with_retries

    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = with_retries(lambda: list_folder(rel), retries=LISTING_RETRIES,
                                   backoff_s=1.0, describe=rel or "/")
        except StorageError as exc:
            if rel:
                on_error(rel, str(exc))
                continue
            if isinstance(exc, NotFound):
                raise LocationMissing(missing_root, path="") from None
            raise
        yield from entries
        stack.extend(st.path for st in reversed(entries) if st.kind == DIR)


def wait_for_staging(pending: list[str], still_offline: Callable[[list[str]], list[str]],
                     timeout_s: float, poll_s: float, where: Callable[[str], str]) -> None:
    """Poll still_offline(pending) (the files of `pending` not on disk yet) until none is
    left, or fail after timeout_s naming the files still on tape."""
    deadline = time.monotonic() + timeout_s
    while True:
        pending = still_offline(pending)
        if not pending:
            return
        if time.monotonic() >= deadline:
            shown = ", ".join(where(p) for p in pending[:5])
            more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
            raise StorageError(f"still on tape after {timeout_s:g} s of staging: {shown}{more}",
                               path=pending[0])
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def __getattr__(name: str):
    # BackendOptions is a pydantic model: built when a back-end that takes options (castor,
    # fsspec, xrootd) is imported, so that a local back-end, the catalog (records) and the
    # command line start without importing pydantic
    if name == "BackendOptions":
        from pydantic import BaseModel, ConfigDict

        class BackendOptions(BaseModel):
            """The options a back-end accepts (the config file's `storage:`, a pipeline's
            `locations:`): each back-end declares its own as `Options`, a subclass. An
            unknown option or a wrong value is one line naming it and the location
            (parse_options)."""

            model_config = ConfigDict(extra="forbid", frozen=True)

        BackendOptions.__module__ = __name__
        globals()["BackendOptions"] = BackendOptions
        return BackendOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _done(setter: Callable[[str, int], None], path: str, value: int | None) -> bool | None:
    """set_folder_metadata's answer for one attribute: None not asked, False refused."""
    if value is None:
        return None
    try:
        setter(path, value)
        return True
    except Unsupported:
        return False


def parse_options(model, options: dict, url: LocationURL):
    """The options as `model` reads them, or a ConfigError naming the first wrong one.
    model None: the back-end takes no option (settings None)."""
    if model is None:
        if not options:
            return None
        raise option_error(url, str(next(iter(options))), "unknown option (known: none)",
                           options)
    from pydantic import ValidationError

    try:
        return model.model_validate(options)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(part) for part in error["loc"]) or "options"
        if error["type"] == "extra_forbidden":
            known = ", ".join(_model_at(model, error["loc"][:-1]).model_fields) or "none"
            message = f"unknown option (known: {known})"
        else:
            message = error["msg"]
            if "input" in error and not isinstance(error["input"], (dict, list)):
                message += f", not {error['input']!r}"
        raise option_error(url, name, message, options) from None


def option_error(url: LocationURL, name: str, message: str, options=None) -> ConfigError:
    """The one line for a wrong back-end option: the location, the option, what is
    wrong; and the file and line that set it, where a configuration file did (`options`
    as config.StorageOptions gives them)."""
    lines = getattr(options, "lines", None) or {}
    top = name.split(".")[0]   # (a nested option's: the line of the key that holds it)
    file = getattr(options, "file", None) if top in lines else None   # (not a pipeline's)
    error = ConfigError(f"{url}: option {name}: {message}", file=file, line=lines.get(top))
    error.key = name   # which option, for a caller (the message names it already)
    return error


def _model_at(model, loc: tuple):
    """The options model (or nested model, as castor's `tools`) an error's location is in."""
    from pydantic import BaseModel

    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = field.annotation if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            break
        model = inner
    return model


class WriteStream:
    """The one write life cycle of every back-end: write(), then either a commit (close(),
    or the clean end of a `with` block) or an abort (abort(), or a `with` block left on an
    exception). A commit returns only once the bytes are stored, and raises if they are
    not; an abort leaves nothing under the name written (or at most a castlib temporary,
    which the next sync removes) and never raises: the error that made the caller stop is
    the one worth reporting. A commit that fails is aborted too. Subclasses implement
    _write, _commit and _abort only."""

    _done = False

    def write(self, data) -> int:
        if self._done:
            raise ValueError("write to a closed stream")
        return self._write(data)

    def close(self) -> None:
        """Commit (once; a second close does nothing)."""
        if self._done:
            return
        self._done = True
        try:
            self._commit()
        except BaseException:
            self._abort_quietly()
            raise

    def abort(self) -> None:
        """Give the write up (once; after a commit, nothing)."""
        if self._done:
            return
        self._done = True
        self._abort_quietly()

    def _abort_quietly(self) -> None:
        try:
            self._abort()
        except Exception as exc:  # the error that made the caller abort is the one to report
            logging.getLogger(__name__).debug("aborting a write: %s", exc)

    @property
    def closed(self) -> bool:
        return self._done

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    # -- what a back-end's stream implements -------------------------------------------------
    def _write(self, data) -> int:
        raise NotImplementedError

    def _commit(self) -> None:
        """Make the bytes durable under the name, or raise."""
        raise NotImplementedError

    def _abort(self) -> None:
        """Stop writing and leave no file under the name (a temporary may remain)."""
        raise NotImplementedError


class Backend(ABC):
    """One storage root reached through one protocol.

    All paths are relative to the root given at construction (`""` is the root). Methods
    raise castlib.errors.StorageError subclasses: NotFound, TransientStorageError (worth a
    retry), Unsupported; never a library's own exception type.
    """

    capabilities: ClassVar[Capabilities] = Capabilities()
    description: ClassVar[str] = ""
    # what it accepts (a BackendOptions subclass, checked into self.settings); None: no
    # option at all (self.settings None)
    Options: ClassVar["type | None"] = None
    # The key that tags castlib's temporary names (transfer.temp_path): the run that opens
    # a back-end gives it the catalog's (catalog.settings.temp_name_key), so the temporaries
    # a back-end makes on its own (a file moved aside, a probe) are known as castlib's by
    # the next run. Without a catalog, a key of this process: its temporaries are shaped
    # like castlib's but claimed by no catalog.
    temp_key: bytes = os.urandom(32)

    # what the last walk() saw and left out because no back-end can hold it (fifos,
    # sockets, devices): [(path, kind name)], for the index to report; a class default,
    # so that a back-end whose listings have no such entries need not know of it
    specials_skipped: "list[tuple[str, str]] | tuple" = ()

    # How many files a sync copies in parallel to or from this back-end when the user
    # names no number (--transfers): rclone's 4, where a copy's time is its bytes; more
    # where each copy is mostly waits on round trips (SftpBackend). A sync takes the
    # larger of its two ends'.
    default_transfers: ClassVar[int] = 4

    @classmethod
    def capabilities_for(cls, scheme: str) -> Capabilities:
        """What a URL scheme's back-end can do, before any location is opened (for
        `castlib backends`)."""
        return cls.capabilities

    def __init__(self, url: LocationURL, options: dict | None = None):
        self.url = url
        self._options_set = options   # (where each was set: option_error)
        self.options = dict(options or {})
        self.settings = self._plain_settings(self.options)
        if self.settings is None:
            self.settings = parse_options(self.Options, options or {}, url)

    @classmethod
    def _plain_settings(cls, options: dict):
        """The settings without the Options model (pydantic), when a back-end can tell
        that the options are plainly right; None: the model checks them."""
        return None

    # -- identity ----------------------------------------------------------------------
    @classmethod
    def identity(cls, url: LocationURL) -> str:
        """What a root is, whatever its spelling: the key of a destination's lock. Here the
        canonical URL; a back-end that can see through aliases (links, mounts) does better."""
        return str(url)

    @classmethod
    def identities_above(cls, url: LocationURL) -> list[str]:
        """The identities of the folders containing the root, outermost first: a lock on
        the root holds them shared, so that a sync into a folder around it waits (see
        catalog.locks). Here the URL's parent paths."""
        out, path = [], url.path.rstrip("/")
        while path:
            path = posixpath.dirname(path).rstrip("/")
            out.append(cls.identity(replace(url, path=path or "/")))
        return out[::-1]

    @classmethod
    def overlaps(cls, a: LocationURL, b: LocationURL) -> bool:
        """Whether one of two roots of this back-end is, or lies inside, the other."""
        if (a.scheme, a.host) != (b.scheme, b.host):
            return False
        pa, pb = a.path.rstrip("/") + "/", b.path.rstrip("/") + "/"
        return pa.startswith(pb) or pb.startswith(pa)

    @classmethod
    def mount_overlap(cls, a: LocationURL, b: LocationURL) -> str | None:
        """A mount below root `a` that shows (part of) root `b`, described for a message,
        or None. Only a back-end with mounts (local) has any."""
        return None

    # -- listing -----------------------------------------------------------------------
    @abstractmethod
    def walk(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        """Every entry below the root, recursively, parents before their children.
        Symlinks are reported as LINK and never followed. A folder that cannot be listed
        is reported through on_error and skipped; the walk goes on."""

    @abstractmethod
    def stat(self, path: str) -> Stat | None:
        """The entry at `path`, or None if nothing is there. Links are not followed."""

    def stat_many(self, paths: list[str]) -> Iterator[tuple[str, "Stat | None | StorageError"]]:
        """stat() of each path (links not followed), as each is answered: what is there
        (None: nothing) or the StorageError that kept it from being looked at. Here one
        after another; a back-end whose every request is a round trip sends them together
        (SftpBackend)."""
        for path in paths:
            try:
                yield path, self.stat(path)
            except StorageError as exc:
                yield path, exc

    def root_exists(self) -> bool:
        st = self.stat("")
        return st is not None and st.kind == DIR

    # -- data ----------------------------------------------------------------------------
    @abstractmethod
    def open_read(self, path: str) -> BinaryIO:
        """A readable binary stream (context manager) of the file's bytes."""

    @abstractmethod
    def open_write(self, path: str) -> "WriteStream":
        """A WriteStream that creates or truncates the file: the bytes are durable once
        close() (or a `with` block's clean end) returns without error; leaving the block
        on an exception aborts, and no partial file is published."""

    def expect_write(self, path: str | None) -> None:
        """A hint from the calling thread: its next open_write is of `path` (a temporary
        name copy_file will write), or None: no write is expected any more. A back-end
        whose opening is a round trip may send the open with the requests it sends
        meanwhile (SFTP: with the rename that ends the copy before), and must then undo
        an open no write took when told None or another path. open_write works as ever
        whatever was announced. Most back-ends ignore it."""

    # Whether write_files and rename_many do several files in the time of one (the
    # engine then copies small files a few at a time: transfer.copy_files_together).
    writes_files_together = False

    def write_files(self, files: list[tuple[str, bytes]]) -> list[StorageError | None]:
        """Write each (path, bytes) as open_write would, whole: for each, None once it
        is stored, or the StorageError that kept it from being. Here one after another; a
        back-end whose every request is a round trip sends them together (SftpBackend)."""
        outcomes: list[StorageError | None] = []
        for path, data in files:
            try:
                with self.open_write(path) as stream:
                    stream.write(data)
                outcomes.append(None)
            except StorageError as exc:
                outcomes.append(exc)
        return outcomes

    def rename_many(self, renames: list[tuple[str, str]]) -> list[StorageError | None]:
        """rename() of each (src, dst): for each, None once done, or the StorageError
        that kept it from being. Here one after another (see write_files)."""
        outcomes: list[StorageError | None] = []
        for src, dst in renames:
            try:
                self.rename(src, dst)
                outcomes.append(None)
            except StorageError as exc:
                outcomes.append(exc)
        return outcomes

    def checksum(self, path: str, algorithm: str) -> str:
        """The file's checksum: from the server when it computes `algorithm` itself,
        otherwise by reading the bytes once."""
        with self.open_read(path) as stream:
            digests, _ = checksum_stream(stream, (algorithm,), CHUNK_SIZE)
        return digests[algorithm]

    # -- namespace -----------------------------------------------------------------------
    @abstractmethod
    def mkdir(self, path: str) -> None:
        """Create the folder and its missing parents; no error if it exists."""

    def make_folders(self, paths: list[str]) -> Iterator[tuple[str, "Stat | None | StorageError"]]:
        """Create these folders (mkdir), a parent before the folders in it, and give for
        each, as it is made, what is there then (stat; None: nothing) or the StorageError
        that kept it from being made. Here one after another; a back-end whose every
        request is a round trip sends those of one depth together (SftpBackend)."""
        for path in paths:
            try:
                self.mkdir(path)
                yield path, self.stat(path)
            except StorageError as exc:
                yield path, exc

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Move src to dst, replacing dst if it is a file. Where the protocol cannot
        replace in one step, the back-end moves the target aside first and back if the
        rename fails: the only copy under dst is never lost (see xrootd.py, sftp.py)."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove a file, a link or an empty folder."""

    def set_mtime(self, path: str, mtime_ns: int) -> None:
        raise Unsupported(f"{self.url.scheme}:// cannot set modification times", path=path)

    def symlink(self, path: str, target: str) -> None:
        raise Unsupported(f"{self.url.scheme}:// cannot hold symbolic links", path=path)

    def chmod(self, path: str, mode: int) -> None:
        """Set the permission bits of a file or folder (capabilities.permissions)."""
        raise Unsupported(f"{self.url.scheme}:// cannot set permissions", path=path)

    def set_folder_metadata(self, folders: list[tuple[str, int | None, int | None]]
                            ) -> Iterator[tuple[str, "tuple[bool | None, bool | None] | StorageError"]]:
        """Give folders (path, permission bits, mtime in ns; None: leave it) their bits and
        mtime, each after the folders in it (as listed: deepest first), and say for each,
        as it is done, whether its bits and its mtime were set (None: not asked; False:
        this back-end cannot, learned as for chmod and set_mtime: Unsupported), or the
        StorageError that stopped it. Here one after another; a back-end whose every
        request is a round trip sends those of one depth together (SftpBackend)."""
        for path, mode, mtime_ns in folders:
            try:
                yield path, (_done(self.chmod, path, mode), _done(self.set_mtime, path, mtime_ns))
            except StorageError as exc:
                yield path, exc

    def chown(self, path: str, uid: int | None, gid: int | None, *,
              was: Stat | None = None, mode: int | None = None) -> None:
        """Set owner and group of an entry, links not followed (capabilities.owner).
        `was`: the entry as the caller saw it (stat) when it decided: another one found
        there now is left as it is (StorageError). `mode`: its bits set again after (a
        chown clears the set-ID bits), on that same entry."""
        raise Unsupported(f"{self.url.scheme}:// cannot set owners", path=path)

    def hard_link(self, path: str, existing: str) -> None:
        """Make `path` a new name of the file `existing` (capabilities.hard_links)."""
        raise Unsupported(f"{self.url.scheme}:// cannot hold hard links", path=path)

    def stage(self, paths: list[str], timeout_s: float) -> None:
        """Bring nearline (tape) files online before reading them; a no-op on disk storage."""

    def copy_from(self, source: "Backend", src_path: str, dst_path: str) -> bool:
        """Third-party copy: have the servers move the bytes directly. Returns False when
        not possible between these two, and the caller streams instead. Asked only of a
        back-end whose capabilities say third_party_copy."""
        return False

    def connect_in_background(self, sessions: int = 1) -> None:
        """Start connecting now, if this back-end's first call would wait on the network,
        and return at once; the first call then waits for that attempt and sees its
        outcome. `sessions`: how many the run will use at once (a back-end whose every
        session is a login may start them all). Local back-ends have nothing to do."""

    def sessions_needed(self, sessions: int) -> None:
        """How many sessions the stage now knows it will use at once (its files to copy,
        once planned, and its own thread): a back-end that opens its sessions ahead
        (connect_in_background) opens those still missing now. Others have nothing to do."""

    def close(self) -> None:
        """Release connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
