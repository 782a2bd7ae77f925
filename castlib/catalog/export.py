"""Catalog entries as JSON documents: what the web API answers and http-push sends, one
shape for both. Timestamps in ISO 8601 UTC with a Z; adler32 as 8 hex digits."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from functools import lru_cache

from .records import JSON_TYPES

_HEX8 = re.compile(r"[0-9a-fA-F]{1,8}")


def iso(value: datetime | None) -> str | None:
    """A timestamp in ISO 8601, UTC, with its Z (SQLite hands them back without a zone:
    the catalog writes UTC)."""
    return None if value is None else _iso(value)


@lru_cache(maxsize=4096)
def _iso(value: datetime) -> str:
    # entries listed together share their first/last seen: a stream of millions formats
    # each once (isoformat was a quarter of the NDJSON stream's time)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def iso_ns(ns: int | None) -> str | None:
    if ns is None:
        return None
    return iso(datetime.fromtimestamp(ns / 1e9, timezone.utc))


def adler32_hex(value: str | None) -> str | None:
    """adler32 as 8 lower-case hex digits, whatever the catalog was handed."""
    if value is None:
        return None
    return f"{int(value, 16):08x}" if _HEX8.fullmatch(value) else value


def entry_document(e: dict) -> dict:
    """An entry as Catalog.entries_page gives it, as JSON."""
    return {"path": e["path"], "name": e["name"], "kind": JSON_TYPES.get(e["kind"], e["kind"]),
            "size": e["size"], "mtime": iso_ns(e["mtime_ns"]), "mtime_ns": e["mtime_ns"],
            "mode": None if e["mode"] is None else f"{e['mode']:04o}",
            "link_target": e["link_target"], "adler32": adler32_hex(e["adler32"]),
            "md5": e["md5"], "sha256": e["sha256"], "online": e["online"],
            "first_seen": iso(e["first_seen"]), "last_seen": iso(e["last_seen"]),
            "deleted": bool(e["deleted"]), "corrupted": bool(e["corrupted"])}
