"""Back-end options are pydantic models (each back-end's `Options`): a wrong one is one
line naming the option and the location, from Python and from the command line."""
from __future__ import annotations

import pytest
import yaml

from castlib.backends import open_backend
from castlib.errors import ConfigError
from tests.helpers import make_tree, run_cli


@pytest.mark.parametrize("url,options,expected", [
    ("s3://bucket/p", {"block_size": "big"},
     "s3://bucket/p: option block_size: Input should be a valid integer"),
    ("s3://bucket/p", {"etag_is_md5": "perhaps"},
     "s3://bucket/p: option etag_is_md5: Input should be a valid boolean"),
    ("webdav://h.example/x", {"connect_timeout": -1},
     "webdav://h.example/x: option connect_timeout: Input should be greater than 0"),
    ("root://h.example//data", {"checksum_querys": 2},
     "root://h.example//data: option checksum_querys: unknown option (known: "
     "checksum_queries, tpc_min_size)"),
    ("root://h.example//data", {"tpc_min_size": "16M"},
     "root://h.example//data: option tpc_min_size: Input should be a valid integer"),
])
def test_a_wrong_option_is_one_line_naming_it_and_the_location(url, options, expected):
    with pytest.raises(ConfigError) as err:
        open_backend(url, options)
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_options_a_library_takes_still_go_through(s3_bucket):
    b = open_backend(s3_bucket.url, dict(s3_bucket.options, block_size=5 * 1024 * 1024))
    assert b.block_size == 5 * 1024 * 1024
    assert "endpoint_url" in str(b._storage_options) or b._storage_options
    assert b.root_exists()


@pytest.mark.parametrize("kind", ["s3", "webdav", "sftp"])
def test_an_option_the_library_does_not_take_is_refused_before_anything_connects(
        request, kind):
    """The options castlib does not read itself go to the back-end's library as they
    are. A misspelt one reached webdav4, asyncssh and aiobotocore (at the first request:
    s3fs takes any keyword) as a TypeError of theirs, said as such ("TypeError
    (Client.__init__() got an unexpected keyword argument ...)"). Each is now one line
    naming the option and the location, as castlib's own options are."""
    server = request.getfixturevalue({"s3": "s3_bucket", "webdav": "webdav_server",
                                      "sftp": "sftp_server"}[kind])
    typo = {"s3": "endpoint_ur", "webdav": "scheme", "sftp": "client_key"}[kind]
    options = dict(server.options)
    options[typo] = options.pop("endpoint_url", None) or "x"
    b = open_backend(server.url, options)
    with pytest.raises(ConfigError) as err:
        b.stat("")
    assert str(err.value) == (f"{b.url}: option {typo}: unknown option (not one castlib "
                              f"reads, nor one its {b.url.scheme}:// library takes)")
    assert "Traceback" not in str(err.value)
    assert err.value.key == typo
    b.close()
    right = open_backend(server.url, server.options)   # without it: the same place answers
    assert right.root_exists()
    right.close()


def test_a_wrong_option_in_the_config_file_stops_the_cli_with_exit_2(tmp_path, db_url):
    src = make_tree(tmp_path / "src", {"f": b"1"})
    dst = tmp_path / "dst"
    config = tmp_path / "castlib.yaml"
    config.write_text(f"# the archive\nstorage:\n  {dst}:\n    colour: blue\n")
    proc = run_cli("sync", str(src), str(dst), db=db_url, env={"CASTLIB_CONFIG": str(config)})
    assert proc.returncode == 2, proc.stderr
    # the file and the line that set it, as for every other key of the file
    assert f"{config}:4: " in proc.stderr and "option colour: unknown option" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not dst.exists()


def test_a_wrong_option_a_pipeline_sets_does_not_blame_the_configuration_file(tmp_path,
                                                                              db_url):
    """An option from the pipeline's `locations:` over the configuration file's entry for
    the same place: its error names neither that file nor a line of it."""
    src = make_tree(tmp_path / "src", {"f": b"1"})
    dst = tmp_path / "dst"
    config = tmp_path / "castlib.yaml"
    config.write_text(f"storage:\n  {dst}:\n    colour: blue\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "locations": {"arch": {"url": str(dst), "options": {"colour": "red"}}},
        "stages": [{"index": {"location": str(src)}}, {"index": {"location": "arch"}}]}))
    proc = run_cli("run", str(pipeline), db=db_url, env={"CASTLIB_CONFIG": str(config)})
    assert proc.returncode == 2, proc.stderr
    assert "option colour: unknown option" in proc.stderr
    assert str(config) not in proc.stderr, proc.stderr


def test_an_option_to_a_back_end_that_takes_none_is_one_line_naming_it(tmp_path):
    """A local back-end takes no option (checked without pydantic): the same line as a
    back-end whose options are a model."""
    with pytest.raises(ConfigError) as err:
        open_backend(str(tmp_path), {"colour": "blue"})
    backend = open_backend(str(tmp_path), {})
    assert str(err.value) == f"{backend.url}: option colour: unknown option (known: none)"
    assert err.value.key == "colour" and backend.settings is None


@pytest.mark.parametrize("options", [
    {}, {"block_size": 1 << 20, "connect_timeout": 2, "known_hosts": None, "password": "p"},
    {"connect_timeout": 0.5, "client_keys": ["~/.ssh/id"]}, {"connect_timeout": float("inf")},
    {"block_size": 0}, {"block_size": "1048576"}, {"block_size": True}, {"block_size": 1.0},
    {"connect_timeout": 0}, {"connect_timeout": -1.5}, {"connect_timeout": "3"},
    {"connect_timeout": float("nan")}, {"connect_timeout": False}, {1: "x"},
], ids=str)
def test_options_plainly_right_are_read_as_the_model_reads_them(options):
    """FsspecBackend's options without pydantic (PlainSettings) give what FsspecOptions
    gives; what it leaves (None) the model converts or refuses."""
    from pydantic import ValidationError

    from castlib.backends.fsspec import FsspecOptions, PlainSettings

    plain = PlainSettings.read(options)
    try:
        model = FsspecOptions.model_validate(options)
    except ValidationError:
        model = None
    if plain is not None:
        assert model is not None
        for name in ("block_size", "connect_timeout", "model_extra"):
            got, want = getattr(plain, name), getattr(model, name)
            assert got == want and type(got) is type(want), name
    else:
        assert options   # the defaults are plain


def test_an_sftp_location_with_right_options_is_opened_without_pydantic():
    import subprocess
    import sys

    from tests.helpers import cli_env

    probe = ("import sys\nfrom castlib.backends import open_backend\n"
             "b = open_backend('sftp://u@h.example:2222/data', {'known_hosts': None, "
             "'connect_timeout': 3, 'password': 'p'})\n"
             "print(b.connect_timeout, b.block_size, sorted(b._storage_options))\n"
             "print(sorted(m for m in sys.modules if m.startswith('pydantic')))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       env=cli_env({}), check=True)
    assert r.stdout.splitlines() == ["3.0 8388608 ['known_hosts', 'password']", "[]"], r.stdout
    # a wrong one is still the model's one line
    with pytest.raises(ConfigError) as err:
        open_backend("sftp://u@h.example/data", {"connect_timeout": "soon"})
    assert str(err.value).startswith("sftp://h.example/data: option connect_timeout: "
                                     "Input should be a valid number")
