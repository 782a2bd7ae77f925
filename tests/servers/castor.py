"""A stand-in for CASTOR's name-server and stager tools, over a real xrootd server.

CASTOR is retired, so nothing real can answer `nsls` or `stager_qry` any more. These
fixtures install small programs under the tools' names that print what the real ones
printed (formats from docs/castor-tool-outputs.md, the same formats the parser tests
use) for the namespace the test xrootd server exports; the bytes move with the real
`xrdcp` through that real server, as they did on CASTOR. A tape is simulated by a state
file: a migrated file is listed with mode `m`, and the stager reports it STAGEIN once
`stager_get` asks for it, then STAGED at the next query (the recall done).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TOOL_NAMES = ("nsls", "rfstat", "nsmkdir", "nsrename", "nsrm", "nsrmdir", "nstouch",
              "stager_qry", "stager_get", "stager_put")

_SIMULATOR = r'''#!@PYTHON@
"""CASTOR tool simulator for castlib's tests: argv[0] says which tool."""
import datetime, json, os, sys, time, uuid, zlib

sys.stdout.reconfigure(errors="surrogateescape")
sys.stderr.reconfigure(errors="surrogateescape")
tool = os.path.basename(sys.argv[0])
args = sys.argv[1:]
state_dir = os.environ["CASTOR_SIM_STATE"]
tape_file = os.path.join(state_dir, "tape.json")
with open(os.path.join(state_dir, "calls.log"), "a") as log:
    log.write(json.dumps([tool] + args) + "\n")


def tape():
    try:
        with open(tape_file) as f:
            return json.load(f)
    except FileNotFoundError:
        return dict()


def save_tape(t):
    with open(tape_file, "w") as f:
        json.dump(t, f)


def adler32(path):
    value = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            value = zlib.adler32(chunk, value)
    return f"{value:08x}"


def date(mtime):
    when = datetime.datetime.fromtimestamp(mtime)
    if abs(time.time() - mtime) < 180 * 86400:
        return when.strftime("%b %d %H:%M")
    return when.strftime("%b %d  %Y")


def perms(mode):
    out = ""
    for who in (6, 3, 0):
        bits = (mode >> who) & 7
        out += ("r" if bits & 4 else "-") + ("w" if bits & 2 else "-") + ("x" if bits & 1 else "-")
    return out


def line(path, name, show_class, show_sum):
    st = os.lstat(path)
    if os.path.islink(path):
        kind, shown = "l", name + " -> " + os.readlink(path)
    elif os.path.isdir(path):
        kind, shown = "d", name
    else:
        kind, shown = ("m" if path in tape() else "-"), name
    size = 0 if kind == "d" else st.st_size
    out = f"{2:>6} " if show_class else ""
    out += f"{kind}{perms(st.st_mode)} {st.st_nlink:>3} castlibt castlibt {size:>12} {date(st.st_mtime)} "
    if show_sum and kind in "-m":
        out += f"AD {adler32(path)} "
    return out + shown


def missing(path):
    print(f"{path}: No such file or directory", file=sys.stderr)
    sys.exit(1)


def nsls():
    flags = [a for a in args if a.startswith("-")]
    paths = [a for a in args if not a.startswith("-")]
    long_, dir_only = any("l" in f and not f.startswith("--") for f in flags), any("d" in f and not f.startswith("--") for f in flags)
    show_class, show_sum = "--class" in flags, "--checksum" in flags
    for path in paths:
        if not os.path.lexists(path):
            missing(path)
        if dir_only or not os.path.isdir(path) or os.path.islink(path):
            print(line(path, path, show_class, show_sum))
            continue
        for name in sorted(os.listdir(path)):
            print(line(os.path.join(path, name), name, show_class, show_sum))


def rfstat():
    path = args[-1]
    if not os.path.lexists(path):
        missing(path)
    st = os.lstat(path)
    stamp = lambda t: time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(t))
    kind = "d" if os.path.isdir(path) else "-"
    print(f"Device              : 0\nInode number        : {st.st_ino}\n"
          f"Protection          : {kind}{perms(st.st_mode)} ({oct(st.st_mode)[2:]})\n"
          f"Hard Links          : {st.st_nlink}\nUid                 : {st.st_uid} (castlibt)\n"
          f"Gid                 : {st.st_gid} (castlibt)\nSize (bytes)        : {st.st_size}\n"
          f"Last access         : {stamp(st.st_atime)}\nLast modify         : {stamp(st.st_mtime)}\n"
          f"Last stat. mod.     : {stamp(st.st_ctime)}")


def owned_like_parent(path):
    parent = os.stat(os.path.dirname(path))
    if os.geteuid() == 0:
        os.chown(path, parent.st_uid, parent.st_gid)


