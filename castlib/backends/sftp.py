"""SFTP: SSH hosts, through asyncssh (data, names) and sshfs (listings, folders).

Options (from the config file's `storage:` or a pipeline's `locations:`): `client_keys`
(or `key_filename`), `password`, `passphrase`; host keys are checked against
~/.ssh/known_hosts unless `known_hosts` names another file, or is null to check nothing;
any other asyncssh connection option goes to asyncssh as it is.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import posixpath
import re
import shlex
import stat as statmod
import subprocess
import sys
import threading
import time
import types
from typing import BinaryIO

from ..checksum import CHUNK_SIZE, CKSUM, Hasher, checksum_stream, cksum_available
from ..errors import NotFound, StorageError, Unsupported
from ..transfer import is_temp_name, temp_path
from . import sftp_wire
from . import ssh_command
from .base import (BACKGROUND_END_S, DIR, FILE, LINK, Capabilities, Stat,
                   background_thread)
from .fsspec import (READ_TIMEOUT_S, SECOND_NS, FsspecBackend, _quiet_background_errors,
                     _Reader, _Writer)

log = logging.getLogger(__name__)


# fsspec (its event loop thread, its timeout error) is imported when first needed, not
# with this module: a location's first ssh starts before it (see _connect_openssh)
def _fsspec_asyn():
    import fsspec.asyn

    return fsspec.asyn


def _fs_timeout() -> type:
    from fsspec.exceptions import FSTimeoutError

    return FSTimeoutError


# -- importing asyncssh ------------------------------------------------------------------
# asyncssh looks for liboqs (sntrup761 key exchange) and nettle (UMAC) with
# ctypes.util.find_library as it is imported, which on Linux runs `ldconfig -p`, then for
# a library ldconfig does not know (liboqs, on most machines) gcc and ld: ~0.03 s of every
# command on SFTP, in processes. The first import of asyncssh (from anywhere: sshfs, the
# request helpers) goes through _AsyncsshImport, under which find_library answers None at
# once when no file named lib<name>.* is anywhere those three look (ld.so.cache's names,
# LD_LIBRARY_PATH, LIBRARY_PATH, the linker's and gcc's folders), and asks the stock
# lookup otherwise: the same answer, without the processes when there is nothing to find.
# (A library only gcc could find outside those folders, the stock answer would name and
# asyncssh's dlopen of it fail: an error on import there, no sntrup761 here.)

# the linker's folders (`ld --verbose`'s SEARCH_DIR, `gcc -print-search-dirs`): these,
# with their multiarch and gcc folders below (_LibraryFiles._library_names)
_LIBRARY_TOPS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib",
                 "/usr/local/lib64")


class _LibraryFiles:
    """Whether a file of a library could be found by ctypes.util.find_library on Linux."""

    def __init__(self):
        self._cache: bytes | None = None
        self._names: set[str] | None = None

    def could_exist(self, name: str) -> bool:
        prefix = f"lib{name}."
        if self._cache is None:
            try:
                with open("/etc/ld.so.cache", "rb") as f:   # what `ldconfig -p` prints
                    self._cache = f.read()
            except OSError:
                self._cache = b""
        if prefix.encode("utf-8", "surrogateescape") in self._cache:
            return True
        if self._names is None:
            self._names = self._library_names()
        return any(n.startswith(prefix) for n in self._names)

    @staticmethod
    def _library_names() -> set[str]:
        """The names starting with "lib" in every folder ld and gcc search, and in those
        of LD_LIBRARY_PATH and LIBRARY_PATH (a superset: intermediate folders too)."""
        import os

        names: set[str] = set()

        def listing(folder: str) -> list[str]:
            try:
                entries = os.listdir(folder)
            except OSError:   # absent, or not a folder
                return []
            names.update(n for n in entries if n.startswith("lib"))
            return entries

        for var in ("LD_LIBRARY_PATH", "LIBRARY_PATH"):
            for folder in os.environ.get(var, "").split(os.pathsep):
                listing(folder or ".")
        for top in _LIBRARY_TOPS:
            for entry in listing(top):
                if "-linux-" in entry:   # lib/x86_64-linux-gnu, and lib/x86_64-linux-gnu/12
                    for sub in listing(f"{top}/{entry}"):
                        if sub[:1].isdigit():
                            listing(f"{top}/{entry}/{sub}")
                elif entry == "gcc":   # lib/gcc/x86_64-linux-gnu/12
                    for triplet in listing(f"{top}/gcc"):
                        for version in listing(f"{top}/gcc/{triplet}"):
                            listing(f"{top}/gcc/{triplet}/{version}")
        for entry in listing("/usr"):   # /usr/x86_64-linux-gnu/lib, .../lib/x86_64-linux-gnu
            if "-linux-" in entry:
                for sub in listing(f"/usr/{entry}"):
                    if sub.startswith("lib"):
                        for inner in listing(f"/usr/{entry}/{sub}"):
                            if "-linux-" in inner:
                                listing(f"/usr/{entry}/{sub}/{inner}")
        return names


class _AsyncsshImport:
    """A finder on sys.meta_path until asyncssh is first imported: it runs that import
    with the lookup above in ctypes.util.find_library, then leaves."""

    def find_spec(self, name, path=None, target=None):
        if name != "asyncssh":
            return None
        import sys

        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = next((s for s in (f.find_spec(name, path, target) for f in sys.meta_path
                                 if hasattr(f, "find_spec")) if s is not None), None)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            import ctypes.util

            stock, files = ctypes.util.find_library, _LibraryFiles()

            def find_library(lib):
                return stock(lib) if files.could_exist(lib) else None

            ctypes.util.find_library = find_library
            try:
                run(module)
            finally:
                if ctypes.util.find_library is find_library:
                    ctypes.util.find_library = stock
                loader.__dict__.pop("exec_module", None)

        loader.exec_module = exec_module
        return spec


def _import_asyncssh_lightly() -> None:
    import sys

    if (sys.platform.startswith("linux") and "asyncssh" not in sys.modules
            and not any(isinstance(f, _AsyncsshImport) for f in sys.meta_path)):
        sys.meta_path.insert(0, _AsyncsshImport())


_import_asyncssh_lightly()
MAX_SFTP_SESSIONS = 8   # SFTP sessions a connection: OpenSSH allows 10 channels (MaxSessions)
# Commands (cksum, md5sum) at once on the connection, each a channel: the two channels the SFTP
# sessions leave. Beyond OpenSSH's 10, ssh would not fail: it would log in again, a
# connection of its own for each command, which a host's admins would rather not see.
MAX_COMMANDS = 10 - MAX_SFTP_SESSIONS
# A command's channel, closed, is freed by sshd a moment later (its next loop turn): the
# next command's open, sent at once, can find it still counted. Over asyncssh, a refused
# open is asked again after these pauses (None: given up), not its file read back.
_CHANNEL_FREED_S = (0.02, 0.1, None)


class SftpBackend(FsspecBackend):
    """One location on an SSH host, through castlib's SFTP client (sftp_wire), a session
    of each thread's (see _wire), each wait bounded (see _on_sftp). Over OpenSSH's ssh
    (the default: see _openssh_command) every call goes through those sessions. Over
    asyncssh, a copy's requests (its writes, read-back, stats, set-stats and rename;
    reads) do; listings and folders go through sshfs, and the rest to asyncssh's SFTP
    client."""

    description = "SSH hosts over SFTP (OpenSSH's ssh, or asyncssh)"
    # SFTP v3 sets permission bits and folder mtimes; a link's own mtime needs an OpenSSH
    # extension (lsetstat), and owners need root on the far side: not claimed
    capabilities = Capabilities(set_mtime=True, mtime_precision_ns=SECOND_NS, symlinks=True,
                                empty_dirs=True, permissions=True, dir_mtimes=True)
    connect_is_handshake = True   # key exchange and login: started early (see FsspecBackend)
    # A small file's copy is three round trips on its session, each a wait on the server
    # (and on ssh's and the server's share of the CPU): with 4 sessions, 300 small files
    # to rclone serve sftp took 0.60 s, with 8 0.54 s (rclone copy's 4: 0.57 s; its 8,
    # which are 8 connections, 0.76 s). Sessions beyond MAX_SFTP_SESSIONS share.
    default_transfers = 8

    def __init__(self, url, options: dict | None = None):
        super().__init__(url, options)
        self._sftp = None             # the connection's first SFTP session
        self._sessions: list = []     # [session, thread using it], the first one included
        self._more_sessions = True    # False once the server refused a channel
        self._sftp_kwargs: dict = {}
        self._wires: list = []        # [SftpWire, thread using it] (see _wire)
        self._mine = threading.local()   # .held: (SftpWire, generation) the thread holds
        self._more_wires = True       # False once the server refused a channel for one
        self._setstat_policy: bool | None = None   # see _setstat_denied_by_policy
        self.posix_rename = True      # False once the server refused it (see _sftp_rename)
        # What a small file's upload already told (see _SftpFile and copy_file's steps):
        self._read_back: dict[str, bytes] = {}   # temporary path -> its bytes, read back
        self._pending_attrs: dict[str, dict] = {}   # temporary path -> set-stat at rename
        self._setstat_proven: set[str] = set()   # set-stat kinds the server has done here
        self._published = threading.local()      # .entries: path -> (Stat, when) of renames
        # a write announced (expect_write), by thread: .next, the path to open with the
        # thread's next rename; .opened, (path, session, the open's answer) once sent
        self._ahead = threading.local()
        # {algorithm: whether its command runs on the host} (see "verification" below)
        self._server_sums: dict[str, bool] = {}
        self._command_turns = threading.BoundedSemaphore(MAX_COMMANDS)   # (their turns)
        self._ssh = self._openssh_command()      # None: asyncssh connects (see below)
        self._more_coming = threading.Event()    # set: no session is being opened early
        self._more_coming.set()
        # notified as each session opened early comes (and when the last has): see _wire
        self._session_came = threading.Condition(self._connect_lock)
        self._openers: list[threading.Thread] = []   # the threads opening them (see close)
        self._openers_busy = 0   # how many of them are still at it
        # the exception classes of this location's sessions (see sftp_wire)
        self._E = sftp_wire.OWN_ERRORS if self._ssh is not None else None

    # -- which SSH client ----------------------------------------------------------------------
    # OpenSSH's own `ssh` carries the SFTP sessions where it can (the option `ssh_client:
    # openssh`, the default when ssh is installed and every option translates to it): the
    # key exchange, the login and every packet's encryption in C, in processes of their
    # own, and no asyncssh import (0.1-0.2 s of a short run); the user's ~/.ssh/config,
    # agent, Kerberos and ProxyJump apply, as to any ssh. `ssh_client: asyncssh` keeps
    # SSH in Python (asyncssh), with its own options.
    _SSH_CLIENTS = ("openssh", "asyncssh")

    def _openssh_command(self):
        from ..errors import ConfigError
        from .ssh_command import SshCommand

        choice = self._storage_options.pop("ssh_client", None)
        if choice is not None and choice not in self._SSH_CLIENTS:
            raise ConfigError(f"{self._where()}: ssh_client must be one of "
                              f"{', '.join(self._SSH_CLIENTS)}, not {choice!r}")
        if choice == "asyncssh":
            return None
        left_out = SshCommand.untranslatable(self._storage_options)
        if choice is None and (left_out or SshCommand.available() is None):
            return None
        if left_out:
            raise ConfigError(f"{self._where()}: ssh_client: openssh cannot carry the option "
                              f"{left_out[0]} (set ssh_client: asyncssh)")
        if SshCommand.available() is None:
            raise ConfigError(f"{self._where()}: ssh_client: openssh needs the ssh command, "
                              "which is not installed")
        try:
            return SshCommand(self.url, self._storage_options, self.connect_timeout)
        except ConfigError as exc:   # (a key file missing, a user name refused): where
            raise ConfigError(f"{self._where()}: {exc}") from None

    @property
    def _login_timeout(self) -> float:
        """How long ssh may take to give a session: its ConnectTimeout bounds the TCP
        connection and the banner, not the key exchange and login after them (asyncssh's
        login_timeout is the connect timeout); three of it leave room for a ProxyJump's
        second login or Kerberos."""
        return 3 * self.connect_timeout

    @property
    def _errors_ns(self):
        if self._E is None:
            self._E = sftp_wire._asyncssh_errors()
        return self._E

    # -- connecting ------------------------------------------------------------------------
    def _root_path(self) -> str:
        return self.url.path.rstrip("/") or "/"

    def _connect(self):
        if self._ssh is not None:
            return self._connect_openssh()
        import sshfs

        _tune_asyncssh_logging()
        _quiet_background_errors(_fsspec_asyn().get_loop())
        opts = dict(self._storage_options)
        if "key_filename" in opts:
            keys = opts.pop("key_filename")
            opts.setdefault("client_keys", [keys] if isinstance(keys, str) else list(keys))
        if isinstance(opts.get("client_keys"), str):
            opts["client_keys"] = [opts["client_keys"]]
        # asyncssh's own default (~/.ssh/known_hosts) unless the options say otherwise;
        # sshfs would silently turn host key checking off.
        opts.setdefault("known_hosts", ())
        opts.setdefault("connect_timeout", self.connect_timeout)
        opts.setdefault("login_timeout", self.connect_timeout)
        opts.setdefault("encryption_algs", _sftp_cipher_preference())
        if self.url.password and "password" not in opts:
            opts["password"] = self.url.password
        if self.url.user:
            opts.setdefault("username", self.url.user)
        if self.url.port:
            opts.setdefault("port", self.url.port)
        # names that are not UTF-8 round-trip as surrogate escapes, as local names do
        sftp_kwargs = {"path_encoding": "utf-8", "path_errors": "surrogateescape"}
        fs = sshfs.SSHFileSystem(self.url.hostname, skip_instance_cache=True,
                                 sftp_client_kwargs=sftp_kwargs, **opts)
        _fsspec_asyn().sync(fs.loop, _lighten_connection, fs.client, timeout=READ_TIMEOUT_S)
        self._sftp = _fsspec_asyn().sync(fs.loop, fs.client.start_sftp_client,
                                         timeout=READ_TIMEOUT_S, **sftp_kwargs)
        self._sftp_kwargs = sftp_kwargs
        self._sessions = [[self._sftp, threading.current_thread()]]
        self._more_sessions = True
        return fs

    def _connect_openssh(self):
        """The first session over OpenSSH's ssh (the login: see connect_in_background):
        the location's 'connection' is its sessions, each an ssh process (_wire), driven
        by the threads that use it (no event loop, no fsspec). Its login may have been
        started by the command already (ssh_command.start_ahead)."""
        connection = ssh_command.take_ahead(self._ssh)   # (started by the CLI: see there)
        if connection is not None:
            # the same command line and secrets, with an askpass helper of its own: this
            # back-end's from now on (its next connections, its close), the other goes
            own, self._ssh = self._ssh, connection.command
            own.close()
        try:
            host, wire = self._open_master(connection)
        except ssh_command.SshConnectionLost as exc:
            if not ssh_command.dialer_did_not_run(exc, self._ssh):
                raise
            # ssh_dialer.py did not run under sys.executable (an embedded interpreter's
            # host program): this login, and every later one, without it
            log.info("%s: ssh's connection helper did not run under %s; ssh connects "
                     "itself", self._where(), sys.executable)
            ssh_command.give_up_dialer()
            host, wire = self._open_master(None)
        self._sftp = wire
        self._sessions, self._more_sessions = [], False
        self._wires, self._more_wires = [[wire, threading.current_thread()]], True
        self._open_ahead(host, min(self._sessions_wanted, MAX_SFTP_SESSIONS) - 1)
        return host

    def _open_ahead(self, host, count: int) -> None:
        """Open `count` more sessions on `host` at once, in the background, for the threads
        the run will use (rather than each when a transfer thread first asks); their places
        are kept meanwhile (see _wire). Called with the connect lock held."""
        if count <= 0:
            return
        places = [[None, _NOBODY] for _ in range(count)]
        try:   # (what it changes here waits for the lock held, as the lines below do)
            opener = background_thread(self._open_more_wires, host, places,
                                       self._generation, name="castlib-sftp-sessions")
        except RuntimeError as exc:   # no thread to be had: each thread opens its own
            log.debug("%s: sessions not opened ahead (%s)", self._where(), exc)
            return
        self._wires += places
        self._openers_busy += 1
        self._more_coming.clear()
        self._openers.append(opener)

    def sessions_needed(self, sessions: int) -> None:
        """Over ssh, the sessions still missing of those the stage now knows it will use
        (each an ssh process, ~10 ms of CPU here and a channel of the server's 10):
        opened now, together, in the background. The login opens one: a sync's 8
        transfer threads come to the number of files it copies, a one-file sync opens one
        more session, not seven. Over asyncssh, each thread opens its own when it first
        asks."""
        if self._ssh is None:
            return
        with self._session_came:   # (the connect lock: after a login under way)
            self._sessions_wanted = max(self._sessions_wanted, sessions)
            host = self._fs
            if isinstance(host, _OpensshHost) and self._more_wires:
                self._open_ahead(host, min(self._sessions_wanted, MAX_SFTP_SESSIONS)
                                 - len(self._wires))

    def _open_master(self, connection) -> tuple:
        """The host of a connection (the one started ahead, else a new one, whose login
        starts now), and the login's session."""
        host = _OpensshHost(connection or ssh_command.ControlConnection(self._ssh))
        try:
            return host, host.open_master(self._login_timeout)
        except BaseException:
            host.close()   # (no session of it is open: its ssh is stopped, its folder goes)
            raise

    def _open_more_wires(self, host, places: list, generation: int) -> None:
        """Open a session for each place at once, each, as soon as it is open, for
        whichever thread asks first (see _held_or_handed_on; a thread waiting for one
        takes the first to come: see _wire); one the server refused is a place given up."""
        filled: list = []

        def came(wire) -> None:
            with self._session_came:
                if generation != self._generation:
                    wire.close()   # (a connection given up since: its own go with it)
                    return
                place = places[len(filled)]
                place[0] = wire
                filled.append(place)
                self._session_came.notify_all()

        try:
            host.open_wires(len(places), self._login_timeout, came)
        finally:
            with self._session_came:
                # by identity: a place not filled, [None, nobody], equals each of a newer
                # connection's (a line that dropped meanwhile), which must stay
                given_up = places[len(filled):]
                self._wires = [entry for entry in self._wires
                               if not any(entry is place for place in given_up)]
                if generation == self._generation and given_up:
                    self._more_wires = False   # the server's limit: threads share these
                self._openers_busy -= 1
                if not self._openers_busy:
                    self._more_coming.set()
                self._session_came.notify_all()

    def _client(self):
        """This thread's SFTP session, connected (a back-end's first call may be any).

        Each transfer thread gets a session of its own on the location's one connection
        (up to MAX_SFTP_SESSIONS; a session whose thread has ended is handed on), so that
        parallel transfers do not queue behind one another on the server: OpenSSH runs
        one sftp-server process a session, rclone runs a session's commands one at a
        time. Beyond that, or once the server refuses another channel (OpenSSH's
        MaxSessions), threads share the first session. The threads' lean sessions (see
        _wire), which carry their files' bytes, count against the same limit: these
        serve the rest (deletions, links, renames without posix-rename)."""
        if self._ssh is not None:   # every session is a wire (each an ssh process)
            return self._wire()
        me = threading.current_thread()
        with self._connect_lock:
            # connected, again if another thread saw the line drop since (a reentrant lock)
            fs = self.fs
            generation, first = self._generation, self._sftp
            held = _held_or_handed_on(self._sessions, me)
            if held is not None:
                return held
            if not self._more_sessions or \
                    len(self._sessions) + len(self._wires) >= MAX_SFTP_SESSIONS:
                return first
            entry = [first, me]   # reserved; the session itself comes below, unlocked
            self._sessions.append(entry)
        try:
            session = _fsspec_asyn().sync(fs.loop, fs.client.start_sftp_client,
                                          timeout=READ_TIMEOUT_S, **self._sftp_kwargs)
        except Exception as exc:  # no channel for it: share the first session
            log.debug("%s: no further SFTP session (%s); sharing one", self._where(), exc)
            with self._connect_lock:
                if generation == self._generation:   # not of a connection given up since
                    self._more_sessions = False
                if entry in self._sessions:
                    self._sessions.remove(entry)
            return first
        with self._connect_lock:
            if generation == self._generation:
                entry[0] = session
        return session

    def _wire(self, afresh: bool = False):
        """This thread's lean SFTP session (sftp_wire.SftpWire), for a file's copy: its
        writes (_sftp_write_whole, or _sftp_open_write and its pipe), stats, set-stats
        and rename (_sftp_publish), and reads (_sftp_open_sized): the same requests as
        asyncssh's client makes, at two thirds of the event loop's time for a small
        file (over asyncssh), or with no event loop at all (over ssh: the thread that
        waits reads the answers), which is what limits a sync of many small files.

        A session of its own on the location's one connection for each thread, handed on
        as _client() hands its sessions on, up to MAX_SFTP_SESSIONS with the asyncssh
        sessions; beyond that, threads share the first. Copies need no asyncssh session
        of the thread's own, so that OpenSSH's 10 channels a connection leave one to
        each of 4 transfer threads for cksum (see _sum_on_server). A server that
        refuses the channel (OpenSSH's MaxSessions) leaves the thread on its asyncssh
        session, which the helpers take as well."""
        held = getattr(self._mine, "held", None)
        if (held is not None and not afresh and held[1] == self._generation
                and self._fs is not None and not held[0].closed):
            # the thread's own, as below would find it: no lock taken (a copy asks for
            # its session four times, 8 threads at once, 300 small files: ~16 % of the
            # threads' samples were waits for _connect_lock)
            return held[0]
        me = threading.current_thread()
        if self._ssh is not None and not self._more_coming.is_set():
            self.fs   # connected: then the sessions opened early are coming, and this
            # thread takes the first it may (the login's, say, or the first opened early
            # that no thread took), not waiting for the rest: to a host whose shell starts
            # slowly (each session starts the user's shell), the last of 7 came 0.7 s
            # after the first, while a one-file sync's only copy waited for it
            deadline = time.monotonic() + self._login_timeout
            with self._session_came:
                while not self._more_coming.is_set():
                    ready = _held_or_handed_on(self._wires, me)
                    left = deadline - time.monotonic()
                    if (ready is not None and not ready.closed) or left <= 0:
                        break
                    self._session_came.wait(left)
        with self._connect_lock:
            fs = self.fs   # connected, as in _client
            generation = self._generation
            held = _held_or_handed_on(self._wires, me)
            if held is not None and not held.closed:
                self._mine.held = (held, generation)
                return held
            if held is not None:
                # a session the server broke (a reply it could not take: beyond repair,
                # as asyncssh's rule is) is let go, or its thread's every later copy
                # would fail; a new one below
                self._wires = [entry for entry in self._wires
                               if entry[0] is None or not entry[0].closed]
            if not self._more_wires or \
                    len(self._wires) + len(self._sessions) >= MAX_SFTP_SESSIONS:
                shared = next((entry[0] for entry in self._wires
                               if entry[0] is not None and not entry[0].closed), None)
                if shared is not None or self._ssh is None:
                    return shared if shared is not None else self._client()
            entry = [None, me]   # reserved; the session itself comes below, unlocked
            self._wires.append(entry)
        try:
            wire = self._open_wire(fs)
        except Exception as exc:
            with self._connect_lock:
                if entry in self._wires:
                    self._wires.remove(entry)
                shared = next((e[0] for e in self._wires
                               if e[0] is not None and not e[0].closed), None)
            if self._master_gone(exc) and not afresh:
                # the master's ssh ended (its own session broken, the line dropped): the
                # connection, and every session on it, went with it. A new login, once
                # (ssh no longer logs in on its own for a session: see ssh_command)
                self._connection_failed(generation)
                return self._wire(afresh=True)
            if not self._no_further_session(exc) or (self._ssh is not None and shared is None):
                raise
            # no channel for it (MaxSessions), no SFTP v3 there, no further login (sshd's
            # MaxStartups): asyncssh's session serves, or another thread's wire
            log.debug("%s: no further lean SFTP session (%s)", self._where(), exc)
            with self._connect_lock:
                if generation == self._generation:   # not of a connection given up since
                    self._more_wires = False
            return self._client() if self._ssh is None else shared
        with self._connect_lock:
            if generation == self._generation:
                entry[0] = wire
                self._mine.held = (wire, generation)
        return wire

    def _master_gone(self, exc: BaseException) -> bool:
        """Whether a session that could not be opened over ssh says the master's
        connection is gone (its control socket refused or missing, the line), not that
        the host opens no more sessions on it, nor that it is slow."""
        return (self._ssh is not None and isinstance(exc, ssh_command.SshFailure)
                and not isinstance(exc, (ssh_command.SshSessionRefused,
                                         ssh_command.SshTimeout)))

    def _no_further_session(self, exc: BaseException) -> bool:
        """Whether a session that could not be opened is one too many (the server's
        limit), not a line that is gone."""
        if self._ssh is None:
            import asyncio

            import asyncssh

            return isinstance(exc, (asyncssh.Error, OSError, _fs_timeout(),
                                    asyncio.TimeoutError))
        return isinstance(exc, (sftp_wire.SFTPError, OSError, TimeoutError))

    def _open_wire(self, fs):
        if self._ssh is not None:
            return fs.open_wire(self._login_timeout)
        from .sftp_wire import open_wire

        # names as the asyncssh sessions have them (see _connect)
        return _fsspec_asyn().sync(fs.loop, open_wire, fs.client,
                                   self._sftp_kwargs.get("path_encoding", "utf-8"),
                                   self._sftp_kwargs.get("path_errors", "surrogateescape"),
                                   timeout=READ_TIMEOUT_S)

    def _on_sftp(self, call, *args, **kwargs):
        """Run one of the SFTP client's coroutines (or a wire's request, which returns a
        future) on the file system's loop, and wait for it a bounded time: a request on a
        connection that died under it may never be answered (fsspec's own SSHFile waits
        for ever there). The call itself is made on the loop: a wire's requests must be.
        It runs as it is: fsspec.asyn.sync would wrap it in asyncio.wait_for, a task more
        on the loop's thread for every call.

        Over OpenSSH's ssh, the sessions are driven by the threads that use them (see
        sftp_wire.SyncFuture): the call is made, and waited for, in this thread."""
        if self._ssh is not None:
            self.fs   # (connected: a session's first call may be any)
            result = call(*args, **kwargs)
            if isinstance(result, sftp_wire.SyncFuture):
                return result.result(READ_TIMEOUT_S)
            return (sftp_wire.drive(result) if isinstance(result, types.CoroutineType)
                    else result)
        import asyncio   # (asyncssh's sessions: their loop has imported it)

        fut = asyncio.run_coroutine_threadsafe(_awaited(call, args, kwargs), self.fs.loop)
        try:
            return fut.result(timeout=READ_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            if fut.done():   # the call's own timeout (one exception type since 3.11)
                raise _fs_timeout()(str(fut.exception())) from None
            fut.cancel()
            raise _fs_timeout()(f"no answer within {READ_TIMEOUT_S} s") from None
        except asyncio.TimeoutError as exc:   # the call's own, on 3.10
            raise _fs_timeout()(str(exc)) from None

    def _connection_failed(self, generation: int) -> None:
        """An SSH connection that dropped stays dropped (every later call fails with 'not
        open'): forget it, so the engine's retry connects afresh. Once per connection,
        however many transfer threads saw it fail."""
        given_up = None
        with self._connect_lock:
            if generation == self._generation and self._fs is not None:
                given_up = self._fs
                self._generation += 1
                self._fs = self._sftp = None
                self._sessions, self._more_sessions = [], True
                self._wires, self._more_wires = [], True
        if given_up is not None:
            # Closed, not waited for: a connection given up at a timeout may still be
            # open, its sessions waiting for answers that will not come (their futures
            # pending, the server's processes held) to the end of the run. Closing it
            # fails what waits there (connection lost: transient, tried again).
            if isinstance(given_up, _OpensshHost):   # (its sessions need no loop)
                given_up.close()
                return
            try:
                given_up.loop.call_soon_threadsafe(given_up.client.close)
            except (AssertionError, RuntimeError):   # (sshfs: no client; the loop ended)
                pass

    def close(self) -> None:
        self._abandon_early_connect()
        fs, self._fs = self._fs, None
        try:
            if isinstance(fs, _OpensshHost):   # every session of it, the master last
                fs.close()
            elif self._sftp is not None and fs is not None:
                sessions = [entry[0] for entry in self._sessions] or [self._sftp]
                sessions += [entry[0] for entry in self._wires if entry[0] is not None]
                _fsspec_asyn().sync(fs.loop, _close_ssh, sessions, fs.client, timeout=5)
        except Exception:  # closing is best effort: the connection may be gone already
            pass
        self._sftp = None
        self._sessions = []
        self._wires = []
        if self._ssh is not None:
            self._ssh.close()   # (its askpass helper, if any; made again if needed)
        openers, self._openers = self._openers, []
        for opener in openers:
            if opener is not threading.current_thread():
                # its sessions were stopped above, and none starts after: it ends at
                # once. Waited for, so that nothing of this location runs on after close
                opener.join(BACKGROUND_END_S)

    # -- listing -------------------------------------------------------------------------
    def walk(self, on_error):
        return self._walk_by_folder(on_error)

    def _child(self, folder: str, info: dict) -> str:
        """(asyncssh's listings, through sshfs, which joins each name to the folder.) A
        name that is not one ('a/..', 'x/y', empty: a server that lies) fails the
        folder's listing: its last part was taken, and 'a/..' became '..', a path
        above the location (a sync from it wrote outside its destination, and the
        walk went round for ever)."""
        parent = self._full(folder).rstrip("/") + "/"
        name = info["name"]
        rest = name[len(parent):] if name.startswith(parent) else None
        if not rest or "/" in rest or rest in (".", ".."):
            raise StorageError(f"{self._where(folder)}: the server's listing holds "
                               f"{name[len(parent):] if rest is not None else name!r}, "
                               "which is not a name", path=folder)
        return super()._child(folder, info)

    def _list_folder(self, folder: str) -> list[Stat]:
        if self._ssh is None:
            entries = super()._list_folder(folder)
        else:
            with self._errors(folder):
                names = self._on_sftp(self._wire().readdir, self._full(folder))
            entries = [_stat_from_attrs(f"{folder}/{name}" if folder else name, attrs)
                       for name, attrs in names]
            entries.sort(key=lambda st: st.path)
        for st in entries:
            if st.kind == LINK:
                st.link_target = self._readlink(st.path)
        return entries

    def mkdir(self, path: str) -> None:
        if self._ssh is None:
            return super().mkdir(path)
        with self._errors(path):
            self._makedirs(self._full(path))

    def make_folders(self, paths: list[str]):
        """(Backend.make_folders) The folders of one depth in one round trip (over ssh and
        over asyncssh alike; 5,000 folders over asyncssh: 21 s one by one, now 0.6 s):
        each one's mkdir and then its lstat, sent together (a server runs the requests
        about one file in the order they came: the SFTP drafts), a depth after the one
        above it was answered. 50 folders 3 deep: 3 round trips, not 100 (2 s over a
        line of 20 ms). A folder whose mkdir failed and that is no folder now (a parent
        missing, a file in the way, no permission) is made again one by one (mkdir):
        what it says is what the run reports."""
        for level in _by_depth(paths, deepest_first=False):
            answers = self._in_one_round_trip(_sftp_make_folders, level)
            for path, attrs in zip(level, answers):
                if attrs is not None and statmod.S_ISDIR(attrs.permissions or 0):
                    yield path, _stat_from_attrs(path, attrs)
                    continue
                try:   # one by one: made, or the reason why not
                    self.mkdir(path)
                    yield path, self.stat(path)
                except StorageError as exc:
                    yield path, exc

    def _in_one_round_trip(self, helper, paths: list[str]) -> list:
        """What `helper` (_sftp_make_folders, _sftp_lstats) answers for each of `paths`,
        its requests sent together; None for each where the line or the session failed
        (the caller then asks one by one, which says why)."""
        try:
            with self._errors(paths[0]):
                return self._on_sftp(helper, self._wire(), [self._full(p) for p in paths])
        except StorageError:
            return [None] * len(paths)

    def stat_many(self, paths: list[str]):
        """(Backend.stat_many) The lstats of up to _BATCH paths in one round
        trip. A path whose lstat failed otherwise than "no such file" is asked again one
        by one (stat), which says why."""
        for start in range(0, len(paths), _BATCH):
            batch = paths[start:start + _BATCH]
            answers = self._in_one_round_trip(_sftp_lstats, batch)
            for path, attrs in zip(batch, answers):
                if attrs is False:
                    yield path, None
                elif attrs is not None:
                    yield path, _stat_from_attrs(path, attrs)
                else:
                    try:
                        yield path, self.stat(path)
                    except StorageError as exc:
                        yield path, exc

    def set_folder_metadata(self, folders):
        """(Backend.set_folder_metadata) Once the server has set both bits and
        times here (each kind's first refusal is learned one by one, as chmod and
        set_mtime learn it): one set-stat a folder with both, those of one depth sent
        together, deepest first (a folder's bits after those in it: one made read-only
        first would refuse them). 50 folders: 3 round trips, not 100. A folder whose
        set-stat failed is done again one by one, and says why as chmod and set_mtime do."""
        asked = {path: (mode, mtime) for path, mode, mtime in folders}
        unproven = [entry for entry in folders if not self._setstat_proven_for(*entry)]
        while unproven:   # until the kinds asked are proven, or refused
            entry = unproven.pop(0)
            del asked[entry[0]]
            yield from super().set_folder_metadata([entry])
            unproven = [e for e in unproven if not self._setstat_proven_for(*e)]
        for level in _by_depth(list(asked), deepest_first=True):
            requests = []
            for path in level:
                mode, mtime = asked[path]
                attrs = {} if mode is None or not self.capabilities.permissions else \
                    {"permissions": mode & 0o7777}
                if mtime is not None and self.capabilities.set_mtime:
                    attrs["mtime"] = mtime // SECOND_NS   # SFTP v3 keeps whole seconds
                requests.append((self._full(path), attrs))
            try:
                with self._errors(level[0]):
                    answers = self._on_sftp(_sftp_set_stats, self._wire(), requests)
            except StorageError:   # the line, the session: each one says it below
                answers = [False] * len(level)
            for path, (_, attrs), done in zip(level, requests, answers):
                mode, mtime = asked[path]
                if done:   # (a kind the server refused earlier was not asked: False)
                    yield path, (None if mode is None else "permissions" in attrs,
                                 None if mtime is None else "mtime" in attrs)
                else:   # refused, or failed: one by one, which says why
                    yield from super().set_folder_metadata([(path, mode, mtime)])

    def _setstat_proven_for(self, path: str, mode: int | None, mtime: int | None) -> bool:
        """Whether each kind asked for here is known: set by the server here already (see
        _setstat), or refused (the capability learned off)."""
        return ((mode is None or "permissions" in self._setstat_proven
                 or not self.capabilities.permissions) and
                (mtime is None or "set_mtime" in self._setstat_proven
                 or not self.capabilities.set_mtime))

    def _makedirs(self, full: str) -> None:
        """`full` and any folder above it that is missing (as fs.makedirs, exist_ok)."""
        E = self._errors_ns
        try:
            self._on_sftp(self._wire().mkdir, full)
            return
        except E.SFTPError as exc:
            try:
                attrs = self._on_sftp(self._wire().stat, full)
            except E.SFTPNoSuchFile:
                attrs = None
            if attrs is not None:
                if statmod.S_ISDIR(attrs.permissions or 0):
                    return
                raise FileExistsError(f"not a folder: {full}") from None
            parent = posixpath.dirname(full)
            if parent == full or not isinstance(exc, (E.SFTPNoSuchFile, E.SFTPFailure)):
                raise
        self._makedirs(parent)
        try:
            self._on_sftp(self._wire().mkdir, full)
        except E.SFTPError:   # made meanwhile by another thread: fine if a folder
            attrs = self._on_sftp(self._wire().stat, full)
            if not statmod.S_ISDIR(attrs.permissions or 0):
                raise

    def stat(self, path: str) -> Stat | None:
        back = self._read_back.get(path)
        if back is not None:   # a temporary file just written and read back whole
            return Stat(path, FILE, len(back), None, None)
        entry = getattr(self._published, "entries", {}).pop(path, None)
        if entry is not None and time.monotonic() - entry[1] < PUBLISHED_STAT_S:
            return entry[0]
        return self._sftp_lstat(path)

    def _sftp_lstat(self, path: str) -> Stat | None:
        self.fs   # connected: the SFTP client comes with the connection
        try:
            with self._errors(path):
                try:
                    attrs = self._on_sftp(self._wire().lstat, self._full(path))
                except self._errors_ns.SFTPNoSuchFile:
                    return None
        except NotFound:
            return None
        st = _stat_from_attrs(path, attrs)
        if st.kind == LINK:
            st.link_target = self._readlink(path)
        return st

    def _readlink(self, path: str) -> str | None:
        try:
            return self._on_sftp(self._client().readlink, self._full(path))
        except Exception:  # a link we cannot read is still listed, without its target
            return None

    # -- data ----------------------------------------------------------------------------
    def open_read(self, path: str, exact: bool = False) -> BinaryIO:
        with self._errors(path):
            return _Reader(self, path, _SftpFile(self, path, "rb", exact=exact))

    def open_write(self, path: str) -> BinaryIO:
        # castlib's own temporary files are read back as soon as they are written (see
        # _SftpFile.close), for the verification that follows
        with self._errors(path):
            return _Writer(self, path, _SftpFile(self, path, "wb",
                                                 read_back=self._reads_back(path)))

    # -- small files, several at once --------------------------------------------------------
    # Over OpenSSH's ssh, the copies of a few small files go as one: their opens in one
    # channel write, then their writes, closes and read-backs' opens, then their reads,
    # then their set-stats, renames and stats (sftp_wire.drive_together): four round
    # trips for the group, where each file took three. Each file's requests are
    # those of its copy alone (_sftp_write_whole, _sftp_publish), in the same order.

    @property
    def writes_files_together(self) -> bool:
        return self._ssh is not None

    def write_files(self, files: list[tuple[str, bytes]]) -> list[StorageError | None]:
        if self._ssh is None or len(files) < 2:
            return super().write_files(files)
        generation = self._generation   # (the connection the group uses: see _translated)
        try:
            wire = self._wire()   # (connected, as every call: _wire connects)
            copies = [_sftp_write_whole(
                wire, self._full(path), "wb", data,
                len(data) <= READ_BACK_MAX and self._reads_back(path),
                self._opened_ahead(self._full(path), wire)) for path, data in files]
        except Exception as exc:   # noqa: BLE001 - no session: each fails with it
            return [self._translated(exc, path, generation) for path, _ in files]
        outcomes: list[StorageError | None] = []
        for (path, _), done in zip(files, sftp_wire.drive_together(copies, wire)):
            if isinstance(done, BaseException):
                outcomes.append(self._translated(done, path, generation))
                continue
            if done is not None:
                self._read_back[path] = done
            outcomes.append(None)
        return outcomes

    def rename_many(self, renames: list[tuple[str, str]]) -> list[StorageError | None]:
        if self._ssh is None or not self.posix_rename or len(renames) < 2:
            return super().rename_many(renames)
        generation = self._generation
        try:
            wire = self._wire()
        except Exception as exc:   # noqa: BLE001 - no session: each fails with it
            return [self._translated(exc, src, generation) for src, _ in renames]
        steps = []
        for src, dst in renames:
            self._read_back.pop(src, None)
            steps.append(_sftp_publish(wire, self._full(src), self._full(dst),
                                       self._pending_attrs.pop(src, None)))
        published = self._published.entries = {}
        outcomes: list[StorageError | None] = []
        for (src, dst), done in zip(renames, sftp_wire.drive_together(steps, wire)):
            if isinstance(done, BaseException):
                outcomes.append(self._translated(done, src, generation))
                continue
            attrs, renamed = done
            if not renamed:   # (its set-stats went out): as rename() goes on from there
                if self.posix_rename:
                    log.info("%s: the server refuses posix-rename; renaming in steps",
                             self._where())
                    self.posix_rename = False
                try:
                    with self._errors(src):
                        self._sftp_rename(src, dst)
                except StorageError as exc:
                    outcomes.append(exc)
                    continue
            elif attrs is not None:
                published[dst] = (_stat_from_attrs(dst, attrs), time.monotonic())
            outcomes.append(None)
        return outcomes

    def _translated(self, exc: BaseException, path: str, generation: int) -> StorageError:
        """The castlib error a call on `path` raises for `exc` (see _errors), as if raised
        where the group began: a line lost gives up the connection of `generation`, not
        one another thread made while the group waited (closed under its copies)."""
        if not isinstance(exc, Exception):
            raise exc
        try:
            with self._errors(path) as call:
                call.generation = generation
                raise exc
        except StorageError as error:
            return error
        raise AssertionError("_errors let an exception through")   # pragma: no cover

    def _reads_back(self, path: str) -> bool:
        """Whether a file written at `path` is read back as it is closed (see
        _SftpFile.close): castlib's own temporary files, verified next."""
        return is_temp_name(posixpath.basename(path), self.temp_key)

    # -- a write announced: its open sent with the copy before it ---------------------------
    # A small file's copy is four round trips: the open, the write with the close and the
    # read-back's open, the read, and the rename (see _sftp_write_whole, _sftp_publish).
    # The engine says which temporary file a transfer thread writes next (copy_file's
    # before_rename), and its open goes out with the rename of the copy before it: three
    # round trips a file instead of four (300 small files to rclone serve sftp: 0.556 ->
    # 0.510 s). The file is then created before its source is read; one that no copy
    # takes is closed and removed (expect_write(None), _opened_ahead).

    def expect_write(self, path: str | None) -> None:
        """(Backend.expect_write) Over OpenSSH's ssh, the open of `path` (a temporary
        name of castlib's) goes out with this thread's next rename; None: no write is
        expected, and an open sent ahead that no write took is undone."""
        self._ahead.next = None
        self._drop_opened_ahead()
        if (path is not None and self._ssh is not None
                and is_temp_name(posixpath.basename(path), self.temp_key)):
            self._ahead.next = self._full(path)

    def _opened_ahead(self, full: str, wire):
        """The answer of the open of `full` sent ahead on `wire` by this thread, taken (a
        write uses it once); None if there is none for it (another one is undone)."""
        opened = getattr(self._ahead, "opened", None)
        if opened is None:
            return None
        if opened[0] == full and opened[1] is wire:
            self._ahead.opened = None
            return opened[2]
        self._drop_opened_ahead()
        return None

    def _drop_opened_ahead(self) -> None:
        """Undo this thread's open sent ahead that no write took: its handle closed, the
        file it made removed (a temporary name of castlib's, empty: nothing of anyone's).
        Best effort, as the removal of any temporary file that failed: the next run's
        index sees a leftover temporary file and removes it."""
        opened, self._ahead.opened = getattr(self._ahead, "opened", None), None
        if opened is None:
            return
        full, wire, answer = opened
        try:
            handle = answer.result(READ_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - never opened: nothing to undo
            return
        try:
            self._on_sftp(handle.close)
            self._on_sftp(wire.remove, full)
        except Exception as exc:  # noqa: BLE001 - see above
            log.debug("%s: an unused temporary file stays (%s)", full, exc)

    # -- verification by a hash the host computes --------------------------------------------
    # A large file is verified by `cksum` (else `md5sum`) run on the host over `ssh exec`,
    # against the same hash of the bytes read from the source, instead of being read back
    # through SFTP (as many bytes again, each encrypted and decrypted). The command opens
    # the file the server stored and reads all of it: the same guarantee as a read-back,
    # at the server's disk speed. cksum first: POSIX's CRC-32 and the length it read, in
    # every coreutils and BusyBox, ~7x as fast as md5sum on the host with coreutils 9
    # (pclmul: 256 MiB in 0.08 s, md5sum 0.56 s), and here (the C accelerator) ~2.4x as
    # fast as md5; a CRC-32 catches every burst of errors up to 32 bits and misses other
    # damage once in 2^32, with the length checked as well: stronger than the adler32
    # XRootD, EOS and Rucio verify transfers in. Without the accelerator, md5.
    #
    # On OpenSSH the command is the host's own, run by the user's shell. Another server
    # that runs commands runs its own: rclone serve sftp answers `md5sum NAME` (the name
    # as it is: no shell unquotes it, so only names that need no quoting are asked) from
    # the md5 it took of the bytes as they came in and went to its disk, or by reading
    # the file; rclone copy verifies its uploads by that answer. castlib takes it for a
    # large file there as it takes XRootD's, EOS's or S3's checksum: an answer that equals
    # the md5 of the bytes read from the source was computed from those bytes by the
    # server that stored them (the temporary name, unique to this copy, has no older
    # hash). A server that answers anything else once (no such command, no shell, a
    # refusal, a line that is not md5sum's) is not asked again for the location, and
    # its files are read back. A host that runs no commands (ForceCommand internal-sftp,
    # no shell) or lacks one is learned at its first refusal: the next algorithm, then
    # read-back.

    def server_checksum_algorithm(self, size: int | None) -> str | None:
        """The algorithm copy_file should verify a file of `size` bytes in, if not the
        catalog's (see transfer.copy_file): for a large file, the first of the host's
        algorithms (_algorithms_asked) it has not refused."""
        if size is None or size <= READ_BACK_MAX:
            return None
        wanted = [a for a in self._algorithms_asked() if self._server_sums.get(a) is not False]
        return wanted[0] if wanted else None

    def _algorithms_asked(self) -> tuple[str, ...]:
        """An OpenSSH host's (_host_algorithms), another server's: md5 (see above)."""
        return _host_algorithms() if self._on_openssh() else ("md5",)

    def _on_openssh(self) -> bool:
        if self._ssh is not None:   # no version string through ssh's pipes: the SFTP
            return self.fs is not None and self._sftp is not None and \
                self._sftp.openssh_server   # server's own extensions tell
        version = self.fs.client.get_extra_info("server_version") or ""
        return version.startswith("SSH-2.0-OpenSSH")

    def _host_command(self, algorithm: str, full: str) -> list[str] | None:
        """The words that ask the host for `full`'s hash in `algorithm`; None where it
        cannot be asked (the file is read back): a name that is not UTF-8 (no command
        line carries it), or, on a server that is not OpenSSH, a name its unquoted
        command line would not carry as it is."""
        try:
            full.encode("utf-8")
        except UnicodeEncodeError:
            return None
        if self._on_openssh():
            return [_HOST_COMMANDS[algorithm], "--", full]
        if algorithm != "md5" or not _PLAIN_NAME.fullmatch(full):
            return None
        return [_HOST_COMMANDS[algorithm], full]

    def _sum_on_server(self, path: str, size: int | None, algorithm: str) -> str | None:
        """The hash `algorithm` of `path` by its command (_HOST_COMMANDS) run on the host;
        None where it cannot tell (the caller reads the file back instead), learned for
        the location when the host runs no such command."""
        words = self._host_command(algorithm, self._full(path))
        if words is None:
            return None
        command = words[0]
        # the command reads at disk speed: a bound on its wait that grows with the size
        timeout = READ_TIMEOUT_S + (size or 0) / (20 * 1024 * 1024)
        if self._ssh is not None:
            return self._sum_over_ssh(path, words, timeout, algorithm)
        import asyncssh   # (its connection's: imported already)

        # a turn, as over ssh: the SFTP sessions leave the connection MAX_COMMANDS channels
        # (a command that found none would have its file read back, 8 transfers: 6 of 8)
        if not self._command_turns.acquire(timeout=timeout):
            return None
        try:
            for pause in _CHANNEL_FREED_S:
                with self._errors(path):   # a line that drops is a storage error, as elsewhere
                    try:
                        result = _fsspec_asyn().sync(self.fs.loop, self.fs.client.run,
                                                     shlex.join(words),
                                                     check=False, timeout=timeout)
                        break
                    except asyncssh.ChannelOpenError as exc:   # no channel now (MaxSessions)
                        if exc.code == asyncssh.OPEN_REQUEST_SESSION_FAILED:
                            # a channel, and the command refused on it: a server that runs
                            # none, not one short of channels; not asked again here
                            return self._no_commands_here(path, command, exc)
                        if pause is None:
                            log.debug("%s: no channel for %s (%s)", self._where(path),
                                      command, exc)
                            return None
                time.sleep(pause)
        finally:
            self._command_turns.release()
        return self._sum_said(algorithm, words[-1], result.exit_status,
                              result.stdout if isinstance(result.stdout, str) else "",
                              result.stderr if isinstance(result.stderr, str) else "")

    def _sum_said(self, algorithm: str, full: str, status: int | None, line: str,
                  stderr: str) -> str | None:
        """The digest the answer of the command on `full` gives, or None (the caller reads
        back instead)."""
        openssh = self._on_openssh()
        match = _HOST_SUM_LINES[algorithm].match(line)
        if match and not openssh and line.rstrip("\n") != match[0] + full:
            match = None   # another server's md5sum names the file it hashed: this one
        if status == 0 and match:
            self._server_sums[algorithm] = True
            return " ".join(match.groups())
        if status == 1 and not line and openssh:
            return None   # it ran, and could not read this file: the read-back says why
        why = f"exit {status}: {(line or stderr or '').strip()[:200]}"
        if status in (0, 127) and openssh:
            # The shell has no such command (127), or one that printed what it should not
            # (0): the next one may do.
            log.debug("%s: no %s on the host (%s); verifying otherwise", self._where(),
                      _HOST_COMMANDS[algorithm], why)
            self._server_sums[algorithm] = False
            return None
        # No shell, a host that answers every command with its own words and a failure
        # ("This service allows sftp connections only."), or another server's answer that
        # is not md5sum's: none is asked again.
        return self._no_commands_here("", _HOST_COMMANDS[algorithm], why)

    def _no_commands_here(self, path: str, command: str, why) -> None:
        """The host refused `command`: none of its hash commands is asked again for this
        location (its files are read back). None, for the caller to return."""
        log.debug("%s: %s refused (%s); verifying otherwise", self._where(path), command, why)
        for refused in self._algorithms_asked():
            self._server_sums[refused] = False

    def _sum_over_ssh(self, path: str, words: list[str], timeout: float,
                      algorithm: str) -> str | None:
        """_sum_on_server's command, an ssh of its own on the master's connection, when
        one of its MAX_COMMANDS turns is free within the timeout (else None: the file
        is read back). A session the host refused (its MaxSessions, or a channel sshd
        has not freed yet) is asked again, as over asyncssh, then read back."""
        command = words[0]
        argv, env = self.fs.command(words)
        if not self._command_turns.acquire(timeout=timeout):
            return None
        try:
            for pause in _CHANNEL_FREED_S:
                with self._errors(path):
                    try:
                        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                                              capture_output=True, timeout=timeout,
                                              start_new_session=True)
                    except subprocess.TimeoutExpired:
                        raise _fs_timeout()(f"{command} gave no answer within "
                                            f"{timeout:.0f} s") from None
                    if done.returncode != 255:
                        break
                    failure = self._ssh.failure(done.returncode, done.stderr)
                    if not isinstance(failure, ssh_command.SshSessionRefused):
                        if not self._on_openssh():
                            # a server of its own that refused the command (ssh says
                            # nothing but 255): not asked again here; the read-back
                            # meets a line that is really lost
                            return self._no_commands_here(path, command, failure)
                        raise failure   # ssh's own failure: the line, the login
                    if pause is None:
                        log.debug("%s: no session for %s (%s)", self._where(path), command,
                                  failure)
                        return None
                time.sleep(pause)
        finally:
            self._command_turns.release()
        return self._sum_said(algorithm, words[-1], done.returncode,
                              done.stdout.decode("utf-8", "replace"),
                              done.stderr.decode("utf-8", "replace"))

    def checksum(self, path: str, algorithm: str) -> str:
        back = self._read_back.pop(path, None)
        if back is not None:
            # The bytes of a temporary file as the server gave them back, read by a new
            # open after the writing handle was closed: what it stored, not what was sent
            # (see _sftp_write_whole). Nobody else writes under a castlib temporary name.
            hasher = Hasher((algorithm,))
            hasher.update(back)
            return hasher.hexdigests()[algorithm]
        if is_temp_name(posixpath.basename(path), self.temp_key):
            if (algorithm in self._algorithms_asked()
                    and self._server_sums.get(algorithm) is not False):
                st = self._sftp_lstat(path)   # its size bounds the command's wait
                digest = self._sum_on_server(path, st.size if st else None, algorithm)
                if digest is not None:
                    return digest
            # the read-back of a temporary file castlib just wrote, under a name nobody
            # else uses: the size it had when opened is the size it has
            with self.open_read(path, exact=True) as stream:
                digests, _ = checksum_stream(stream, (algorithm,), CHUNK_SIZE)
            return digests[algorithm]
        return super().checksum(path, algorithm)

    # -- namespace -------------------------------------------------------------------------
    def rename(self, src: str, dst: str) -> None:
        self._read_back.pop(src, None)
        pending = self._pending_attrs.pop(src, None)
        with self._errors(src):
            if self.posix_rename:
                # a copy's last steps in one call: its times and bits (see set_mtime), the
                # rename, and a stat of the result, which the engine asks for next; and the
                # open of the thread's next write, if announced (expect_write)
                wire, ahead = self._wire(), getattr(self._ahead, "next", None)
                self._ahead.next = None
                opened = [] if ahead is not None else None
                attrs, renamed = self._on_sftp(_sftp_publish, wire, self._full(src),
                                               self._full(dst), pending, ahead, opened)
                if opened:
                    self._ahead.opened = (ahead, wire, opened[0])
                if renamed:
                    self._published.entries = {} if attrs is None else \
                        {dst: (_stat_from_attrs(dst, attrs), time.monotonic())}
                    return
                # the set-stats went out before the refused rename
                log.info("%s: the server refuses posix-rename; renaming in steps", self._where())
                self.posix_rename = False
            elif pending:
                wire = self._wire()
                self._on_sftp(wire.setstat, self._full(src), _attrs(pending, wire))
            self._sftp_rename(src, dst)

    def _sftp_rename(self, src: str, dst: str) -> None:
        """posix-rename@openssh.com replaces the target in one step. A server without it
        (learned at the first refusal) gets SFTP v3's plain rename, which refuses an
        existing target: that one is moved aside first, and back if the rename fails."""
        E = self._errors_ns
        if self.posix_rename:
            try:
                self._on_sftp(self._wire().posix_rename, self._full(src), self._full(dst))
                return
            except E.SFTPOpUnsupported:
                log.info("%s: the server refuses posix-rename; renaming in steps", self._where())
                self.posix_rename = False
        try:
            self._on_sftp(self._client().rename, self._full(src), self._full(dst))
            return
        except E.SFTPError:
            existing = self._sftp_lstat(dst)
            if existing is None or existing.kind == DIR:
                raise
        aside = temp_path(dst, self.temp_key)   # a castlib temporary name: a killed run's next sync removes it
        self._on_sftp(self._client().rename, self._full(dst), self._full(aside))
        try:
            self._on_sftp(self._client().rename, self._full(src), self._full(dst))
        except BaseException:
            self._on_sftp(self._client().rename, self._full(aside), self._full(dst))
            raise
        self._on_sftp(self._client().remove, self._full(aside))

    def delete(self, path: str) -> None:
        self._read_back.pop(path, None)
        self._pending_attrs.pop(path, None)
        st = self.stat(path)
        if st is None:
            raise NotFound(f"{self._where(path)}: not found", path=path)
        with self._errors(path):
            if st.kind == DIR:
                self._on_sftp(self._client().rmdir, self._full(path))
            else:
                self._on_sftp(self._client().remove, self._full(path))

    def set_mtime(self, path: str, mtime_ns: int) -> None:
        if not self.capabilities.set_mtime:
            return super().set_mtime(path, mtime_ns)
        seconds = mtime_ns // SECOND_NS   # SFTP v3 keeps whole seconds
        if self._defer_setstat(path, "set_mtime", mtime=seconds):
            return
        self._setstat(path, "set_mtime", "modification times",
                      lambda sftp: sftp.setstat(self._full(path),
                                                _attrs({"mtime": seconds}, sftp)))

    def chmod(self, path: str, mode: int) -> None:
        if not self.capabilities.permissions:
            return super().chmod(path, mode)
        if self._defer_setstat(path, "permissions", permissions=mode & 0o7777):
            return
        self._setstat(path, "permissions", "permission bits",
                      lambda sftp: sftp.setstat(self._full(path),
                                                _attrs({"permissions": mode & 0o7777},
                                                       sftp)))

    def _defer_setstat(self, path: str, capability: str, **attrs) -> bool:
        """Whether a set-stat of a temporary file can wait for its rename, to go out with
        it in one call (see rename). Only once the server did that kind of set-stat on a
        file of this location: whether it refuses one (policy, a server that cannot) is
        learned at an immediate request, whose refusal the engine counts as such. A
        deferred one that fails after all fails the rename, and so the copy: never a
        copy said to have times or bits it has not."""
        if capability not in self._setstat_proven or \
                not is_temp_name(posixpath.basename(path), self.temp_key):
            return False
        self._pending_attrs.setdefault(path, {}).update(attrs)
        return True

    def _setstat(self, path: str, capability: str, what: str, request) -> None:
        """One set-stat request (times, bits): a server that refuses set-stat as policy
        (not for this file's permissions) is learned to lack `capability`, once."""
        E = self._errors_ns
        try:
            with self._errors(path):
                try:
                    self._on_sftp(request, self._wire())
                    self._setstat_proven.add(capability)
                except E.SFTPPermissionDenied:
                    if not self._setstat_denied_by_policy(path):
                        raise
                    raise E.SFTPOpUnsupported("set-stat refused") from None
        except Unsupported:
            self._learn_refusal(capability, f"setting {what}")
            raise Unsupported(f"{self._where(path)}: the server cannot set {what}",
                              path=path) from None

    def _setstat_denied_by_policy(self, path: str) -> bool:
        """Whether a 'permission denied' to set a time is the server's policy (sftp-server
        -P setstat) rather than this file's permissions. The owner of a file may always
        set its times, and castlib owns the temporary files it writes: a denial on one of
        those is policy. For any other file, a temporary file written beside it tells
        (once per location)."""
        E = self._errors_ns
        if is_temp_name(posixpath.basename(path), self.temp_key):
            return True
        if self._setstat_policy is None:
            probe = temp_path(path, self.temp_key)
            try:
                with self._errors(probe):
                    f = self._on_sftp(self._client().open, self._full(probe), "wb")
                    self._on_sftp(f.close)
                    try:
                        self._on_sftp(self._client().utime, self._full(probe), (0, 0))
                        self._setstat_policy = False
                    except E.SFTPPermissionDenied:
                        self._setstat_policy = True
                    finally:
                        self._on_sftp(self._client().remove, self._full(probe))
            except StorageError:   # not even a file can be written there: its permissions
                return False
        return self._setstat_policy

    def symlink(self, path: str, target: str) -> None:
        if not self.capabilities.symlinks:
            return super().symlink(path, target)
        try:
            with self._errors(path):
                self._on_sftp(self._client().symlink, target, self._full(path))
        except Unsupported:
            self._learn_refusal("symlinks", "symbolic links")
            raise Unsupported(f"{self._where(path)}: the server cannot hold links",
                              path=path) from None


# -- helpers ----------------------------------------------------------------------------------
class _OpensshHost:
    """What a location over OpenSSH's ssh has for a connection (SftpBackend.fs there):
    its sessions, each an `ssh -s HOST sftp` process of one
    ssh_command.ControlConnection (the first logs in, the master; the others are
    channels of its connection), each driven by the threads that use it
    (sftp_wire.begin_threaded_wire): no event loop."""

    def __init__(self, connection):
        self._connection = connection
        self._command = connection.command
        self._wires: list = []
        self._master = None
        self._lock = threading.Lock()   # sessions come from several threads
        self._closed = False   # see close: a session that comes after it is closed too
        self._opening: set = set()   # sessions begun, not opened yet (see close)

    def command(self, words: list[str]) -> tuple[list[str], dict]:
        """A command on the host, on the master's connection (no login of its own)."""
        return self._connection.remote_command(words)

    def _begun(self, proc):
        wire = sftp_wire.begin_threaded_wire(proc, self._command.session_failure,
                                             READ_TIMEOUT_S)
        with self._lock:
            closed = self._closed
            if not closed:
                self._opening.add(wire)
        if closed:   # (close() came as its ssh started: stopped as close() stops them)
            wire.stop()
        return wire

    def _opened(self, wire, timeout: float):
        """A session begun, initialised and kept. One not opened in time is not left
        behind; one opened after close() (a connection given up, a run that ended while
        its early sessions were still coming) is closed at once, not left running."""
        try:
            sftp_wire.finish_threaded_wire(wire, timeout)
        except sftp_wire.WaitTimeout:
            # ssh still at it (its own failures, "timed out during banner exchange" too,
            # end it, and say themselves)
            raise ssh_command.SshTimeout(f"no login within {timeout:g} s") from None
        finally:
            with self._lock:
                self._opening.discard(wire)
        with self._lock:
            if not self._closed:
                self._wires.append(wire)
                if self._master is None:
                    self._master = wire
                return wire
        wire.close()
        raise sftp_wire.SFTPConnectionLost("the connection was closed meanwhile")

    def _start(self):
        """A session's ssh, started, unless the connection is closed: none is started
        after it (a login of its own each, the master being gone)."""
        if self._closed:
            raise sftp_wire.SFTPConnectionLost("the connection was closed")
        return ssh_command.start_ssh(*self._connection.session(master=False))

    def open_master(self, timeout: float):
        """The master's session, of the ssh the connection started (or starts now)."""
        return self._opened(self._begun(self._connection.take_master()), timeout)

    def open_wire(self, timeout: float):
        return self._opened(self._begun(self._start()), timeout)

    def open_wires(self, count: int, timeout: float, came=None) -> list:
        """`count` sessions opened at once (their ssh started, their INIT sent, then each
        waited for, on the master's connection, in a thread of its own: they come in any
        order); those that could not be, left out. came(session): called with each as
        soon as it is open."""
        begun, opened = [], []
        for _ in range(count):
            try:
                begun.append(self._begun(self._start()))
            except Exception as exc:  # noqa: BLE001 - no ssh now: the others still serve
                log.debug("ssh: no further session (%s)", exc)
                break

        def finish(wire) -> None:
            try:
                wire = self._opened(wire, timeout)
            except Exception as exc:  # noqa: BLE001 - refused (MaxSessions): left out
                log.debug("ssh: no further session (%s)", exc)
                return
            with self._lock:
                opened.append(wire)
            if came is not None:
                came(wire)

        waits = [background_thread(finish, wire, name="castlib-sftp-session")
                 for wire in begun[1:]]
        if begun:
            finish(begun[0])   # (this thread's)
        for wait in waits:
            wait.join()
        return opened

    def close(self) -> None:
        with self._lock:
            self._closed = True
            wires = list(self._wires)
            opening = list(self._opening)
        # every ssh killed first: they end together. Those of sessions still being opened
        # too (each is closed by the thread that opens it): one that came to the master's
        # ControlPath after the master had gone would log in to the host on its own
        for wire in wires + opening:
            wire.stop()
        # the master last: the others' sessions are channels of its connection
        for wire in sorted(wires, key=lambda w: w is self._master):
            wire.close()
        self._connection.close()   # (its master's ssh, if no session took it; its folder)


class _Nobody:
    """The holder of a session opened for whichever thread asks first."""

    @staticmethod
    def is_alive() -> bool:
        return False


_NOBODY = _Nobody()


def _held_or_handed_on(entries: list, me: threading.Thread):
    """Of [session, thread] pairs: the session `me` holds, else one whose thread has
    ended, handed on to `me`; None if neither (a pair whose session is still being
    opened, None, is neither)."""
    free = None
    for entry in entries:
        if entry[0] is None:
            continue
        if entry[1] is me:
            return entry[0]
        if free is None and not entry[1].is_alive():
            free = entry
    if free is not None:
        free[1] = me
        return free[0]
    return None


# How long after a rename the stat of its target may be answered by the stat taken in the
# rename's own call: the engine asks at once, from the same thread (SftpBackend.stat).
PUBLISHED_STAT_S = 5.0
# The largest file read back at its close (see _SftpFile.close); bigger ones are read
# back by checksum() in blocks, not held in memory.
READ_BACK_MAX = CHUNK_SIZE


# The commands run on the host for a hash of a file (see "verification" in SftpBackend),
# and their answers: md5sum's digest (after a backslash when the name has one escaped),
# two spaces or a space and '*', the name; cksum's CRC and size in decimal, then the name
# (checksum.format_cksum's "CRC SIZE" from the two groups).
_HOST_COMMANDS = {CKSUM: "cksum", "md5": "md5sum"}
_HOST_SUM_LINES = {"md5": re.compile(r"\\?([0-9a-f]{32}) [ *]"),
                   CKSUM: re.compile(r"([0-9]{1,10}) ([0-9]+) ")}


# A name a command line carries as it is, quoted or not: no shell, and no server's own
# parsing, reads any of these characters otherwise (shlex.quote leaves it as it is).
_PLAIN_NAME = re.compile(r"/[A-Za-z0-9_@%+=:,./-]*")


def _host_algorithms() -> tuple[str, ...]:
    """The hashes a host is asked for, the first one it runs taken: cksum where this
    process can compute it too (the C accelerator), then md5."""
    return (CKSUM, "md5") if cksum_available() else ("md5",)


def _errors_of(sftp):
    """The exception classes a session raises: a wire's own namespace (see sftp_wire),
    else asyncssh's (its SFTP client)."""
    errors = getattr(sftp, "errors", None)
    return errors if errors is not None else sftp_wire._asyncssh_errors()


def _stat_from_attrs(path: str, attrs) -> Stat:
    perms = attrs.permissions or 0
    kind = DIR if statmod.S_ISDIR(perms) else LINK if statmod.S_ISLNK(perms) else FILE
    return Stat(path, kind, 0 if kind == DIR else attrs.size,
                attrs.mtime * SECOND_NS if attrs.mtime is not None else None, perms & 0o7777)


# paths a batch holds at most (make_folders, set_folder_metadata): their answers wait in
# ssh's pipe until the batch is all sent, and must fit there (~60 bytes each, 1 MiB)
_BATCH = 1000


def _by_depth(paths: list[str], deepest_first: bool) -> list[list[str]]:
    """The paths grouped by depth, in batches of at most _BATCH, the top first (or the
    deepest), each in the order given."""
    levels: dict[int, list[str]] = {}
    for path in paths:
        levels.setdefault(path.count("/"), []).append(path)
    return [levels[depth][start:start + _BATCH]
            for depth in sorted(levels, reverse=deepest_first)
            for start in range(0, len(levels[depth]), _BATCH)]


async def _sftp_set_stats(sftp, requests: list[tuple[str, dict]]) -> list[bool]:
    """A set-stat of each (full path, attributes) that has attributes, all sent at once:
    whether each was done (True for one with none)."""
    with _together(sftp):
        sent = [sftp.setstat(full, _attrs(attrs, sftp)) if attrs else None
                for full, attrs in requests]
    done = await _settled([request for request in sent if request is not None])
    answers = iter(done)
    return [True if request is None else not isinstance(next(answers), BaseException)
            for request in sent]


async def _sftp_make_folders(sftp, fulls: list[str]) -> list:
    """mkdir and then lstat of each folder in `fulls`, all sent at once: the attributes
    the lstat gave for each (None if it failed). Whether the mkdir failed tells nothing
    more: the folder may have been there."""
    with _together(sftp):
        requests = [request for full in fulls for request in (sftp.mkdir(full), sftp.lstat(full))]
    done = await _settled(requests)
    return [None if isinstance(attrs, BaseException) else attrs for attrs in done[1::2]]


async def _sftp_lstats(sftp, fulls: list[str]) -> list:
    """An lstat of each path in `fulls`, all sent at once: the attributes of each, False
    where the server said there is no such file, None where the lstat failed otherwise."""
    missing = _errors_of(sftp).SFTPNoSuchFile
    with _together(sftp):
        requests = [sftp.lstat(full) for full in fulls]
    done = await _settled(requests)
    return [False if isinstance(attrs, missing) else
            None if isinstance(attrs, BaseException) else attrs for attrs in done]


def _attrs(pending: dict, sftp):
    """SFTP attributes for deferred set-stats: mtime (atime too, as utime sets both) and
    permission bits, one request for both; of the class the session `sftp` takes."""
    if isinstance(sftp, sftp_wire.SftpWire):
        attrs = sftp_wire.WireAttrs()
    else:
        import asyncssh

        attrs = asyncssh.SFTPAttrs()
    if "mtime" in pending:
        attrs.atime = attrs.mtime = pending["mtime"]
    if "permissions" in pending:
        attrs.permissions = pending["permissions"]
    return attrs


async def _sftp_publish(sftp, src: str, dst: str, pending: dict | None,
                        open_ahead: str | None = None, opened: list | None = None):
    """A copy's last steps, in one round trip: the set-stats that waited for it, the
    posix-rename, and an lstat of the target (None if that fails: the engine then asks
    itself). Returns (attributes, whether renamed); not renamed when the server has no
    posix-rename (the caller renames another way).

    The three go out together, in this order, which a server keeps (see
    _sftp_write_whole): the set-stat is done before the rename, the lstat after it. A
    set-stat is deferred to here only once the server has done that kind (see
    _defer_setstat); one refused after all fails the copy even though the rename went
    through: the file in place then holds the verified bytes without the times or bits,
    which the next sync sees as a metadata difference and sets, and no copy is said to
    have what it has not. Before, the rename waited for the set-stat's answer: a round
    trip more for every file.

    `open_ahead`: a file to open for writing with them, last (the thread's next copy:
    SftpBackend.expect_write); the answer of its open is appended to `opened`, not
    awaited here."""
    errors = _errors_of(sftp)
    with _together(sftp):
        requests = [sftp.setstat(src, _attrs(pending, sftp))] if pending else []
        requests += [sftp.posix_rename(src, dst), sftp.lstat(dst)]
        if open_ahead is not None:
            opened.append(sftp.open(open_ahead, "wb", block_size=0))
    done = await _settled(requests)
    set_stat = done[0] if pending else None
    renamed, attrs = done[-2:]
    if isinstance(set_stat, BaseException):
        if not isinstance(renamed, BaseException):
            log.info("%s: in place without its times or bits (set-stat refused: %s)",
                     dst, set_stat)
        raise set_stat
    if isinstance(renamed, errors.SFTPOpUnsupported):
        return None, False
    if isinstance(renamed, BaseException):
        raise renamed
    if isinstance(attrs, errors.SFTPError):
        return None, True
    if isinstance(attrs, BaseException):
        raise attrs
    return attrs, True


_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _sftp_cipher_preference() -> list[str]:
    """asyncssh's default ciphers with AES-GCM first. The client's order decides, and
    asyncssh puts chacha20-poly1305 first, which it runs as two calls into `cryptography`
    per packet; AES-GCM is one, in hardware on any recent CPU. A server that offers no
    AES-GCM still gets the rest of the list."""
    from asyncssh.encryption import get_default_encryption_algs

    defaults = [alg.decode() for alg in get_default_encryption_algs()]
    fast = [alg for alg in _FAST_CIPHERS if alg in defaults]
    return fast + [alg for alg in defaults if alg not in fast]


class _CoalescedTransport:
    """The connection's socket, with what asyncssh writes in one turn of the event loop
    sent in one system call. asyncssh writes each SSH packet as it is made (a request, a
    window adjustment), one send() each; with requests pipelined, and several transfer
    threads' sessions on one connection, a turn makes several: a quarter of the event
    loop's time for 300 small files went into send() (py-spy). The bytes go out in the
    order written, at the end of the turn (before the loop waits for anything), or at
    once when a turn has written much (big files)."""

    FLUSH_AT = 256 * 1024

    def __init__(self, transport, loop):
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._size = 0

    def write(self, data) -> None:
        if not self._buffer:
            self._loop.call_soon(self._flush)
        self._buffer.append(data)
        self._size += len(data)
        if self._size >= self.FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        buffer, self._buffer, self._size = self._buffer, [], 0
        if buffer:
            self._transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._buffer, self._size = [], 0
        self._transport.abort()

    def __getattr__(self, name):
        return getattr(self._transport, name)


# Ciphers with integrity built in (AEAD): asyncssh's empty MSG_IGNORE before each packet
# is a counter-measure for CBC modes (an attack on their predictable IVs), of no use here.
_AEAD_CIPHERS = frozenset(("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                           "chacha20-poly1305@openssh.com"))


async def _lighten_connection(client) -> None:
    """What asyncssh spends per SSH packet, cut where it buys nothing (on the loop's
    thread, between two of its writes; an asyncssh that keeps these elsewhere is left as
    it is):
    - each turn's packets go out in one send() (_CoalescedTransport);
    - with an AEAD cipher, no empty MSG_IGNORE before every packet: asyncssh sends one
      (encrypted, logged, sent) ahead of each, a defence for CBC ciphers only; 300 small
      files cost 5,587 packets, half of them these."""
    import asyncio

    import asyncssh.connection

    transport = getattr(client, "_transport", None)
    if transport is not None and hasattr(transport, "write") and \
            not isinstance(transport, _CoalescedTransport):
        client._transport = _CoalescedTransport(transport, asyncio.get_running_loop())
    ignore, empty = getattr(asyncssh.connection, "MSG_IGNORE", None), b"\0\0\0\0"
    send = getattr(client, "send_packet", None)
    if ignore is None or send is None or "send_packet" in vars(client):
        return

    def send_packet(pkttype, *args, **kwargs):
        if pkttype == ignore and args == (empty,) and \
                client.get_extra_info("send_cipher") in _AEAD_CIPHERS:
            return
        send(pkttype, *args, **kwargs)

    client.send_packet = send_packet


_ASYNCSSH_LOGGING_TUNED = False


def _tune_asyncssh_logging() -> None:
    """asyncssh formats its debug messages (each request's, each packet's) before it asks
    whether they are logged at all: ~5 % of the event loop's time over small files. Ask
    first; what is logged, when it is, does not change. Once a process."""
    global _ASYNCSSH_LOGGING_TUNED
    if _ASYNCSSH_LOGGING_TUNED:
        return
    _ASYNCSSH_LOGGING_TUNED = True
    try:
        from asyncssh.logging import SSHLogger
        from asyncssh.packet import SSHPacketLogger
        log_any = SSHLogger.log
        log_packet = SSHPacketLogger._log_packet
    except (ImportError, AttributeError):   # another asyncssh: left as it is
        return

    def log_if_enabled(self, level, msg, *args, **kwargs):
        if self.isEnabledFor(level):
            log_any(self, level, msg, *args, **kwargs)

    def log_packet_if_enabled(self, *args, **kwargs):
        logger = self.logger
        if getattr(logger, "_debug_level", 3) >= 3 and logger.isEnabledFor(logging.DEBUG):
            log_packet(self, *args, **kwargs)

    SSHLogger.log = log_if_enabled
    SSHPacketLogger._log_packet = log_packet_if_enabled


async def _close_ssh(sessions, client) -> None:
    for session in set(sessions):   # asyncssh's SFTP clients, and SftpWires
        if hasattr(session, "exit"):
            session.exit()
        else:
            session.close()
    client.close()
    await client.wait_closed()


class _SftpFile:
    """A remote file through the thread's SFTP sessions (see SftpBackend._wire), each wait
    bounded (see _on_sftp).

    Every call from a transfer thread to the event loop (over asyncssh) costs a thread
    switch or two, and every request a round trip: small files go in as few of both as
    their bytes allow.

    Reading, the file's size is known (stat'ed alongside the open, in the same round trip)
    and no more is asked for: asyncssh splits a read of n bytes into n / (the server's
    largest read) requests, up to 128 in flight, whatever the file holds, so a 4 MiB read
    of a 4 KiB file cost some 256 encrypted requests, and the read that found the end as
    many again. Up to the known size, reads go through a _ReadPipe: requests in file
    order, kept in flight ahead of the caller while it hashes what it has. A file up to
    PREFETCH bytes comes with the open, in the same call. At the known end, one request
    looks whether the file grew since, unless `exact`: a file castlib just wrote itself
    and nobody else touches (the read-back of a temporary file), which is then closed in
    that same call too.

    Writing, the open waits for the second write or the close: a file of one write goes
    out as open, write and close in one call. A larger one goes through a _WritePipe."""

    PREFETCH = CHUNK_SIZE

    def __init__(self, backend: FsspecBackend, path: str, mode: str, exact: bool = False,
                 read_back: bool = False):
        self._backend = backend
        self._rel = path
        self._read_back = read_back
        self._path = backend._full(path)
        self._mode = mode
        self._pos = 0
        self._size: int | None = None
        self._exact = exact
        self._buffer = b""           # read: prefetched bytes; write: the first write's
        self._file = None
        self._pipe = None            # _ReadPipe or _WritePipe
        self._in_flight = None       # write: the block being handed to the pipe
        self._closed = False
        if "r" in mode:
            self._file, self._size, self._buffer, self._pipe = backend._on_sftp(
                _sftp_open_sized, backend._wire(), self._path, self.PREFETCH, exact)

    # -- reading -------------------------------------------------------------------------------
    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = -1
        if self._buffer:
            n = len(self._buffer) if size < 0 else min(size, len(self._buffer))
            data, self._buffer = self._buffer[:n], self._buffer[n:]
            self._pos += n
            return data
        known = self._size
        if self._file is None:   # read whole and closed with the open
            return b""
        if known is not None and self._pos < known and self._pipe is not None:
            want = known - self._pos if size < 0 else min(size, known - self._pos)
            data = self._backend._on_sftp(self._pipe.take, want)
            if not data:   # shorter than it was: read on without a size, as below
                self._pipe, self._size = None, None
                return self.read(size)
            self._pos += len(data)
            return data
        if known is None:   # no size to go by: one request at a time
            want = size if size >= 0 else CHUNK_SIZE
        elif self._pos < known:
            want = known - self._pos if size < 0 else min(size, known - self._pos)
        elif self._exact:
            return b""
        else:
            # at the size the file had when opened: one request tells whether it grew
            # since (then it is read on without a known size)
            want = CHUNK_SIZE if size < 0 else min(CHUNK_SIZE, size)
        if want == 0:
            return b""
        data = self._backend._on_sftp(self._file.read, want, self._pos)
        if known is not None and self._pos >= known and data:
            self._size = None   # it grew: no size to trust any more
        self._pos += len(data)
        return data

    # -- writing -------------------------------------------------------------------------------
    def write(self, data) -> int:
        data = bytes(data)
        if not data:
            return 0
        if self._file is None and not self._buffer:
            self._buffer = data   # the open waits: this may be the only write
            return len(data)
        if self._file is None:
            self._file, self._pipe = self._backend._on_sftp(
                _sftp_open_write, self._backend._wire(), self._path, self._mode, self._buffer,
                self._backend._opened_ahead(self._path, self._backend._wire()))
            self._buffer = b""
        self._wait_handed()
        if self._backend._ssh is not None:
            # a threaded session: the requests are sent in this thread, the pipe's
            # window (PIPE_BYTES) kept in flight while it reads and hashes the next block
            self._backend._on_sftp(self._pipe.put, data)
            return len(data)
        # The pipe takes the block while the caller reads and hashes the next one: the
        # next write waits only until this one's requests are all sent (not answered),
        # so the line never idles between blocks; the close waits for every answer.
        import asyncio

        self._in_flight = asyncio.run_coroutine_threadsafe(self._pipe.put(data),
                                                           self._backend.fs.loop)
        return len(data)

    def _wait_handed(self) -> None:
        fut, self._in_flight = self._in_flight, None
        if fut is None:
            return
        try:
            fut.result(timeout=READ_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise _fs_timeout()(f"no answer to a write within {READ_TIMEOUT_S} s") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        f, self._file = self._file, None
        pipe, self._pipe = self._pipe, None
        if "r" in self._mode:
            if f is not None:
                self._backend._on_sftp(_sftp_close_reading, f, pipe)
            return
        data, self._buffer = self._buffer, b""
        if f is None:   # one write or none: open, write and close in one call
            wire = self._backend._wire()
            back = self._backend._on_sftp(_sftp_write_whole, wire, self._path, self._mode,
                                          data, self._read_back and len(data) <= READ_BACK_MAX,
                                          self._backend._opened_ahead(self._path, wire))
            if back is not None:
                self._backend._read_back[self._rel] = back
        else:
            try:
                self._wait_handed()
            finally:
                self._backend._on_sftp(_sftp_close_writing, f, pipe)

    def discard(self) -> None:
        """Stop writing (an aborted upload): what was not sent is not."""
        self._buffer = b""
        try:
            self._wait_handed()
        except Exception:  # the error that made the caller abort is the one to report
            pass
        if isinstance(self._pipe, _WritePipe):
            self._pipe.drop_tail()
        if self._file is not None:
            try:
                self.close()
            except Exception:   # as above: the caller's error is the one to report
                pass
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed


# Bytes a pipe keeps in flight (see _ReadPipe, _WritePipe), and requests at most: asyncssh
# keeps up to 128 requests in flight within one call. More than the SSH channel's window
# (2 MiB at OpenSSH and rclone) only waits in asyncssh's buffer: with 8 MiB a 256 MiB
# copy to OpenSSH peaked at 92-96 MB, with 4 MiB at 86 MB, in the same time.
PIPE_BYTES = 4 * 1024 * 1024
PIPE_REQUESTS = 128


def _pipe_depth(block: int) -> int:
    return max(1, min(PIPE_REQUESTS, PIPE_BYTES // max(block, 1)))


class _ReadPipe:
    """Read requests for the bytes [offset, end) of an open file, sent in file order and
    kept in flight ahead of the caller (up to PIPE_BYTES), answered in order. asyncssh's
    own parallel reads fill one call's bytes and stop, so the line idled while a transfer
    thread hashed each 4 MiB; and they go out one loop turn late, each with tasks of its
    own. The file must be opened with block size 0: each read is one request."""

    def __init__(self, f, offset: int, end: int, block: int, sftp):
        self._f = f
        self._sftp = sftp   # the session (whose exception classes it raises)
        self._next = offset
        self._end = end
        self._block = block
        self._depth = _pipe_depth(block)
        self._pending: collections.deque = collections.deque()   # (offset, size, task)
        self._left = b""   # answered bytes not taken yet

    def _fill(self) -> None:
        while len(self._pending) < self._depth and self._next < self._end:
            size = min(self._block, self._end - self._next)
            # a task for asyncssh's coroutine, a wire's future as it is
            self._pending.append((self._next, size, _started(self._f.read(size, self._next))))
            self._next += size

    async def take(self, want: int) -> bytes:
        """Up to `want` bytes from where the last take stopped; b"" at the end (or where
        the file now ends, if it got shorter)."""
        parts, got = [], 0
        if self._left:
            parts.append(self._left[:want])
            got = len(parts[0])
            self._left = self._left[got:]
        self._fill()
        while got < want and self._pending:
            offset, size, task = self._pending[0]
            data = await task
            self._pending.popleft()
            if not data:   # the file ends before the size it had
                self._next = self._end = offset
                await self.drain()
                break
            if len(data) > size:   # a broken server (asyncssh's client lets it through):
                # its bytes would be taken as the next request's
                raise _errors_of(self._sftp).SFTPBadMessage("Data reply longer than asked for")
            if len(data) < size:   # a short answer: the rest is asked for first
                rest = offset + len(data)
                self._pending.appendleft((rest, size - len(data),
                                          _started(self._f.read(size - len(data), rest))))
            if got + len(data) > want:
                self._left = data[want - got:]
                data = data[:want - got]
            parts.append(data)
            got += len(data)
            self._fill()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def drain(self) -> None:
        """Wait for the requests still out (before the handle is closed)."""
        pending, self._pending = self._pending, collections.deque()
        if pending:
            await _settled([task for _, _, task in pending])


class _WritePipe:
    """Write requests of one block size, sent in file order with up to PIPE_BYTES in
    flight, across the caller's blocks: asyncssh's own parallel writes stop at the end
    of each call's bytes, and two such calls at once interleave their offsets, which
    `rclone serve sftp` refuses ("Illegal seek": it takes writes in order only). Here the
    next block's requests go out as the oldest are answered, and always in order. The
    first error an answer brings is raised by the next put() or by finish(). The file
    must be opened with block size 0: each write is one request."""

    def __init__(self, f, offset: int, block: int):
        self._f = f
        self._offset = offset
        self._block = block
        self._depth = _pipe_depth(block)
        self._out: collections.deque = collections.deque()   # in flight, oldest first
        self._error: BaseException | None = None
        self._tail = b""   # the last bytes put, short of a whole request

    async def put(self, data: bytes) -> None:
        """Send `data` on from where the last put ended; returns once it is sent, but for
        a last part short of a whole request, which waits for the next put or finish()
        (a block of 4 MiB is not a multiple of every server's request size)."""
        view = memoryview(data)
        if self._tail:   # completed first (no copy of the whole block to join them)
            need = self._block - len(self._tail)
            if len(view) < need:
                self._tail += bytes(view)
                return
            first, self._tail = self._tail + bytes(view[:need]), b""
            await self._send(memoryview(first))
            view = view[need:]
        whole = len(view) - len(view) % self._block
        self._tail = bytes(view[whole:])
        await self._send(view[:whole])

    async def _answer_of_the_oldest(self) -> None:
        request = self._out.popleft()
        try:
            await request
        except Exception as exc:  # noqa: BLE001 - raised by the next put() or finish()
            if self._error is None:
                self._error = exc

    async def _send(self, view) -> None:
        if self._error is not None:
            raise self._error
        for start in range(0, len(view), self._block):
            while len(self._out) >= self._depth:   # room: the oldest answered
                await self._answer_of_the_oldest()
            if self._error is not None:
                raise self._error
            piece = bytes(view[start:start + self._block])
            self._out.append(_started(self._f.write(piece, self._offset)))
            self._offset += len(piece)

    def drop_tail(self) -> None:
        """Forget the bytes not sent yet (an aborted upload)."""
        self._tail = b""

    async def finish(self) -> None:
        """Send what is left, wait for every answer; the first error, if any."""
        tail, self._tail = self._tail, b""
        if tail:
            await self._send(memoryview(tail))
        while self._out:
            await self._answer_of_the_oldest()
        if self._error is not None:
            raise self._error


def _started(request):
    """A request under way: a session's future as it is; asyncssh's coroutine as a task
    of the running loop (sent as the loop next turns)."""
    if hasattr(request, "add_done_callback"):
        return request
    import asyncio

    return asyncio.ensure_future(request)


async def _settled(requests: list) -> list:
    """Each request's result, or its exception, as asyncio.gather(...,
    return_exceptions=True) gives them; a threaded session's (all sent already: see
    _together), each waited for in turn, without a loop."""
    if not requests:
        return []
    if all(isinstance(r, sftp_wire.SyncFuture) for r in requests):
        out = []
        for request in requests:
            try:
                out.append(await request)
            except Exception as exc:  # noqa: BLE001 - returned, as gather does
                out.append(exc)
        return out
    import asyncio

    return await asyncio.gather(*requests, return_exceptions=True)


class _NoBatch:
    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


def _together(sftp):
    """Requests made inside go out in one channel write on an SftpWire (its batch());
    asyncssh's client sends each as its task starts, in the order made, as it is."""
    batch = getattr(sftp, "batch", None)
    return batch() if batch is not None else _NoBatch()


async def _awaited(call, args, kwargs):
    """What `call` gives (a coroutine's result, or a future's), called on the loop."""
    return await call(*args, **kwargs)


async def _sftp_close_reading(f, pipe) -> None:
    try:
        if pipe is not None:
            await pipe.drain()
    finally:
        await f.close()


async def _sftp_close_writing(f, pipe) -> None:
    try:
        if pipe is not None:
            await pipe.finish()
    finally:
        await f.close()


# Bytes a read or write request: what the server says (the limits extension), else just
# under 32 KiB, which every server takes (the SFTP drafts: packets of at least 34000
# bytes), and which leaves room for the request's header (a handle is at most 256 bytes)
# in one SSH channel packet (32 KiB, OpenSSH's and Go's). asyncssh's own fallback is
# 16 KiB: twice the requests, each packets to encrypt in Python; a full 32 KiB takes two
# channel packets a request.
SFTP_BLOCK_WITHOUT_LIMITS = 32 * 1024 - 512


# Reads ask for a whole 32 KiB: the request is small whatever it asks, and `rclone serve
# sftp` answers reads of 32 KiB twice as fast as reads of SFTP_BLOCK_WITHOUT_LIMITS (256 MiB
# read back: 1.6-2.4 s against 3.5-4.6 s, interleaved), its reads being 32 KiB at most.
SFTP_READ_BLOCK_WITHOUT_LIMITS = 32 * 1024


def _sftp_limits_told(sftp) -> bool:
    """Whether the server named its limits (OpenSSH's limits@openssh.com): asyncssh (and
    an SftpWire) then keep them in `limits`, else a safe 16 KiB (and never the packet
    length)."""
    told = getattr(sftp, "limits_told", None)   # an SftpWire
    if told is not None:
        return told
    told = getattr(getattr(sftp, "_handler", None), "_supports_limits", None)
    if told is not None:
        return bool(told)
    return (sftp.limits.max_read_len, sftp.limits.max_write_len) != (16 * 1024, 16 * 1024)


def _sftp_write_limit(sftp) -> int:
    """The most bytes one write request carries here."""
    if _sftp_limits_told(sftp):
        return sftp.limits.max_write_len
    return SFTP_BLOCK_WITHOUT_LIMITS


def _sftp_read_piece(sftp) -> int:
    """The most bytes one read request asks for here."""
    if _sftp_limits_told(sftp):
        return sftp.limits.max_read_len
    return SFTP_READ_BLOCK_WITHOUT_LIMITS


async def _sftp_open_sized(sftp, path: str, prefetch: int, exact: bool):
    """(the open file, its size, its first bytes, its _ReadPipe) in one call. The open
    and a stat go out together; a file of up to `prefetch` bytes is read at once, and
    closed as well when `exact` (then no open file is returned). A size that is off (the
    file changed in between) costs an extra request or two in _SftpFile.read, never a
    wrong byte."""
    with _together(sftp):
        requests = sftp.open(path, "rb", block_size=0), sftp.stat(path)
    opened, attrs = await _settled(requests)
    if isinstance(opened, BaseException):
        raise opened
    if isinstance(attrs, BaseException):
        if not isinstance(attrs, _errors_of(sftp).SFTPError):
            await opened.close()
            raise attrs
        return opened, None, b"", None   # opened, yet no stat: read without a known size
    size = attrs.size
    data = b""
    pipe = _ReadPipe(opened, 0, size, _sftp_read_piece(sftp), sftp) if size else None
    if pipe is not None and size <= prefetch:
        try:
            data = await pipe.take(size)
        except BaseException:
            await _sftp_close_reading(opened, pipe)
            raise
    if exact and size is not None and size <= prefetch and len(data) == size:
        await opened.close()
        return None, size, data, None
    return opened, size, data, pipe


async def _sftp_opened(sftp, path: str, mode: str, opened):
    """The file open for writing: by the open sent ahead (`opened`, its answer: see
    SftpBackend.expect_write), else by one sent now (also when that one failed: the
    folder was not there yet, say, and this open says why, if it fails too)."""
    if opened is not None:
        try:
            return await opened
        except Exception:  # noqa: BLE001 - opened again below, which says why if it fails
            pass
    return await sftp.open(path, mode, block_size=0)


async def _sftp_open_write(sftp, path: str, mode: str, first: bytes, opened=None):
    """Open a file for writing (or take the open sent ahead: _sftp_opened), and hand its
    first bytes to a _WritePipe, in one call."""
    f = await _sftp_opened(sftp, path, mode, opened)
    pipe = _WritePipe(f, 0, _sftp_write_limit(sftp))
    try:
        await pipe.put(first)
    except BaseException:
        await _sftp_close_writing(f, pipe)
        raise
    return f, pipe


async def _sftp_write_whole(sftp, path: str, mode: str, data: bytes, read_back: bool,
                            opened=None):
    """A file of one write: open, write, close, in one call; and when `read_back`, its
    bytes as the server then has them (None if they are not as many as were written: the
    verification then looks for itself, by stat and read-back).

    The read-back opens the file anew after the writing handle is closed, and asks for
    one byte more than was written: the server answers from what it stored (on disk, or
    its cache of the disk), not from anything the client sent, so the checksum of these
    bytes verifies the copy as a separate read-back would; the extra byte's absence
    shows the file ends where it should, without a stat.

    Requests that need no answer of the one before go out together (pipelined), each
    after the one it must follow: the write, the close and the new open in one round
    trip, then the read and its close in another. A server runs the requests of one
    session in the order they came (the SFTP drafts; OpenSSH's sftp-server one at a time,
    rclone's closes a handle only after its reads and writes and runs every other request
    in turn), so the read-back is still of a file opened after the writing handle was
    closed. Before, each of the six waited for the one before: twice the round trips.

    `sftp` is the thread's SftpWire (which sends each request as it is called, those
    made together in one channel write: see _together) or, where the server gave it no
    channel, its asyncssh client: the same requests in the same order."""
    one_write = len(data) <= _sftp_write_limit(sftp)
    # block size 0: one request each, sent as the call starts (asyncssh's parallel I/O
    # would send it only a loop turn later, after the close), in the order given; or the
    # open sent ahead (`opened`: see SftpBackend.expect_write)
    f = await _sftp_opened(sftp, path, mode, opened)
    if data and not one_write:   # several requests: all answered before the close
        pipe = _WritePipe(f, 0, _sftp_write_limit(sftp))
        try:
            await pipe.put(data)
            await pipe.finish()
        except BaseException:
            await _sftp_close_writing(f, pipe)
            raise
    with _together(sftp):
        steps = [f.write(data, 0)] if data and one_write else []
        steps.append(f.close())
        if read_back:
            one_read = len(data) < _sftp_read_piece(sftp)
            steps.append(sftp.open(path, "rb", block_size=0))
    done = await _settled(steps)
    reader = done[-1] if read_back else None
    failed = [r for r in done if isinstance(r, BaseException)]
    if failed:
        if reader is not None and not isinstance(reader, BaseException):
            await reader.close()
        raise failed[0]
    if reader is None:
        return None
    if one_read:   # the read and the close together
        with _together(sftp):
            requests = reader.read(len(data) + 1, 0), reader.close()
        back, closed = await _settled(requests)
        for result in (back, closed):
            if isinstance(result, BaseException):
                raise result
    else:   # its size, then the byte more
        pipe = _ReadPipe(reader, 0, len(data) + 1, _sftp_read_piece(sftp), sftp)
        try:
            back = await pipe.take(len(data) + 1)
        finally:
            await _sftp_close_reading(reader, pipe)
    return back if len(back) == len(data) else None
