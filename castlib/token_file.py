"""A file that holds a secret castlib reads (a bearer token): refused unless it is its
owner's alone, as OpenSSH refuses a private key (read_token_file)."""
from __future__ import annotations

import os
import stat

from .errors import ConfigError


def read_token_file(path: str, runner: str = "the server") -> str:
    """The token in the file at `path`: `castlib web --token-file`'s (whoever holds it
    starts syncs and deletions) or one castlib sends (an http-push stage's `token_file`:
    whoever reads it speaks for castlib to that service). The file is refused, as OpenSSH
    refuses a private key, unless it is a regular file (symbolic links followed) that
    only its owner may read or write, and its owner is the user running castlib (`runner`
    in the refusal's words) or root. Another user's file is refused even when it is 0600
    and castlib runs as root: its owner may rewrite the token, or open the file to
    others, at any time, and so would hold castlib's actions, or learn what it sends.
    A root-owned file adds no one: root may rewrite the server user's files anyway.
    Checked on the file opened (fstat), so it cannot be swapped between check and read."""
    try:
        # O_NONBLOCK: open() of a FIFO would otherwise wait for a writer; it is refused
        # below without a byte read. O_NOCTTY: a terminal named here does not become ours.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(f"cannot read the token file: {exc.strerror}", file=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                     (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device"))
            kind = next((k for test, k in kinds if test(st.st_mode)), "not a file")
            raise ConfigError(f"the token file is not a regular file ({kind}); give a file "
                              "holding the token, with mode 600", file=path)
        if os.name == "posix":
            if st.st_uid not in (os.geteuid(), 0):
                raise ConfigError(
                    f"the token file belongs to {_user_name(st.st_uid)}, not to "
                    f"{_user_name(os.geteuid())} who runs {runner}; chown it, or copy it "
                    "to a file of your own with mode 600", file=path)
            if st.st_mode & 0o066:
                raise ConfigError(f"the token file is {_open_to(st.st_mode)} (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it", file=path)
        try:
            token = _read_all(fd).decode("utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file: {exc.strerror}",
                              file=path) from None
        except UnicodeDecodeError:
            raise ConfigError("the token file is not text", file=path) from None
    finally:   # not os.fdopen(): it refuses a folder's descriptor before the check above
        os.close(fd)
    if not token:
        raise ConfigError("the token file is empty", file=path)
    return token


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _open_to(mode: int) -> str:
    """Who besides the owner may read or write a file of this mode, in words: 'readable
    by its group and others', 'readable by its group, writable by others'."""
    rights = {}
    for who, shift in (("its group", 3), ("others", 0)):
        can = " and ".join(w for bit, w in ((4, "readable"), (2, "writable"))
                           if mode & (bit << shift))
        if can:
            rights.setdefault(can, []).append(who)
    return ", ".join(f"{can} by {' and '.join(whom)}" for can, whom in rights.items())


def _user_name(uid: int) -> str:
    import pwd   # (POSIX only: asked on POSIX only)

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
