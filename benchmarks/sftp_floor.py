#!/usr/bin/env python3
"""Where the floor of a small-file SFTP upload is, for castlib's design choices.

    python benchmarks/sftp_floor.py                 # both servers, 5 runs each
    python benchmarks/sftp_floor.py --server rclone --runs 3

The `upload-sftp*` scenarios of run.py compare whole commands. This script takes the
command apart, on the same tree (small-300: 300 files of 0-8 KiB) and the same two servers
(OpenSSH's sshd, `rclone serve sftp`), so that a claim of "this is as fast as it gets in
Python" is a measurement, not an opinion:

1. the whole command, castlib against `rclone copy`, and the same for an empty tree: the
   fixed cost of a command (start-up, imports, configuration, connection, catalog);
2. `import asyncssh` in a fresh interpreter, against `python -c pass`;
3. the upload work alone, in a fresh process, 4 SFTP sessions, each file written under a
   temporary name, read back whole, given its mtime and mode, renamed and stat'ed (what
   castlib does for every small file), through four clients of the same protocol:
   - `asyncssh-client`: asyncssh's SFTP client, with castlib's own pipelined helpers
     (backends/sftp.py: _sftp_write_whole, _sftp_publish);
   - `lean-asyncssh`: a minimal SFTP v3 framing (struct, one future a request, requests
     of a step in one write) on a raw asyncssh channel: asyncssh's SSH layer only;
   - `lean-ssh`: the same framing over the pipes of OpenSSH's `ssh -s HOST sftp` (what
     restic's sftp back-end and rclone's --sftp-ssh do): no SSH in Python at all;
   - `castlib-ssh`: castlib's own SFTP code as a sync runs it, without its engine or
     catalog: the back-end over `ssh`, its sessions driven by the threads that use them,
     castlib's helpers for each file (one round trip fewer than the lean clients: the
     set-stat goes with the rename).
   For each: the wall time of the uploads, the CPU time of this process and of its `ssh`
   children, the time to connect.

The lean clients here are measuring instruments (no error handling beyond a status check),
not castlib code.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

CLIENTS = ("asyncssh-client", "lean-asyncssh", "lean-ssh", "castlib-ssh")
SESSIONS = 4
# copies in flight on each session (--per-session): 2 overlaps one file's round trips with
# another's, as a transfer thread carrying two copies would
PER_SESSION = int(os.environ.get("FLOOR_PER_SESSION", "1"))


# -- a minimal SFTP v3 client: framing and the steps of one small file's upload ---------------
_U32 = struct.Struct(">I")
_HEADER = struct.Struct(">IBI")   # length, type, request id
OPEN, CLOSE, READ, WRITE, LSTAT, SETSTAT, MKDIR, EXTENDED = 3, 4, 5, 6, 7, 9, 14, 200
STATUS, HANDLE, DATA, ATTRS = 101, 102, 103, 105


def _string(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b


class LeanSftp:
    """SFTP v3 over anything with write(bytes): feed() what comes back."""

    def __init__(self, write):
        self._write = write
        self._buffer = bytearray()
        self._waiting: dict[int, asyncio.Future] = {}
        self._next_id = 1
        self.version = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        self._write(_U32.pack(5) + b"\x01" + _U32.pack(3))   # INIT, version 3
        await self.version

    def feed(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        while len(buf) >= 4:
            n = _U32.unpack_from(buf)[0]
            if len(buf) < 4 + n:
                break
            kind = buf[4]
            if kind == 2:   # VERSION
                self.version.set_result(bytes(buf[5:4 + n]))
            else:
                self._waiting.pop(_U32.unpack_from(buf, 5)[0]).set_result(
                    (kind, bytes(buf[9:4 + n])))
            del buf[:4 + n]

    def lost(self, exc) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc or ConnectionError("SFTP channel closed"))

    def send(self, *requests) -> list[asyncio.Future]:
        """(type, payload) pairs, written at once; their answers' futures."""
        loop = asyncio.get_running_loop()
        out, futures = [], []
        for kind, payload in requests:
            rid, self._next_id = self._next_id, self._next_id + 1
            out += (_HEADER.pack(len(payload) + 5, kind, rid), payload)
            fut = loop.create_future()
            self._waiting[rid] = fut
            futures.append(fut)
        self._write(b"".join(out))
        return futures


