"""Helpers for tests: build file trees, run the castlib command, compare trees byte by byte."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def make_tree(root: Path | str, files: dict[str, bytes | str | None]) -> Path:
    """Create files under root: {"a/b.dat": b"bytes", "empty/": None (a folder)}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        p = root / rel
        if rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else (content or b""))
    return root


def tree_digest(root: Path | str) -> dict[str, str]:
    """{relative path: sha256 or 'dir' or 'link:target'} of a local tree, names as bytes-safe str."""
    root = os.fsencode(str(root))
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(full, root))
            if os.path.islink(full):
                out[rel] = "link:" + os.fsdecode(os.readlink(full))
            elif os.path.isdir(full):
                out[rel] = "dir"
            else:
                with open(full, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def backend_write(backend, path: str, data: bytes, chunk: int = 4 * 1024 * 1024) -> None:
    """Write `data` to `path` through a back-end's open_write, `chunk` bytes a write."""
    with backend.open_write(path) as f:
        for start in range(0, len(data), chunk):
            f.write(data[start:start + chunk])


def backend_read(backend, path: str, chunk: int = 1024 * 1024) -> bytes:
    """A file's bytes through a back-end's open_read, `chunk` bytes a read (never more)."""
    with backend.open_read(path) as f:
        chunks = []
        while part := f.read(chunk):
            assert len(part) <= chunk
            chunks.append(part)
    return b"".join(chunks)


def backend_listing(backend) -> list:
    """A back-end's walk, which must report no folder it could not list."""
    errors = []
    entries = list(backend.walk(lambda path, msg: errors.append((path, msg))))
    assert errors == []
    return entries


def cli_env(extra: dict | None = None) -> dict:
    """The environment for a castlib subprocess: the castlib under test comes first on
    PYTHONPATH, whatever else is installed; a crash in C (a segfault, seen once at the
    exit of a sync to SFTP) prints every thread's Python stack on stderr, which a failed
    run_cli shows."""
    env = dict(os.environ)
    env.setdefault("PYTHONFAULTHANDLER", "1")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [(extra or {}).get("PYTHONPATH"), REPO_ROOT, os.environ.get("PYTHONPATH")]))
    env.update({k: v for k, v in (extra or {}).items() if k != "PYTHONPATH"})
    return env


def castlib_command(*args: str, db: str | None = None) -> list[str]:
    return [sys.executable, "-m", "castlib", *(["--db", db] if db else []), *args]


def run_cli(*args: str, db: str | None = None, env: dict | None = None, check: int | None = None,
            input: str | None = None, cwd: str | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """Run `castlib [--db DB] ARGS...` in a subprocess, as a user would."""
    proc = subprocess.run(castlib_command(*args, db=db), capture_output=True, text=True,
                          env=cli_env(env), input=input,
                          cwd=cwd, timeout=timeout)
    if check is not None and proc.returncode != check:
        raise AssertionError(f"castlib {' '.join(args)} exited {proc.returncode}, wanted {check}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def last_json(stdout: str) -> dict:
    """The JSON object on the last non-empty line of a command's output."""
    lines = [l for l in stdout.splitlines() if l.strip()]
    return json.loads(lines[-1])


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(l) for l in stdout.splitlines() if l.strip()]


def in_unprivileged_child(fn):
    """Run fn() in a forked child that has dropped root (root reads any folder, so EACCES
    needs a plain user); returns what fn returned, through a pipe as JSON."""
    import json

    if os.geteuid() != 0:
        return fn()
    # the child may not read root's site-packages: import what a run needs first
    import importlib

    for module in ("castlib.api", "castlib.backends.local", "castlib.stages.index",
                   "castlib.stages.diff", "castlib.stages.sync", "castlib.stages.verify",
                   "castlib.stages.report", "psycopg"):
        importlib.import_module(module)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)   # nobody
            payload = json.dumps({"ok": fn()})
        except BaseException as exc:  # report anything to the parent, then leave
            payload = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        os.write(w, payload.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = json.loads(f.read())
    os.waitpid(pid, 0)
    if "error" in data:
        raise AssertionError(data["error"])
    return data["ok"]


def run_cli_interrupted(*args: str, db: str | None, ready, interrupt, env: dict | None = None,
                        ready_within: float = 120, timeout: float = 300
                        ) -> subprocess.CompletedProcess:
    """Run `castlib ARGS...` in the background; once ready() says so (a first file has
    landed), call interrupt() (stop a server, cut the line) or, if it is a signal number,
    send the run that signal; then let the run end. The result's `ended_after` is the
    seconds from the interruption to the end of the run."""
    import time

    proc = subprocess.Popen(castlib_command(*args, db=db), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(env))
    try:
        deadline = time.monotonic() + ready_within
        while not ready():
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, f"not ready within {ready_within:g} s"
            time.sleep(0.02)
        interrupted_at = time.monotonic()
        if isinstance(interrupt, int):
            proc.send_signal(interrupt)
        else:
            interrupt()
        out, err = proc.communicate(timeout=timeout)
        ended_after = time.monotonic() - interrupted_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result.ended_after = ended_after
    return result


def local_url(path) -> str:
    """How castlib names a local folder of this machine: file://HOST/path (HOST is this
    machine's name, or $CASTLIB_HOSTNAME: local locations belong to a host)."""
    from castlib.hosts import local_hostname

    return f"file://{local_hostname()}{path}"


def wait_for(condition, seconds: float = 20.0) -> bool:
    """Whether `condition()` came true within `seconds` (asked every 20 ms, and once more
    at the end)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def ssh_processes(port: int, masters_only: bool = False) -> list[int]:
    """The ssh processes (of anyone here) whose command line names this port; with
    `masters_only`, only ControlMasters (ControlMaster=yes)."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"ssh") and str(port).encode() in argv and (
                not masters_only or any(b"ControlMaster=yes" in a for a in argv)):
            found.append(int(pid))
    return found
