"""OpenSSH's `ssh` as the way to an SSH host (castlib/backends/ssh_command.py): its argv and
environment log in to real servers (OpenSSH's sshd with a key, `rclone serve sftp` with a
password) and speak SFTP, and its failures read as castlib's one-line errors."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from castlib.backends import open_backend
from castlib.backends import ssh_dialer
from castlib.backends.ssh_command import ControlConnection, SshCommand, SshHostKeyNotTrusted
from castlib.errors import ConfigError
from castlib.location import LocationURL, parse_location
from tests.servers.common import free_port

pytestmark = pytest.mark.skipif(SshCommand.available() is None, reason="no ssh here")

SFTP_INIT = b"\x00\x00\x00\x05\x01\x00\x00\x00\x03"   # SSH_FXP_INIT, version 3
TIMEOUT_S = 60   # generous: the machine is shared


@pytest.fixture(autouse=True)
def no_ssh_left_behind():
    """Every ssh a test starts (each in a session of its own, as the back-end starts
    them) has ended with everything it started, askpass included, when the test ends."""
    sessions: list[int] = []
    yield sessions
    left = {pid: sid for pid, sid in _process_sessions() if sid in sessions}
    for sid in set(left.values()):   # a failing test's ssh ends here all the same
        try:
            os.killpg(sid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind: {sorted(left)}"


def _process_sessions():
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:   # ended meanwhile
                continue
            # after the command's "(name)": state, ppid, pgrp, session
            yield int(entry), int(stat.rsplit(")", 1)[1].split()[3])


def start(argv_env, sessions) -> subprocess.Popen:
    """Start ssh as the back-end does: a session of its own, pipes, no terminal."""
    argv, env = argv_env
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    sessions.append(proc.pid)
    return proc


def finish(proc: subprocess.Popen, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    """Give ssh the rest of its input and wait for its end: (status, stdout, stderr)."""
    try:
        out, err = proc.communicate(stdin, timeout=TIMEOUT_S)   # its input ends here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def run(argv_env, sessions) -> tuple[int, bytes, bytes]:
    return finish(start(argv_env, sessions))


def speak_sftp(ssh: SshCommand, sessions, argv_env=None) -> tuple[int, bytes, bytes]:
    """Log in, open the SFTP subsystem, send INIT and read the answer, then end the input:
    (status, the answer, stderr). The input stays open until the answer came, as a client
    keeps it: sftp-server ends at the end of its input without writing what it owes."""
    proc = start(argv_env or ssh.subsystem(), sessions)
    answer = b""
    try:
        proc.stdin.write(SFTP_INIT)
        proc.stdin.flush()
        deadline = time.monotonic() + TIMEOUT_S
        while len(answer) < 4 or len(answer) < 4 + int.from_bytes(answer[:4], "big"):
            if not select.select([proc.stdout], [], [],
                                 max(0, deadline - time.monotonic()))[0]:
                break   # no answer in time: what ssh says tells why
            more = os.read(proc.stdout.fileno(), 65536)
            if not more:
                break
            answer += more
    except BrokenPipeError:   # ssh gave up before it read a word: its stderr says why
        pass
    finally:
        status, rest, err = finish(proc)
    return status, answer + rest, err


def sftp_version(ssh: SshCommand, sessions) -> int:
    """The SFTP version the server answers INIT with, through ssh."""
    status, out, err = speak_sftp(ssh, sessions)
    assert len(out) >= 9, (status, err, str(ssh.failure(status, err)))
    assert out[4] == 2, out   # SSH_FXP_VERSION
    return int.from_bytes(out[5:9], "big")


def failure_message(ssh: SshCommand, url: str, options: dict, sessions) -> str:
    """The one line castlib says for the failure of ssh's login (through the SFTP back-end's
    own error translation)."""
    status, out, err = speak_sftp(ssh, sessions)
    assert status == 255 and not out, (status, out, err)
    return str(open_backend(url, options).translate(ssh.failure(status, err), ""))


def ssh_for(server, options: dict | None = None) -> SshCommand:
    """The ssh command for a fixture's server, with its options or these."""
    return SshCommand(parse_location(server.url),
                      server.options if options is None else options, 20)


def host_key_line(server) -> str:
    """The OpenSSH fixture's host key as a known_hosts line."""
    key = (Path(server.client_key).parent / "host_key.pub").read_text().split()[:2]
    return f"[{server.host}]:{server.port} {' '.join(key)}\n"


# -- logging in --------------------------------------------------------------------------
def test_key_login_to_openssh_speaks_sftp(sftp_server, no_ssh_left_behind):
    ssh = ssh_for(sftp_server)
    assert sftp_version(ssh, no_ssh_left_behind) == 3
    argv, env = ssh.subsystem()
    assert argv[-3:] == ["--", "127.0.0.1", "sftp"] and "BatchMode=yes" in argv