def _ok(answer) -> None:
    kind, payload = answer
    if kind != STATUS or _U32.unpack_from(payload)[0] != 0:
        raise RuntimeError(f"SFTP request refused: {answer!r}")


def _handle(answer) -> bytes:
    kind, payload = answer
    if kind != HANDLE:
        _ok(answer)
    return payload[4:4 + _U32.unpack_from(payload)[0]]


async def lean_mkdir(sftp: LeanSftp, path: str) -> None:
    fut, = sftp.send((MKDIR, _string(path.encode()) + _U32.pack(0)))
    _ok(await fut)


async def lean_upload(sftp: LeanSftp, tmp: str, final: str, data: bytes, mtime: int,
                      mode: int) -> None:
    """castlib's steps for one small file: open, write, close and re-open in one round
    trip (after the handle came), read back one byte more and close, set-stat, rename
    and lstat."""
    t, f = tmp.encode(), final.encode()
    opened, = sftp.send((OPEN, _string(t) + _U32.pack(0x1a) + _U32.pack(0)))
    h = _handle(await opened)
    written, closed, reopened = sftp.send(
        (WRITE, _string(h) + struct.pack(">Q", 0) + _string(data)), (CLOSE, _string(h)),
        (OPEN, _string(t) + _U32.pack(1) + _U32.pack(0)))
    _ok(await written)
    _ok(await closed)
    h = _handle(await reopened)
    read, closed = sftp.send((READ, _string(h) + struct.pack(">QI", 0, len(data) + 1)),
                             (CLOSE, _string(h)))
    kind, payload = await read
    back = payload[4:4 + _U32.unpack_from(payload)[0]] if kind == DATA else b""
    _ok(await closed)
    if back != data:
        raise RuntimeError(f"{tmp}: read back {len(back)} bytes, wrote {len(data)}")
    attrs = _U32.pack(0x0c) + _U32.pack(mode) + struct.pack(">II", mtime, mtime)
    fut, = sftp.send((SETSTAT, _string(t) + attrs))
    _ok(await fut)
    renamed, stat = sftp.send(
        (EXTENDED, _string(b"posix-rename@openssh.com") + _string(t) + _string(f)),
        (LSTAT, _string(f)))
    _ok(await renamed)
    if (await stat)[0] != ATTRS:
        raise RuntimeError(f"{final}: no attributes after the rename")


# -- the three clients --------------------------------------------------------------------
async def _asyncssh_connection(server: dict):
    import asyncssh

    from castlib.backends import sftp as castlib_sftp

    options = dict(known_hosts=None, username=server["user"], port=server["port"],
                   encryption_algs=castlib_sftp._sftp_cipher_preference())
    if server.get("password"):
        options["password"] = server["password"]
    else:
        options["client_keys"] = [server["key"]]
    conn = await asyncssh.connect("127.0.0.1", **options)
    await castlib_sftp._lighten_connection(conn)
    return conn


async def _lean_on_asyncssh(conn) -> LeanSftp:
    import asyncssh

    holder = {}

    class Session(asyncssh.SSHClientSession):
        def connection_made(self, chan):
            holder["chan"] = chan

        def data_received(self, data, datatype):
            holder["sftp"].feed(data)

        def connection_lost(self, exc):
            holder["sftp"].lost(exc)

    chan, _ = await conn.create_session(Session, subsystem="sftp", encoding=None)
    holder["sftp"] = sftp = LeanSftp(chan.write)
    await sftp.start()
    return sftp


