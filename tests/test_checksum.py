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
