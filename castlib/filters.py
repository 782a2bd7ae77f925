"""only/ignore globs over relative paths: what a listing takes in and what a diff compares."""
from __future__ import annotations

import re
from typing import NamedTuple

from .backends.base import DIR
from .catalog.paths import parent_of


class PathFilter:
    """only/ignore globs, with rsync's wildcards: `*` and `?` stop at "/", `**` crosses it,
    `[...]` is a character class. A glob with "/" or "**" matches the end of the relative
    path from a folder boundary (rsync's "any portion of a path from the starting
    directory on down"), or, with a leading "/", the whole of it; any other glob the name
    alone; a trailing "/" matches folders only. An ignored folder hides its subtree; `only` selects files (folders are
    kept)."""

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
        if any(_match(g, path, name, kind) for g in self.ignore):
            if kind == DIR:
                self._ignored_dirs.add(path)
            return False
        if kind != DIR and self.only and not any(_match(g, path, name, kind) for g in self.only):
            return False
        return True

    def covers(self, path: str, kind: str) -> bool:
        """Whether a catalog entry falls inside what this listing looked at (stateless)."""
        if not self.active:
            return True
        parts = path.split("/")
        for i in range(1, len(parts)):
            sub = "/".join(parts[:i])
            if any(_match(g, sub, parts[i - 1], DIR) for g in self.ignore):
                return False
        name = parts[-1]
        if any(_match(g, path, name, kind) for g in self.ignore):
            return False
        if kind != DIR and self.only and not any(_match(g, path, name, kind) for g in self.only):
            return False
        return True


class _Glob(NamedTuple):
    whole_path: bool     # matched against the relative path, not the name
    folders_only: bool   # written with a trailing "/"
    regex: re.Pattern


def _compile(glob: str) -> _Glob:
    folders_only = glob.endswith("/") and len(glob) > 1
    body = glob.rstrip("/") if folders_only else glob
    whole = "/" in body or "**" in body
    regex = _translate(body.lstrip("/"))
    if whole and not body.startswith("/"):
        # unanchored, as rsync matches it: at the end of the path, from any folder down
        regex = "(?:.*/)?" + regex
    return _Glob(whole, folders_only, re.compile(regex, re.S))


def _translate(glob: str) -> str:
    """A regular expression for an rsync glob (fnmatch's `*` would cross "/")."""
    out, i, n = [], 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if glob.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            start = i + 2 if glob[i + 1:i + 2] in ("!", "^") else i + 1
            if glob[start:start + 1] == "]":   # "[]...]": a leading "]" is literal
                start += 1
            end = glob.find("]", start)
            if end < 0:          # no closing bracket: a literal "["
                out.append(re.escape(c))
            else:
                inner = glob[i + 1:end]
                negate = inner[:1] in ("!", "^")
                inner = inner[1:] if negate else inner
                body = inner.replace("\\", "\\\\").replace("^", "\\^")
                out.append(f"[{'^/' if negate else ''}{body}]")
                i = end + 1
                continue
        elif c == "\\" and i + 1 < n:   # an escaped wildcard is itself
            out.append(re.escape(glob[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out) + r"\Z"


def _match(glob: _Glob, path: str, name: str, kind: str) -> bool:
    if glob.folders_only and kind != DIR:
        return False
    return glob.regex.match(path if glob.whole_path else name) is not None