async def _lean_on_ssh(server: dict, askpass: str):
    loop = asyncio.get_running_loop()
    holder = {}

    class Pipes(asyncio.SubprocessProtocol):
        def pipe_data_received(self, fd, data):
            if fd == 1:
                holder["sftp"].feed(data)

        def process_exited(self):
            holder["sftp"].lost(None)

    argv = ["ssh", "-q", "-e", "none", "-p", str(server["port"]), "-l", server["user"],
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com"]
    env = dict(os.environ)
    if server.get("password"):
        argv += ["-o", "PreferredAuthentications=password,keyboard-interactive"]
        env.update(SSH_ASKPASS=askpass, SSH_ASKPASS_REQUIRE="force",
                   FLOOR_PASSWORD=server["password"])
    else:
        argv += ["-i", server["key"], "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]
    argv += ["-s", "127.0.0.1", "sftp"]
    transport, _ = await loop.subprocess_exec(
        Pipes, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    holder["sftp"] = sftp = LeanSftp(transport.get_pipe_transport(0).write)
    await sftp.start()
    return sftp, transport


async def _upload_all(client: str, server: dict, files: list[tuple[str, bytes]],
                      folders: list[str], base: str, askpass: str) -> dict:
    from castlib.backends import sftp as castlib_sftp

    started = time.perf_counter()
    conn, transports = None, []
    if client == "lean-ssh":
        pairs = await asyncio.gather(*(_lean_on_ssh(server, askpass) for _ in range(SESSIONS)))
        sessions = [sftp for sftp, _ in pairs]
        transports = [t for _, t in pairs]
    else:
        conn = await _asyncssh_connection(server)
        if client == "asyncssh-client":
            sessions = [await conn.start_sftp_client(path_encoding="utf-8")
                        for _ in range(SESSIONS)]
        else:
            sessions = [await _lean_on_asyncssh(conn) for _ in range(SESSIONS)]
    connected = time.perf_counter()
    for folder in [""] + folders:   # untimed: the uploads are what is measured
        path = base + ("/" + folder if folder else "")
        if client == "asyncssh-client":
            await sessions[0].mkdir(path)
        else:
            await lean_mkdir(sessions[0], path)
    queue = list(files)

    async def uploads(session) -> None:
        while queue:
            rel, data = queue.pop()
            final = f"{base}/{rel}"
            tmp = final + ".floor-part"
            if client == "asyncssh-client":
                back = await castlib_sftp._sftp_write_whole(session, tmp, "wb", data, True)
                if back != data:
                    raise RuntimeError(f"{tmp}: read back differs")
                await castlib_sftp._sftp_publish(session, tmp, final,
                                                 {"mtime": 1_000_000_000, "permissions": 0o644})
            else:
                await lean_upload(session, tmp, final, data, 1_000_000_000, 0o644)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(uploads(s) for s in sessions for _ in range(PER_SESSION)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if conn is not None:
        conn.close()
        await conn.wait_closed()
    for transport in transports:
        transport.close()
    await asyncio.sleep(0.05)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"connect_s": connected - started, "upload_s": wall, "cpu_s": cpu,
            "children_cpu_s": children.ru_utime + children.ru_stime}


def _read_tree(tree: str) -> tuple[list[tuple[str, bytes]], list[str]]:
    files, folders = [], set()
    for root, _, names in os.walk(tree):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, tree)
            with open(path, "rb") as f:
                files.append((rel, f.read()))
            folder = os.path.dirname(rel)
            while folder:
                folders.add(folder)
                folder = os.path.dirname(folder)
    return sorted(files), sorted(folders, key=lambda d: d.count("/"))


def _upload_all_castlib(server: dict, files: list[tuple[str, bytes]], folders: list[str],
                        base: str) -> dict:
    """castlib's own SFTP code, without its engine or catalog: the back-end over ssh, its
    sessions driven by the threads that use them, each of SESSIONS threads copying with
    castlib's helpers (_sftp_write_whole with the read-back, then _sftp_publish with the
    set-stat, rename and lstat in one round trip)."""
    import threading

    from castlib.backends import open_backend
    from castlib.backends import sftp as castlib_sftp

    options = {"known_hosts": None}
    if server.get("password"):
        options["password"] = server["password"]
    else:
        options["client_keys"] = [server["key"]]
    started = time.perf_counter()
    b = open_backend(f"sftp://{server['user']}@127.0.0.1:{server['port']}{base or '/'}",
                     options)
    b.connect_in_background(SESSIONS + 1)
    b.stat("")
    connected = time.perf_counter()
    for folder in [""] + folders:   # untimed: the uploads are what is measured
        b.mkdir(folder)
    queue = list(files)

    def uploads() -> None:
        while queue:
            rel, data = queue.pop()
            tmp = b._full(rel) + ".floor-part"
            back = b._on_sftp(castlib_sftp._sftp_write_whole, b._wire(), tmp, "wb", data, True)
            if back != data:
                raise RuntimeError(f"{tmp}: read back differs")
            b._on_sftp(castlib_sftp._sftp_publish, b._wire(), tmp, b._full(rel),
                       {"mtime": 1_000_000_000, "permissions": 0o644})

    cpu0, t0 = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=uploads) for _ in range(SESSIONS * PER_SESSION)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    b.close()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"connect_s": connected - started, "upload_s": wall, "cpu_s": cpu,
            "children_cpu_s": children.ru_utime + children.ru_stime}