def with_user_config(argv_env, config: Path):
    """The command as if `config` were the user's ~/.ssh/config."""
    argv, env = argv_env
    return [argv[0], "-F", str(config), *argv[1:]], env


def test_the_command_line_wins_over_the_users_config(sftp_server, tmp_path,
                                                     no_ssh_left_behind):
    """A user's ~/.ssh/config still applies, but cannot make ssh write into the SFTP
    stream (LocalCommand), run another command, ask, or take a host key unchecked."""
    config = tmp_path / "config"
    config.write_text(f"""\
Host *
  PermitLocalCommand yes
  LocalCommand echo this would corrupt the stream
  RemoteCommand echo neither would this
  RequestTTY force
  ForwardAgent yes
  StrictHostKeyChecking accept-new
  UserKnownHostsFile {tmp_path / "known_hosts"}
""")
    ssh = ssh_for(sftp_server)
    status, out, err = speak_sftp(ssh, no_ssh_left_behind,
                                  with_user_config(ssh.subsystem(), config))
    assert out[4:9] == b"\x02\x00\x00\x00\x03", (out, err)   # VERSION 3, first thing
    checked = ssh_for(sftp_server, {"client_keys": [sftp_server.client_key]})   # ssh's files
    status, out, err = speak_sftp(checked, no_ssh_left_behind,
                                  with_user_config(checked.subsystem(), config))
    assert status == 255 and isinstance(checked.failure(status, err), SshHostKeyNotTrusted)
    assert not (tmp_path / "known_hosts").exists()   # not added either


def test_key_file_with_an_odd_path(sftp_server, tmp_path, no_ssh_left_behind):
    """ssh expands %-tokens in a key's path and parts names at blanks: a '%', a blank,
    quotes and a backslash of the name are kept as they are."""
    odd = tmp_path / "my \"keys\" 'k' %d \\"
    odd.mkdir()
    shutil.copy(sftp_server.client_key, odd / "id %h")
    ssh = ssh_for(sftp_server, {"client_keys": str(odd / "id %h"), "known_hosts": None})
    assert sftp_version(ssh, no_ssh_left_behind) == 3


def test_password_login_by_askpass(rclone_sftp_server, monkeypatch, no_ssh_left_behind):
    """The password reaches ssh through askpass, without a display (SSH_ASKPASS_REQUIRE
    =force), and is in neither the command line nor the helper's file."""
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    ssh = ssh_for(rclone_sftp_server)
    try:
        assert sftp_version(ssh, no_ssh_left_behind) == 3
        argv, env = ssh.subsystem()
        password = rclone_sftp_server.password
        assert password not in " ".join(argv) and "BatchMode=no" in argv
        assert password not in Path(env["SSH_ASKPASS"]).read_text()
        assert "DISPLAY" not in env
    finally:
        ssh.close()


def test_password_in_the_url(rclone_sftp_server, no_ssh_left_behind):
    s = rclone_sftp_server
    url = parse_location(f"sftp://{s.user}:{s.password}@{s.host}:{s.port}/{s.folder}")
    ssh = SshCommand(url, {"known_hosts": None}, 20)
    try:
        assert sftp_version(ssh, no_ssh_left_behind) == 3
    finally:
        ssh.close()


def test_ipv6_literal(rclone_sftp_ipv6_session, no_ssh_left_behind):
    server = rclone_sftp_ipv6_session.for_test()
    ssh = ssh_for(server)
    try:
        assert ssh.subsystem()[0][-2] == "::1"   # bare: ssh wants no brackets
        assert sftp_version(ssh, no_ssh_left_behind) == 3
    finally:
        ssh.close()


def test_passphrase_protected_key(sftp_server, tmp_path, no_ssh_left_behind):
    key = tmp_path / "id_protected"
    shutil.copy(sftp_server.client_key, key)
    subprocess.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", "secret words", "-f", str(key)],
                   check=True, capture_output=True)
    options = {"client_keys": [str(key)], "known_hosts": None}
    without = ssh_for(sftp_server, options)
    assert "authentication failed" in failure_message(without, sftp_server.url, options,
                                                      no_ssh_left_behind)
    ssh = ssh_for(sftp_server, {**options, "passphrase": "secret words"})
    try:
        assert sftp_version(ssh, no_ssh_left_behind) == 3
    finally:
        ssh.close()


def test_askpass_answers_each_prompt_with_its_secret(rclone_sftp_server):
    """A key's passphrase goes to ssh's own prompt for it only; a server's prompt (which
    ssh shows as "(user@host) ...") gets the password, whatever it says."""
    nasty = "p a'ss\"w$(o)`r`d %s\\ -n"
    ssh = SshCommand(parse_location(rclone_sftp_server.url),
                     {"password": nasty, "passphrase": "the phrase"}, 20)
    try:
        argv, env = ssh.subsystem()

        def answer(prompt: str) -> str:
            return subprocess.run([env["SSH_ASKPASS"], prompt], env=env, check=True,
                                  capture_output=True, text=True).stdout

        assert answer("Enter passphrase for key '/k': ") == "the phrase\n"
        assert answer("castlib@127.0.0.1's password: ") == nasty + "\n"
        assert answer("(castlib@127.0.0.1) Enter passphrase for key:") == nasty + "\n"
    finally:
        ssh.close()


