"""A real XRootD server for tests: Debian's xrootd on loopback, exporting a temp folder.

xrootd refuses to run as root, so under root (CI containers) it runs as the unprivileged
`castlibtest` user (created on first use) and the data folder belongs to that user.
No authentication; adler32 is the server's checksum, as on EOS.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .common import (answers_on, free_port, stop_process, unprivileged_user,
                     wait_until_ready)

XROOTD = shutil.which("xrootd") or "/usr/bin/xrootd"
def _chown_for(user: pwd.struct_passwd, *paths: Path) -> None:
    for p in paths:
        os.chmod(p, 0o755)
        if os.geteuid() == 0:
            os.chown(p, user.pw_uid, user.pw_gid)


@dataclass
class XRootDServer:
    """One xrootd process; `stop()` and `start()` restart it on the same port."""

    port: int
    data_dir: Path            # the folder behind the export: root://host:port//<data_dir>/...
    work_dir: Path
    user: pwd.struct_passwd
    export: str = "all.export / writable"
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _log: object = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The server's base URL, e.g. root://127.0.0.1:PORT/"""
        return f"root://{self.host}/"

    def url_of(self, local_path: Path | str) -> str:
        """The root:// URL of a path below data_dir (xrootd serves the local namespace as is)."""
        return f"root://{self.host}/{local_path}"

    def new_folder(self, prefix: str = "t") -> tuple[str, Path]:
        """A fresh empty folder on the server, owned by the server's user: (URL, local path)."""
        folder = self.data_dir / f"{prefix}-{uuid.uuid4().hex[:10]}"
        folder.mkdir()
        _chown_for(self.user, folder)
        return self.url_of(folder), folder

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        config = self.work_dir / "xrootd.cfg"
        config.write_text(f"""\
xrd.port {self.port}
xrd.network nokeepalive
{self.export}
oss.localroot /
all.adminpath {self.work_dir}/admin
all.pidpath {self.work_dir}/run
xrootd.chksum adler32
ofs.tpc pgm /usr/bin/xrdcp --server -f
""")
        self._log = open(self.work_dir / "xrootd.log", "ab")
        cmd = [XROOTD, "-c", str(config), "-l", str(self.work_dir / "xrootd-internal.log"),
               "-n", "castlib"]
        if os.geteuid() == 0:
            cmd += ["-R", self.user.pw_name]
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                      cwd=self.work_dir)
        wait_until_ready("xrootd", self._proc, answers_on(self.port),
                         log_path=self.work_dir / "xrootd.log", timeout_s=20)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture(scope="session")
def xrootd_server():
    """xrootd on 127.0.0.1 on a free port, exporting `data_dir` (and the whole namespace,
    as EOS would: URLs carry absolute paths)."""
    user = unprivileged_user()
    # not below pytest's private temporary tree, which the server's user cannot enter
    work_dir = Path(tempfile.mkdtemp(prefix="castlib-xrootd-"))
    data_dir = work_dir / "data"
    for d in (data_dir, work_dir / "admin", work_dir / "run"):
        d.mkdir()
    _chown_for(user, work_dir, data_dir, work_dir / "admin", work_dir / "run")
    server = XRootDServer(free_port(), data_dir, work_dir, user)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


# The oss asks this "mass storage" gateway about files it does not have on disk: statx
# answers from the tape folder, so such a file is listed offline (kXR_offline) until a
# copy lands on disk. Its first output line is the command's errno (0: done).
_MSS_GATEWAY = """#!/bin/sh
tape={tape}
case "$1" in
  statx) if [ -f "$tape$2" ]; then
           echo 0; echo "f rw-r--r-- 1 0 0 0 0 $(stat -c '%Y %s' "$tape$2") 4096 0"
         else echo 2; fi ;;
  *) echo 0 ;;
esac
"""


@dataclass
class TapeServer:
    server: XRootDServer
    tape_dir: Path            # what is "on tape": tape_dir / <absolute path on the server>

    def put_on_tape(self, local_path: Path, data: bytes) -> None:
        copy = self.tape_dir / str(local_path).lstrip("/")
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(data)

    def recall(self, local_path: Path) -> None:
        """What a tape system does once a file is staged: its bytes appear on disk."""
        local_path.parent.mkdir(parents=True, exist_ok=True)
        local_path.write_bytes((self.tape_dir / str(local_path).lstrip("/")).read_bytes())


@pytest.fixture
def xrootd_tape_server():
    """An xrootd whose export is backed by a simulated tape system (oss.msscmd), for
    nearline files and staging. The standalone server accepts a prepare (stage) request
    but recalls nothing by itself: a test calls recall() to play the tape system. Its
    folder listings come out empty (this xrootd lists such an export through the
    gateway's dlist, which it does not answer usefully), so it serves stat and staging
    tests, not listings or syncs."""
    user = unprivileged_user()
    work_dir = Path(tempfile.mkdtemp(prefix="castlib-xrootd-tape-"))
    data_dir, tape_dir = work_dir / "data", work_dir / "tape"
    for d in (data_dir, tape_dir, work_dir / "admin", work_dir / "run"):
        d.mkdir()
    gateway = work_dir / "mss-gateway"
    gateway.write_text(_MSS_GATEWAY.format(tape=tape_dir))
    gateway.chmod(0o755)
    _chown_for(user, work_dir, data_dir, tape_dir, work_dir / "admin", work_dir / "run")
    export = f"all.export {data_dir} stage writable\noss.msscmd {gateway}"
    server = XRootDServer(free_port(), data_dir, work_dir, user, export)
    server.start()
    try:
        yield TapeServer(server, tape_dir)
    finally:
        server.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


@dataclass(frozen=True)
class XRootDFolder:
    server: XRootDServer
    url: str                  # root://127.0.0.1:PORT//.../folder
    path: Path                # the same folder on the local disk


@pytest.fixture
def xrootd_folder(xrootd_server) -> XRootDFolder:
    """An empty folder of its own on the session's server for one test; the server is
    (re)started if a test stopped it."""
    xrootd_server.start()
    url, path = xrootd_server.new_folder()
    try:
        yield XRootDFolder(xrootd_server, url, path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
