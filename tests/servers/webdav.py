"""A real WebDAV server for tests: WsgiDAV on cheroot over a temporary folder, basic auth."""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from .common import free_port

USER = "davuser"


@dataclass(frozen=True)
class WebdavServer:
    host: str
    port: int
    user: str
    password: str
    root: Path               # what the server serves at /
    folder: str = ""         # this test's folder below the root

    @property
    def url(self) -> str:
        return f"webdav://{self.host}:{self.port}/{self.folder}"

    @property
    def options(self) -> dict:
        return {"user": self.user, "password": self.password}

    @property
    def path(self) -> Path:
        return self.root / self.folder


@pytest.fixture(scope="session")
def webdav_server_session(tmp_path_factory):
    from cheroot import wsgi
    from wsgidav.wsgidav_app import WsgiDAVApp

    root = tmp_path_factory.mktemp("webdav")
    password = secrets.token_urlsafe(12)
    port = free_port()
    app = WsgiDAVApp({
        "host": "127.0.0.1",
        "port": port,
        "provider_mapping": {"/": str(root)},
        "simple_dc": {"user_mapping": {"*": {USER: {"password": password}}}},
        "http_authenticator": {"accept_basic": True, "accept_digest": False,
                               "default_to_digest": False},
        "verbose": 0,
        "logging": {"enable_loggers": []},
        "property_manager": True,
        "lock_storage": True,
    })
    server = wsgi.Server(("127.0.0.1", port), app, numthreads=8)
    server.prepare()   # binds now: the port is listening when the fixture yields
    thread = threading.Thread(target=server.serve, daemon=True, name="webdav-server")
    thread.start()
    try:
        yield WebdavServer("127.0.0.1", port, USER, password, root)
    finally:
        server.stop()
        thread.join(10)


@pytest.fixture
def webdav_server(webdav_server_session) -> WebdavServer:
    """The session's server, with a fresh folder for this test (`.folder`, in `.url`)."""
    folder = f"t-{secrets.token_hex(6)}"
    (webdav_server_session.root / folder).mkdir()
    s = webdav_server_session
    return WebdavServer(s.host, s.port, s.user, s.password, s.root, folder)
