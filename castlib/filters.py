"""only/ignore globs over relative paths: what a listing takes in and what a diff compares."""
from __future__ import annotations

import fnmatch
import re

from .backends.base import DIR
from .catalog.paths import parent_of


class PathFilter:
    """only/ignore globs: a glob with "/" matches the whole relative path, others the name.
    An ignored folder hides its subtree; `only` selects files (folders are kept)."""

    def __init__(self, only: list[str], ignore: list[str]):
        self.only = [_compile(g) for g in only]
        self.ignore = [_compile(g) for g in ignore]
        self._ignored_dirs: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self.only or self.ignore)

    def accepts(self, path: str, kind: str) -> bool:
        if not self.active:
            return True
        parent = parent_of(path)
        if parent and parent in self._ignored_dirs:
            if kind == DIR:
                self._ignored_dirs.add(path)
            return False
        name = path.rsplit("/", 1)[-1]
        if any(_match(g, path, name) for g in self.ignore):
            if kind == DIR:
                self._ignored_dirs.add(path)
            return False
        if kind != DIR and self.only and not any(_match(g, path, name) for g in self.only):
            return False
        return True

    def covers(self, path: str, kind: str) -> bool:
        """Whether a catalog entry falls inside what this listing looked at (stateless)."""
        if not self.active:
            return True
        parts = path.split("/")
        for i in range(1, len(parts)):
            sub = "/".join(parts[:i])
            if any(_match(g, sub, parts[i - 1]) for g in self.ignore):
                return False
        name = parts[-1]
        if any(_match(g, path, name) for g in self.ignore):
            return False
        if kind != DIR and self.only and not any(_match(g, path, name) for g in self.only):
            return False
        return True


def _compile(glob: str):
    return (("/" in glob), re.compile(fnmatch.translate(glob), re.S))


def _match(glob, path: str, name: str) -> bool:
    whole, regex = glob
    return bool(regex.match(path if whole else name))
