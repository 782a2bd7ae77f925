"""Local locations belong to a host: file://HOST/path, the host from $CASTLIB_HOSTNAME, the
configuration's `hostname:`, else the machine's name; another host's disk is refused."""
import socket

import pytest

from castlib.backends.local import LocalBackend
from castlib.catalog import Catalog
from castlib.catalog.locks import lock_key
from castlib.errors import ConfigError
from castlib.hosts import local_hostname
from castlib.location import parse_location
from tests.helpers import make_tree, run_cli


def test_the_host_is_the_machine_unless_told(monkeypatch, tmp_path):
    monkeypatch.delenv("CASTLIB_HOSTNAME", raising=False)
    monkeypatch.setenv("CASTLIB_CONFIG", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text("storage: {}\n")
    assert local_hostname() == socket.gethostname().lower()
    (tmp_path / "c.yaml").write_text("hostname: DAQ07\n")
    monkeypatch.setenv("CASTLIB_CONFIG", str(tmp_path / "c.yaml"))
    assert local_hostname() == "daq07"
    monkeypatch.setenv("CASTLIB_HOSTNAME", "daq01")   # the environment wins
    assert local_hostname() == "daq01"


def test_bare_paths_and_host_less_urls_are_on_this_host(monkeypatch, tmp_path):
    monkeypatch.setenv("CASTLIB_HOSTNAME", "daq01")
    for text in (str(tmp_path), f"file://{tmp_path}", f"file://localhost{tmp_path}",
                 f"file://daq01{tmp_path}"):
        url = parse_location(text)
        assert (url.host, url.path, str(url)) == ("daq01", str(tmp_path),
                                                  f"file://daq01{tmp_path}")
    other = parse_location("file://DAQ02/data/../data/cdr/")
    assert str(other) == "file://daq02/data/cdr"   # another machine's path: not resolved here


def test_another_hosts_disk_is_refused_in_one_line(monkeypatch, tmp_path):
    make_tree(tmp_path / "data", {"a.dat": b"a"})
    env = {"CASTLIB_HOSTNAME": "daq01"}
    run_cli("index", str(tmp_path / "data"), env={"CASTLIB_HOSTNAME": "daq02"}, check=0)
    for args in (["index", f"file://daq02{tmp_path}/data"],
                 ["sync", str(tmp_path / "data"), f"file://daq02{tmp_path}/copy"],
                 ["verify", f"file://daq02{tmp_path}/data"]):
        r = run_cli(*args, env=env, check=2)
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("castlib: error: file://daq02"), r.stderr
        assert "is on daq02; run it there or through a worker" in lines[-1]
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "copy").exists()
    # the catalog alone is no refusal: what daq02's location holds may be looked at anywhere
    run_cli("locations", env=env, check=0)
    monkeypatch.setenv("CASTLIB_HOSTNAME", "daq01")
    with pytest.raises(ConfigError, match="is on daq02"):
        LocalBackend(parse_location(f"file://daq02{tmp_path}"))


def test_a_bad_host_name_is_one_line(tmp_path):
    r = run_cli("index", str(tmp_path), env={"CASTLIB_HOSTNAME": "daq/01"}, check=2)
    assert r.stderr.strip() == ("castlib: error: host name 'daq/01' from $CASTLIB_HOSTNAME "
                                "is not a host name (letters, digits, '-' and '.')")


def test_two_hosts_indexing_one_path_keep_two_locations(db_url, tmp_path):
    """The bug of the issue: daq01 and daq02 both have /data/cdr; indexed into one catalog
    they were one location, each listing overwriting the other's entries."""
    data = tmp_path / "cdr"
    make_tree(data, {"run1.dat": b"from daq01"})
    run_cli("index", str(data), db=db_url, env={"CASTLIB_HOSTNAME": "daq01"}, check=0)
    (data / "run1.dat").unlink()
    make_tree(data, {"run2.dat": b"from daq02"})
    run_cli("index", str(data), db=db_url, env={"CASTLIB_HOSTNAME": "daq02"}, check=0)
    with Catalog(db_url) as catalog:
        by_url = {r["url"]: r for r in catalog.locations()}
        assert set(by_url) == {f"file://daq01{data}", f"file://daq02{data}"}
        assert [e["path"] for e in catalog.entries(by_url[f"file://daq01{data}"]["id"])] == [
            "run1.dat"]
        assert [e["path"] for e in catalog.entries(by_url[f"file://daq02{data}"]["id"])] == [
            "run2.dat"]
        assert {r["hostname"] for r in catalog.runs()} == {"daq01", "daq02"}
    r = run_cli("ls", f"file://daq01{data}", db=db_url, env={"CASTLIB_HOSTNAME": "daq02"},
                check=0)
    assert "run1.dat" in r.stdout and "run2.dat" not in r.stdout


def test_one_path_on_two_hosts_is_two_locks_and_no_overlap(monkeypatch, tmp_path):
    monkeypatch.setenv("CASTLIB_HOSTNAME", "daq01")
    here, there = parse_location(str(tmp_path)), parse_location(f"file://daq02{tmp_path}")
    assert lock_key(here) != lock_key(there)
    assert lock_key(here).startswith("file://daq01:")
    assert not LocalBackend.overlaps(here, there)
    assert LocalBackend.overlaps(here, parse_location(str(tmp_path / "sub")))
    assert LocalBackend.overlaps(there, parse_location(f"file://daq02{tmp_path}/sub"))
