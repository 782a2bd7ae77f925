#!/usr/bin/env python3
"""castlib side by side with rsync, rclone and xrdcp: one command, a table of medians.

    python benchmarks/run.py                 # every scenario (about 7 minutes on 2 cores)
    python benchmarks/run.py --quick         # small trees, one run each: a smoke test
    python benchmarks/run.py --only copy-1k,startup --runs 3

Trees are generated from a fixed seed and cached in benchmarks/.cache/ (see trees.py).
Each castlib run and each peer run is a separate process; they alternate (castlib, peer,
castlib, peer...) after one untimed warm-up of each, so both see the same warm page cache.
Wall time is the median over the runs; memory is the child's peak RSS (GNU time).
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from trees import QUICK_TREES, TREES, ensure_tree  # noqa: E402

CASTLIB = [sys.executable, "-m", "castlib"]
TIME = "/usr/bin/time"   # GNU time (Debian package "time")


# -- measuring one process ---------------------------------------------------------------------
@dataclass
class Sample:
    wall_s: float
    peak_rss_mb: float
    output: str


def measure(argv: list[str], work: str, env: dict | None = None) -> Sample:
    """Run argv to completion; its wall time and peak RSS.

    The peak RSS comes from GNU time, not from this process's own wait4: Linux carries a
    process's peak RSS across exec, so a child forked from this (larger) Python process
    would report at least our size; GNU time is small enough not to hide the child's."""
    out_path = os.path.join(work, "last-output.txt")
    rss_path = os.path.join(work, "last-rss.txt")
    timed = [TIME, "-f", "%M", "-o", rss_path] + argv
    with open(out_path, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.run(timed, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                              env=env or _env())
        wall = time.perf_counter() - started
    with open(out_path, "rb") as f:   # the tail is enough, and a listing can be huge
        f.seek(max(0, os.path.getsize(out_path) - 65536))
        output = f.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        raise BenchmarkError(f"{' '.join(argv)} exited with {proc.returncode}:\n{output[-2000:]}")
    with open(rss_path) as f:
        peak_kib = int(f.read().split()[-1])
    return Sample(wall, peak_kib / 1024, output)


def _env() -> dict:
    env = dict(os.environ)
    env.pop("CASTLIB_DB", None)   # every castlib run names its catalog with --db
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class BenchmarkError(Exception):
    pass


@dataclass
class Side:
    """One contender of a scenario: argv for run i, what to do untimed before it, and a
    check of its output (a benchmark of a run that did the wrong thing is worthless)."""

    label: str
    argv: Callable[[int], list[str]]
    prepare: Callable[[int], None] | None = None
    check: Callable[[str], None] | None = None
    samples: list[Sample] = field(default_factory=list)

    def run(self, i: int, work: str) -> Sample:
        if self.prepare:
            self.prepare(i)
        sample = measure(self.argv(i), work)
        if self.check:
            self.check(sample.output)
        return sample

    @property
    def median_s(self) -> float | None:
        return statistics.median(s.wall_s for s in self.samples) if self.samples else None

    @property
    def peak_mb(self) -> float | None:
        return max(s.peak_rss_mb for s in self.samples) if self.samples else None


@dataclass
class Result:
    key: str
    title: str
    target: str
    castlib: Side | None
    peer: Side | None
    runs: int
    verdict: str = ""
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict:
        side = lambda s: None if s is None or not s.samples else {  # noqa: E731
            "label": s.label, "median_s": s.median_s, "peak_rss_mb": s.peak_mb,
            "walls_s": [round(x.wall_s, 4) for x in s.samples]}
        return {"key": self.key, "title": self.title, "target": self.target, "runs": self.runs,
                "castlib": side(self.castlib), "peer": side(self.peer), "met": self.met,
                "verdict": self.verdict, "note": self.note}


def interleave(castlib: Side, peer: Side | None, runs: int, work: str, log) -> None:
    """One untimed warm-up of each side, then castlib, peer, castlib, peer..."""
    castlib.run(-1, work)
    if peer:
        peer.run(-1, work)
    for i in range(runs):
        for side in (castlib, peer):
            if side is None:
                continue
            sample = side.run(i, work)
            side.samples.append(sample)
            log(f"    {side.label:<10} run {i + 1}/{runs}: {sample.wall_s:8.3f} s "
                f"{sample.peak_rss_mb:7.1f} MB")


# -- helpers for scenarios -----------------------------------------------------------------------
def fresh_db(work: str, name: str) -> str:
    """The URL of an SQLite catalog that does not exist yet (the file and its WAL removed)."""
    path = os.path.join(work, f"{name}.sqlite")
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
    return f"sqlite:///{path}"


def db_url(work: str, name: str) -> str:
    return f"sqlite:///{os.path.join(work, name + '.sqlite')}"


def remove_tree(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)


def sync_counts(output: str) -> dict:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchmarkError(f"no JSON counts in castlib output:\n{output[-2000:]}")


def expect_counts(**wanted):
    def check(output: str) -> None:
        counts = sync_counts(output)
        wrong = {k: counts.get(k) for k, v in wanted.items() if counts.get(k) != v}
        if wrong:
            raise BenchmarkError(f"castlib sync did not do what was expected: {wrong} "
                                 f"instead of {wanted}")
    return check


def run_untimed(argv: list[str]) -> str:
    proc = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchmarkError(f"{' '.join(argv)} exited with {proc.returncode}:\n"
                             f"{proc.stdout[-1000:]}{proc.stderr[-1000:]}")
    return proc.stdout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the scenarios ---------------------------------------------------------------------------------
@dataclass
class Bench:
    cache: str
    work: str
    trees: dict
    quick: bool
    runs_override: int | None
    log: Callable[[str], None]

    def tree(self, name: str) -> str:
        return ensure_tree(self.trees[name], self.cache, self.log)

    def runs(self, default: int) -> int:
        if self.runs_override:
            return self.runs_override
        return 1 if self.quick else default


def ratio_result(key, title, target_ratio, castlib, peer, runs) -> Result:
    r = Result(key, title, f"ratio <= {target_ratio:g}", castlib, peer, runs)
    ratio = castlib.median_s / peer.median_s
    r.met = ratio <= target_ratio
    r.verdict = f"{ratio:.2f}"
    return r


def sc_catalog_100k(b: Bench) -> Result:
    tree = b.tree("small-100k")
    runs = b.runs(3)
    castlib = Side("castlib", lambda i: CASTLIB + ["--db", db_url(b.work, "catalog"), "-q",
                                                   "index", tree],
                   prepare=lambda i: fresh_db(b.work, "catalog"))
    peer = Side("rclone", lambda i: ["rclone", "lsjson", "-R", tree])
    interleave(castlib, peer, runs, b.work, b.log)
    return ratio_result("catalog-100k", "catalogue a 100k-file tree into a fresh catalog",
                        1.0, castlib, peer, runs)


def _resync_setup(b: Bench) -> tuple[str, str, str]:
    tree = b.tree("small-100k")
    dst = os.path.join(b.work, "resync-dst")
    remove_tree(dst)
    run_untimed(["rsync", "-a", tree + "/", dst + "/"])
    db = fresh_db(b.work, "resync")
    counts = sync_counts(run_untimed(CASTLIB + ["--db", db, "-q", "sync", tree, dst, "--json"]))
    if counts.get("copied") or counts.get("replaced"):
        raise BenchmarkError(f"a tree copied by rsync -a differs for castlib: {counts}")
    return tree, dst, db


def _resync(b: Bench, key: str, title: str, index: str, target: float) -> Result:
    tree, dst, db = _resync_setup(b)
    runs = b.runs(5)
    extra = [] if index == "both" else ["--index", index]
    castlib = Side("castlib", lambda i: CASTLIB + ["--db", db, "-q", "sync", tree, dst,
                                                   "--json"] + extra,
                   check=expect_counts(copied=0, replaced=0, deleted=0, failed=0))
    peer = Side("rsync", lambda i: ["rsync", "-a", tree + "/", dst + "/"])
    interleave(castlib, peer, runs, b.work, b.log)
    return ratio_result(key, title, target, castlib, peer, runs)


def sc_resync_100k(b: Bench) -> Result:
    return _resync(b, "resync-100k", "re-sync an unchanged 100k-file tree, both sides re-listed",
                   "both", 1.5)


def sc_resync_100k_ref(b: Bench) -> Result:
    return _resync(b, "resync-100k-ref", "the same, destination from the catalog "
                   "(--index ref)", "ref", 1.0)


def _copy(b: Bench, key: str, title: str, rsync_extra: list[str], target: float) -> Result:
    tree = b.tree("copy-1k")
    files = b.trees["copy-1k"].files
    dst = os.path.join(b.work, "copy-dst")
    runs = b.runs(3)

    def prepare(i):   # an empty destination, and no dirty pages left by the previous run
        remove_tree(dst)
        os.sync()

    castlib = Side("castlib", lambda i: CASTLIB + ["--db", db_url(b.work, "copy"), "-q", "sync",
                                                   tree, dst, "--json"],
                   prepare=lambda i: (prepare(i), fresh_db(b.work, "copy")),
                   check=expect_counts(copied=files, failed=0))
    peer = Side("rsync", lambda i: ["rsync", "-a"] + rsync_extra + [tree + "/", dst + "/"],
                prepare=prepare)
    interleave(castlib, peer, runs, b.work, b.log)
    remove_tree(dst)
    return ratio_result(key, title, target, castlib, peer, runs)


def sc_copy_1k(b: Bench) -> Result:
    return _copy(b, "copy-1k", "first copy of 1,000 files (~0.5 GiB), adler32-verified",
                 [], 1.2)


def sc_copy_1k_fsync(b: Bench) -> Result:
    r = _copy(b, "copy-1k-fsync", "the same against rsync --fsync (both durable on return)",
              ["--fsync"], 1.0)
    r.note = ("castlib fsyncs every file before publishing it, plain rsync does not: "
              "this is the peer that gives the same guarantee")
    return r


XRD_CHECKSUM_XATTR = "user.XrdCks.adler32"


def forget_xrd_checksum(path: str) -> None:
    """xrdadler32 keeps the checksum it computes in an extended attribute and answers from
    it next time (in milliseconds): removed before each run, so that it reads the file."""
    try:
        os.removexattr(path, XRD_CHECKSUM_XATTR)
    except OSError:
        pass


def sc_adler32_1g(b: Bench) -> Result:
    tree = b.tree("one-1g")
    (name,) = [os.path.join(d, f) for d, _, fs in os.walk(tree) for f in fs]
    runs = b.runs(5)
    castlib = Side("castlib", lambda i: CASTLIB + ["--db", db_url(b.work, "adler"), "-q", "index",
                                                   tree, "--checksum", "adler32"],
                   prepare=lambda i: fresh_db(b.work, "adler"))
    peer = Side("xrdadler32", lambda i: ["xrdadler32", name],
                prepare=lambda i: forget_xrd_checksum(name))
    interleave(castlib, peer, runs, b.work, b.log)
    return ratio_result("adler32-1g", "adler32 of a 1 GiB file (index --checksum adler32)",
                        1.0, castlib, peer, runs)


def sc_adler32_1g_api(b: Bench) -> Result:
    tree = b.tree("one-1g")
    (name,) = [os.path.join(d, f) for d, _, fs in os.walk(tree) for f in fs]
    runs = b.runs(5)
    code = ("import sys; from castlib.backends import open_backend; "
            "b = open_backend(sys.argv[1]); print(b.checksum(sys.argv[2], 'adler32'))")
    castlib = Side("castlib", lambda i: [sys.executable, "-c", code, os.path.dirname(name),
                                         os.path.basename(name)])
    peer = Side("xrdadler32", lambda i: ["xrdadler32", name],
                prepare=lambda i: forget_xrd_checksum(name))
    interleave(castlib, peer, runs, b.work, b.log)
    return ratio_result("adler32-1g-api", "adler32 of a 1 GiB file (the back-end's checksum "
                        "API, no catalog)", 1.0, castlib, peer, runs)


class XRootDServer:
    """A throwaway xrootd on 127.0.0.1 serving a scratch folder (stopped on exit)."""

    def __init__(self, base: str):
        self.base = base
        self.data = os.path.join(base, "data")
        self.port = free_port()
        self.proc = None

    def __enter__(self):
        remove_tree(self.base)
        for sub in ("data", "admin", "logs"):
            os.makedirs(os.path.join(self.base, sub))
        cfg = os.path.join(self.base, "xrootd.cfg")
        with open(cfg, "w") as f:
            f.write(f"all.export /\noss.localroot {self.data}\n"
                    f"all.adminpath {self.base}/admin\nall.pidpath {self.base}/admin\n"
                    "xrootd.chksum adler32\n")
        argv = ["xrootd", "-p", str(self.port), "-c", cfg, "-l",
                os.path.join(self.base, "logs", "xrootd.log")]
        if os.geteuid() == 0:   # xrootd refuses to run as root
            self._run_as = "xrootd" if _user_exists("xrootd") else "nobody"
            argv[1:1] = ["-R", self._run_as]
            shutil.chown(self.base, self._run_as)
            for dirpath, dirs, files in os.walk(self.base):
                for n in dirs + files:
                    shutil.chown(os.path.join(dirpath, n), self._run_as)
        else:
            self._run_as = None
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchmarkError(f"xrootd exited with {self.proc.returncode}; see "
                                     f"{self.base}/logs")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise BenchmarkError("xrootd did not start listening within 20 s")

    def url(self, path: str) -> str:
        return f"root://127.0.0.1:{self.port}//{path.lstrip('/')}"

    def empty_folder(self, path: str) -> None:
        """A fresh, empty folder on the server (removed and recreated on its disk)."""
        local = os.path.join(self.data, path.strip("/"))
        remove_tree(local)
        os.makedirs(local)
        if self._run_as:
            walk_to = self.data
            for part in path.strip("/").split("/"):
                walk_to = os.path.join(walk_to, part)
                shutil.chown(walk_to, self._run_as)

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def castlib_has_backend(scheme: str) -> bool:
    proc = subprocess.run(CASTLIB + ["backends"], cwd=REPO, env=_env(), capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(scheme + "://"):
            return "not installed" not in line and "unavailable" not in line
    return False


def sc_upload_xrootd(b: Bench) -> Result:
    return _upload(b, "upload-xrootd", [], "upload {files} files to a local XRootD server")


def sc_upload_xrootd_cksum(b: Bench) -> Result:
    r = _upload(b, "upload-xrootd-cksum", ["--cksum", "adler32"],
                "the same against xrdcp --cksum adler32 (both verify every copy)")
    r.note = ("informational: castlib checks each copy against the server's adler32, plain "
              "xrdcp checks nothing")
    return r


def _upload(b: Bench, key: str, xrdcp_extra: list[str], title: str) -> Result:
    tree = b.tree("upload-200")
    files = b.trees["upload-200"].files
    runs = b.runs(5)
    title = title.format(files=files)
    with XRootDServer(os.path.join(b.work, "xrootd")) as server:
        def prepare_peer(i):
            server.empty_folder("peer")

        peer = Side("xrdcp", lambda i: ["xrdcp", "--parallel", "4", "-r", "-s", *xrdcp_extra,
                                        tree, server.url("peer") + "/"], prepare=prepare_peer)
        if not castlib_has_backend("root"):
            peer.run(-1, b.work)
            for i in range(runs):
                peer.samples.append(peer.run(i, b.work))
            r = Result(key, title, "ratio <= 1", None, peer, runs)
            r.verdict = "n/a"
            r.note = "castlib has no root:// back-end yet: only the peer was measured"
            return r

        def prepare_castlib(i):
            remove_tree(os.path.join(server.data, "castlib"))
            fresh_db(b.work, "upload")

        castlib = Side("castlib", lambda i: CASTLIB + ["--db", db_url(b.work, "upload"), "-q",
                                                       "sync", tree, server.url("castlib"),
                                                       "--json"],
                       prepare=prepare_castlib, check=expect_counts(copied=files, failed=0))
        interleave(castlib, peer, runs, b.work, b.log)
    return ratio_result(key, title, 1.0, castlib, peer, runs)


class SftpServers:
    """Two SFTP servers on 127.0.0.1, free ports, over scratch folders (stopped on exit):
    OpenSSH's sshd (key login as the current user, as tests/servers/sftp.py starts it)
    and `rclone serve sftp` (password login). With `rate` (tc's words: "1gbit"), they
    are reached through a link of that rate instead: a network namespace of their own,
    a veth pair into it, each end shaped by tbf (root only)."""

    def __init__(self, base: str, rate: str | None = None):
        self.base = base
        self.rate = rate
        self.host = "127.0.0.1"
        self.netns: str | None = None
        self.procs: list[subprocess.Popen] = []
        self.user = __import__("getpass").getuser()
        self.password = "castlib-bench"

    def __enter__(self):
        remove_tree(self.base)
        os.makedirs(self.base)
        os.chmod(self.base, 0o755)
        self.key = os.path.join(self.base, "client_key")
        host_key = os.path.join(self.base, "host_key")
        for key in (self.key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key],
                           check=True)
        shutil.copy(self.key + ".pub", os.path.join(self.base, "authorized_keys"))
        self.openssh_data = os.path.join(self.base, "openssh-data")
        self.rclone_data = os.path.join(self.base, "rclone-data")
        os.makedirs(self.openssh_data)
        os.makedirs(self.rclone_data)
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        sftp_server = next((p for p in ("/usr/lib/openssh/sftp-server",
                                        "/usr/libexec/sftp-server") if os.path.exists(p)),
                           "internal-sftp")
        self.openssh_port, self.rclone_port = free_port(), free_port()
        try:
            return self._start(sftp_server)
        except BaseException:
            self.__exit__(None, None, None)   # (servers started, the namespace)
            raise

    def _start(self, sftp_server: str):
        host_key = os.path.join(self.base, "host_key")
        inside = self._shaped_link() if self.rate else []
        config = os.path.join(self.base, "sshd_config")
        with open(config, "w") as f:
            f.write(f"ListenAddress {self.host}\nPort {self.openssh_port}\nHostKey {host_key}\n"
                    f"PidFile {self.base}/sshd.pid\n"
                    f"AuthorizedKeysFile {self.base}/authorized_keys\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
                    f"MaxStartups 50\nLogLevel ERROR\nSubsystem sftp {sftp_server}\n")
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.procs.append(subprocess.Popen(inside + [sshd, "-D", "-e", "-f", config],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.procs.append(subprocess.Popen(
            inside + ["rclone", "serve", "sftp", self.rclone_data, "--addr",
                      f"{self.host}:{self.rclone_port}", "--user", self.user,
                      "--pass", self.password, "--key", host_key,
                      "--config", os.path.join(self.base, "rclone.conf"),
                      "--log-level", "ERROR"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in (self.openssh_port, self.rclone_port):
            self._wait(port)
        self.config = os.path.join(self.base, "castlib.yaml")
        with open(self.config, "w") as f:
            json.dump({"storage": {   # YAML is a superset of JSON
                self.url("openssh", ""): {"client_keys": [self.key], "known_hosts": None},
                self.url("rclone", ""): {"password": self.password, "known_hosts": None}}}, f)
        self.obscured = subprocess.run(["rclone", "obscure", self.password], check=True,
                                       capture_output=True, text=True).stdout.strip()
        return self

    def _shaped_link(self) -> list[str]:
        """The servers' network namespace, reached through a veth pair shaped to
        self.rate both ways; sets self.host, returns the prefix that runs a command in
        it."""
        if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")):
            raise BenchmarkError(f"a {self.rate} link needs root and iproute2's ip and tc "
                                 "(a network namespace, a veth pair, tbf)")
        n = os.getpid() % 250 + 1
        self.netns = f"castlib-bench-{os.getpid()}"
        near, far = f"cbench{n}a", f"cbench{n}b"
        inside = ["ip", "netns", "exec", self.netns]
        shape = ["tc", "qdisc", "add", "dev", "{}", "root", "tbf", "rate", self.rate,
                 "burst", "256kb", "latency", "50ms"]
        for argv in (["ip", "netns", "add", self.netns],
                     ["ip", "link", "add", near, "type", "veth", "peer", "name", far],
                     ["ip", "link", "set", far, "netns", self.netns],
                     ["ip", "addr", "add", f"10.231.{n}.1/30", "dev", near],
                     ["ip", "link", "set", near, "up"],
                     inside + ["ip", "addr", "add", f"10.231.{n}.2/30", "dev", far],
                     inside + ["ip", "link", "set", far, "up"],
                     inside + ["ip", "link", "set", "lo", "up"],
                     [a.format(near) for a in shape],
                     inside + [a.format(far) for a in shape]):
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode:
                subprocess.run(["ip", "link", "del", near], capture_output=True)
                subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
                self.netns = None
                raise BenchmarkError(f"{' '.join(argv)}: {done.stderr.strip()}")
        self.host = f"10.231.{n}.2"
        return inside

    def _wait(self, port: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise BenchmarkError("an SFTP server exited at start")
            try:
                with socket.create_connection((self.host, port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.1)
        raise BenchmarkError(f"no SFTP server answered on port {port} within 30 s")

    def data(self, server: str) -> str:
        return self.openssh_data if server == "openssh" else self.rclone_data

    def url(self, server: str, folder: str) -> str:
        """castlib's URL of a folder on a server (the root for folder "")."""
        if server == "openssh":
            return (f"sftp://{self.user}@{self.host}:{self.openssh_port}"
                    f"{os.path.join(self.openssh_data, folder).rstrip('/')}")
        return f"sftp://{self.user}@{self.host}:{self.rclone_port}/{folder}".rstrip("/")

    def rclone_remote(self, server: str, folder: str) -> str:
        """rclone's on-the-fly remote for the same folder."""
        if server == "openssh":
            return (f":sftp,host={self.host},port={self.openssh_port},user={self.user},"
                    f"key_file={self.key}:{os.path.join(self.openssh_data, folder)}")
        return (f":sftp,host={self.host},port={self.rclone_port},user={self.user},"
                f"pass={self.obscured}:{folder}")

    def __exit__(self, *exc):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.netns is not None:   # (its end of the veth pair, and so both, go too)
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        remove_tree(self.base)


def sc_upload_sftp(b: Bench) -> Result:
    return _upload_sftp(b, "upload-sftp", "openssh", "OpenSSH sshd")


def sc_upload_sftp_rclone(b: Bench) -> Result:
    return _upload_sftp(b, "upload-sftp-rclone", "rclone", "rclone serve sftp")


def sc_upload_sftp_rclone_3k(b: Bench) -> Result:
    return _upload_sftp(b, "upload-sftp-rclone-3k", "rclone", "rclone serve sftp", "small-3k")


def sc_upload_sftp_big(b: Bench) -> Result:
    return _upload_sftp(b, "upload-sftp-big", "openssh", "OpenSSH sshd", "one-256m")


def sc_upload_sftp_big_rclone(b: Bench) -> Result:
    return _upload_sftp(b, "upload-sftp-big-rclone", "rclone", "rclone serve sftp", "one-256m")


def sc_upload_sftp_big_rclone_1g(b: Bench) -> Result:
    r = _upload_sftp(b, "upload-sftp-big-rclone-1g", "rclone",
                     "rclone serve sftp over a 1 Gbit/s link", "one-256m", rate="1gbit")
    line_s = b.trees["one-256m"].max_size * 8 / 1e9
    r.target, r.met = "-", None
    r.note = ("informational: "
              f"the link's own time for the file's bytes: {line_s:.2f} s (SSH's and TCP's "
              "framing on top); the server in a network namespace of its own, reached "
              "through a veth pair shaped by tbf both ways (a DAQ host's 1 Gbit/s link): "
              "where the line, not the two CPUs shared with the server, is the limit")
    return r


def sc_upload_sftp_asyncssh(b: Bench) -> Result:
    r = _upload_sftp(b, "upload-sftp-asyncssh", "openssh", "OpenSSH sshd", ssh_client="asyncssh")
    r.target, r.met = "-", None
    r.note = "informational: the same as upload-sftp through asyncssh (ssh_client: asyncssh)"
    return r


def sc_upload_sftp_rclone_asyncssh(b: Bench) -> Result:
    r = _upload_sftp(b, "upload-sftp-rclone-asyncssh", "rclone", "rclone serve sftp",
                     ssh_client="asyncssh")
    r.target, r.met = "-", None
    r.note = ("informational: the same as upload-sftp-rclone through asyncssh "
              "(ssh_client: asyncssh)")
    return r


def sc_upload_sftp_rclone_verified(b: Bench) -> Result:
    r = _upload_sftp(b, "upload-sftp-rclone-verified", "rclone", "rclone serve sftp",
                     verified=True)
    r.target, r.met = "-", None
    r.note = ("informational: the peer is `rclone copy` then `rclone check --download`, which "
              "reads every file back from the server (castlib reads back the small ones)")
    return r


def sc_upload_sftp_big_rclone_verified(b: Bench) -> Result:
    r = _upload_sftp(b, "upload-sftp-big-rclone-verified", "rclone", "rclone serve sftp",
                     "one-256m", verified=True)
    r.target, r.met = "-", None
    r.note = ("informational: upload-sftp-big-rclone against `rclone copy` then `rclone check "
              "--download`, which reads the file back from the server (castlib takes rclone "
              "serve sftp's md5sum, as rclone copy does)")
    return r


def _upload_sftp(b: Bench, key: str, server_kind: str, server_name: str,
                 tree_key: str = "small-300", verified: bool = False,
                 ssh_client: str | None = None, rate: str | None = None) -> Result:
    """A first sync to an SFTP server on loopback, each copy verified by castlib (read
    back, or cksum on an OpenSSH host for a large file), against `rclone copy` of the
    same tree to the same server. Each run writes into a folder of its own (rclone serve
    sftp caches folder listings)."""
    tree = b.tree(tree_key)
    spec = b.trees[tree_key]
    files = spec.files
    runs = b.runs(5 if tree_key == "small-300" else 3)
    what = (f"{files:,} small files (0-{spec.max_size >> 10} KiB)" if files > 1
            else f"one {spec.max_size >> 20} MiB file")
    title = f"upload {what} to {server_name}"
    with SftpServers(os.path.join(b.work, "sftp"), rate) as servers:
        data = servers.data(server_kind)
        saved = os.environ.get("CASTLIB_CONFIG")
        config = servers.config
        if ssh_client is not None:   # the same options, and the SSH client named
            with open(config) as f:
                storage = json.load(f)["storage"]
            config = os.path.join(servers.base, f"castlib-{ssh_client}.yaml")
            with open(config, "w") as f:
                json.dump({"storage": {url: {**opts, "ssh_client": ssh_client}
                                       for url, opts in storage.items()}}, f)
        os.environ["CASTLIB_CONFIG"] = config   # the runs inherit it (_env)
        try:
            def prepare(side):
                def clear(i):
                    for name in os.listdir(data):
                        if name.startswith(side):
                            remove_tree(os.path.join(data, name))
                    if side == "castlib":
                        fresh_db(b.work, "upload-sftp")
                return clear

            castlib = Side("castlib", lambda i: CASTLIB + [
                "--db", db_url(b.work, "upload-sftp"), "-q", "sync", tree,
                servers.url(server_kind, f"castlib-{i + 1}"), "--json"],
                prepare=prepare("castlib"), check=expect_counts(copied=files, failed=0))
            def rclone_argv(i: int) -> list[str]:
                remote = servers.rclone_remote(server_kind, f"rclone-{i + 1}")
                conf = ["--config", os.path.join(servers.base, "rclone.conf")]
                copy = ["rclone", "copy", "-q", tree, remote] + conf
                if not verified:
                    return copy
                check = ["rclone", "check", "-q", "--download", tree, remote] + conf
                return ["sh", "-c", " && ".join(" ".join(map(shlex.quote, argv))
                                                for argv in (copy, check))]

            peer = Side("rclone", rclone_argv, prepare=prepare("rclone"))
            interleave(castlib, peer, runs, b.work, b.log)
        finally:
            if saved is None:
                os.environ.pop("CASTLIB_CONFIG", None)
            else:
                os.environ["CASTLIB_CONFIG"] = saved
    if verified:
        title += ", against rclone copy + rclone check --download"
    r = ratio_result(key, title, 1.0, castlib, peer, runs)
    r.note = ("castlib also starts Python, indexes both sides into its catalog and verifies "
              "every copy (small ones a group at a time, each read back once written; a "
              "large one by the server's hash: cksum on an OpenSSH host, rclone serve "
              "sftp's md5sum); rclone "
              "copy checks sizes, and md5 where it can run md5sum on the server (OpenSSH: "
              "one `ssh exec` a file, its main cost there; rclone serve sftp answers from "
              "the md5 it took as the upload came in)")
    return r


def _million_tree(b: Bench) -> str:
    return b.tree("empty-1m")


def sc_catalog_1m(b: Bench) -> Result:
    tree = _million_tree(b)
    runs = b.runs(3)
    castlib = Side("castlib", lambda i: CASTLIB + ["--db", db_url(b.work, "million"), "-q",
                                                   "index", tree],
                   prepare=lambda i: fresh_db(b.work, "million"))
    peer = Side("rclone", lambda i: ["rclone", "lsjson", "-R", tree])
    interleave(castlib, peer, runs, b.work, b.log)
    limit = 150
    r = Result("catalog-1m", f"catalogue {b.trees['empty-1m'].files:,} files: peak memory",
               f"peak RSS <= {limit} MB", castlib, peer, runs)
    r.met = castlib.peak_mb <= limit
    r.verdict = f"{castlib.peak_mb:.0f} MB"
    return r


def sc_reindex_1m(b: Bench) -> Result:
    """The hourly no-op at scale: a re-index of the unchanged 1M-entry tree into a catalog
    that already holds it. The bound is its peak memory (one folder at a time, not the
    tree's entries); its time is informational, beside rclone's listing of the same tree."""
    tree = _million_tree(b)
    db = fresh_db(b.work, "reindex")
    b.log("    indexing the tree once (untimed setup)")
    run_untimed(CASTLIB + ["--db", db, "-q", "index", tree])
    runs = b.runs(3)
    castlib = Side("castlib", lambda i: CASTLIB + ["--db", db, "-q", "index", tree])
    peer = Side("rclone", lambda i: ["rclone", "lsjson", "-R", tree])
    interleave(castlib, peer, runs, b.work, b.log)
    limit = 150
    r = Result("reindex-1m", f"re-index {b.trees['empty-1m'].files:,} unchanged files: peak "
               "memory", f"peak RSS <= {limit} MB", castlib, peer, runs)
    r.met = castlib.peak_mb <= limit
    r.verdict = f"{castlib.peak_mb:.0f} MB"
    r.note = (f"informational: {castlib.median_s:.2f} s, rclone lsjson -R "
              f"{peer.median_s:.2f} s")
    return r


def _million_twins(b: Bench) -> tuple[str, str]:
    """The 1M tree and a hard-linked copy of it (cached): two locations alike."""
    tree = _million_tree(b)
    twin = os.path.join(os.path.dirname(tree), "twin")
    if not os.path.isdir(twin):
        b.log("    making a hard-linked twin of the tree (cached)")
        run_untimed(["cp", "-al", tree, twin + ".part"])
        os.rename(twin + ".part", twin)
    return tree, twin


def sc_diff_1m(b: Bench) -> Result:
    """Two locations of 1M entries each: the tree and a hard-linked copy of it (cached)."""
    tree, twin = _million_twins(b)
    db = fresh_db(b.work, "diff")
    b.log("    indexing both locations (untimed setup)")
    run_untimed(CASTLIB + ["--db", db, "-q", "index", tree])
    run_untimed(CASTLIB + ["--db", db, "-q", "index", twin])
    return _diff_1m(b, "diff-1m", "", db, tree, twin)


def sc_diff_1m_postgresql(b: Bench) -> Result:
    """diff-1m on a PostgreSQL catalog: a throwaway server started as the tests start
    theirs (tests/servers/postgres.py: fsync off, loopback, removed afterwards)."""
    tree, twin = _million_twins(b)
    sys.path.insert(0, REPO)
    from tests.servers.postgres import admin_execute, postgres_server

    with postgres_server() as server:
        admin_execute(server, "CREATE DATABASE bench TEMPLATE template0")
        db = f"{server}/bench"
        b.log("    indexing both locations (untimed setup)")
        run_untimed(CASTLIB + ["--db", db, "-q", "index", tree])
        run_untimed(CASTLIB + ["--db", db, "-q", "index", twin])
        # what autovacuum does within a minute of such writes (statistics, visibility
        # map), done now: the timed runs see the plans a catalog in use gets
        import psycopg

        with psycopg.connect(f"{server}/bench", autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE entries")
        return _diff_1m(b, "diff-1m-postgresql", " on PostgreSQL", db, tree, twin)


def _diff_1m(b: Bench, key: str, where: str, db: str, tree: str, twin: str) -> Result:
    runs = b.runs(5)
    castlib = Side("castlib", lambda i: CASTLIB + ["--db", db, "-q", "diff", tree, twin,
                                                   "--no-index"])
    interleave(castlib, None, runs, b.work, b.log)
    limit = 2.0
    entries = b.trees["empty-1m"].files
    r = Result(key, f"diff two {entries:,}-entry locations in the catalog{where} (--no-index)",
               f"<= {limit:g} s", castlib, None, runs)
    r.met = castlib.median_s <= limit
    r.verdict = f"{castlib.median_s:.2f} s"
    return r


def sc_startup(b: Bench) -> Result:
    runs = b.runs(10)
    castlib = Side("castlib", lambda i: CASTLIB + ["--help"])
    peer = Side("python", lambda i: [sys.executable, "-c", "pass"])
    interleave(castlib, peer, runs, b.work, b.log)
    limit = 0.3
    r = Result("startup", "castlib --help: start-up", f"<= {limit:g} s", castlib, peer, runs)
    r.met = castlib.median_s <= limit
    r.verdict = f"{castlib.median_s:.3f} s"
    r.note = "peer: a bare Python interpreter start, the floor"
    return r


SCENARIOS = {
    "catalog-100k": sc_catalog_100k,
    "resync-100k": sc_resync_100k,
    "resync-100k-ref": sc_resync_100k_ref,
    "copy-1k": sc_copy_1k,
    "copy-1k-fsync": sc_copy_1k_fsync,
    "adler32-1g": sc_adler32_1g,
    "adler32-1g-api": sc_adler32_1g_api,
    "upload-xrootd": sc_upload_xrootd,
    "upload-xrootd-cksum": sc_upload_xrootd_cksum,
    "upload-sftp": sc_upload_sftp,
    "upload-sftp-rclone": sc_upload_sftp_rclone,
    "upload-sftp-rclone-3k": sc_upload_sftp_rclone_3k,
    "upload-sftp-big": sc_upload_sftp_big,
    "upload-sftp-big-rclone": sc_upload_sftp_big_rclone,
    "upload-sftp-big-rclone-1g": sc_upload_sftp_big_rclone_1g,
    "upload-sftp-rclone-verified": sc_upload_sftp_rclone_verified,
    "upload-sftp-big-rclone-verified": sc_upload_sftp_big_rclone_verified,
    "upload-sftp-asyncssh": sc_upload_sftp_asyncssh,
    "upload-sftp-rclone-asyncssh": sc_upload_sftp_rclone_asyncssh,
    "diff-1m": sc_diff_1m,
    "diff-1m-postgresql": sc_diff_1m_postgresql,
    "catalog-1m": sc_catalog_1m,
    "reindex-1m": sc_reindex_1m,
    "startup": sc_startup,
}


# -- report --------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(), "cpu": cpu, "memory": mem,
            "python": platform.python_version(), "kernel": platform.release(),
            "castlib_commit": commit}


def table(results: list[Result]) -> str:
    head = ("| scenario | castlib | peer | peer time | ratio | castlib peak RSS | "
            "peer peak RSS | target | met |")
    lines = [head, "|" + "---|" * 9]
    fmt_s = lambda s: "-" if s is None or not s.samples else f"{s.median_s:.3f} s"  # noqa: E731
    fmt_m = lambda s: "-" if s is None or not s.samples else f"{s.peak_mb:.0f} MB"  # noqa: E731
    for r in results:
        ratio = "-"
        if r.castlib and r.peer and r.castlib.samples and r.peer.samples:
            ratio = f"{r.castlib.median_s / r.peer.median_s:.2f}"
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        lines.append(f"| {r.key}: {r.title} | {fmt_s(r.castlib)} | "
                     f"{r.peer.label if r.peer else '-'} | {fmt_s(r.peer)} | {ratio} | "
                     f"{fmt_m(r.castlib)} | {fmt_m(r.peer)} | {r.target} | {met} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small trees, one run: a smoke test")
    p.add_argument("--only", metavar="SCENARIO[,SCENARIO]", action="append", default=[],
                   help=f"run only these ({', '.join(SCENARIOS)})")
    p.add_argument("--runs", type=int, help="timed runs per side (default 5; 3 for big ones)")
    p.add_argument("--cache", default=os.path.join(HERE, ".cache"),
                   help="where trees and scratch files go (default benchmarks/.cache)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = p.parse_args(argv)
    if args.list:
        for key, fn in SCENARIOS.items():
            print(key)
        return 0
    chosen = [k.strip() for spec in args.only for k in spec.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {', '.join(unknown)} (--list shows them)")
    keys = chosen or list(SCENARIOS)
    missing = [t for t in ("rsync", "rclone", "xrdcp", "xrdadler32", "xrootd", TIME)
               if shutil.which(t) is None]
    if missing:
        print(f"benchmarks: missing tools: {', '.join(missing)} "
              "(scripts/install-test-deps installs them)", file=sys.stderr)
        return 2
    # castlib runs from this checkout: its bytecode is compiled first, as pip compiles an
    # installed package's, so that no timed run compiles a module (where
    # PYTHONDONTWRITEBYTECODE is set, as on our CI machines, every run of a checkout with
    # an edited module did: 0.1-0.2 s more for each run of castlib)
    compileall.compile_dir(os.path.join(REPO, "castlib"), quiet=1)
    cache = os.path.abspath(args.cache)
    os.makedirs(cache, exist_ok=True)
    # a scratch folder of this run's own (servers' data, catalogs, copies), removed at the
    # end: two runs sharing one cache of trees do not clear each other's servers
    work = tempfile.mkdtemp(prefix="quick-work-" if args.quick else "work-", dir=cache)
    os.chmod(work, 0o755)   # the servers' unprivileged users (xrootd) reach their folders
    try:
        return _run_scenarios(args, keys, cache, work)
    finally:
        remove_tree(work)


def _run_scenarios(args, keys: list[str], cache: str, work: str) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    bench = Bench(cache, work, QUICK_TREES if args.quick else TREES, args.quick, args.runs, log)
    results, failures = [], []
    for key in keys:
        log(f"== {key}")
        started = time.monotonic()
        try:
            results.append(SCENARIOS[key](bench))
        except BenchmarkError as exc:
            failures.append(f"{key}: {exc}")
            log(f"   FAILED: {exc}")
        log(f"   ({time.monotonic() - started:.0f} s)")
    info = machine()
    print(f"\n{info['date']}; {info['cpus']} CPUs ({info['cpu']}), {info['memory']} RAM; "
          f"Python {info['python']}; castlib {info['castlib_commit']}"
          f"{'; QUICK: a smoke run on small trees (titles name the full sizes), not figures' if args.quick else ''}\n")
    print(table(results))
    for r in results:
        if r.note:
            print(f"\n- {r.key}: {r.note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "quick": args.quick,
                       "results": [r.as_dict() for r in results], "failures": failures}, f,
                      indent=1)
    for f in failures:
        print(f"\nFAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