def child_main(argv: list[str]) -> None:
    """One measurement in this (fresh) process: --child CLIENT SERVER_JSON TREE BASE."""
    client, server, tree, base, askpass = argv
    files, folders = _read_tree(tree)
    if client == "castlib-ssh":
        result = _upload_all_castlib(json.loads(server), files, folders, base)
    else:
        result = asyncio.run(_upload_all(client, json.loads(server), files, folders, base,
                                         askpass))
    print(json.dumps(result))


# -- the parent: servers, whole commands, and the table ------------------------------------------
def _timed(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout)[-500:]}")
    return time.perf_counter() - started


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    import run
    from trees import TREES, ensure_tree

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--server", choices=("openssh", "rclone", "both"), default="both")
    parser.add_argument("--cache", default=os.path.join(HERE, ".cache"))
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help=f"which upload clients to time (of {', '.join(CLIENTS)})")
    parser.add_argument("--per-session", type=int, default=PER_SESSION,
                        help="copies in flight on each SFTP session (default 1)")
    parser.add_argument("--no-commands", action="store_true",
                        help="time the upload clients only, not the whole commands")
    args = parser.parse_args()
    clients = [c for c in args.clients.split(",") if c]
    unknown = sorted(set(clients) - set(CLIENTS))
    if unknown:
        parser.error(f"--clients: unknown {', '.join(unknown)}")
    tree = ensure_tree(TREES["small-300"], args.cache, print)
    work = tempfile.mkdtemp(prefix="castlib-sftp-floor-")
    empty = os.path.join(work, "empty")
    os.makedirs(empty)
    askpass = os.path.join(work, "askpass")
    with open(askpass, "w") as f:
        f.write('#!/bin/sh\nprintf "%s\\n" "$FLOOR_PASSWORD"\n')
    os.chmod(askpass, 0o700)
    env = run._env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)   # what users see: imports from .pyc files
    env["FLOOR_PER_SESSION"] = str(args.per_session)
    rows: list[tuple[str, str, float, str]] = []
    servers_wanted = ("openssh", "rclone") if args.server == "both" else (args.server,)
    with run.SftpServers(os.path.join(work, "servers")) as servers:
        env["CASTLIB_CONFIG"] = servers.config
        conf = ["--config", os.path.join(servers.base, "rclone.conf")]
        for kind in servers_wanted:
            server = {"port": servers.openssh_port if kind == "openssh" else servers.rclone_port,
                      "user": servers.user, "key": servers.key,
                      "password": servers.password if kind == "rclone" else None}
            remote_base = (servers.openssh_data if kind == "openssh" else "")
            times: dict[str, list] = {}
            for i in range(-1, args.runs):   # run -1: the untimed warm-up
                db = os.path.join(work, "floor.sqlite")
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(db + suffix):
                        os.unlink(db + suffix)
                server_proc = servers.procs[0 if kind == "openssh" else 1]
                sample = {} if args.no_commands else {
                    "castlib sync": _timed(run.CASTLIB + ["--db", f"sqlite:///{db}", "-q", "sync",
                                                          tree, servers.url(kind, f"c{i + 1}")],
                                           env),
                    "rclone copy": _timed(["rclone", "copy", "-q", tree,
                                           servers.rclone_remote(kind, f"r{i + 1}")] + conf, env),
                }
                if not args.no_commands:
                    os.unlink(db)
                    _whole_commands_of_nothing(sample, kind, i, db, empty, servers, conf, env)
                for client in clients:
                    server_cpu = _cpu_s(server_proc.pid)
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", client, json.dumps(server), tree,
                         f"{remote_base}/{client}-{i + 1}", askpass],
                        cwd=REPO, env=env, capture_output=True, text=True)
                    if out.returncode != 0:
                        raise SystemExit(f"{client}: {out.stderr[-1500:]}")
                    sample[client] = json.loads(out.stdout.strip().splitlines()[-1])
                    sample[client]["server_cpu_s"] = _cpu_s(server_proc.pid) - server_cpu
                if i >= 0:
                    for key, value in sample.items():
                        times.setdefault(key, []).append(value)
                print(f"{kind} run {i + 1}/{args.runs} done", file=sys.stderr)
            _rows(rows, kind, times)
    print(f"\nsmall-300 ({len(_read_tree(tree)[0])} files), {SESSIONS} SFTP sessions, "
          f"{args.per_session} copies in flight on each, medians of {args.runs}, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print("| server | what | seconds | detail |\n|---|---|---|---|")
    for kind, key, seconds, detail in rows:
        print(f"| {kind} | {key} | {seconds:.3f} | {detail} |")


def _whole_commands_of_nothing(sample, kind, i, db, empty, servers, conf, env) -> None:
    """The fixed cost of a command: both commands on an empty tree, Python's start."""
    import run

    sample["castlib sync (empty tree)"] = _timed(
        run.CASTLIB + ["--db", f"sqlite:///{db}", "-q", "sync", empty,
                       servers.url(kind, f"ce{i + 1}")], env)
    sample["rclone copy (empty tree)"] = _timed(
        ["rclone", "copy", "-q", empty, servers.rclone_remote(kind, f"re{i + 1}")] + conf, env)
    sample["python -c pass"] = _timed([sys.executable, "-c", "pass"], env)
    sample["python -c 'import asyncssh'"] = _timed(
        [sys.executable, "-c", "import asyncssh"], env)


def _cpu_s(pid: int) -> float:
    """A process's CPU time so far (user and system), with that of the children it waited
    for (sshd's for each connection), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(n) for n in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _rows(rows: list, kind: str, times: dict) -> None:
    for key, values in times.items():
        if isinstance(values[0], dict):
            med = {k: statistics.median(v[k] for v in values) for k in values[0]}
            rows.append((kind, key, med["upload_s"],
                         f"connect {med['connect_s']:.3f} s, CPU {med['cpu_s']:.3f} s "
                         f"here + {med['children_cpu_s']:.3f} s in ssh + "
                         f"{med['server_cpu_s']:.3f} s in the server"))
        else:
            rows.append((kind, key, statistics.median(values), ""))


if __name__ == "__main__":
    main()
