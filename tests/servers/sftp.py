"""A real SFTP server for tests: Debian's OpenSSH sshd on loopback, key login only.

Run as root (CI containers), sshd logs in an unprivileged user, `castlibtest`, created on
first use (useradd), so that permissions are real: root-owned folders are closed to it.
Run as anyone else, sshd runs as that user and logs in that same user. StrictModes is off
because the host key and authorized_keys live under the world-writable /tmp.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from .common import TEST_USER, answers_on, free_port, server_process, unprivileged_user

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass(frozen=True)
class SftpServer:
    host: str
    port: int
    user: str
    client_key: str          # private key file accepted by the server
    folder: Path             # the server's files live here (same machine)

    @property
    def url(self) -> str:
        return f"sftp://{self.user}@{self.host}:{self.port}{self.folder}"

    @property
    def options(self) -> dict:
        # host key checking off: the server's key is made up for this session
        return {"client_keys": [self.client_key], "known_hosts": None}


def _login_user() -> pwd.struct_passwd:
    """The account the tests log in as (made able to log in, when root)."""
    user = unprivileged_user()
    if os.geteuid() != 0:
        return user
    # password '*': no password login, yet not locked ('!', useradd's default), which
    # sshd refuses even for keys; and a shell, which runs the sftp subsystem
    change = ["--password", "*"]
    if user.pw_shell.endswith(("nologin", "false")):
        change += ["--shell", "/bin/sh"]
    subprocess.run(["usermod", *change, TEST_USER], check=True, capture_output=True)
    return pwd.getpwnam(TEST_USER)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "castlib-test",
                    "-f", str(path)], check=True)


def _sshd(sftp_args: str = "", max_sessions: int = 10, extra: str = ""):
    """sshd -D on 127.0.0.1 on a free port with its own host key and one client key;
    `sftp_args` go to its sftp-server (e.g. `-P symlink` to refuse links); at most
    `max_sessions` channels a connection (OpenSSH's default: 10); `extra`: more lines of
    sshd_config."""
    # not below pytest's private temporary tree: sshd reads authorized_keys as the user
    conf_dir = Path(tempfile.mkdtemp(prefix="castlib-sshd-"))
    os.chmod(conf_dir, 0o755)
    _keygen(conf_dir / "host_key")
    _keygen(conf_dir / "client_key")
    (conf_dir / "authorized_keys").write_text((conf_dir / "client_key.pub").read_text())
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation dir
    port = free_port()
    sftp_server = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server",
                                    "/usr/lib/ssh/sftp-server") if os.path.exists(p)), "internal-sftp")
    config = conf_dir / "sshd_config"
    config.write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {conf_dir / 'host_key'}
PidFile {conf_dir / 'sshd.pid'}
AuthorizedKeysFile {conf_dir / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
MaxStartups 50
MaxSessions {max_sessions}
LogLevel ERROR
Subsystem sftp {sftp_server} {sftp_args}
{extra}""")
    try:
        with server_process("sshd", [SSHD, "-D", "-e", "-f", str(config)],
                            conf_dir / "sshd.log", answers_on(port, b"SSH-")):
            yield SftpServer("127.0.0.1", port, _login_user().pw_name,
                             str(conf_dir / "client_key"), conf_dir)
    finally:
        shutil.rmtree(conf_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def sftp_server_session():
    """OpenSSH's sshd and sftp-server, as they come."""
    yield from _sshd()


# What a restricted server refuses: setting times (SSH_FX_PERMISSION_DENIED), and the
# atomic rename extension (not offered at all).
RESTRICTED_REQUESTS = "setstat,fsetstat,lsetstat,posix-rename"


@pytest.fixture(scope="session")
def sftp_restricted_session():
    """sshd whose sftp-server refuses set-stat and posix-rename (`-P`), as locked
    down or minimal servers do."""
    yield from _sshd(f"-P {RESTRICTED_REQUESTS}")


@pytest.fixture(scope="session")
def sftp_two_sessions_session():
    """sshd that opens at most two channels a connection (MaxSessions 2)."""
    yield from _sshd(max_sessions=2)


@pytest.fixture(scope="session")
def sftp_no_exec_session():
    """sshd that runs no commands: every session is its sftp-server (ForceCommand
    internal-sftp), as on hosts that offer SFTP and nothing else."""
    yield from _sshd(extra="ForceCommand internal-sftp\n")


@pytest.fixture(scope="session")
def sftp_chatty_session():
    """sshd whose login writes to stdout before the sftp subsystem starts, as a .bashrc
    that echoes a greeting does (the sftp subsystem runs through the user's shell)."""
    sftp_server = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server",
                                    "/usr/lib/ssh/sftp-server") if os.path.exists(p)), None)
    if sftp_server is None:
        pytest.fail("OpenSSH's sftp-server is not installed (openssh-server)")
    yield from _sshd(extra=f"ForceCommand echo Welcome to the machine; exec {sftp_server}\n")


@pytest.fixture
def sftp_chatty_server(sftp_chatty_session) -> SftpServer:
    yield from _fresh_folder(sftp_chatty_session)


@pytest.fixture
def sftp_no_exec_server(sftp_no_exec_session) -> SftpServer:
    yield from _fresh_folder(sftp_no_exec_session)


@pytest.fixture
def sftp_two_sessions_server(sftp_two_sessions_session) -> SftpServer:
    yield from _fresh_folder(sftp_two_sessions_session)


def _fresh_folder(session: SftpServer) -> Iterator[SftpServer]:
    """The session's server, with a fresh folder for one test, owned by the login user and
    outside pytest's private temporary tree, which it cannot enter."""
    user = pwd.getpwnam(session.user)
    folder = Path(tempfile.mkdtemp(prefix="castlib-sftp-"))
    os.chmod(folder, 0o755)
    os.chown(folder, user.pw_uid, user.pw_gid)
    try:
        yield SftpServer(session.host, session.port, session.user, session.client_key, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sftp_restricted_server(sftp_restricted_session) -> SftpServer:
    """The restricted server, with a fresh folder for this test."""
    yield from _fresh_folder(sftp_restricted_session)


@pytest.fixture
def sftp_server(sftp_server_session) -> SftpServer:
    """The session's sshd, with a fresh folder for this test (`.folder`, in `.url`), owned
    by the login user and outside pytest's private temporary tree, which it cannot enter."""
    yield from _fresh_folder(sftp_server_session)