def test_close_removes_the_askpass_folder(rclone_sftp_server):
    ssh = ssh_for(rclone_sftp_server)
    argv, env = ssh.subsystem()
    folder = Path(env["SSH_ASKPASS"]).parent
    assert folder.stat().st_mode & 0o777 == 0o700
    assert Path(env["SSH_ASKPASS"]).stat().st_mode & 0o777 == 0o700
    assert ssh.subsystem()[1]["SSH_ASKPASS"] == env["SSH_ASKPASS"]   # made once
    ssh.close()
    assert not folder.exists()
    ssh.close()   # again: nothing to do


def test_a_command_used_after_close_logs_in_again(rclone_sftp_server, no_ssh_left_behind):
    """A back-end whose connection dropped is given up and connects anew with the same
    command, whose askpass helper the connection's close may have removed: it is made
    again, and the password still logs in (was: "authentication failed" after a cut)."""
    ssh = ssh_for(rclone_sftp_server)
    ssh.close()
    try:
        assert sftp_version(ssh, no_ssh_left_behind) == 3
        helper = Path(ssh.subsystem()[1]["SSH_ASKPASS"])
        assert helper.exists()
    finally:
        ssh.close()
    assert not helper.exists()


# -- host keys ---------------------------------------------------------------------------
def test_known_hosts_file_with_the_key(sftp_server, tmp_path, no_ssh_left_behind):
    folder = tmp_path / "known \"hosts\" 'x' %d \\"   # ssh_config quoting and %-tokens
    folder.mkdir()
    (folder / "kh").write_text(host_key_line(sftp_server))
    ssh = ssh_for(sftp_server, {"client_keys": sftp_server.client_key,
                                "known_hosts": [str(tmp_path / "absent"), str(folder / "kh")]})
    assert sftp_version(ssh, no_ssh_left_behind) == 3


@pytest.mark.parametrize("known", ["other host", "changed", "default files", "no file"])
def test_known_hosts_without_the_key(sftp_server, tmp_path, known, no_ssh_left_behind):
    line = host_key_line(sftp_server)
    client_key = (Path(sftp_server.client_key).with_suffix(".pub")).read_text().split()
    files = {
        "other host": line.replace(f"[{sftp_server.host}]", "[10.1.2.3]"),
        "changed": line.split()[0] + " " + " ".join(client_key[:2]) + "\n",
    }
    options: dict = {"client_keys": [sftp_server.client_key]}
    if known in files:
        (tmp_path / "kh").write_text(files[known])
        options["known_hosts"] = str(tmp_path / "kh")
    elif known == "no file":
        options["known_hosts"] = []   # as asyncssh: no key trusted
    message = failure_message(ssh_for(sftp_server, options), sftp_server.url, options,
                              no_ssh_left_behind)
    assert "host key not trusted" in message and "\n" not in message
    if known == "changed":
        assert "it has changed since" in message and str(tmp_path / "kh") in message
    if known in files:   # ssh checked the file and left it alone
        assert (tmp_path / "kh").read_text() == files[known]


# -- failures ----------------------------------------------------------------------------
def test_broken_user_config_is_not_a_lost_connection(sftp_server, tmp_path,
                                                     no_ssh_left_behind):
    """A ~/.ssh/config ssh refuses is said as such, and not retried as a dropped line."""
    config = tmp_path / "config"
    config.write_text("Host *\n  NoSuchOption yes\n")
    ssh = ssh_for(sftp_server)
    status, out, err = speak_sftp(ssh, no_ssh_left_behind,
                                  with_user_config(ssh.subsystem(), config))
    error = open_backend(sftp_server.url, sftp_server.options).translate(
        ssh.failure(status, err), "")
    assert "ssh configuration error (" in str(error), error
    assert "config: line 2: Bad configuration option" in str(error), error
    assert not error.transient


@pytest.mark.parametrize("line, said", [("Hostname %z", "unknown key %z"),
                                        ("IdentityFile ${CASTLIB_NO_SUCH_VAR}",
                                         "env var ${CASTLIB_NO_SUCH_VAR} has no value")])
def test_a_token_ssh_cannot_expand_is_a_configuration_error(sftp_server, users_config,
                                                            line, said, no_ssh_left_behind):
    """A %-token or ${VAR} in ~/.ssh/config that ssh cannot expand: refused by ssh, said as
    a configuration error (not retried as a line that dropped)."""
    users_config.write_text(f"Host *\n  {line}\n")
    ssh = ssh_for(sftp_server)
    argv_env, connection = master_argv(ssh)
    try:
        status, out, err = speak_sftp(ssh, no_ssh_left_behind, argv_env)
    finally:
        connection.close()
    error = open_backend(sftp_server.url, sftp_server.options).translate(
        ssh.failure(status, err), "")
    assert "ssh configuration error (" in str(error) and said in str(error), (error, err)
    assert not error.transient


