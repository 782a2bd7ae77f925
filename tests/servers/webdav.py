"""A real WebDAV server for tests: WsgiDAV on cheroot over a temporary folder, basic auth;
a second one over TLS (davs://) with a self-signed certificate made for the session."""
from __future__ import annotations

import datetime
import ipaddress
import logging
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from .common import FolderPerTest, free_port

USER = "davuser"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebdavServer(FolderPerTest):
    host: str
    port: int
    user: str
    password: str
    root: Path               # what the server serves at /
    folder: str = ""         # this test's folder below the root
    ca_file: str | None = None   # set for the TLS server: the certificate to trust

    @property
    def url(self) -> str:
        scheme = "davs" if self.ca_file else "webdav"
        return f"{scheme}://{self.host}:{self.port}/{self.folder}"

    @property
    def options(self) -> dict:
        options = {"user": self.user, "password": self.password}
        if self.ca_file:
            options["verify"] = self.ca_file   # passed on to the HTTP client
        return options


def _self_signed_certificate(folder: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def _serve(tmp_path_factory, tls: bool):
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
    # cheroot prints every dropped connection (tests drop some on purpose): to the log only
    server.error_log = lambda msg="", level=20, traceback=False: log.debug("cheroot: %s", msg)
    ca_file = None
    if tls:
        from cheroot.ssl.builtin import BuiltinSSLAdapter

        ca_file, key_file = _self_signed_certificate(tmp_path_factory.mktemp("webdav-tls"))
        server.ssl_adapter = BuiltinSSLAdapter(ca_file, key_file)
    server.prepare()   # binds now: the port is listening when the fixture yields
    thread = threading.Thread(target=server.serve, daemon=True, name="webdav-server")
    thread.start()
    try:
        yield WebdavServer("127.0.0.1", port, USER, password, root, "", ca_file)
    finally:
        server.stop()
        thread.join(10)


@pytest.fixture(scope="session")
def webdav_server_session(tmp_path_factory):
    """WsgiDAV over plain HTTP on 127.0.0.1, a free port, for the whole session."""
    yield from _serve(tmp_path_factory, tls=False)


@pytest.fixture(scope="session")
def webdavs_server_session(tmp_path_factory):
    """WsgiDAV over HTTPS, with a self-signed certificate (`.ca_file`)."""
    yield from _serve(tmp_path_factory, tls=True)


@pytest.fixture
def webdav_server(webdav_server_session) -> WebdavServer:
    """The session's server, with a fresh folder for this test (`.folder`, in `.url`)."""
    return webdav_server_session.for_test()


@pytest.fixture
def webdavs_server(webdavs_server_session) -> WebdavServer:
    """The TLS server, with a fresh folder for this test."""
    return webdavs_server_session.for_test()
