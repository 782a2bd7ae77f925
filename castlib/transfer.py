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
from typing import Callable, Iterator

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
    before = _source_before(src, src_path)
    verify_in = _verified_in(dst, expected_size, algorithm)
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
        _check_read(src, src_path, before, size, read, algorithm, expected_size,
                    expected_checksum)
        size = _check_written(dst, tmp, dst_path, size, read, verify_in)
        mtime_set = _set_times(dst, tmp, mtime_ns)
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


@dataclass
class FileCopy:
    """One copy for copy_files_together: copy_file's arguments of that file."""
    src_path: str
    dst_path: str
    tmp: str
    expected_size: int   # (known: no more is read than this and a byte)
    expected_checksum: str | None = None
    mtime_ns: int | None = None
    before_rename: Callable[[str], None] | None = None


def copy_files_together(src: Backend, dst: Backend, copies: list[FileCopy], *,
                        algorithm: str, on_bytes: Callable[[int], None] | None = None
                        ) -> list[TransferResult | Exception]:
    """Small files as copy_file copies them, each verified the same way before it takes
    its name, a few at once: each read whole here, all written by one dst.write_files,
    each checked, all renamed by one dst.rename_many. Over SFTP, that is four round
    trips for the group, where each file took three.

    For each copy, its TransferResult, or the exception that stopped it (its temporary
    file removed), which counts as one attempt of copy_file would: the caller copies a
    file again on its own (copy_file, with its retries) where the error is transient,
    and otherwise takes it as that file's outcome. The caller keeps the group
    small: each file is held in memory whole, and no more of it is read than the catalog
    says it has (and a byte more, to see it grew)."""
    outcomes: list = [None] * len(copies)
    read_whole = []   # (index, bytes, their checksums, the algorithm dst verifies in)
    for i, copy in enumerate(copies):
        try:
            before = _source_before(src, copy.src_path)
            verify_in = _verified_in(dst, copy.expected_size, algorithm)
            data, read = _read_whole(src, copy.src_path, (algorithm, verify_in),
                                     copy.expected_size + 1, on_bytes)
            _check_read(src, copy.src_path, before, len(data), read, algorithm,
                        copy.expected_size, copy.expected_checksum)
            read_whole.append((i, data, read, verify_in))
        except Exception as exc:  # noqa: BLE001 - that copy's outcome
            outcomes[i] = exc
    try:
        written = dst.write_files([(copies[i].tmp, data) for i, data, _, _ in read_whole])
    except Exception as exc:  # noqa: BLE001 - the group's outcome: of each of its files
        written = [exc] * len(read_whole)
    checked = []   # (index, its result once renamed)
    for (i, data, read, verify_in), failed in zip(read_whole, written):
        copy = copies[i]
        try:
            if failed is not None:
                raise failed
            size = _check_written(dst, copy.tmp, copy.dst_path, len(data), read, verify_in)
            mtime_set = _set_times(dst, copy.tmp, copy.mtime_ns)
            if copy.before_rename is not None:
                copy.before_rename(copy.tmp)
            checked.append((i, TransferResult(size, read, mtime_set)))
        except Exception as exc:  # noqa: BLE001 - that copy's outcome
            outcomes[i] = exc
            _remove_quietly(dst, copy.tmp)
    try:
        renamed = dst.rename_many([(copies[i].tmp, copies[i].dst_path) for i, _ in checked])
    except Exception as exc:  # noqa: BLE001 - as above
        renamed = [exc] * len(checked)
    for (i, result), failed in zip(checked, renamed):
        outcomes[i] = result if failed is None else failed
        if failed is not None:
            _remove_quietly(dst, copies[i].tmp)
    return outcomes


def _source_before(src: Backend, src_path: str):
    """The source's entry before it is read (compared with the one after: _check_read)."""
    before = src.stat(src_path)
    if before is None:
        raise NotFound("source vanished before it could be copied", path=src_path)
    return before


def _verified_in(dst: Backend, expected_size: int | None, algorithm: str) -> str:
    """The algorithm the destination verifies a copy in: the one its server hashes the
    stored file in, where that is not the catalog's (see copy_file), else the catalog's."""
    server_algorithm = getattr(dst, "server_checksum_algorithm", None)
    return (server_algorithm(expected_size) if server_algorithm else None) or algorithm


def _read_whole(src: Backend, src_path: str, algorithms, limit: int, on_bytes):
    """A small source file's bytes (`limit` at most) and their checksums."""
    hasher = Hasher(algorithms)
    with src.open_read(src_path) as reader:
        data = b"".join(_hashed_chunks(reader, hasher, CHUNK_SIZE, on_bytes, limit))
    return data, hasher.hexdigests()


def _hashed_chunks(reader, hasher: Hasher, chunk_size: int, on_bytes,
                   limit: int | None = None) -> Iterator[bytes]:
    """The reader's bytes a chunk at a time (`limit` at most), each hashed and counted."""
    while limit is None or hasher.size < limit:
        chunk = reader.read(chunk_size if limit is None else min(chunk_size, limit - hasher.size))
        if not chunk:
            return
        hasher.update(chunk)
        if on_bytes:
            on_bytes(len(chunk))
        yield chunk


def _check_read(src: Backend, src_path: str, before, size: int | None, read: dict,
                algorithm: str, expected_size: int | None,
                expected_checksum: str | None) -> None:
    """The bytes read are those of the file the catalog knows, unchanged while read."""
    _check_unchanged(src, src_path, before)
    if expected_size is not None and size != expected_size:
        raise VerificationFailed(
            f"source changed since it was indexed: read {size} bytes, catalog says "
            f"{expected_size}", path=src_path)
    if expected_checksum and read[algorithm] != expected_checksum:
        raise VerificationFailed(
            f"source {algorithm} {read[algorithm]} differs from the catalog's "
            f"{expected_checksum} (changed or corrupted since it was indexed)", path=src_path)


def _check_written(dst: Backend, tmp: str, dst_path: str, size: int | None, read: dict,
                   verify_in: str) -> int:
    """The temporary file holds what was read: its size, and its checksum as the
    destination computes it (its server's, or by reading it back). Returns its size."""
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
    return size


def _set_times(dst: Backend, tmp: str, mtime_ns: int | None) -> bool:
    """The source's mtime on the temporary file, where the destination keeps one; whether
    it was set (a server that refuses it leaves the copy standing)."""
    if mtime_ns is None or not dst.capabilities.set_mtime:
        return False
    try:
        dst.set_mtime(tmp, mtime_ns)
        return True
    except Unsupported:   # the server refused (the back-end learned it): the copy stands
        return False


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
        for chunk in _hashed_chunks(reader, hasher, chunk_size, on_bytes):
            writer.write(chunk)
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

