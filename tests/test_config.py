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


# what a file may hold: right ones, and ones the model converts or refuses
AGREE = [
    None, {}, {"storage": None, "locations": None, "queues": None},
    {"storage": {"s3://a": {"endpoint_url": "https://x", "n": 3, "keys": ["k"]}},
     "locations": {"daq": "/data", 2017: "/d/2017", True: "/t"},
     "hostname": "daq01", "broker": "redis://b:6379/0", "queues": {"root://eos": "eos"}},
    {"storage": {"s3://a": None}}, {"storage": {"s3://a": {1: "x"}}}, {"storage": []},
    {"storage": {"s3://a": "str"}}, {"locations": {"a": 1}}, {"locations": {"a": None}},
    {"queues": {"root://eos": ""}}, {"queues": {"root://eos": 5}}, {"hostname": 5},
    {"broker": ["x"]}, {"hostname": None, "broker": None}, {"locatoins": {}}, {1: {}},
    ["storage"], "text", {"locations": {"a": b"/bytes"}},
]


@pytest.mark.parametrize("data", AGREE, ids=range(len(AGREE)))
def test_the_plain_check_reads_a_file_as_the_model_does(data):
    """_plain_file (no pydantic) reads what it accepts exactly as the model would, and
    leaves to the model whatever it converts or refuses."""
    from pydantic import ValidationError

    from castlib.config import FIELDS, _file_model, _plain_file

    plain = _plain_file(data)
    try:
        checked = _file_model().model_validate({} if data is None else data)
        model = {k: getattr(checked, k) for k in FIELDS}
    except ValidationError:
        model = None
    if plain is not None:
        assert plain == model and list(plain) and set(plain) == set(FIELDS)
        for key in ("storage", "locations", "queues"):   # its own dicts, not the YAML's
            assert data is None or plain[key] is not (data or {}).get(key)
    else:   # left to the model: which converts it, or says what is wrong
        assert data not in (None, {})


def test_a_valid_config_file_is_read_without_pydantic(tmp_path):
    import subprocess
    import sys

    from tests.helpers import cli_env

    config = tmp_path / "config.yaml"
    config.write_text("storage:\n  's3://cdr': {endpoint_url: 'https://s3.example.org'}\n"
                      "locations:\n  daq: /data/cdr\n  2017: /data/2017\nhostname: daq01\n"
                      "queues:\n  'root://eos': eos\n")
    probe = ("import sys\nfrom castlib.config import load_user_config\n"
             "c = load_user_config()\n"
             "print(c.locations, c.hostname, c.queues, c.storage)\n"
             "print(sorted(m for m in sys.modules if m.startswith('pydantic')))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       env=cli_env({"CASTLIB_CONFIG": str(config)}), check=True)
    assert r.stdout.splitlines() == [
        "{'daq': '/data/cdr', '2017': '/data/2017'} daq01 {'root://eos': 'eos'} "
        "{'s3://cdr': {'endpoint_url': 'https://s3.example.org'}}", "[]"], r.stdout