def test_wrong_password(rclone_sftp_server, no_ssh_left_behind):
    wrong = "wrong-" + rclone_sftp_server.password
    options = {"password": wrong, "known_hosts": None}
    ssh = ssh_for(rclone_sftp_server, options)
    try:
        message = failure_message(ssh, rclone_sftp_server.url, options, no_ssh_left_behind)
    finally:
        ssh.close()
    assert "authentication failed" in message and wrong not in message, message
    # and should ssh ever say it (a ProxyCommand's words, say), it is not repeated
    said = f"castlib@127.0.0.1: Permission denied for {wrong} (password).".encode()
    assert wrong not in str(ssh.failure(255, said))


def test_key_refused(sftp_server, tmp_path, no_ssh_left_behind):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    options = {"client_keys": [str(tmp_path / "k")], "known_hosts": None}
    message = failure_message(ssh_for(sftp_server, options), sftp_server.url, options,
                              no_ssh_left_behind)
    assert ": authentication failed (Permission denied (publickey))" in message, message


def test_connection_refused(no_ssh_left_behind):
    url = f"sftp://someone@127.0.0.1:{free_port()}/x"
    message = failure_message(SshCommand(parse_location(url), {}, 20), url, {},
                              no_ssh_left_behind)
    assert "connection refused" in message, message


def test_name_that_does_not_resolve(no_ssh_left_behind):
    url = "sftp://someone@no-such-host.castlib.invalid/x"
    message = failure_message(SshCommand(parse_location(url), {}, 20), url, {},
                              no_ssh_left_behind)
    assert "host unreachable" in message, message


def test_connect_timeout(no_ssh_left_behind):
    """A host that takes the connection and never greets: ssh gives up at the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)   # the kernel accepts; nobody speaks
        url = f"sftp://someone@127.0.0.1:{silent.getsockname()[1]}/x"
        message = failure_message(SshCommand(parse_location(url), {}, 1), url, {},
                                  no_ssh_left_behind)
    assert "timed out" in message, message


def test_connection_closed_at_once(no_ssh_left_behind):
    """A host that hangs up before it says a word: the line was lost, in ssh's words."""
    with socket.socket() as rude:
        rude.bind(("127.0.0.1", 0))
        rude.listen(1)

        def hang_up():
            conn, _ = rude.accept()
            conn.close()

        hanging_up = threading.Thread(target=hang_up)
        hanging_up.start()
        url = f"sftp://someone@127.0.0.1:{rude.getsockname()[1]}/x"
        ssh = SshCommand(parse_location(url), {}, 20)
        status, out, err = speak_sftp(ssh, no_ssh_left_behind)
        hanging_up.join()
    error = open_backend(url, {}).translate(ssh.failure(status, err), "")
    # closed, or reset when ssh's own greeting was still unread
    assert re.search(r"/x: connection lost \(Connection (closed|reset)", str(error)), error
    assert error.transient


# -- what is refused before anything runs --------------------------------------------------
@pytest.mark.parametrize("host, user, options", [
    ("-oProxyCommand=touch MARK", None, {}),
    ("example.org", "-oProxyCommand=touch MARK", {}),
    ("example.org", None, {"username": "-oProxyCommand=touch MARK"}),
    ("example.org", "a;touch MARK", {}),   # a user's ProxyCommand %r runs in a shell
    ("exa mple.org", None, {}),
    ("example.org\n", None, {}),
    ("user@example.org", None, {}),
])
def test_host_or_user_that_would_be_an_option_is_refused(host, user, options):
    with pytest.raises(ConfigError, match="host|user"):
        SshCommand(LocationURL("sftp", host, "/", user), options, 20)


def test_option_ssh_cannot_carry_is_named():
    options = {"agent_path": "/x", "password": "two\nlines", "client_keys": [b"raw"],
               "known_hosts": None, "port": 22}
    assert SshCommand.untranslatable(options) == ["agent_path", "password", "client_keys"]
    with pytest.raises(ConfigError, match="^agent_path: "):
        SshCommand(parse_location("sftp://h/x"), options, 20)
    with pytest.raises(ConfigError, match="client_keys: no key file"):
        SshCommand(parse_location("sftp://h/x"), {"client_keys": "/no/such/key"}, 20)


