"""One verified file copy: stream to a temporary name, check size and checksum, then rename.

Nothing is ever published under its final name before its bytes are verified, so a run
killed at any moment leaves at most a temporary file, which the next sync removes.
"""
from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable

from .backends.base import Backend
from .checksum import CHUNK_SIZE, Hasher
from .errors import StorageError, Unsupported, VerificationFailed

log = logging.getLogger(__name__)

TEMP_MARK = ".castlib-part-"
_TEMP_NAME = re.compile(r"^\..+\.castlib-part-[0-9a-f]{12}$", re.S)


NAME_MAX = 255   # bytes in one path component, on every file system that matters here


def temp_path(final_path: str) -> str:
    """A hidden temporary name beside the final one, unique per attempt, and never longer
    than a file name may be (a long final name is shortened in the temporary one)."""
    folder, _, name = final_path.rpartition("/")
    room = NAME_MAX - len(f".{TEMP_MARK}") - 12
    while len(name.encode("utf-8", "surrogateescape")) > room:
        name = name[:-1]
    tmp = f".{name}{TEMP_MARK}{secrets.token_hex(6)}"
    return f"{folder}/{tmp}" if folder else tmp


def is_temp_name(name: str) -> bool:
    """True for the temporary files castlib writes (and only for those)."""
    return TEMP_MARK in name and bool(_TEMP_NAME.match(name))


@dataclass
class TransferResult:
    size: int
    checksums: dict[str, str]
    mtime_set: bool
    third_party: bool = False


def copy_file(src: Backend, src_path: str, dst: Backend, dst_path: str, *,
              algorithm: str, expected_size: int | None, expected_checksum: str | None,
              mtime_ns: int | None, on_bytes: Callable[[int], None] | None = None,
              chunk_size: int = CHUNK_SIZE) -> TransferResult:
    """Copy src_path to dst_path and verify every byte before it takes the final name.

    Verification: the bytes read match the size (and checksum, when known) the catalog
    holds for the source; the written file's size and its checksum, as the destination
    computes it (server-side, or by reading it back), match the bytes read.
    """
    tmp = temp_path(dst_path)
    published = False
    try:
        third_party = dst.copy_from(src, src_path, tmp)
        if third_party:
            source_sum = expected_checksum or src.checksum(src_path, algorithm)
            read = {algorithm: source_sum}
            size = expected_size
            if on_bytes and size:
                on_bytes(size)
        else:
            read, size = _stream(src, src_path, dst, tmp, algorithm, on_bytes, chunk_size)
        if expected_size is not None and size != expected_size:
            raise VerificationFailed(
                f"source changed since it was indexed: read {size} bytes, catalog says "
                f"{expected_size}", path=src_path)
        if expected_checksum and read[algorithm] != expected_checksum:
            raise VerificationFailed(
                f"source {algorithm} {read[algorithm]} differs from the catalog's "
                f"{expected_checksum} (changed or corrupted since it was indexed)", path=src_path)
        written = dst.stat(tmp)
        if written is None or (size is not None and written.size != size):
            raise VerificationFailed(
                f"written size {None if written is None else written.size} != {size}", path=dst_path)
        if size is None:
            size = written.size
        dst_sum = dst.checksum(tmp, algorithm)
        if dst_sum != read[algorithm]:
            raise VerificationFailed(
                f"written {algorithm} {dst_sum} != read {read[algorithm]}", path=dst_path)
        mtime_set = False
        if mtime_ns is not None and dst.capabilities.set_mtime:
            try:
                dst.set_mtime(tmp, mtime_ns)
                mtime_set = True
            except Unsupported:   # the server refused (the back-end learned it): the copy stands
                pass
        dst.rename(tmp, dst_path)
        published = True
        return TransferResult(size, read, mtime_set, third_party)
    finally:
        if not published:
            _remove_quietly(dst, tmp)


def _stream(src, src_path, dst, tmp, algorithm, on_bytes, chunk_size):
    hasher = Hasher((algorithm,))
    with src.open_read(src_path) as reader:
        writer = dst.open_write(tmp)
        try:
            while True:
                chunk = reader.read(chunk_size)
                if not chunk:
                    break
                hasher.update(chunk)
                writer.write(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
        except BaseException:
            _close_quietly(writer)
            raise
        writer.close()
    return hasher.hexdigests(), hasher.size


def _close_quietly(writer) -> None:
    try:
        writer.close()
    except Exception:  # the original error is the one worth reporting
        pass


def _remove_quietly(dst: Backend, path: str) -> None:
    try:
        if dst.stat(path) is not None:
            dst.delete(path)
    except Exception as exc:  # a leftover temp file is cleaned by the next sync
        log.debug("could not remove temporary %s: %s", path, exc)


def with_retries(action: Callable[[], object], *, retries: int, backoff_s: float,
                 describe: str) -> object:
    """Run action, retrying transient storage errors with exponential backoff."""
    attempt = 0
    while True:
        try:
            return action()
        except StorageError as exc:
            if not exc.transient or attempt >= retries:
                raise
            delay = backoff_s * (2 ** attempt)
            log.warning("%s: %s; retrying in %.1f s", describe, exc, delay)
            time.sleep(delay)
            attempt += 1
        except OSError as exc:  # a back-end let one through: treat as not transient
            raise StorageError(f"{exc.strerror or exc}", path=describe) from None

