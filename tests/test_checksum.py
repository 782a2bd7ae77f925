"""Checksums: adler32 as XRootD prints it, md5 and sha256, in one streaming pass."""
import hashlib
import io
import zlib

import pytest
from hypothesis import given, strategies as st

from castlib.checksum import Hasher, check_algorithm, checksum_stream, format_adler32, normalise
from castlib.errors import ConfigError


def test_adler32_known_values():
    # adler32("") is 1, and of "Wikipedia" is 0x11e60398 (the textbook example)
    assert Hasher(["adler32"]).hexdigests()["adler32"] == "00000001"
    h = Hasher(["adler32"])
    h.update(b"Wikipedia")
    assert h.hexdigests()["adler32"] == "11e60398"


def test_adler32_is_zero_padded_lower_case():
    assert format_adler32(0xABC) == "00000abc"


@given(st.lists(st.binary(max_size=5000), max_size=20))
def test_one_pass_equals_each_algorithm_on_its_own(chunks):
    data = b"".join(chunks)
    h = Hasher(["adler32", "md5", "sha256"])
    for c in chunks:
        h.update(c)
    assert h.hexdigests() == {
        "adler32": f"{zlib.adler32(data):08x}",
        "md5": hashlib.md5(data).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert h.size == len(data)


def test_checksum_stream_reads_in_chunks():
    data = bytes(range(256)) * 1000
    digests, size = checksum_stream(io.BytesIO(data), ["md5"], chunk_size=1000)
    assert size == len(data) and digests["md5"] == hashlib.md5(data).hexdigest()


def test_server_values_are_normalised():
    assert normalise("adler32", "0x1A2B") == "00001a2b"
    assert normalise("md5", " ABCDEF ") == "abcdef"


def test_unknown_algorithm_is_a_config_error():
    with pytest.raises(ConfigError, match="crc32"):
        check_algorithm("crc32")


# -- the adler32 implementation (zlib-ng's when installed, else zlib's) -------------------------

import mmap
import os
import random
import shutil
import subprocess

from castlib import checksum as checksum_module
from castlib.backends import open_backend

# around NMAX (5552: the longest run zlib sums before a modulo), and an odd tail
EDGE_SIZES = [0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 5551, 5552, 5553, 2 * 5552 + 1,
              65521, 65536, 1 << 20, (1 << 20) + 7]


def test_the_fast_adler32_is_used_when_installed():
    """zlib-ng is in the test extra: the implementation chosen must be it (a broken
    install, or a probe that failed, would quietly fall back to zlib's)."""
    function, name = checksum_module.adler32_implementation()
    from zlib_ng import zlib_ng

    assert name == "zlib-ng" and function is zlib_ng.adler32


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_adler32_equals_zlib_at_edge_sizes_and_any_start(size):
    function, _ = checksum_module.adler32_implementation()
    rng = random.Random(size)
    data = rng.randbytes(size)
    # the value carried from one chunk to the next is an adler32: both halves below 65521
    # (zlib-ng leaves an impossible start such as 0xffffffff as it is on empty data, zlib
    # reduces it: no chunk of castlib's ever starts there)
    for start in (1, 0, 0xFFF0FFF0, rng.randrange(65521) << 16 | rng.randrange(65521)):
        assert function(data, start) == zlib.adler32(data, start), (size, start)
    high = b"\xff" * size   # the largest sums per byte: the modulo's worst case
    assert function(high, 1) == zlib.adler32(high, 1)
    assert function(memoryview(bytearray(high)), 1) == zlib.adler32(high, 1)


@given(st.lists(st.binary(max_size=70000), max_size=8))
def test_adler32_of_random_chunks_equals_zlib(chunks):
    h = Hasher(["adler32"])
    for c in chunks:
        h.update(c)
    assert h.hexdigests()["adler32"] == f"{zlib.adler32(b''.join(chunks)):08x}"


def _after_zeros(value: int, n: int) -> int:
    """adler32 continued over n zero bytes: s1 stays, s2 grows by n * s1 (mod 65521)."""
    s1, s2 = value & 0xFFFF, value >> 16
    return ((s2 + n * s1) % 65521) << 16 | s1


def test_adler32_of_more_than_4_gib_in_one_buffer(tmp_path):
    """A buffer longer than zlib's unsigned int length (2^32 + a few bytes: a sparse file,
    mapped) gives the value computed from its parts."""
    head, tail, zeros = b"castlib head", b"tail", (1 << 32) + 5
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.write(head)
        f.seek(len(head) + zeros)
        f.write(tail)
    expected = zlib.adler32(tail, _after_zeros(zlib.adler32(head), zeros))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        h = Hasher(["adler32"])
        h.update(m)
        assert h.size == len(head) + zeros + len(tail)
        assert h.hexdigests()["adler32"] == f"{expected:08x}"


def _xrdadler32(path) -> str:
    # xrdadler32 answers from an extended attribute it keeps: a fresh file has none
    out = subprocess.run([shutil.which("xrdadler32"), str(path)], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[0]


@pytest.mark.parametrize("size", [0, 1, 5552, 5553, (4 << 20) + 1, (9 << 20) + 12345])
def test_a_local_file_checksum_equals_xrdadler32(tmp_path, size):
    assert shutil.which("xrdadler32"), "xrdadler32 is installed with the test dependencies"
    name = f"f{size}.dat"
    (tmp_path / name).write_bytes(random.Random(size).randbytes(size))
    assert open_backend(str(tmp_path)).checksum(name, "adler32") == _xrdadler32(tmp_path / name)


def test_checksum_stream_of_a_file_reads_into_one_buffer(tmp_path):
    data = random.Random(3).randbytes((1 << 20) * 3 + 17)
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb", buffering=0) as f:
        digests, size = checksum_stream(f, ["adler32", "md5"], chunk_size=1 << 20)
    assert size == len(data)
    assert digests == {"adler32": f"{zlib.adler32(data):08x}",
                       "md5": hashlib.md5(data).hexdigest()}


# -- POSIX cksum, which an SSH host is asked for to verify a large copy ----------------------
@pytest.mark.parametrize("size", [0, 1, 7, 8, 255, 256, 65535, 65536, 1 << 20, 5 * (1 << 20) + 3])
def test_cksum_is_what_the_cksum_command_prints(tmp_path, size):
    """The CRC and length castlib computes (the C accelerator's CRC, fed in blocks that
    break the 8-byte steps anywhere) equal what coreutils' cksum prints for the file."""
    assert checksum_module.cksum_available(), "the C accelerator (setup.py) is not built"
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    printed = subprocess.run(["cksum", str(path)], capture_output=True, text=True,
                             check=True).stdout.split()
    hasher = Hasher(("adler32", "cksum"))
    at = 0
    for step in (3, 8, 13, 65536 + 5):
        hasher.update(memoryview(data)[at:at + step])
        at += step
    hasher.update(data[at:])
    assert hasher.hexdigests()["cksum"] == f"{printed[0]} {printed[1]}"
    assert hasher.hexdigests()["adler32"] == format_adler32(zlib.adler32(data))
