"""Streaming checksums: adler32 (the XRootD/EOS/CASTOR/dCache checksum), md5, sha256.

adler32 is computed by zlib-ng's (SIMD: AVX2, AVX-512, NEON; a dependency of castlib)
when it can be imported, else by the standard zlib's; both give the same values
(tests/test_checksum.py). On a 1 GiB file in page cache (BENCHMARKS.md), zlib-ng hashes it
2.5-3.5x as fast as zlib (python-isal's adler32 was measured too: between the two).
"""
from __future__ import annotations

import zlib
from functools import lru_cache
from typing import BinaryIO, Iterable

ALGORITHMS = ("adler32", "md5", "sha256")
DEFAULT_ALGORITHM = "adler32"
CHUNK_SIZE = 4 * 1024 * 1024
# what checksum_stream reads at a time into one reused buffer: small enough that the bytes
# the kernel copies in are still in the CPU's cache when adler32 reads them
READ_SIZE = 1024 * 1024
# the largest buffer given to an adler32 in one call (zlib's takes an unsigned int length)
_MAX_CALL = 1 << 30

_adler32 = None   # the implementation chosen (adler32_implementation)

# POSIX `cksum`: a CRC-32 of the bytes and their length, printed "CRC SIZE" in decimal. Not
# a catalog checksum (ALGORITHMS): what a copy is verified in where the host runs `cksum`
# (backends/sftp.py), some 7x as fast there as md5sum (pclmul; coreutils 9), its CRC here
# by the C accelerator (cksum_available).
CKSUM = "cksum"


def cksum_available() -> bool:
    """Whether Hasher can compute CKSUM: the C accelerator is built with it."""
    return _cksum_update() is not None


@lru_cache(maxsize=None)   # once: asked for each large copy, and a failed import is a search
def _cksum_update():
    try:
        from ._accel import cksum_update
    except ImportError:   # not built here, or a build from before it had cksum
        return None
    return cksum_update


def format_cksum(crc: int, size: int) -> str:
    """What `cksum` prints for a file before its name, from the CRC register after its
    bytes (cksum_update from 0): the length's bytes fed in, least significant first, as
    few as it takes, then the complement."""
    n, tail = size, bytearray()
    while n:
        tail.append(n & 0xFF)
        n >>= 8
    crc = _cksum_update()(bytes(tail), crc)
    return f"{~crc & 0xFFFFFFFF} {size}"


def adler32_implementation():
    """(function, name) of the adler32 used, chosen once: zlib-ng's when installed (and
    giving zlib's value on a probe), else zlib's."""
    global _adler32
    if _adler32 is None:
        _adler32 = (zlib.adler32, "zlib")
        try:
            from zlib_ng.zlib_ng import adler32
        except ImportError:
            pass
        else:
            probe = b"castlib adler32 probe" * 300
            if adler32(probe, 7) == zlib.adler32(probe, 7):
                _adler32 = (adler32, "zlib-ng")
    return _adler32


def check_algorithm(name: str) -> str:
    from .errors import ConfigError

    algo = (name or "").lower()
    if algo not in ALGORITHMS:
        raise ConfigError(f"unknown checksum algorithm {name!r} (choose from {', '.join(ALGORITHMS)})")
    return algo


class Hasher:
    """Computes several checksums in one pass over a stream of chunks."""

    __slots__ = ("_adler", "_adler32", "_crc", "_cksum", "_hashes", "size")

    def __init__(self, algorithms: Iterable[str] = (DEFAULT_ALGORITHM,)):
        algorithms = tuple(dict.fromkeys(algorithms))
        self._adler = 1 if "adler32" in algorithms else None
        self._adler32 = adler32_implementation()[0] if self._adler is not None else None
        self._crc = 0 if CKSUM in algorithms else None
        self._cksum = _cksum_update() if self._crc is not None else None
        if self._crc is not None and self._cksum is None:   # asked only where available
            raise ValueError("cksum needs castlib's C accelerator, which is not built here")
        others = [a for a in algorithms if a not in ("adler32", CKSUM)]
        self._hashes = {}
        if others:   # hashlib (OpenSSL) imported only when asked for
            import hashlib

            self._hashes = {a: hashlib.new(a) for a in others}
        self.size = 0

    def update(self, chunk) -> None:
        """Add bytes (any buffer: bytes, bytearray, memoryview)."""
        n = len(chunk)
        self.size += n
        if self._adler is not None:
            if n <= _MAX_CALL:
                self._adler = self._adler32(chunk, self._adler)
            else:
                view = memoryview(chunk).cast("B")
                for i in range(0, n, _MAX_CALL):
                    self._adler = self._adler32(view[i:i + _MAX_CALL], self._adler)
        if self._crc is not None:
            self._crc = self._cksum(chunk, self._crc)
        for h in self._hashes.values():
            h.update(chunk)

    def hexdigests(self) -> dict[str, str]:
        out = {name: h.hexdigest() for name, h in self._hashes.items()}
        if self._adler is not None:
            out["adler32"] = format_adler32(self._adler)
        if self._crc is not None:
            out[CKSUM] = format_cksum(self._crc, self.size)
        return out


def format_adler32(value: int) -> str:
    """8 lower-case hex digits, zero-padded, as xrdadler32 and EOS print it."""
    return f"{value & 0xFFFFFFFF:08x}"


def normalise(algo: str, value: str | None) -> str | None:
    """Bring a checksum from a server into castlib's form (adler32: 8 lower-case hex)."""
    if value is None:
        return None
    value = value.strip().lower()
    if algo == "adler32":
        if value.startswith("0x"):
            value = value[2:]
        return value.zfill(8)
    return value


def checksum_stream(stream: BinaryIO, algorithms: Iterable[str] = (DEFAULT_ALGORITHM,),
                    chunk_size: int = READ_SIZE) -> tuple[dict[str, str], int]:
    """Read `stream` to its end; return ({algo: hex}, bytes read). A stream that reads
    into a buffer (a file) fills one buffer again and again: no new bytes object per read."""
    hasher = Hasher(algorithms)
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:
        buffer = bytearray(chunk_size)
        view = memoryview(buffer)
        update = hasher.update
        while True:
            n = readinto(buffer)
            if not n:
                break
            update(buffer if n == chunk_size else view[:n])
        return hasher.hexdigests(), hasher.size
    read = stream.read
    while True:
        chunk = read(chunk_size)
        if not chunk:
            break
        hasher.update(chunk)
    return hasher.hexdigests(), hasher.size
