"""OpenSSH's own `ssh` as the way to an SSH host: the command line and environment that
reach one location's host, and what ssh's failures mean.

ssh does the key exchange, the crypto and the login (in C), with what the user set up
for it: ~/.ssh/config (host aliases, ProxyJump, Kerberos), the agent, known_hosts.
castlib speaks SFTP over its pipes (`ssh -s HOST sftp`, as restic and rclone do) or
runs a command there (md5sum). The location's options say the rest, as they say it to
asyncssh (see SftpBackend._connect); what ssh cannot carry faithfully is refused.
"""
from __future__ import annotations

import atexit
import math
import os
import re
import shlex
import shutil
import signal
import stat as statmod
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from functools import lru_cache

from ..errors import ConfigError
from ..hosts import process_alive
from ..location import redact
from .base import CONNECT_TIMEOUT_S

# Options of a location this module carries to ssh. castlib's own two (connect_timeout
# comes as an argument; block_size is no SSH matter) are let through as well.
_CARRIED = {"password", "passphrase", "username", "port", "client_keys", "key_filename",
            "known_hosts", "connect_timeout", "block_size"}

# A host or user that could become an ssh option or a shell word (a user's ProxyCommand
# with %h or %r runs in a shell; OpenSSH checks this itself only from 9.6): refused.
_UNSAFE_NAME = re.compile(r"^-|[\s\x00-\x1f\x7f'`\"$\\;&<>|(){}]")
# A host: a name, an IPv4 or an IPv6 address (bare, with a zone: fe80::1%eth0), an alias
# of ~/.ssh/config. No '@', '/' or '[': ssh would read another user, a URI, a bracket.
_HOST = re.compile(r"[A-Za-z0-9_.:%-]+")

_ASKPASS_MIN_VERSION = (8, 4)   # SSH_ASKPASS_REQUIRE=force: askpass without a display
_PASSWORD_VAR = "CASTLIB_SSH_PASSWORD"
_PASSPHRASE_VAR = "CASTLIB_SSH_PASSPHRASE"
# ssh runs this with the prompt as its one argument, and reads the answer on its stdout.
# The secrets are in ssh's environment, never in its argv or in this file. A passphrase
# prompt of ssh's own begins "Enter passphrase"; a server's prompts begin "(user@host)",
# so a server never gets the key's passphrase by asking for it.
_ASKPASS_SCRIPT = f"""#!/bin/sh
case "$1" in
"Enter passphrase"*) [ -n "${{{_PASSPHRASE_VAR}+set}}" ] || exit 1
    printf '%s\\n' "${_PASSPHRASE_VAR}" ;;
*) [ -n "${{{_PASSWORD_VAR}+set}}" ] || exit 1
    printf '%s\\n' "${_PASSWORD_VAR}" ;;
esac
"""


# -- what ssh's failures mean -------------------------------------------------------------
class SshFailure(OSError):
    """ssh could not reach the host or log in. `castlib_kind` is what castlib calls it
    (backends/fsspec.py's _classify reads it); str() is ssh's own words, without secrets."""

    castlib_kind = "connection lost"


class SshAuthenticationFailed(SshFailure, PermissionError):
    castlib_kind = "authentication failed"


class SshHostKeyNotTrusted(SshFailure, PermissionError):
    castlib_kind = "host key not trusted (add it to known_hosts, or set the known_hosts option)"


class SshHostKeyChanged(SshHostKeyNotTrusted):
    castlib_kind = ("host key not trusted (it has changed since known_hosts recorded it: "
                    "replace that entry only once you know why)")


class SshConnectionRefused(SshFailure, ConnectionRefusedError):
    castlib_kind = "connection refused"


class SshHostUnreachable(SshFailure):
    castlib_kind = "host unreachable"


class SshTimeout(SshFailure, TimeoutError):
    castlib_kind = "timed out"


class SshConnectionLost(SshFailure, ConnectionError):
    castlib_kind = "connection lost"


class SshSessionRefused(SshConnectionLost):
    """The master's connection is there, and the host opens no more sessions on it
    (OpenSSH's MaxSessions): not a line lost; another session may come once one ends."""

    castlib_kind = "no more sessions on this connection"


class SshConfigurationBroken(SshFailure):
    """ssh refused its own configuration (~/.ssh/config): no retry mends that."""

    castlib_kind = "ssh configuration error"


class SshRemoteCommandFailed(SshFailure):
    """ssh ran, the command on the host did not succeed (its exit status, not 255)."""

    castlib_kind = "remote command failed"


