"""`castlib web`: refusals are one line and exit 2, before anything listens."""
import os
import socket

import httpx

from tests.helpers import make_tree, run_cli


def test_a_missing_or_empty_token_file_is_refused(tmp_path):
    r = run_cli("web", "--token-file", str(tmp_path / "nope"), "--port", "1", timeout=60)
    assert r.returncode == 2 and "cannot read the token file" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    from tests.web.conftest import write_token_file

    write_token_file(tmp_path / "empty", "\n")
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



def _server_of_a_catalog(tmp_path, web_server, args=()) -> tuple[str, str]:
    db = f"sqlite:///{tmp_path / 'c.sqlite'}"
    run_cli("index", str(make_tree(tmp_path / "t", {"secret-name.dat": b"x"})), db=db,
            check=0)
    base = web_server(db, args=args)
    return base, base.rsplit(":", 1)[1]


def _refused(http, host: str) -> None:
    for path in ("/api/v1/locations", "/locations", "/api/v1/runs"):
        r = http.get(path, headers={"Host": host})
        assert r.status_code == 400, (host, path, r.text)
        assert "secret-name" not in r.text and "does not answer" in r.text


def test_a_request_for_another_host_name_is_refused(tmp_path, web_server):
    """DNS rebinding: a page of evil.example whose name then resolves to 127.0.0.1 reads
    the server as its own origin, but its requests say `Host: evil.example`."""
    base, port = _server_of_a_catalog(tmp_path, web_server)
    with httpx.Client(base_url=base, timeout=60) as http:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                     "localhost.evil.example:80", ""):
            _refused(http, host)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", "[::1]:80"):
            r = http.get("/api/v1/locations", headers={"Host": host})
            assert r.status_code == 200 and "secret-name" not in r.text, (host, r.text)


def test_allow_host_names_what_a_proxy_sends(tmp_path, web_server):
    base, port = _server_of_a_catalog(tmp_path, web_server,
                                      args=("--allow-host", "castlib.example.org"))
    with httpx.Client(base_url=base, timeout=60) as http:
        _refused(http, "castlib.example.org.evil.example")
        _refused(http, "evil.example")
        for host in ("castlib.example.org", f"CASTLIB.example.org:{port}",
                     f"127.0.0.1:{port}"):
            r = http.get("/api/v1/locations", headers={"Host": host})
            assert r.status_code == 200, (host, r.text)


def _refused_in_one_line(r, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_a_token_file_others_may_read_or_write_is_refused(tmp_path):
    """As OpenSSH refuses a private key: the token lets its holder start syncs and
    deletions. The line names the file, what is wrong and the fix; nothing listens."""
    from tests.web.conftest import write_token_file

    token = tmp_path / "token"
    write_token_file(token, "s3cret\n")
    for mode, words in ((0o644, "is readable by its group and others (mode 0644)"),
                        (0o640, "is readable by its group (mode 0640)"),
                        (0o602, "is writable by others (mode 0602)"),
                        (0o660, "is readable and writable by its group (mode 0660)")):
        os.chmod(token, mode)
        r = run_cli("web", "--token-file", str(token), "--port", "1", timeout=60)
        _refused_in_one_line(r, f"castlib: error: {token}: the token file {words}; chmod 600 it")
        assert "s3cret" not in r.stderr


def test_a_token_file_that_is_not_a_regular_file_is_refused(tmp_path):
    """A FIFO would hold the server at open() until something wrote to it; a device, a
    folder or a link to one is no place for a token."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o600)
    (tmp_path / "link").symlink_to("/dev/null")
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    for path, kind in ((fifo, "a FIFO"), (tmp_path / "link", "a character device"),
                       (folder, "a folder")):
        r = run_cli("web", "--token-file", str(path), "--port", "1", timeout=30)
        _refused_in_one_line(r, f"{path}: the token file is not a regular file ({kind})")


def test_a_token_file_of_another_user_is_refused(tmp_path):
    """Its owner could rewrite the token, or open the file to all, whenever they like:
    even root does not take another user's token file (mode 600 or not)."""
    from tests.web.conftest import write_token_file

    token = tmp_path / "token"
    write_token_file(token, "s3cret\n")
    if os.geteuid() == 0:
        os.chown(token, 65534, 65534)
        r = run_cli("web", "--token-file", str(token), "--port", "1", timeout=60)
        _refused_in_one_line(r, f"{token}: the token file belongs to ", "(uid 65534), not to ",
                             "(uid 0) who runs the server; chown it")
    else:   # a plain user cannot give a file away: their own, mode 600, passes the checks
        r = run_cli("web", "--token-file", str(token), "--port", "1", timeout=60)
        assert "the token file" not in r.stderr, r.stderr
