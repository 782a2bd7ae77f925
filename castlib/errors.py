"""The exceptions castlib raises, each carrying one line a user can act on."""
from __future__ import annotations


class CastlibError(Exception):
    """Base of every error castlib reports to the user as one line, without a traceback."""

    exit_code = 2

    def __str__(self) -> str:  # one line, always
        return " ".join(super().__str__().split("\n"))


class ConfigError(CastlibError):
    """Bad input: a pipeline file, an option, a URL. Names the file, line and key when known."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None):
        self.file, self.line, self.key, self.message = file, line, key, message
        where = ""
        if file:
            where = file + (f":{line}" if line else "")
        if key:
            where = f"{where}: {key}" if where else key
        super().__init__(f"{where}: {message}" if where else message)


class BackendUnavailable(CastlibError):
    """A URL scheme whose optional dependency is not installed, or that nothing serves."""


class StorageError(CastlibError):
    """An operation on storage failed. `transient` errors are worth retrying."""

    transient = False

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        super().__init__(message)


class TransientStorageError(StorageError):
    """A failure that may pass: a dropped connection, a timeout, a busy server.
    `unreached`: the server was not reached at all (refused, timed out, unreachable):
    worth retrying within a long run, not as its very first call (a host that does not
    answer would cost its timeout once per attempt)."""

    transient = True

    def __init__(self, message: str, *, path: str | None = None, unreached: bool = False):
        super().__init__(message, path=path)
        self.unreached = unreached


class NotFound(StorageError):
    """The file or folder does not exist."""


class LocationMissing(StorageError):
    """The root of a location does not exist or cannot be reached."""


class Unsupported(StorageError):
    """The back-end cannot do this (e.g. set an mtime on XRootD)."""


class VerificationFailed(StorageError):
    """Bytes written do not match the bytes read: size or checksum mismatch."""


class SourceChanged(StorageError):
    """The source's size or mtime moved while it was being copied: what was read may mix
    old and new bytes. The copy is discarded; the next run copies the file again."""


class SafetyRefusal(CastlibError):
    """castlib refused to act because acting could lose data; `--force` overrides where said."""


class LockBusy(CastlibError):
    """Another run holds the lock on a destination."""


class Interrupted(KeyboardInterrupt):
    """The run was told to stop by a signal (Ctrl-C, SIGTERM). A KeyboardInterrupt, so that
    a Ctrl-C in a notebook and a signal to the command stop a run the same way: no new
    copy starts, those in flight end, what was done is recorded, the run is 'interrupted'."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.signame = signal.Signals(signum).name
        self.exit_code = 128 + signum   # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        super().__init__(self.signame)


# A signal's handler (the CLI's, a worker's) raises Interrupted in the main thread, at
# whatever it was running. The few steps that must not be cut in two run inside
# interruptions_held(): a finished copy counted and remembered for the catalog (the sync
# stage's collect), cut between the two, was on the destination, in the run's counts, and
# not in the catalog. Signals are handled in the main thread only: so are these blocks.
_held: list[bool] = []      # one for each held block the main thread is in
_waiting: list[int] = []    # the signals that came meanwhile


def interrupt(signum: int) -> None:
    """What a signal handler does: raise Interrupted(signum) now, or at the end of the
    interruptions_held() block the main thread is in."""
    if _held:
        _waiting.append(signum)
        return
    raise Interrupted(signum)


class interruptions_held:
    """A block a signal's Interrupted does not cut: it is raised at the block's end (from
    whatever exception was leaving it, if one was)."""

    def __enter__(self):
        _held.append(True)

    def __exit__(self, *exc_info):
        _held.pop()
        if not _held and _waiting:
            signum = _waiting[0]
            _waiting.clear()
            raise Interrupted(signum)
        return False


def interruption_name(exc: BaseException) -> str:
    """SIGTERM, SIGINT...: which signal stopped a run (a bare KeyboardInterrupt is a Ctrl-C)."""
    return getattr(exc, "signame", "SIGINT")