# (what ssh writes on stderr, what it means), the first that matches: its configuration
# is read first, the host key checked before the login
_FAILURES = [
    # a session on the master's connection that the host refused (ProxyCommand=false
    # then ends ssh: see ControlConnection._with_ours)
    (re.compile(r"Session open refused by peer"), SshSessionRefused),
    (re.compile(r"Bad configuration option|bad configuration options|Bad owner or "
                r"permissions on|Unsupported option|no argument after keyword|"
                # a %-token or ${VAR} of ~/.ssh/config it cannot expand (its first line
                # says which, the second "percent_expand: failed")
                r"percent_expand: (unknown key|env var)"),
     SshConfigurationBroken),
    (re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed"),
     SshHostKeyChanged),
    (re.compile(r"Host key verification failed|No \S+ host key is known for"),
     SshHostKeyNotTrusted),
    (re.compile(r"Permission denied \(|Too many authentication failures|"
                r"No more authentication methods"), SshAuthenticationFailed),
    (re.compile(r"Connection refused"), SshConnectionRefused),
    (re.compile(r"Could not resolve hostname|Name or service not known|"
                r"No address associated with hostname|No route to host|"
                r"Network is unreachable"), SshHostUnreachable),
    (re.compile(r"timed out|Timeout, server"), SshTimeout),
]
# stderr lines that say nothing of the failure: warnings, the host key warning's frame
_NOISE = re.compile(r"^(Warning: |@+$|\*\*)|^$")
# ssh's line for a TCP connection it could not make (the dialer says it as ssh does)
_NOT_CONNECTED = re.compile(r"^ssh: (connect to host |Could not resolve hostname )")