# -- remote commands ---------------------------------------------------------------------
def test_command_quotes_any_name(sftp_server, no_ssh_left_behind):
    name = "-a b'c\"d\ne $(x) " + os.fsdecode(b"\xff")   # not UTF-8 either
    content = os.urandom(1000)
    (sftp_server.folder / name).write_bytes(content)
    path = f"{sftp_server.folder}/{name}"
    ssh = ssh_for(sftp_server)
    status, out, err = run(ssh.command(["md5sum", "--", path]), no_ssh_left_behind)
    assert status == 0, err
    # md5sum marks a line whose name it had to escape (the line break) with a backslash
    assert out.lstrip(b"\\")[:32].decode() == hashlib.md5(content).hexdigest()
    status, out, err = run(ssh.command(["md5sum", "--", path + "-gone"]), no_ssh_left_behind)
    failure = ssh.failure(status, err)
    assert status == 1 and "exit status 1" in str(failure), (status, err)
    with pytest.raises(ValueError):
        ssh.command([])


# -- the dialer: ssh's TCP connection, made with TCP_NODELAY (ssh_dialer.py) -----------------
def master_argv(ssh: SshCommand):
    """The master's argv and environment, as a back-end starts it (the dialer's options
    in it where they apply), and its connection, to close."""
    connection = ControlConnection(ssh)
    return connection.session(master=True), connection


def dialed(port: int, *args: str) -> socket.socket:
    """The socket ssh_dialer.py hands over for 127.0.0.1:port, as ssh receives it."""
    ours, its = socket.socketpair()
    with ours, its:
        proc = subprocess.run([sys.executable, "-I", "-S", ssh_dialer.__file__, "127.0.0.1",
                               str(port), *(args or ("any", "10", "yes"))],
                              stdout=its, stderr=subprocess.PIPE, timeout=TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    return socket.socket(fileno=fds[0])


def test_the_dialer_hands_ssh_a_connection_with_nodelay(sftp_server):
    with dialed(sftp_server.port) as conn:
        assert conn.getpeername() == ("127.0.0.1", sftp_server.port)
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)   # TCPKeepAlive yes
        assert conn.gettimeout() is None and conn.getblocking()
        assert conn.recv(4) == b"SSH-"   # the server's greeting: ssh's to read
    with dialed(sftp_server.port, "inet", "none", "no") as conn:
        assert not conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)


def test_the_master_logs_in_through_the_dialer(sftp_server, rclone_sftp_server,
                                               no_ssh_left_behind):
    """The master's ssh (the one that makes the TCP connection) gets the dialer; the
    login and SFTP work through it, with a key and with a password."""
    for server in (sftp_server, rclone_sftp_server):
        ssh = ssh_for(server)
        argv_env, connection = master_argv(ssh)
        try:
            assert "ProxyUseFdpass=yes" in argv_env[0], argv_env[0]
            assert ssh_dialer.__file__ in " ".join(argv_env[0])
            status, out, err = speak_sftp(ssh, no_ssh_left_behind, argv_env)
            assert out[4:9] == b"\x02\x00\x00\x00\x03", (status, out, err)   # VERSION 3
        finally:
            connection.close()
            ssh.close()


@pytest.fixture
def users_config(tmp_path, monkeypatch):
    """`ssh` on PATH reads this file as if it were the user's ~/.ssh/config."""
    config = tmp_path / "config"
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {config} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    return config


@pytest.mark.parametrize("line", ["ProxyCommand nc %h %p", "ProxyJump jump.example.org",
                                  "BindAddress 127.0.0.1", "ConnectionAttempts 3",
                                  "CanonicalizeHostname yes", "CheckHostIP yes"])
def test_the_dialer_leaves_how_the_user_connects_alone(users_config, line):
    """Where the user's ~/.ssh/config says how to reach the host (a proxy of its own, a
    bind address, retries...), ssh connects as it says: no dialer."""
    users_config.write_text(f"Host *\n  ServerAliveCountMax 5\n\nHost example.org\n  {line}\n")
    assert SshCommand(parse_location("sftp://someone@example.org/x"), {}, 20).dialer() == []
    # the same file, for another host: the dialer
    assert SshCommand(parse_location("sftp://someone@example.net/x"), {}, 20).dialer()


def test_the_dialer_connects_where_the_users_config_says(users_config, sftp_server,
                                                         no_ssh_left_behind):
    """An alias of ~/.ssh/config: the dialer connects to its HostName and Port, as ssh."""
    users_config.write_text(f"Host castlib-alias\n  HostName 127.0.0.1\n"
                            f"  Port {sftp_server.port}\n")
    ssh = SshCommand(parse_location("sftp://castlib-alias/x"), sftp_server.options, 20)
    argv_env, connection = master_argv(ssh)
    try:
        assert "ProxyUseFdpass=yes" in argv_env[0]
        status, out, err = speak_sftp(ssh, no_ssh_left_behind, argv_env)
        assert out[4:9] == b"\x02\x00\x00\x00\x03", (status, out, err)
    finally:
        connection.close()