def nsmkdir():
    for path in [a for a in args if not a.startswith("-")]:
        todo = []
        p = path
        while not os.path.exists(p):
            todo.append(p)
            p = os.path.dirname(p)
        for p in reversed(todo):
            os.mkdir(p)
            owned_like_parent(p)


def nsrename():
    src, dst = args[-2], args[-1]
    if not os.path.lexists(src):
        missing(src)
    os.rename(src, dst)


def nsrm():
    path = args[-1]
    if not os.path.lexists(path):
        missing(path)
    if os.path.isdir(path) and not os.path.islink(path):
        print(f"{path}: Is a directory", file=sys.stderr)
        sys.exit(1)
    os.remove(path)
    t = tape()
    t.pop(path, None)
    save_tape(t)


def nsrmdir():
    path = args[-1]
    if not os.path.lexists(path):
        missing(path)
    os.rmdir(path)


def nstouch():
    stamp = args[args.index("-t") + 1]
    when = time.mktime(time.strptime(stamp, "%Y%m%d%H%M"))
    os.utime(args[-1], (when, when))


def stager_qry():
    t, status = tape(), 0
    for path in [a for a in args if not a.startswith("-")]:
        state = t.get(path, "STAGED")
        if not os.path.exists(path):
            print(f"Error 2/No such file or directory")
            status = 1
        elif state == "tape":
            print(f"Error 1015/File is not in the stager (on tape only)")
            status = 1
        elif state == "STAGEIN":
            print(f"{path} {os.stat(path).st_ino}@castorns.sim STAGEIN")
            t[path] = "STAGED"      # the recall finishes by the next query
        elif state == "stuck":
            print(f"{path} {os.stat(path).st_ino}@castorns.sim STAGEIN")
        else:
            print(f"{path} {os.stat(path).st_ino}@castorns.sim {state}")
    save_tape(t)
    sys.exit(status)


def stager_request(busy_state):
    t, failed = tape(), False
    for path in [a for a in args if not a.startswith("-")]:
        if t.get(path) == busy_state:
            print(f"{path} SUBREQUEST_FAILED 16 Another prepareToPut is ongoing for this file")
            failed = True
            continue
        if tool == "stager_get" and t.get(path) == "tape":
            t[path] = "STAGEIN"
        print(f"{path} SUBREQUEST_READY")
    save_tape(t)
    print(f"Stager request ID: {uuid.uuid4()}")
    sys.exit(1 if failed else 0)


{"nsls": nsls, "rfstat": rfstat, "nsmkdir": nsmkdir, "nsrename": nsrename, "nsrm": nsrm,
 "nsrmdir": nsrmdir, "nstouch": nstouch, "stager_qry": stager_qry,
 "stager_get": lambda: stager_request("get-refused"),
 "stager_put": lambda: stager_request("put-busy")}[tool]()
'''


@dataclass
class CastorTools:
    """The simulated CASTOR of one test: its tools' folder, its tape, its calls."""

    bin_dir: Path
    state_dir: Path
    host: str                 # the xrootd server that carries the data: 127.0.0.1:PORT

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "CASTOR_SIM_STATE": str(self.state_dir)}

    def options(self, **extra) -> dict:
        """Back-end options of a tools-mode location served by this simulation."""
        return {"mode": "tools", "env": self.env, "stage_poll": 0.1, **extra}

    def url_of(self, path: Path | str) -> str:
        return f"castor://{self.host}{path}"

    def set_tape_state(self, path: Path | str, state: str) -> None:
        """'tape' (migrated, not on disk), 'stuck' (a recall that never ends), 'INVALID',
        'put-busy' (stager_put refuses), or 'get-refused' (stager_get refuses)."""
        tape_file = self.state_dir / "tape.json"
        states = json.loads(tape_file.read_text()) if tape_file.exists() else {}
        states[str(path)] = state
        tape_file.write_text(json.dumps(states))

    def calls(self) -> list[list[str]]:
        log = self.state_dir / "calls.log"
        return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def castor_tools(xrootd_server, tmp_path) -> CastorTools:
    """CASTOR's tools for one test, answering for the session's xrootd server."""
    xrootd_server.start()
    bin_dir, state_dir = tmp_path / "castor-bin", tmp_path / "castor-state"
    bin_dir.mkdir()
    state_dir.mkdir()
    simulator = bin_dir / "castor-sim"
    simulator.write_text(_SIMULATOR.replace("@PYTHON@", sys.executable))
    simulator.chmod(0o755)
    for name in TOOL_NAMES:
        (bin_dir / name).symlink_to(simulator)
    return CastorTools(bin_dir, state_dir, xrootd_server.host)
