"""rclone's own servers for tests: `rclone serve sftp` and `rclone serve webdav` over a
temporary folder, each on a free loopback port, password login, one per session.

They are other implementations of the protocols than OpenSSH's sftp-server and WsgiDAV
(Go's pkg/sftp and golang.org/x/net/webdav, behind rclone's VFS), with their own gaps:
`rclone serve sftp` refuses symbolic links (SSH_FX_OP_UNSUPPORTED) and serves at most
16 KiB a read request, so castlib's remote tests run against them too.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from .common import FolderPerTest, answers_on, free_port, server_process
from .webdav import WebdavServer

RCLONE = shutil.which("rclone") or "/usr/bin/rclone"
USER = "castlib"


@dataclass(frozen=True)
class RcloneSftpServer(FolderPerTest):
    host: str
    port: int
    user: str
    password: str
    root: Path               # what the server serves at /
    folder: str = ""         # this test's folder below the root

    @property
    def url(self) -> str:
        return f"sftp://{self.user}@{self.host}:{self.port}/{self.folder}"

    @property
    def options(self) -> dict:
        # host key checking off: the server's key is made up for this session
        return {"password": self.password, "known_hosts": None}


def _serve(tmp_path_factory, what: str, host: str = "127.0.0.1"):
    """rclone serve WHAT on host (127.0.0.1, or ::1) at a free port over a fresh folder;
    (port, password, root).
    No directory cache: tests look at and change the folder behind the server's back."""
    root = tmp_path_factory.mktemp(f"rclone-{what}")
    conf = Path(tempfile.mkdtemp(prefix=f"castlib-rclone-{what}-"))
    password = secrets.token_urlsafe(12)
    port = free_port()
    argv = [RCLONE, "serve", what, str(root), "--addr", f"[{host}]:{port}" if ":" in host else f"{host}:{port}", "--user", USER,
            "--pass", password, "--dir-cache-time", "0s", "--poll-interval", "0",
            "--config", str(conf / "rclone.conf"), "--cache-dir", str(conf / "cache"),
            "--log-level", "ERROR"]
    if what == "sftp":   # a host key of its own, not one generated into ~/.cache/rclone
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(conf / "host_key")], check=True)
        argv += ["--key", str(conf / "host_key")]
    env = dict(os.environ, RCLONE_CONFIG=str(conf / "rclone.conf"))
    try:
        with server_process(f"rclone serve {what}", argv, conf / "rclone.log",
                            answers_on(port, b"SSH-" if what == "sftp" else None, host=host),
                            env=env):
            yield port, password, root
    finally:
        shutil.rmtree(conf, ignore_errors=True)


@pytest.fixture(scope="session")
def rclone_sftp_session(tmp_path_factory):
    for port, password, root in _serve(tmp_path_factory, "sftp"):
        yield RcloneSftpServer("127.0.0.1", port, USER, password, root)


@pytest.fixture(scope="session")
def rclone_webdav_session(tmp_path_factory):
    for port, password, root in _serve(tmp_path_factory, "webdav"):
        yield WebdavServer("127.0.0.1", port, USER, password, root)


@pytest.fixture(scope="session")
def rclone_sftp_ipv6_session(tmp_path_factory):
    """`rclone serve sftp` on the IPv6 loopback [::1] (skipped where it has no ::1)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    for port, password, root in _serve(tmp_path_factory, "sftp", host="::1"):
        yield RcloneSftpServer("[::1]", port, USER, password, root)


@pytest.fixture
def rclone_sftp_server(rclone_sftp_session) -> RcloneSftpServer:
    """The session's `rclone serve sftp`, with a fresh folder for this test (in `.url`)."""
    return rclone_sftp_session.for_test()


@pytest.fixture
def rclone_webdav_server(rclone_webdav_session) -> WebdavServer:
    """The session's `rclone serve webdav`, with a fresh folder for this test."""
    return rclone_webdav_session.for_test()