class SshCommand:
    """How to reach one SSH host with OpenSSH's `ssh`: argv and environment, from a
    location's URL and options. close() removes what it made (the askpass helper)."""

    def __init__(self, url, options: dict, connect_timeout: float):
        options = dict(options or {})
        refused = self.untranslatable(options)
        if refused:
            name = refused[0]
            raise ConfigError(f"{name}: {_why_untranslatable(name, options[name])}")
        self.host = _checked_host(url.hostname)
        # an option wins over the URL, as in SftpBackend._connect
        user = options.get("username", url.user)
        self.user = _checked_user(user) if user is not None else None
        self.port = _checked_port(options.get("port", url.port))
        password = options.get("password", url.password)
        self._password = str(password) if password is not None else None
        passphrase = options.get("passphrase")
        self._passphrase = str(passphrase) if passphrase is not None else None
        self._secrets = [s for s in (self._password, self._passphrase, url.password) if s]
        self._connect_timeout_s = max(1, math.ceil(connect_timeout))   # ssh's: whole seconds
        self._options = _ssh_options(options, self._connect_timeout_s,
                                     self._password is not None,
                                     self._passphrase is not None)
        self._askpass: str | None = None   # the helper's path, when there is a secret
        self._remove_askpass = None   # a weakref.finalize: removed at close, or at exit
        self._askpass_lock = threading.Lock()   # (threads start their ssh at once)
        self._dialer: list[str] | None = None   # dialer(), once asked
        if self._password is not None or self._passphrase is not None:
            # made here, once, not at each command: threads start their ssh at once
            self._make_askpass()

    @staticmethod
    def untranslatable(options: dict) -> list[str]:
        """The names of the options ssh cannot carry as asyncssh would (an asyncssh
        option of no ssh equivalent, a value of a kind ssh has no way to take)."""
        return [name for name, value in (options or {}).items()
                if _why_untranslatable(name, value)]

    @staticmethod
    def available() -> str | None:
        """The path of the ssh binary, or None."""
        return shutil.which("ssh")

    def subsystem(self, name: str = "sftp") -> tuple[list[str], dict]:
        """argv and environment of ssh running `name` (SFTP) over its stdin and stdout."""
        return self._argv(["-s"], [name]), self._env()

    def command(self, words: list[str]) -> tuple[list[str], dict]:
        """argv and environment of ssh running `words` on the host: ssh hands the host's
        shell one line, so each word is quoted for it (any name: spaces, quotes, line
        breaks, a leading '-', bytes that are not UTF-8 as surrogate escapes)."""
        if not words:   # ssh would open a login shell, which waits on its input for ever
            raise ValueError("no remote command given")
        return self._argv([], [" ".join(shlex.quote(w) for w in words)]), self._env()

    def dialer(self) -> list[str]:
        """ssh's options that make its TCP connection through ssh_dialer.py (TCP_NODELAY
        from the first byte: a login ~65 ms shorter, see there), or [] where that would
        change where or how ssh connects: a ProxyCommand or ProxyJump, a bind address,
        more than one attempt, hostname canonicalisation or CheckHostIP in the user's
        ~/.ssh/config; a $SHELL that is no POSIX shell (nologin: ssh runs a ProxyCommand
        with it); an ssh older than 6.8 (no `ssh -G`); a Python without sendmsg.
        Asks `ssh -G` (~5 ms) once for this host, port and user, or takes the answer of
        the one ask_where started while the configuration was read."""
        if self._dialer is None:
            self._dialer = _dialer_options(_where(self.available() or "ssh", self.host,
                                                  self.port, self.user),
                                           self._connect_timeout_s)
        return [] if _DIALER_DID_NOT_RUN else self._dialer

    def same_as(self, other: "SshCommand") -> bool:
        """Whether `other` runs ssh with the same command line and secrets (its askpass
        helper aside, a file of each one's own)."""
        return (self._argv([], []) == other._argv([], [])
                and (self._password, self._passphrase) == (other._password, other._passphrase))

    def failure(self, returncode: int, stderr: bytes) -> BaseException:
        """What ssh's exit status and stderr mean, as one exception whose words hold no
        password (ssh exits with 255 when it failed itself, with the remote command's
        status otherwise)."""
        text = redact(stderr.decode("utf-8", "replace"), self._secrets)
        lines = [line.strip() for line in text.splitlines() if not _NOISE.match(line.strip())]
        last = lines[-1] if lines else ""
        if returncode != 255:
            said = (f"ended by signal {-returncode}" if returncode < 0
                    else f"exit status {returncode}")
            return SshRemoteCommandFailed(f"{said}: {last}" if last else said)
        for pattern, failure in _FAILURES:
            said = next((line for line in lines if pattern.search(line)), None)
            if said is not None:
                if failure is SshHostKeyChanged:   # where the key it knew is: more to act on
                    said = _offending(lines) or said
                return failure(_without_destination(said))
        # ssh's words for a connection it could not make end its stderr, unless a dialer
        # (ssh_dialer.py, a ProxyJump's ssh) said them: then ssh goes on to say what it
        # made of the closed socket it got ("banner exchange: Connection to  port 0: Broken
        # pipe"), which is no reason
        last = next((line for line in lines if _NOT_CONNECTED.match(line)), last)
        return SshConnectionLost(_without_destination(last) or "ssh exited with status 255")

    def session_failure(self, returncode: int, stderr: bytes) -> BaseException:
        """What the end of an ssh that carried a session (`subsystem`) means to what
        waited on it: ssh's own failure (255) as failure() reads it; any other end (ssh
        killed by a signal, the host's sftp-server gone with a status of its own) is
        the session lost, which a new one may mend, as a line that drops is: not the
        answer of a command."""
        exc = self.failure(returncode, stderr)
        if isinstance(exc, SshRemoteCommandFailed):
            return SshConnectionLost(f"the session's ssh ended ({exc})")
        return exc

    def close(self) -> None:
        """Remove the askpass helper's folder (if made); again is harmless. A command used
        after this (a back-end's next connection) makes a new one."""
        with self._askpass_lock:
            if self._remove_askpass is not None:
                self._remove_askpass()
                self._remove_askpass = None
                self._askpass = None

    # -- building ----------------------------------------------------------------------
    def _argv(self, mode: list[str], remote: list[str]) -> list[str]:
        argv = [self.available() or "ssh", *self._options]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.user is not None:
            argv += ["-l", self.user]
        # `--`: nothing after it is an option, not even in the remote words (ssh reads
        # options after the host too, unless told so)
        return argv + mode + ["--", self.host, *remote]

    def _make_askpass(self) -> None:
        folder = tempfile.mkdtemp(prefix="castlib-askpass-")   # 0700: ours alone
        self._remove_askpass = weakref.finalize(self, shutil.rmtree, folder,
                                                ignore_errors=True)
        self._askpass = os.path.join(folder, "askpass")
        fd = os.open(self._askpass, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(_ASKPASS_SCRIPT)

    def _env(self) -> dict:
        env = dict(os.environ)
        if self._password is None and self._passphrase is None:
            return env
        with self._askpass_lock:
            if self._askpass is None:   # removed by close(): used again
                self._make_askpass()
        # force: askpass even without a display or with a terminal (OpenSSH >= 8.4)
        env.update(SSH_ASKPASS=self._askpass, SSH_ASKPASS_REQUIRE="force")
        for var, secret in ((_PASSWORD_VAR, self._password),
                            (_PASSPHRASE_VAR, self._passphrase)):
            if secret is not None:
                env[var] = secret
            else:   # not one of the caller's environment: the script says it has none
                env.pop(var, None)
        return env


def _ssh_options(options: dict, connect_timeout_s: int, password: bool,
                 passphrase: bool) -> list[str]:
    """ssh's options for a location: never a prompt on a terminal, nothing forwarded,
    no master connection left behind; then its keys and known_hosts. The command line
    wins over ~/.ssh/config, which still says the rest (ProxyJump, Kerberos...)."""
    argv = ["-T", "-x", "-a", "-e", "none",
            "-o", "ClearAllForwardings=yes", "-o", "ControlMaster=no",
            "-o", "ControlPath=none",
            # a LocalCommand would write into the SFTP stream; a RemoteCommand would
            # make ssh refuse ours
            "-o", "PermitLocalCommand=no", "-o", "RemoteCommand=none",
            "-o", f"ConnectTimeout={connect_timeout_s}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if password or passphrase:   # the secrets come from askpass (see SshCommand._env)
        argv += ["-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1"]
        if not password:   # as asyncssh: no password asked for when none is given
            argv += ["-o", "PasswordAuthentication=no",
                     "-o", "KbdInteractiveAuthentication=no"]
    else:
        argv += ["-o", "BatchMode=yes"]
    keys = options.get("client_keys", options.get("key_filename"))
    if keys is not None:
        for key in [keys] if isinstance(keys, str) else keys:
            if not os.path.isfile(os.path.expanduser(key)):
                name = "client_keys" if "client_keys" in options else "key_filename"
                raise ConfigError(f"{name}: no key file {key!r}")
            # as an option, not -i: ssh looks for an -i file before it reads the name's
            # %-tokens, so '%' in a name could not be said
            argv += ["-o", f"IdentityFile={_config_quoted(key)}"]
        argv += ["-o", "IdentitiesOnly=yes"]
    if options.get("known_hosts", ()) == ():   # asyncssh's default (a list [] is no file)
        # ssh's own files, checked: a host not in them is refused, never asked, never added
        argv += ["-o", "StrictHostKeyChecking=yes"]
    elif options["known_hosts"] is None:   # asyncssh's None: no check at all
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    else:   # these files only, as asyncssh reads them: not the system's as well
        files = options["known_hosts"]
        files = [files] if isinstance(files, str) else list(files)
        quoted = " ".join(_config_quoted(f) for f in files) or "/dev/null"
        argv += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={quoted}",
                 "-o", "GlobalKnownHostsFile=/dev/null"]
    return argv


# what `ssh -G` must say for ssh_dialer.py to connect as ssh itself would
_DIALER_NEEDS = {"proxycommand": "none", "proxyjump": "none", "connectionattempts": "1",
                 "canonicalizehostname": "false", "checkhostip": "no"}
_DIALER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ssh_dialer.py")
# ssh runs a ProxyCommand as `$SHELL -c "exec ..."` (/bin/sh where SHELL is unset): the
# dialer's words are quoted for a POSIX shell. A service account's shell (nologin, false)
# runs nothing, and fish or csh read quotes otherwise: with those ssh connects itself.
_POSIX_SHELLS = {"sh", "bash", "dash", "ash", "ksh", "ksh93", "mksh", "pdksh", "zsh",
                 "yash", "posh", "busybox"}


_SSH_G_TIMEOUT_S = 10   # (a Match exec may take its time: see _dialer_options)


def _where(ssh: str, host: str, port: int | None, user: str | None) -> list[str]:
    """ssh's words that decide where and how it connects, which `ssh -G` is asked about:
    the host, port and user (what ~/.ssh/config's Host and Match blocks go by). castlib's
    other options (keys, known_hosts, BatchMode...) change none of what _dialer_options
    reads, and its ConnectTimeout, which wins over the user's, is given to it as such."""
    return [ssh, *(["-p", str(port)] if port is not None else []),
            *(["-l", user] if user is not None else []), "--", host]


# ssh's words when its ProxyCommand ended without passing it a connection: the dialer did
# not run at all (where it fails to connect, it says why in ssh's words, and passes ssh a
# closed one)
_DIALER_SILENT = "proxy dialer did not pass back a connection"
_DIALER_DID_NOT_RUN: list = []   # not empty once a login saw it: none uses it from then on


def dialer_did_not_run(exc: BaseException, command: SshCommand) -> bool:
    """Whether a login of `command` failed because its dialer did not run (sys.executable
    is no Python that runs ssh_dialer.py: an embedded interpreter's host program, a
    broken installation), not for anything of the network or the host. Only a login
    that had castlib's dialer: a ProxyCommand of the user's with ProxyUseFdpass (which
    leaves castlib's out) says the same words when it fails."""
    return (bool(command._dialer) and isinstance(exc, SshConnectionLost)
            and _DIALER_SILENT in str(exc))


def give_up_dialer() -> None:
    """No dialer for any login of this process from now on (dialer_did_not_run): ssh
    connects itself, as where the dialer is left out."""
    _DIALER_DID_NOT_RUN.append(True)


def _dialer_possible() -> bool:
    """What a dialer needs of this machine, `ssh -G`'s answer aside."""
    import _socket

    shell = os.environ.get("SHELL", "/bin/sh")   # (ssh's: an empty one is no /bin/sh)
    return bool(sys.executable and not _DIALER_DID_NOT_RUN
                and hasattr(_socket.socket, "sendmsg")
                and os.path.basename(shell) in _POSIX_SHELLS
                and os.path.isfile(_DIALER))   # (not a castlib run from a zip file)


# `ssh -G` started ahead (ask_where), by the words it was asked for, until taken
_WHERE_ASKED: dict[tuple, subprocess.Popen] = {}


def _ask_ssh_config(where: list[str]) -> subprocess.Popen | None:
    """`ssh -G` for these words, started: in a process group of its own, as it runs the
    Match exec commands of ~/.ssh/config, and one that outlasts the wait ends with it
    (ssh -G alone killed, it ran on)."""
    try:
        proc = subprocess.Popen([where[0], "-G", *where[1:]], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError:
        return None
    with _STARTED_LOCK:
        _STARTED.add(proc)   # (one nobody asked for after all: killed at exit)
    return proc


def ask_where(url) -> None:
    """Start `ssh -G` for an SFTP location's URL now, for its SshCommand.dialer() to read
    later: what a command that will start ssh ahead does as it starts `ssh -V`, so that
    the ~5 ms of it pass while its configuration is read. An option of the configuration
    that names another user or port makes the dialer ask again, for those."""
    ssh = shutil.which("ssh")
    if ssh is None or not _dialer_possible():
        return
    try:
        where = _where(ssh, _checked_host(url.hostname), _checked_port(url.port),
                       _checked_user(url.user) if url.user is not None else None)
    except ConfigError:
        return
    with _STARTED_LOCK:
        if tuple(where) in _WHERE_ASKED:
            return
    proc = _ask_ssh_config(where)
    if proc is not None:
        with _STARTED_LOCK:
            _WHERE_ASKED[tuple(where)] = proc


def _dialer_options(where: list[str], connect_timeout_s: int) -> list[str]:
    """The ProxyCommand and ProxyUseFdpass options of SshCommand.dialer(), for ssh's
    words `where` (_where), or []."""
    with _STARTED_LOCK:
        asking = _WHERE_ASKED.pop(tuple(where), None)
    if not _dialer_possible() or openssh_version() < (6, 8):
        if asking is not None:
            stop(asking)
        return []
    if asking is None:
        asking = _ask_ssh_config(where)
        if asking is None:
            return []
    try:
        said, _ = asking.communicate(timeout=_SSH_G_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop(asking)
        return []
    if asking.returncode != 0:   # ssh itself will say what is wrong with its configuration
        return []
    resolved = {}
    for line in said.decode("utf-8", "surrogateescape").splitlines():
        key, _, value = line.partition(" ")
        resolved.setdefault(key.lower(), value)
    if (any(resolved.get(key, default) != default for key, default in _DIALER_NEEDS.items())
            or "bindaddress" in resolved or "bindinterface" in resolved
            or resolved.get("addressfamily") not in ("any", "inet", "inet6")
            or not resolved.get("hostname") or not resolved.get("port", "").isdigit()):
        return []
    words = [sys.executable, "-I", "-S", _DIALER, resolved["hostname"], resolved["port"],
             resolved["addressfamily"], str(connect_timeout_s),
             resolved.get("tcpkeepalive", "yes")]
    # ssh runs it with $SHELL (one of _POSIX_SHELLS) after reading its %-tokens
    command = " ".join(shlex.quote(word) for word in words).replace("%", "%%")
    return ["-o", f"ProxyCommand={command}", "-o", "ProxyUseFdpass=yes"]


def _config_quoted(path: str) -> str:
    """A file name as one word of an ssh_config line: its '%' doubled (ssh expands
    %-tokens in file names), in double quotes (a blank would part two names), in which
    '"' and '\\' take a backslash."""
    path = path.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{path}"'


def _why_untranslatable(name: str, value) -> str:
    """Why ssh cannot carry this option as asyncssh would, or "" when it can."""
    if name not in _CARRIED:
        return "an asyncssh option the ssh command has no equivalent for"
    if name in ("password", "passphrase") and value is not None:   # None: none given
        if not isinstance(value, (str, int)) or any(c in str(value) for c in "\r\n\0"):
            return "ssh's askpass takes one line of text"
        if openssh_version() < _ASKPASS_MIN_VERSION:
            return "this ssh is older than OpenSSH 8.4, which takes a password from castlib"
    if name in ("client_keys", "key_filename", "known_hosts"):
        if value is None:
            return "" if name == "known_hosts" else "no key file named"
        files = [value] if isinstance(value, str) else value
        if not isinstance(files, (list, tuple)) or \
                not all(isinstance(f, str) and f for f in files):
            return "ssh takes file names here (text, or a list of them)"
        if any("${" in f or "\0" in f or "\n" in f for f in files):
            return "ssh would read '${' as an environment variable (or a file name " \
                   "holds a NUL or a line break)"
    return ""


def _checked_host(host: str) -> str:
    if not host or host.startswith("-") or not _HOST.fullmatch(host):
        raise ConfigError(f"host {host!r} is not a host name or address ssh can be given")
    return host


def _checked_user(user) -> str:
    if not isinstance(user, str) or not user or _UNSAFE_NAME.search(user):
        raise ConfigError(f"user {user!r} is not a user name ssh can be given "
                          "(no leading '-', no blanks, quotes or shell characters)")
    return user


def _checked_port(port) -> int | None:
    if port is None:
        return None
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"port: {port!r} is not a port number (1 to 65535)")
    return port


def _without_destination(line: str) -> str:
    """ssh's line without its "user@host: " or "ssh: " (the message names the location)."""
    line = re.sub(r"^(ssh: |[^\s:]+@[^\s:]+: )", "", line)
    return line.rstrip(".")


def _offending(lines: list[str]) -> str:
    """Where the known key of a changed host key is ("Offending ... key in FILE:LINE")."""
    return next((line for line in lines if line.startswith("Offending")), "")


_VERSION_ASKED: list = []   # an `ssh -V` started ahead (ask_openssh_version), not read yet


def ask_openssh_version() -> None:
    """Start `ssh -V` now, for openssh_version() to read later: what a command that will
    start ssh ahead does first, so that the ~10 ms of it pass while its configuration is
    read (ssh's options depend on its version)."""
    ssh = shutil.which("ssh")
    if ssh is None or _VERSION_ASKED or openssh_version.cache_info().currsize:
        return
    try:
        _VERSION_ASKED.append(subprocess.Popen([ssh, "-V"], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE))
    except OSError:
        pass


@lru_cache(maxsize=1)
def openssh_version() -> tuple[int, int]:
    """(major, minor) of the ssh here (`ssh -V`: "OpenSSH_9.2p1 ..."); (0, 0) unknown."""
    ssh = shutil.which("ssh")
    if ssh is None:
        return (0, 0)
    try:
        if _VERSION_ASKED:
            said = _VERSION_ASKED.pop().communicate(timeout=10)[1]
        else:
            said = subprocess.run([ssh, "-V"], capture_output=True, timeout=10).stderr
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    m = re.search(rb"OpenSSH_(\d+)\.(\d+)", said)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# -- one connection: a ControlMaster and the sessions on it ---------------------------------
# ssh's pipes, widened (see start_ssh): Linux's pipe-max-size, for anyone
_PIPE_BYTES = 1024 * 1024


# every ssh start_ssh started, until it is waited for or dropped: those still running at
# exit are killed (_stop_started)
_STARTED: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()
_STARTED_LOCK = threading.Lock()


def _stop_started() -> None:
    """At exit, kill the ssh still running, with their dialers. A login still under way
    (connect_in_background's thread, a daemon, stopped where it was by an interrupt)
    would go on unwatched to its ConnectTimeout, its processes then left to init; a
    session's ssh would end at the end of its input anyway."""
    with _STARTED_LOCK:
        left = [proc for proc in _STARTED if proc.returncode is None]
    for proc in left:
        if proc.poll() is None:
            kill(proc)
            try:
                proc.wait(1)   # reaped here, not left to init
            except subprocess.TimeoutExpired:
                pass


def start_ssh(argv: list[str], env: dict) -> subprocess.Popen:
    """ssh started as `argv`, its stdin, stdout and stderr pipes of the caller's, in the
    calling thread (sftp_wire.begin_threaded_wire makes a session of them). In a
    session of its own: a Ctrl-C at the terminal reaches castlib, which ends it. Its
    pipes are 1 MiB instead of 64 KiB: a 256 MiB copy went 1.0 -> 0.6 s each way, ssh and
    castlib waking each other a sixteenth as often."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    with _STARTED_LOCK:
        _STARTED.add(proc)
    for pipe in (proc.stdin, proc.stdout):
        try:
            import fcntl

            fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        except (ImportError, AttributeError, OSError, ValueError):
            pass   # not Linux, or above pipe-max-size
    return proc


def kill(proc: subprocess.Popen) -> None:
    """Kill an ssh started by start_ssh, with what it started: its dialer (ssh_dialer.py)
    would go on connecting for up to ConnectTimeout with nobody to hand the connection
    to, then be left to init. start_ssh made ssh a process group's leader; a pid not
    yet waited for is no other group's."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):   # no group of its own: ssh alone
        proc.kill()


def stop(proc: subprocess.Popen) -> None:
    """Kill and wait for an ssh whose pipes nothing else holds, and close them."""
    if proc.poll() is None:
        kill(proc)
        proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _short_temp_dir() -> str | None:
    """/tmp where the temporary folder's own path is too long for a socket in it."""
    default = tempfile.gettempdir()
    return default if len(default) < 60 or not os.path.isdir("/tmp") else "/tmp"


# a ControlConnection's private folder: this prefix, the pid of the process that made it, "-"
_FOLDER_PREFIX = "castlib-ssh-"
_swept: set[str] = set()   # the folders swept by this process
SWEEP_AFTER_S = 60.0   # how long a folder of a gone pid stays untouched before it is swept


def _sweep_folders_of_gone_processes(parent: str | None) -> None:
    """Remove the private folders that processes no longer running here left (killed:
    no cleanup ran) in `parent`: this user's own real folders named by _FOLDER_PREFIX and
    a pid this machine has no process of, holding at most a master's socket that nobody
    answers on (a live one may be of a process in another pid namespace sharing /tmp),
    and unchanged for SWEEP_AFTER_S (such a process's folder, just made, has no socket
    yet). Never another user's, a link, or a folder with anything else in it."""
    parent = parent or tempfile.gettempdir()
    if parent in _swept:   # once a process
        return
    _swept.add(parent)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    uid, now = os.geteuid(), time.time()
    for entry in entries:
        if not entry.name.startswith(_FOLDER_PREFIX):
            continue
        pid = entry.name[len(_FOLDER_PREFIX):].partition("-")[0]
        try:
            st = entry.stat(follow_symlinks=False)
            if (not (pid.isascii() and pid.isdigit()) or not statmod.S_ISDIR(st.st_mode)
                    or st.st_uid != uid or now - st.st_mtime < SWEEP_AFTER_S
                    or process_alive(int(pid))):
                continue
            for name in os.listdir(entry.path):
                inside = os.path.join(entry.path, name)
                if (name != "m" or not statmod.S_ISSOCK(os.lstat(inside).st_mode)
                        or _answers(inside)):   # a master of another pid namespace's
                    break
                os.unlink(inside)
            else:
                os.rmdir(entry.path)
        except (OSError, OverflowError):   # gone meanwhile (another process swept it),
            continue   # not ours to remove, or a number no pid can be (too large for kill)


def _answers(socket_path: str) -> bool:
    """Whether a process listens on the Unix socket."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(socket_path)
        except OSError:
            return False
    return True


class ControlConnection:
    """One SSH connection to a location's host, through ssh's ControlMaster: the first
    session started logs in (the master); the others are channels of its connection
    through a socket in a private folder (a session more is a channel, ~10 ms, not a
    login, ~0.1 s and one more for the server to count). The argv of each; the master's
    ssh, once started (start_master), until its session takes it (take_master)."""

    def __init__(self, command: SshCommand):
        self.command = command
        self._master: subprocess.Popen | None = None
        parent = _short_temp_dir()
        _sweep_folders_of_gone_processes(parent)
        folder = tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-", dir=parent)
        # removed at close, or when this is dropped unclosed (a login that failed), or at
        # the interpreter's exit: never left in /tmp a try
        self._remove_folder = weakref.finalize(self, shutil.rmtree, folder,
                                               ignore_errors=True)
        # a socket's path has ~100 bytes at most, and ssh reads % in it as its own tokens
        socket = os.path.join(folder, "m")
        self._socket = socket if len(socket) < 90 and "%" not in socket else None

    def session(self, master: bool, subsystem: str = "sftp") -> tuple[list[str], dict]:
        """argv and environment of ssh carrying a subsystem (SFTP), as the master or as a
        channel of its connection."""
        argv, env = self.command.subsystem(subsystem)
        return self._with_ours(argv, master), env

    def remote_command(self, words: list[str]) -> tuple[list[str], dict]:
        """A command on the host, on the master's connection (no login of its own)."""
        argv, env = self.command.command(words)
        return self._with_ours(argv, master=False), env

    def _with_ours(self, argv: list[str], master: bool) -> list[str]:
        # first: the first value given for an option is the one ssh keeps
        ours = []
        if self._socket is not None:
            ours += ["-o", f"ControlPath={self._socket}", "-o", "ControlPersist=no",
                     "-o", f"ControlMaster={'yes' if master else 'no'}"]
        if openssh_version() >= (8, 2):   # ("^": these first, then ssh's own order)
            # AES-GCM first, as over asyncssh (sftp.py's _sftp_cipher_preference): with
            # AES-NI a 256 MiB copy took 0.7 s against chacha20-poly1305's (ssh's
            # first) 1.1 s
            ours += ["-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com"]
        if master or self._socket is None:   # an ssh that makes its own TCP connection
            ours += self.command.dialer()
        else:
            # A session the master cannot open (the host's MaxSessions, a master gone)
            # would have ssh log in on its own, a connection of its own, silently: 7 logins
            # for 8 transfers to a host that opens 2 sessions a connection. This "proxy"
            # ends it instead, with ssh's words, and castlib learns the limit (SFTP
            # sessions shared: SftpBackend._wire; cksum asked again, then read back).
            ours += ["-o", "ProxyCommand=false"]
        return argv[:1] + ours + argv[1:]

    def start_master(self) -> None:
        """Start the master's ssh (the login), now, in this thread, once."""
        if self._master is None:
            self._master = start_ssh(*self.session(master=True))

    def take_master(self) -> subprocess.Popen:
        """The master's ssh (started now if it was not), for its session to hold: closing
        this no longer stops it."""
        self.start_master()
        master, self._master = self._master, None
        return master

    def close(self) -> None:
        """A master's ssh that no session took is stopped; the socket's folder goes. The
        command is not closed: its askpass helper serves the next connection (after a
        dropped line) as well."""
        master, self._master = self._master, None
        if master is not None:
            stop(master)
        self._remove_folder()


# -- starting a connection ahead of the run --------------------------------------------------
# A command that will sync to an SFTP location starts its login first thing (the CLI,
# connect_ahead), before it imports the engine, the catalog and the libraries a session
# needs (~0.1 s): the login, mostly a wait on the network, runs meanwhile. The back-end
# takes that connection when it connects (take_ahead) if it is for the same ssh command
# line and secrets; one nobody took is stopped at exit.
_AHEAD: list[ControlConnection] = []
_AHEAD_LOCK = threading.Lock()


def start_ahead(url, options: dict) -> None:
    """Start the login of an SFTP location's connection now, with the options a back-end
    would give its ssh (FsspecBackend and SftpBackend: castlib's own two options taken
    out). Does nothing where the back-end would not use ssh, or with options it would
    refuse: the run says why, as it would have."""
    options = dict(options)
    timeout = options.pop("connect_timeout", None)
    options.pop("block_size", None)
    if options.pop("ssh_client", "openssh") != "openssh" or SshCommand.available() is None:
        return
    if timeout is None:
        timeout = CONNECT_TIMEOUT_S   # (the back-end's default)
    elif type(timeout) in (int, float) and timeout > 0:
        timeout = float(timeout)   # as the back-end reads a value given
    else:
        return
    if SshCommand.untranslatable(options):
        return
    try:
        connection = ControlConnection(SshCommand(url, options, timeout))
    except ConfigError:
        return
    with _AHEAD_LOCK:
        _AHEAD.append(connection)
    connection.start_master()


def take_ahead(command: SshCommand) -> ControlConnection | None:
    """The connection started ahead for this same ssh command line and secrets, if any
    (each is taken once). Its command is then the taker's to close."""
    with _AHEAD_LOCK:
        for connection in _AHEAD:
            if connection.command.same_as(command):
                _AHEAD.remove(connection)
                return connection
    return None


def _stop_ahead() -> None:
    with _AHEAD_LOCK:
        left, _AHEAD[:] = list(_AHEAD), []
    for connection in left:
        connection.close()
        connection.command.close()


# once each (registered whenever a list became empty again, they piled up in a long-lived
# worker); at exit, LIFO: the ssh still running are killed first, then the connections
# started ahead that nobody took are closed
atexit.register(_stop_ahead)
atexit.register(_stop_started)