def test_ssh_G_asked_ahead_is_the_one_the_dialer_reads(users_config, tmp_path, monkeypatch,
                                                       no_ssh_left_behind):
    """connect_ahead starts `ssh -G` for a URL while the configuration is read; the
    dialer takes its answer instead of asking again, for the same host, port and user,
    and asks anew for another port (an option of the configuration). The dialer waits
    the ConnectTimeout castlib gives ssh, which wins over the user's."""
    from castlib.backends import ssh_command

    users_config.write_text("Host alias.example.org\n  HostName 127.0.0.2\n  Port 2222\n"
                            "  ConnectTimeout 77\n")
    asked = tmp_path / "asked"
    wrapper = Path(shutil.which("ssh"))   # users_config's: log every -G it is asked
    wrapper.write_text(wrapper.read_text().replace(
        "exec ", f"case \" $* \" in *' -G '*) echo \"$*\" >> {asked} ;; esac\nexec ", 1))
    url = parse_location("sftp://someone@alias.example.org/x")
    ssh_command.ask_where(url)
    assert ssh_command._WHERE_ASKED   # started, not yet read
    options = ssh_command.SshCommand(url, {}, 20).dialer()
    assert asked.read_text().count("-G") == 1   # the one started ahead
    assert not ssh_command._WHERE_ASKED
    proxy = next(o for o in options if o.startswith("ProxyCommand="))
    assert " 127.0.0.2 2222 " in proxy and " 20 " in proxy, proxy   # ours, not 77
    # a port of the configuration's: not what was asked ahead, so asked again
    ssh_command.SshCommand(url, {"port": 2022}, 20).dialer()
    lines = asked.read_text().splitlines()
    assert len(lines) == 2 and "-p 2022" in lines[1], lines


def test_a_users_fdpass_proxy_that_fails_is_not_tried_again(users_config, sftp_server,
                                                            tmp_path, monkeypatch):
    """A ProxyCommand of the user's with ProxyUseFdpass (`nc -F %h %p`) that passes ssh
    no connection makes ssh say what it says when castlib's dialer did not run ("proxy
    dialer did not pass back a connection"); castlib's dialer was not in that login (the
    user's proxy leaves it out), so the login is not made again through the user's proxy
    (a second attempt of whatever it does, the wait twice), nor the dialer given up."""
    from castlib.backends import ssh_command
    from castlib.errors import StorageError

    monkeypatch.setattr(ssh_command, "_DIALER_DID_NOT_RUN", [])
    ran = tmp_path / "ran"
    proxy = tmp_path / "proxy"
    proxy.write_text(f"#!/bin/sh\necho \"$*\" >> {ran}\necho 'proxy: no way through' >&2\n"
                     "exit 1\n")
    proxy.chmod(0o755)
    users_config.write_text(f"Host 127.0.0.1\n  ProxyCommand {proxy} %h %p\n"
                            "  ProxyUseFdpass yes\n")
    b = open_backend(sftp_server.url, sftp_server.options)
    try:
        with pytest.raises(StorageError, match="proxy dialer did not pass back"):
            b.stat("")
    finally:
        b.close()
    assert len(ran.read_text().splitlines()) == 1, ran.read_text()   # one login
    assert not ssh_command._DIALER_DID_NOT_RUN


def dialer_failure(url: str, timeout: float, sessions) -> str:
    """castlib's line for a login that failed in the dialer."""
    ssh = SshCommand(parse_location(url), {}, timeout)
    argv_env, connection = master_argv(ssh)
    try:
        assert "ProxyUseFdpass=yes" in argv_env[0]
        status, out, err = speak_sftp(ssh, sessions, argv_env)
    finally:
        connection.close()
    assert status == 255 and not out, (status, out, err)
    return str(open_backend(url, {}).translate(ssh.failure(status, err), ""))


def test_the_dialers_failures_read_as_ssh_own(no_ssh_left_behind):
    """Refused, unresolvable, too slow to connect: said as ssh says them without it."""
    refused = dialer_failure(f"sftp://someone@127.0.0.1:{free_port()}/x", 20,
                             no_ssh_left_behind)
    assert "connection refused (connect to host 127.0.0.1 port" in refused, refused
    unknown = dialer_failure("sftp://someone@no-such-host.castlib.invalid/x", 20,
                             no_ssh_left_behind)
    assert "host unreachable (Could not resolve hostname no-such-host" in unknown, unknown
    with socket.socket() as full:   # a listener whose queue is full: SYNs go unanswered
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        waiting = []
        for _ in range(3):
            queued = socket.socket()
            queued.setblocking(False)
            queued.connect_ex(full.getsockname())
            waiting.append(queued)
        try:
            started = time.monotonic()
            slow = dialer_failure(f"sftp://someone@127.0.0.1:{full.getsockname()[1]}/x", 1,
                                  no_ssh_left_behind)
        finally:
            for queued in waiting:
                queued.close()
    assert "timed out (connect to host 127.0.0.1 port" in slow, slow
    assert time.monotonic() - started < 10


