"""How entry paths are stored: text, with non-UTF-8 bytes escaped reversibly.

Local names are decoded with surrogate escapes (os.fsdecode), which neither SQLite text nor
PostgreSQL accept. In the catalog a raw byte 0xNN becomes "%NN" and a literal "%" becomes
"%25"; every other character is stored as is. Most names contain neither and pass through
untouched, and "/" is never escaped, so subtree queries on path prefixes keep working.
"""
from __future__ import annotations

import re

_NEEDS_DECODE = re.compile(r"%([0-9A-F]{2})")


def to_catalog(path: str) -> str:
    if "%" not in path:
        try:
            path.encode("utf-8")
            return path
        except UnicodeEncodeError:
            pass
    out = []
    for ch in path:
        o = ord(ch)
        if ch == "%":
            out.append("%25")
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"%{o - 0xDC00:02X}")
        else:
            out.append(ch)
    return "".join(out)


def from_catalog(path: str) -> str:
    if "%" not in path:
        return path

    def unescape(m: re.Match) -> str:
        value = int(m.group(1), 16)
        return "%" if value == 0x25 else chr(0xDC00 + value)

    return _NEEDS_DECODE.sub(unescape, path)


def subtree_range(prefix: str) -> tuple[str, str]:
    """(low, high) such that low <= path < high selects everything below `prefix`."""
    prefix = prefix.rstrip("/") + "/"
    return prefix, prefix[:-1] + "0"   # "0" is the character after "/"


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


_CONTROL = {i: f"\\x{i:02x}" for i in list(range(0x20)) + [0x7F]}
_CONTROL.update({0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r", 0x5C: "\\\\"})


def printable(text: str) -> str:
    """A path (or a message naming one) on one line: control characters and backslashes
    escaped as in Python strings. For text output only; JSON keeps the catalog form."""
    if text.isprintable() and "\\" not in text:
        return text
    return text.translate(_CONTROL)
