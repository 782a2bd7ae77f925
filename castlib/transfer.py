"""One verified file copy: stream to a temporary name, check size and checksum, then rename.

Nothing is ever published under its final name before its bytes are verified, so a run
killed at any moment leaves at most a temporary file, which the next sync removes.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

from .backends.base import Backend
from .checksum import CHUNK_SIZE, Hasher
from .errors import NotFound, SourceChanged, StorageError, Unsupported, VerificationFailed

log = logging.getLogger(__name__)

TEMP_MARK = ".castlib-part-"
# Which temporaries are castlib's own, told by their name alone: each carries a random
# nonce and a tag, an HMAC of the final name and the nonce under the catalog's secret key
# (catalog.settings.temp_name_key). A user's file named like one (".x.castlib-part-...",
# or a temporary another catalog left) has no valid tag: it is listed, copied and kept
# like any file, and never removed without --delete. A tag costs nothing per file
# (recording each temporary in the catalog before writing it would cost a catalog write
# per copy), and any run on any host sharing the catalog recognises it.
_NONCE, _TAG = 12, 16   # hex digits: a 48-bit nonce, a 64-bit tag
_TEMP_NAME = re.compile(r"^\.(.+)\.castlib-part-([0-9a-f]{12})([0-9a-f]{16})$", re.S)


NAME_MAX = 255   # bytes in one path component, on every file system that matters here


def temp_path(final_path: str, key: bytes) -> str:
    """A hidden temporary name beside the final one, unique per attempt, tagged with the
    catalog's key, and never longer than a file name may be (a long final name is
    shortened in the temporary one)."""
    folder, _, name = final_path.rpartition("/")
    room = NAME_MAX - len(f".{TEMP_MARK}") - _NONCE - _TAG
    while len(name.encode("utf-8", "surrogateescape")) > room:
        name = name[:-1]
    nonce = os.urandom(_NONCE // 2).hex()   # (as secrets.token_hex, without its imports)
    tmp = f".{name}{TEMP_MARK}{nonce}{_tag(key, name, nonce)}"
    return f"{folder}/{tmp}" if folder else tmp


def is_temp_name(name: str, key: bytes) -> bool:
    """True for the temporary files castlib writes with this key (and only for those)."""
    m = _TEMP_NAME.match(name) if TEMP_MARK in name else None
    if m is None:
        return False
    import hmac   # OpenSSL, only once a name looks like a temporary (not in every command)

    return hmac.compare_digest(m.group(3), _tag(key, m.group(1), m.group(2)))


@functools.lru_cache(maxsize=1024)   # a copy asks for its temporary name's tag 4 times
def _tag(key: bytes, name: str, nonce: str) -> str:
    import hashlib
    import hmac

    message = name.encode("utf-8", "surrogateescape") + b"/" + nonce.encode("ascii")
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:_TAG]


@dataclass
class TransferResult:
    size: int
    checksums: dict[str, str]
    mtime_set: bool
    third_party: bool = False


def copy_file(src: Backend, src_path: str, dst: Backend, dst_path: str, *,
              algorithm: str, expected_size: int | None, expected_checksum: str | None,
              mtime_ns: int | None, temp_key: bytes,
              on_bytes: Callable[[int], None] | None = None,
              chunk_size: int = CHUNK_SIZE,
              before_rename: Callable[[str], None] | None = None,
              tmp: str | None = None) -> TransferResult:
    """Copy src_path to dst_path and verify every byte before it takes the final name.

    Verification: the bytes read match the size (and checksum, when known) the catalog
    holds for the source; the written file's size and its checksum, as the destination
    computes it (server-side, or by reading it back), match the bytes read; and the
    source's size and mtime are the same after the read as before it (SourceChanged if
    not: a file rewritten in place while it was read would give a torn copy whose
    checksum matches itself, and so passes every other check). A destination that can have
    its server hash the stored file in another algorithm than the catalog's (its
    `server_checksum_algorithm(size)`, e.g. md5sum on an SSH host) gets the source bytes
    hashed in that one too, and is verified in it: no read-back. temp_key: the catalog's
    key that tags the temporary name (catalog.settings.temp_name_key). before_rename
    (temporary path) sets what else the file should have (owner, permission bits) while
    it is still under its temporary name. tmp: the temporary name to write, when the
    caller chose it (temp_path(dst_path, temp_key)) to announce it (Backend.expect_write).
    """
    tmp = tmp or temp_path(dst_path, temp_key)
    published = made = False
    before = src.stat(src_path)
    if before is None:
        raise NotFound("source vanished before it could be copied", path=src_path)
    # the algorithm the destination verifies in, when not the catalog's (see above)
    server_algorithm = getattr(dst, "server_checksum_algorithm", None)
    verify_in = (server_algorithm(expected_size) if server_algorithm else None) or algorithm
    try:
        third_party = dst.capabilities.third_party_copy and dst.copy_from(src, src_path, tmp)
        if third_party:
            source_sum = expected_checksum or src.checksum(src_path, algorithm)
            read = {algorithm: source_sum}
            verify_in = algorithm
            size = expected_size
            if on_bytes and size:
                on_bytes(size)
        else:
            read, size = _stream(src, src_path, dst, tmp, (algorithm, verify_in), on_bytes,
                                 chunk_size)
        made = True
        _check_unchanged(src, src_path, before)
        if expected_size is not None and size != expected_size:
            raise VerificationFailed(
                f"source changed since it was indexed: read {size} bytes, catalog says "
                f"{expected_size}", path=src_path)
        if expected_checksum and read[algorithm] != expected_checksum:
            raise VerificationFailed(
                f"source {algorithm} {read[algorithm]} differs from the catalog's "
                f"{expected_checksum} (changed or corrupted since it was indexed)", path=src_path)
        written = dst.stat(tmp)
        if written is None:
            raise _temp_gone(tmp, dst_path)
        if size is not None and written.size != size:
            raise VerificationFailed(f"written size {written.size} != {size}", path=dst_path)
        if size is None:
            size = written.size
        dst_sum = dst.checksum(tmp, verify_in)
        if dst_sum != read[verify_in]:
            raise VerificationFailed(
                f"written {verify_in} {dst_sum} != read {read[verify_in]}", path=dst_path)
        mtime_set = False
        if mtime_ns is not None and dst.capabilities.set_mtime:
            try:
                dst.set_mtime(tmp, mtime_ns)
                mtime_set = True
            except Unsupported:   # the server refused (the back-end learned it): the copy stands
                pass
        if before_rename is not None:
            before_rename(tmp)
        dst.rename(tmp, dst_path)
        published = True
        return TransferResult(size, read, mtime_set, third_party)
    except NotFound:
        if made and not published and dst.stat(tmp) is None:   # not the source: ours
            raise _temp_gone(tmp, dst_path) from None
        raise
    finally:
        if not published:
            _remove_quietly(dst, tmp)


def _temp_gone(tmp: str, dst_path: str) -> VerificationFailed:
    """The temporary file vanished between its writing and its rename: something else
    removed it (a run that took it for a leftover, a user's cleanup). Said as such, not as
    a size mismatch."""
    return VerificationFailed(f"temporary file {tmp} removed by another process while it "
                              "was written; not published", path=dst_path)


def _check_unchanged(src: Backend, src_path: str, before) -> None:
    """The source after the read is the one before it: same size, same mtime (where the
    back-end gives one). Anything else means it was written to while being read."""
    after = src.stat(src_path)
    if after is None:
        raise SourceChanged("vanished while it was being copied", path=src_path)
    moved = [what for what, a, b in (("size", before.size, after.size),
                                     ("mtime", before.mtime_ns, after.mtime_ns))
             if a is not None and b is not None and a != b]
    if moved or after.kind != before.kind:
        raise SourceChanged(f"changed while it was being copied ({' and '.join(moved) or 'type'} "
                            "moved): copy discarded, left for the next run", path=src_path)


def _stream(src, src_path, dst, tmp, algorithms, on_bytes, chunk_size):
    """Source to temporary, hashing. The write stream commits only at the clean end of
    its block: a read error (or an interruption) aborts it, so no upload is completed
    with the bytes read so far (the temporary, if any is left, is removed by the caller
    or the next sync)."""
    hasher = Hasher(algorithms)
    with src.open_read(src_path) as reader, dst.open_write(tmp) as writer:
        while True:
            chunk = reader.read(chunk_size)
            if not chunk:
                break
            hasher.update(chunk)
            writer.write(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return hasher.hexdigests(), hasher.size


def _remove_quietly(dst: Backend, path: str) -> None:
    try:
        if dst.stat(path) is not None:
            dst.delete(path)
    except Exception as exc:  # a leftover temp file is cleaned by the next sync
        log.debug("could not remove temporary %s: %s", path, exc)


MAX_BACKOFF_S = 60.0   # the longest wait between two attempts


def with_retries(action: Callable[[], object], *, retries: int, backoff_s: float,
                 describe: str, retry_unreached: bool = True) -> object:
    """Run action, retrying transient storage errors with exponential backoff, capped at
    MAX_BACKOFF_S (20 retries would otherwise end in a wait of days) and jittered (half
    to all of it), so the transfer threads that met one outage do not retry in step.
    Not `retry_unreached`: one that never reached the server (TransientStorageError's
    `unreached`) is raised at once."""
    attempt = 0
    while True:
        try:
            return action()
        except StorageError as exc:
            if not exc.transient or attempt >= retries or (
                    not retry_unreached and getattr(exc, "unreached", False)):
                raise
            import random

            delay = min(MAX_BACKOFF_S, backoff_s * (2 ** attempt)) * random.uniform(0.5, 1.0)
            log.warning("%s: %s; retrying in %.1f s", describe, exc, delay)
            time.sleep(delay)
            attempt += 1
        except OSError as exc:  # a back-end let one through: treat as not transient
            raise StorageError(f"{exc.strerror or exc}", path=describe) from None