def test_a_login_shell_that_runs_nothing_leaves_ssh_to_connect(sftp_server, monkeypatch,
                                                                no_ssh_left_behind):
    """ssh runs a ProxyCommand with $SHELL: a service account's (nologin, false) runs no
    dialer, a shell of another syntax (fish, csh) reads its quoted words otherwise, and an
    empty SHELL is no shell to ssh.
    ssh then connects itself, and the login works as it did without the dialer."""
    for shell, dialer in (("/usr/sbin/nologin", False), ("/bin/false", False),
                          ("/usr/bin/fish", False), ("", False), ("/bin/bash", True),
                          (None, True)):
        if shell is None:   # ssh's /bin/sh
            monkeypatch.delenv("SHELL", raising=False)
        else:
            monkeypatch.setenv("SHELL", shell)
        ssh = ssh_for(sftp_server)
        argv_env, connection = master_argv(ssh)
        try:
            assert ("ProxyUseFdpass=yes" in argv_env[0]) == dialer, (shell, argv_env[0])
            status, out, err = speak_sftp(ssh, no_ssh_left_behind, argv_env)
            assert out[4:9] == b"\x02\x00\x00\x00\x03", (shell, status, out, err)
        finally:
            connection.close()
            ssh.close()


def test_a_dialers_failure_of_no_known_kind_reads_as_ssh_own(no_ssh_left_behind):
    """A connect() that fails in a way castlib has no name for (a link-local address
    without its interface: EINVAL) reads as ssh's own line says it, not as what ssh says
    of the closed socket it was handed after it ("banner exchange: Connection to  port
    0: Broken pipe")."""
    url = "sftp://someone@[fe80::1]/x"
    ssh = SshCommand(parse_location(url), {}, 20)
    argv_env, connection = master_argv(ssh)
    try:
        assert "ProxyUseFdpass=yes" in argv_env[0]
        dialed = speak_sftp(ssh, no_ssh_left_behind, argv_env)
    finally:
        connection.close()
    itself = speak_sftp(ssh, no_ssh_left_behind, ssh.subsystem())   # ssh connects
    said = [str(open_backend(url, {}).translate(ssh.failure(status, err), ""))
            for status, _, err in (dialed, itself)]
    assert dialed[0] == itself[0] == 255 and "connect to host fe80::1 port 22" in said[1]
    assert said[0] == said[1], (dialed, itself)


def test_a_name_the_dialer_cannot_encode_reads_as_ssh_own(no_ssh_left_behind):
    """A host name that IDNA refuses (an empty or a 64-byte label) is looked up as ssh
    looks it up, as bytes: unresolvable, said in ssh's words, never a traceback, and the
    dialer ends with a socket handed over (ssh waits for it: no zombie)."""
    for host in ("a..b.castlib.invalid", "a" * 64 + ".castlib.invalid"):
        said = dialer_failure(f"sftp://someone@{host}/x", 20, no_ssh_left_behind)
        assert f"host unreachable (Could not resolve hostname {host}" in said, said


def test_a_socket_the_kernel_will_not_make_is_a_failure_said(monkeypatch):
    """A family the kernel has no support for (IPv6 off at boot: socket() fails with
    EAFNOSUPPORT, as ssh's socket() does; no kernel here lacks it) is that address
    failed: the next one is tried, and the last failure said in ssh's words."""
    class NoIpv6:
        def __getattr__(self, name):
            return getattr(socket, name)

        @staticmethod
        def socket(family, *args):
            if family == socket.AF_INET6:
                raise OSError(97, "Address family not supported by protocol")
            return socket.socket(family, *args)

    monkeypatch.setattr(ssh_dialer, "_socket", NoIpv6())
    with pytest.raises(SystemExit) as said:
        ssh_dialer.dial("::1", "22", "any", "5", "yes")
    assert said.value.code == ("ssh: connect to host ::1 port 22: "
                               "Address family not supported by protocol")


def _running(pid: int) -> bool:
    """Whether the process runs (not ended, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@contextlib.contextmanager
def unanswered_port():
    """A loopback port whose listener's queue is full: SYNs go unanswered, a connect()
    waits until its timeout."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        waiting = []
        try:
            for _ in range(3):
                queued = socket.socket()
                waiting.append(queued)
                queued.setblocking(False)
                queued.connect_ex(full.getsockname())
            yield full.getsockname()[1]
        finally:
            for queued in waiting:
                queued.close()


@pytest.mark.parametrize("how", ["connection", "session"])
def test_a_login_stopped_while_the_dialer_connects_stops_the_dialer(how):
    """castlib ends a login still connecting (an early connection nobody took, at exit; a
    session closed): the dialer ends with ssh, not connecting on for ConnectTimeout
    with nobody to hand the connection to."""
    from castlib.backends import sftp_wire

    with unanswered_port() as port:
        ssh = SshCommand(parse_location(f"sftp://someone@127.0.0.1:{port}/x"), {}, 30)
        connection = ControlConnection(ssh)
        try:
            if how == "connection":
                connection.start_master()
                proc = connection._master
            else:
                proc = connection.take_master()
                wire = sftp_wire.begin_threaded_wire(proc, ssh.session_failure, 30)
            deadline = time.monotonic() + TIMEOUT_S
            while not any("ssh_dialer" in Path(f"/proc/{c}/cmdline").read_text()
                          for c in _children(proc.pid) if _running(c)):
                assert time.monotonic() < deadline, "no dialer started"
                time.sleep(0.01)
            time.sleep(0.2)   # (the dialer in its connect())
            dialers = _children(proc.pid)
            if how == "connection":
                connection.close()
            else:
                wire.close()
                proc.wait(TIMEOUT_S)
            deadline = time.monotonic() + 2
            while any(_running(pid) for pid in dialers) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not any(_running(pid) for pid in dialers), dialers
        finally:
            connection.close()


