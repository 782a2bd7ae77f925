"""The user's configuration file: read through a pydantic model, and a mistake in it is
one line naming the file, the line and the key."""
import re

import pytest

from castlib.config import UserConfig, load_user_config
from castlib.errors import ConfigError
from tests.helpers import make_tree, run_cli


def _load(tmp_path, monkeypatch, text: str) -> UserConfig:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    monkeypatch.setenv("CASTLIB_CONFIG", str(path))
    return load_user_config()


def test_a_config_is_read(tmp_path, monkeypatch):
    config = _load(tmp_path, monkeypatch,
                   "storage:\n  's3://cdr': {endpoint_url: 'https://s3.example.org'}\n"
                   "locations:\n  daq: /data/cdr\n  2017: /data/2017\n")
    assert config.path == str(tmp_path / "config.yaml")
    assert config.storage == {"s3://cdr": {"endpoint_url": "https://s3.example.org"}}
    assert config.locations == {"daq": "/data/cdr", "2017": "/data/2017"}
    assert _load(tmp_path, monkeypatch, "storage:\nlocations:\n").storage == {}
    assert _load(tmp_path, monkeypatch, "").locations == {}
    assert UserConfig().path is None and UserConfig().options_for is not None


BAD = {
    "unknown key": ("storage: {}\nlocatoins: {}\n",
                    r"config.yaml:2: locatoins: unknown key "
                    r"\(expected storage, locations, hostname, broker, queues\)"),
    "not a mapping": ("- storage\n", r"config.yaml:1: expected a mapping with 'storage'"),
    "storage options not a mapping": (
        "storage:\n  's3://a': {}\n  's3://b': just-a-string\n",
        r"config.yaml:3: storage.s3://b: 'storage' must map URL prefixes to option mappings"),
    "location not a URL": ("locations:\n  daq: /data\n  eos: [root://eos//x]\n",
                           r"config.yaml:3: locations.eos: 'locations' must map names to URLs"),
    "malformed": ("storage: {a: \n", r"config.yaml:\d+: malformed YAML"),
    "yaml bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                  "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c]\n"
                  "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e]\n",
                  r"config.yaml:\d+: refused YAML: aliases expand"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_config_is_one_line_with_file_line_and_key(tmp_path, monkeypatch, case):
    text, pattern = BAD[case]
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, monkeypatch, text)
    message = str(info.value)
    assert "\n" not in message and re.search(pattern, message), message


def test_a_bad_config_stops_a_command_with_exit_2(tmp_path, db_url):
    src = make_tree(tmp_path / "src", {"a.dat": b"a"})
    config = tmp_path / "config.yaml"
    config.write_text("storage: {}\nlocation: {}\n")
    r = run_cli("sync", str(src), str(tmp_path / "dst"), db=db_url, check=2,
                env={"CASTLIB_CONFIG": str(config)})
    assert r.stderr == (f"castlib: error: {config}:2: location: unknown key "
                        "(expected storage, locations, hostname, broker, queues)\n")
    assert not (tmp_path / "dst").exists()
