"""Streaming checksums: adler32 (the XRootD/EOS/CASTOR/dCache checksum), md5, sha256."""
from __future__ import annotations

import hashlib
import zlib
from typing import BinaryIO, Iterable

ALGORITHMS = ("adler32", "md5", "sha256")
DEFAULT_ALGORITHM = "adler32"
CHUNK_SIZE = 4 * 1024 * 1024


def check_algorithm(name: str) -> str:
    from .errors import ConfigError

    algo = (name or "").lower()
    if algo not in ALGORITHMS:
        raise ConfigError(f"unknown checksum algorithm {name!r} (choose from {', '.join(ALGORITHMS)})")
    return algo


class Hasher:
    """Computes several checksums in one pass over a stream of chunks."""

    __slots__ = ("_adler", "_hashes", "size")

    def __init__(self, algorithms: Iterable[str] = (DEFAULT_ALGORITHM,)):
        algorithms = tuple(dict.fromkeys(algorithms))
        self._adler = 1 if "adler32" in algorithms else None
        self._hashes = {a: hashlib.new(a) for a in algorithms if a != "adler32"}
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._adler is not None:
            self._adler = zlib.adler32(chunk, self._adler)
        for h in self._hashes.values():
            h.update(chunk)

    def hexdigests(self) -> dict[str, str]:
        out = {name: h.hexdigest() for name, h in self._hashes.items()}
        if self._adler is not None:
            out["adler32"] = format_adler32(self._adler)
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
                    chunk_size: int = CHUNK_SIZE) -> tuple[dict[str, str], int]:
    """Read `stream` to its end; return ({algo: hex}, bytes read)."""
    hasher = Hasher(algorithms)
    read = stream.read
    while True:
        chunk = read(chunk_size)
        if not chunk:
            break
        hasher.update(chunk)
    return hasher.hexdigests(), hasher.size