def test_a_dialer_whose_stderr_is_gone_still_hands_ssh_a_socket():
    """castlib gone (kill -9) while its ssh still dials: the dialer's words about a failure
    find stderr's reader gone, and it still hands ssh a (closed) socket, so that ssh
    waits for it and it is nobody's zombie."""
    read_end, write_end = os.pipe()
    os.close(read_end)   # nobody reads ssh's stderr any more
    ours, its = socket.socketpair()
    try:
        with ours, its:
            proc = subprocess.run([sys.executable, "-I", "-S", ssh_dialer.__file__,
                                   "127.0.0.1", str(free_port()), "any", "10", "yes"],
                                  stdout=its, stderr=write_end, timeout=TIMEOUT_S)
            its.close()
            ours.settimeout(TIMEOUT_S)
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    finally:
        os.close(write_end)
    assert proc.returncode == 255 and len(fds) == 1
    with socket.socket(fileno=fds[0]) as handed:
        assert handed.recv(1) == b""   # closed: ssh reads the end of the connection


def test_a_command_interrupted_while_it_logs_in_leaves_no_ssh(tmp_path):
    """Ctrl-C while the login (started ahead, taken by the back-end's thread) still
    connects: castlib exits, and its ssh and dialer with it, rather than going on to
    their ConnectTimeout unwatched and leaving init their zombies."""
    from tests.helpers import castlib_command, cli_env

    with unanswered_port() as port:
        url = f"sftp://someone@127.0.0.1:{port}/x"
        config = tmp_path / "config.yaml"
        config.write_text(f'storage:\n  "{url}": {{connect_timeout: 30, known_hosts: null}}\n')
        proc = subprocess.Popen(castlib_command("index", url, db=f"sqlite:///{tmp_path}/c.db"),
                                env=cli_env({"CASTLIB_CONFIG": str(config)}),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def ours() -> list[int]:   # ssh (its argv names the port) and its dialer
            found = []
            for entry in filter(str.isdigit, os.listdir("/proc")):
                try:
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if int(entry) != proc.pid and any(a == str(port).encode() or
                                                  f" {port} ".encode() in a for a in argv):
                    found.append(int(entry))
            return [pid for pid in found if _running(pid)]

        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not any(ssh_dialer.__file__ in Path(f"/proc/{pid}/cmdline").read_text()
                          for pid in ours() if pid not in _children(proc.pid)):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.02)
            time.sleep(1)   # the dialer in its connect(), the back-end waiting for the login
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 130, err
            deadline = time.monotonic() + 2
            while ours() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not ours(), ours()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_a_match_exec_too_slow_for_ssh_G_is_ended_with_it(users_config, monkeypatch):
    """`ssh -G` runs the Match exec commands of ~/.ssh/config (`nc -z -w 20 host 22` to
    choose a ProxyJump off-site). One that outlasts the wait for ssh -G ends with it
    (ssh connects as it says, without the dialer), rather than running on alone."""
    from castlib.backends import ssh_command

    marker = f"29.{os.getpid()}"
    users_config.write_text(f'Match exec "sleep {marker}"\n  Port 2222\n')
    monkeypatch.setattr(ssh_command, "_SSH_G_TIMEOUT_S", 1)

    def sleeping() -> list[int]:
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                pass
        return [pid for pid in found if _running(pid)]

    try:
        assert SshCommand(parse_location("sftp://someone@example.org/x"), {}, 20).dialer() == []
        deadline = time.monotonic() + 2
        while sleeping() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not sleeping()
    finally:
        for pid in sleeping():
            os.kill(pid, signal.SIGKILL)


def test_a_folder_named_by_no_possible_pid_does_not_stop_a_login(tmp_path):
    """The sweep of the socket folders killed runs left reads a pid from each name: a
    number no pid can be (too large for kill(2)) or digits that are not ASCII ones are no
    pid of a gone process, and no reason for a login to fail."""
    from castlib.backends import ssh_command

    for name in ("castlib-ssh-99999999999999999999999-x", "castlib-ssh-\u00b2-x"):
        (tmp_path / name).mkdir()
    ssh_command._sweep_folders_of_gone_processes(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["castlib-ssh-99999999999999999999999-x",
                                            "castlib-ssh-\u00b2-x"]
