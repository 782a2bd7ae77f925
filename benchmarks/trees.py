"""Seeded, reproducible test trees for the benchmarks, generated once and cached on disk."""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass

# Every file gets this mtime plus a seeded offset: the same tree on every run and machine.
BASE_MTIME_NS = 1_700_000_000 * 10**9
GENERATOR_VERSION = 1   # bump when the generation below changes: cached trees are rebuilt
MARKER = ".benchmark-tree.json"


@dataclass(frozen=True)
class TreeSpec:
    """files spread over top/sub folders (files_per_dir a folder), sizes uniform in
    [min_size, max_size] bytes of seeded random content."""

    name: str
    files: int
    files_per_dir: int
    dirs_per_top: int
    min_size: int
    max_size: int
    seed: int = 20261124

    @property
    def label(self) -> str:
        return f"{self.name}-v{GENERATOR_VERSION}"


def ensure_tree(spec: TreeSpec, cache: str, log=print) -> str:
    """The path of the tree described by spec under cache, generating it if absent."""
    root = os.path.join(cache, "trees", spec.label)
    marker = os.path.join(root, MARKER)
    wanted = asdict(spec)
    try:
        with open(marker) as f:
            if json.load(f) == wanted:
                return os.path.join(root, "data")
    except (OSError, ValueError):
        pass
    if os.path.exists(root):
        shutil.rmtree(root)
    log(f"generating tree {spec.label}: {spec.files} files, "
        f"{spec.min_size}-{spec.max_size} bytes each (cached for later runs)")
    data = os.path.join(root, "data")
    _generate(spec, data)
    with open(marker, "w") as f:
        json.dump(wanted, f)
    return data


def _generate(spec: TreeSpec, data: str) -> None:
    rng = random.Random(spec.seed)
    per_top = spec.files_per_dir * spec.dirs_per_top
    tops = max(1, -(-spec.files // per_top))
    written = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for t in range(tops):
        for s in range(spec.dirs_per_top):
            if written >= spec.files:
                break
            folder = os.path.join(data, f"run{t:04d}", f"block{s:04d}")
            os.makedirs(folder)
            for i in range(min(spec.files_per_dir, spec.files - written)):
                path = os.path.join(folder, f"evt{written:08d}.dat")
                size = rng.randint(spec.min_size, spec.max_size)
                fd = os.open(path, flags, 0o644)
                try:
                    left = size
                    while left > 0:   # 1 MiB at a time: bounded memory for big files
                        n = min(left, 1 << 20)
                        os.write(fd, rng.randbytes(n))
                        left -= n
                finally:
                    os.close(fd)
                mtime = BASE_MTIME_NS + rng.randrange(86_400 * 10**9)
                os.utime(path, ns=(mtime, mtime))
                written += 1
    # folder mtimes too, deepest first, so a copied tree can match them exactly
    for dirpath, _dirs, _files in sorted(os.walk(data), key=lambda w: -w[0].count(os.sep)):
        os.utime(dirpath, ns=(BASE_MTIME_NS, BASE_MTIME_NS))


def tree_bytes(path: str) -> tuple[int, int]:
    """(files, bytes) below path."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, n)).st_size
    return files, size


# The trees the scenarios use; QUICK_TREES are their small stand-ins for a smoke run.
TREES = {
    "small-100k": TreeSpec("small-100k", 100_000, 100, 100, 0, 4096),
    "copy-1k": TreeSpec("copy-1k", 1_000, 100, 10, 256 << 10, 768 << 10),
    "one-1g": TreeSpec("one-1g", 1, 1, 1, 1 << 30, 1 << 30),
    "upload-200": TreeSpec("upload-200", 200, 50, 4, 256 << 10, 2 << 20),
    "small-300": TreeSpec("small-300", 300, 50, 3, 0, 8 << 10),
    "small-3k": TreeSpec("small-3k", 3_000, 100, 3, 0, 8 << 10),
    "one-256m": TreeSpec("one-256m", 1, 1, 1, 256 << 20, 256 << 20),
    "empty-1m": TreeSpec("empty-1m", 1_000_000, 1000, 100, 0, 0),
}
QUICK_TREES = {
    "small-100k": TreeSpec("quick-small", 2_000, 100, 10, 0, 4096),
    "copy-1k": TreeSpec("quick-copy", 50, 25, 2, 64 << 10, 192 << 10),
    "one-1g": TreeSpec("quick-one", 1, 1, 1, 32 << 20, 32 << 20),
    "upload-200": TreeSpec("quick-upload", 20, 10, 2, 64 << 10, 256 << 10),
    "small-300": TreeSpec("quick-small-300", 60, 20, 3, 0, 8 << 10),
    "small-3k": TreeSpec("quick-small-3k", 200, 50, 3, 0, 8 << 10),
    "one-256m": TreeSpec("quick-one-256m", 1, 1, 1, 16 << 20, 16 << 20),
    "empty-1m": TreeSpec("quick-empty", 10_000, 1000, 10, 0, 0),
}
