"""Location URLs: normalisation, identity, and credentials kept out of text."""
import os

import pytest

from castlib.errors import ConfigError
from castlib.hosts import local_hostname
from castlib.location import parse_location, redact, redact_url, scrub_secrets
from tests.helpers import last_json, run_cli


def test_bare_path_becomes_absolute_file_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = parse_location("data/cdr/")
    assert url.scheme == "file"
    assert url.path == str(tmp_path / "data" / "cdr")
    # a local location names the machine it is on (tests/test_hosts.py)
    assert str(url) == f"file://{local_hostname()}{tmp_path}/data/cdr"


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


@pytest.mark.parametrize("url", [
    "sftp://user:top@secret4@host.example/x",       # '@' in the password: up to the last '@'
    "sftp://user:pa/secret4@host.example/x",        # a raw '/', '?' or '#' cuts the authority
    "sftp://user:pa?secret4@host.example/x",
    "sftp://user:pa#secret4@host.example/x",
    "sftp://user:pa/se@cret4@host.example/x",
    "sftp://user:12/secret4@host.example/x",        # could be host:port: hidden in a URL
    "sftp://user:pa%2Fse%40cret4@host.example/x",   # percent-encoded
    "sftp://user:pa%2Fse%40cret4@host.example/x?q=1",
])
def test_credentials_are_redacted_by_their_position_in_the_url(url):
    assert redact_url(url) == "sftp://***@host.example/x" + ("?q=1" if "?q" in url else "")
    if ":12/" in url:   # in free text, host:port/path@name (parse_location refuses it typed)
        return
    shown = redact(f"cannot reach {url}: refused, and 'ftp://a:b@c' too")
    assert "secret4" not in shown and "cret4" not in shown and "pa" not in shown
    assert shown.startswith("cannot reach sftp://***@host.example/x") and "'ftp://***@c'" in shown


def test_every_url_of_a_text_is_redacted_even_without_spaces_between():
    text = "['sftp://u:p1@h/x','s3://k:q2@b/y'] sftp://v:r3@h"
    assert redact(text) == "['sftp://***@h/x','s3://***@b/y'] sftp://***@h"


@pytest.mark.parametrize("text", [
    "root://eos.example.org:1094//eos/exp/run@1.dat: not found",   # a port, and '@' in a name
    "s3://bucket/user@example.com/f.dat: access denied",
    "sftp://[::1]:2222/data/a@b: permission denied",
    "a mail to k:v@b is no URL",
    "operation unsupported on sftp://host.example/x",
])
def test_text_without_credentials_is_left_alone(text):
    assert redact(text) == text


def test_option_secrets_are_redacted_as_whole_tokens_only():
    """A password "p" hides where it stands alone, not inside every word that has a p."""
    assert redact("operation unsupported (endpoint https://h/p)", ["p"]) == \
        "operation unsupported (endpoint https://h/***)"
    assert redact("bad password p, or 'p'", ["p"]) == "bad password ***, or '***'"
    assert redact("key=AKIA123&sig=AKIA1234", ["AKIA123"]) == "key=***&sig=AKIA1234"
    assert redact("auth pa%2Fss failed for pa/ss", ["pa/ss"]) == "auth *** failed for ***"
    assert redact("x!p@ss!y", ["p@ss!"]) == "x!***y"


def test_parse_location_takes_the_userinfo_up_to_the_last_at():
    url = parse_location("sftp://user:top@secret4@host.example:2222/x")
    assert (url.user, url.password, url.host, url.path) == (
        "user", "top@secret4", "host.example:2222", "/x")
    url = parse_location("sftp://user:pa%2Fss%40x@host.example/x")
    assert (url.password, url.host) == ("pa/ss@x", "host.example")


@pytest.mark.parametrize("url", ["sftp://user:pa/secret4@host/x", "sftp://user:12/secret4@host/x",
                                 "sftp://user:pa#secret4@host/x", "root://host:1094//eos/a@b"])
def test_an_authority_that_may_hide_a_password_is_refused_without_showing_it(url):
    with pytest.raises(ConfigError) as info:
        parse_location(url)
    message = str(info.value)
    assert "ambiguous" in message and "%2F" in message and "%40" in message
    assert "secret4" not in message


def test_run_records_keep_a_url_whole_even_with_spaces():
    kept = scrub_secrets({"location": "sftp://user:pa ss@host/x", "password": "pa ss",
                          "errors": ["sftp://user:pa@host/x: refused"]})
    assert kept == {"location": "sftp://***@host/x", "password": "***",
                    "errors": ["sftp://***@host/x: refused"]}


