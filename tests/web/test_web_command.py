"""`castlib web`: refusals are one line and exit 2, before anything listens."""
import socket

from tests.helpers import run_cli


def test_a_missing_or_empty_token_file_is_refused(tmp_path):
    r = run_cli("web", "--token-file", str(tmp_path / "nope"), "--port", "1", timeout=60)
    assert r.returncode == 2 and "cannot read the token file" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").write_text("\n")
    r = run_cli("web", "--token-file", str(tmp_path / "empty"), timeout=60)
    assert r.returncode == 2 and "the token file is empty" in r.stderr


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("web", "--port", str(port), timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_pipeline_folder_that_is_not_one(tmp_path):
    r = run_cli("web", "--pipelines", str(tmp_path / "none"), timeout=60)
    assert r.returncode == 2 and "not a folder" in r.stderr
