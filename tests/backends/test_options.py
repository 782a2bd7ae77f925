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


def test_a_wrong_option_in_the_config_file_stops_the_cli_with_exit_2(tmp_path, db_url):
    src = make_tree(tmp_path / "src", {"f": b"1"})
    dst = tmp_path / "dst"
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {str(dst): {"colour": "blue"}}}))
    proc = run_cli("sync", str(src), str(dst), db=db_url, env={"CASTLIB_CONFIG": str(config)})
    assert proc.returncode == 2, proc.stderr
    assert "option colour: unknown option" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not dst.exists()


def test_an_option_to_a_back_end_that_takes_none_is_one_line_naming_it(tmp_path):
    """A local back-end takes no option (checked without pydantic): the same line as a
    back-end whose options are a model."""
    with pytest.raises(ConfigError) as err:
        open_backend(str(tmp_path), {"colour": "blue"})
    backend = open_backend(str(tmp_path), {})
    assert str(err.value) == f"{backend.url}: option colour: unknown option (known: none)"
    assert err.value.key == "colour" and backend.settings is None
