"""Location URLs: normalisation, identity, and credentials kept out of text."""
import os

import pytest

from castlib.errors import ConfigError
from castlib.location import parse_location, redact


def test_bare_path_becomes_absolute_file_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = parse_location("data/cdr/")
    assert url.scheme == "file"
    assert url.path == str(tmp_path / "data" / "cdr")
    assert str(url) == f"file://{tmp_path}/data/cdr"


def test_file_url_and_bare_path_are_the_same_location(tmp_path):
    assert str(parse_location(f"file://{tmp_path}")) == str(parse_location(str(tmp_path)))


def test_xrootd_double_slash_path_is_absolute():
    url = parse_location("root://eos.example.org:1094//eos/exp/cdr/")
    assert (url.scheme, url.host, url.path) == ("root", "eos.example.org:1094", "/eos/exp/cdr")
    assert str(url) == "root://eos.example.org:1094//eos/exp/cdr"
    assert url.port == 1094 and url.hostname == "eos.example.org"


def test_castor_and_s3_urls():
    castor = parse_location("castor://castorpublic.cern.ch/castor/cern.ch/na64")
    assert (castor.host, castor.path) == ("castorpublic.cern.ch", "/castor/cern.ch/na64")
    s3 = parse_location("s3://bucket/prefix/run1")
    assert (s3.host, s3.path) == ("bucket", "/prefix/run1")


def test_credentials_are_kept_aside_and_never_in_the_identity():
    url = parse_location("sftp://alice:s3cret@host.example:2222/data")
    assert url.user == "alice" and url.password == "s3cret"
    assert "s3cret" not in str(url) and "alice" not in str(url)
    assert "s3cret" not in repr(url)


def test_redact_hides_user_and_password_in_any_text():
    text = "cannot reach davs://bob:hunter2@dav.example.org/x and s3://k:v@b/p"
    out = redact(text)
    assert "hunter2" not in out and "bob" not in out and ":v@" not in out
    assert "davs://***@dav.example.org/x" in out


@pytest.mark.parametrize("bad", ["", "   ", "root:///no-host", "s3:/bucket-missing-slash",
                                 "root://host:notaport//x", "file://otherhost/data"])
def test_bad_locations_raise_one_line_config_errors(bad):
    with pytest.raises(ConfigError) as info:
        parse_location(bad)
    assert "\n" not in str(info.value)


def test_non_utf8_local_path_round_trips(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9"
    url = parse_location(os.fsdecode(raw))
    assert os.fsencode(url.path) == raw