def test_credentials_stay_out_of_messages_json_and_run_history(tmp_path, db_url):
    """`@` and `/` in a password, and a one-letter password that must not garble a word."""
    from sqlalchemy import create_engine, text

    from castlib.catalog.database import normalise_db_url

    dst = str(tmp_path / "dst")
    cases = [("sftp://na64:top@secret4@127.0.0.1:9/data", "sftp://***@127.0.0.1:9/data"),
             ("sftp://na64:pa/secret4@127.0.0.1:9/data", "sftp://***@127.0.0.1:9/data"),
             ("sftp://na64:a@127.0.0.1:9/data", "sftp://***@127.0.0.1:9/data")]
    for run_id, (url, shown) in enumerate(cases, start=1):
        r = run_cli("sync", url, dst, "--json", db=db_url)
        assert r.returncode == 2, r.stderr
        [line] = r.stderr.strip().splitlines()
        error = last_json(r.stdout)["error"]
        history = run_cli("runs", "show", str(run_id), db=db_url, check=0).stdout
        for out in (line, error, history):
            assert "secret4" not in out and "pa/" not in out
            assert shown in out, out
        assert line.count("***") == 1, line        # the userinfo, and no letter 'a' of a word
        if url.endswith(":a@127.0.0.1:9/data"):   # the client's own words, whole
            assert "connection refused" in line
            assert ("Connect call failed" in line                  # asyncssh's
                    or "port 9: Connection refused" in line), line   # OpenSSH's ssh
    listing = run_cli("runs", db=db_url, check=0).stdout
    assert "secret4" not in listing
    engine = create_engine(normalise_db_url(db_url))
    try:
        with engine.connect() as conn:
            stored = " ".join(str(row) for table in ("runs", "stage_results", "locations")
                              for row in conn.execute(text(f"SELECT * FROM {table}")))
    finally:
        engine.dispose()
    assert "secret4" not in stored and "pa/" not in stored


@pytest.mark.parametrize("bad", ["", "   ", "root:///no-host", "s3:/bucket-missing-slash",
                                 "root://host:notaport//x", "file://daq02:22/data",
                                 "file://user@daq02/data", "file://bad_host/data"])
def test_bad_locations_raise_one_line_config_errors(bad):
    with pytest.raises(ConfigError) as info:
        parse_location(bad)
    assert "\n" not in str(info.value)


def test_non_utf8_local_path_round_trips(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9"
    url = parse_location(os.fsdecode(raw))
    assert os.fsencode(url.path) == raw


@pytest.mark.parametrize("text,host,hostname,port", [
    ("sftp://[::1]:1/x", "[::1]:1", "::1", 1),
    ("root://[::1]:1//x", "[::1]:1", "::1", 1),
    ("davs://[::1]:1/x", "[::1]:1", "::1", 1),
    ("sftp://[::1]/x", "[::1]", "::1", None),
    ("sftp://u:p@[2001:DB8::5]:2222/x", "[2001:db8::5]:2222", "2001:db8::5", 2222),
    ("sftp://[fe80::1%25eth0]:22/x", "[fe80::1%25eth0]:22", "fe80::1%eth0", 22),
])
def test_an_ipv6_host_keeps_its_brackets_and_its_port(text, host, hostname, port):
    """The canonical URL keeps [..] (else ::1:1 reads as host ::1, port 1 or a bad port);
    socket libraries get the bare address and the port apart."""
    url = parse_location(text)
    assert (url.host, url.hostname, url.port) == (host, hostname, port)
    assert str(url) == text.replace("u:p@", "").replace("DB8", "db8")
    assert parse_location(str(url)) == url


def test_the_urls_ipv6_back_ends_are_given_keep_the_brackets():
    """XRootD and WebDAV take a URL (brackets kept); SFTP takes host and port apart."""
    from castlib.backends import open_backend
    assert open_backend("root://[::1]:1//x")._server == "root://[::1]:1/"
    assert str(open_backend("davs://[::1]:1/x").fs.client.base_url) == "https://[::1]:1"
    sftp = open_backend("sftp://[::1]:1/x")
    assert (sftp.url.hostname, sftp.url.port) == ("::1", 1)


def test_an_unclosed_ipv6_bracket_is_a_malformed_location():
    with pytest.raises(ConfigError, match=r"malformed location URL 'sftp://\[::1'.*brackets"):
        parse_location("sftp://[::1")


@pytest.mark.parametrize("url", ["sftp://u:p@ss/w@rd4@host/x", "sftp://u@ss/w:rd4@host/x",
                                 "sftp://u:p@ss?w@rd4@host/x"])
def test_a_userinfo_with_an_at_later_in_the_url_is_refused_without_showing_it(url):
    """user:p@ss/w@rd@host/x read as host 'ss' and path '/w@rd@host/x' would show and
    store part of the password."""
    with pytest.raises(ConfigError) as info:
        parse_location(url)
    message = str(info.value)
    assert "ambiguous" in message and "%2F" in message and "%40" in message
    assert "rd4" not in message and "ss/" not in message and "ss?" not in message
    assert redact(f"error at {url}: refused") == "error at sftp://***@host/x: refused"
