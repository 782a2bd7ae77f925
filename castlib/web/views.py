"""What the pages and the API show, shaped once for both from Catalog methods: entries,
locations, runs, a diff's page, the plots' series. No SQL here (tests/test_boundaries.py)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from fastapi import HTTPException, Path, Query

from ..catalog import Catalog
from ..catalog.records import DIFFERENCE_KINDS
from ..catalog.export import adler32_hex, entry_document, iso, iso_ns

# the pages' templates format with these (pages.common)
__all__ = ["adler32_hex", "iso", "iso_ns"]

MAX_LIMIT = 5000          # entries, runs or differences in one page
# the largest id a catalog holds (a signed 64-bit integer in both databases): a larger
# one in a URL is no id, answered 422, not an overflow in the database driver (a 500)
MAX_ID = 2**63 - 1
PathId = Annotated[int, Path(ge=0, le=MAX_ID)]
QueryId = Annotated[int | None, Query(ge=0, le=MAX_ID)]
STREAM_PAGE = 2000        # entries per catalog query when streaming (bounded memory)


entry_json = entry_document


def location_json(r: dict) -> dict:
    return {"id": r["id"], "name": r["name"], "url": r["url"], "scheme": r["scheme"],
            "host": r["host"], "created_at": iso(r["created_at"]),
            "indexed_at": iso(r["indexed_at"]), "files": r["files"], "dirs": r["dirs"],
            "links": r["links"], "bytes": int(r["bytes"]), "offline_files": r["offline_files"],
            "offline_bytes": int(r["offline_bytes"])}


def duration_s(started: datetime | None, finished: datetime | None) -> float | None:
    if started is None:
        return None
    end = finished or datetime.now(timezone.utc)
    if started.tzinfo is None:
        started = started.replace(tzinfo=timezone.utc)
    if end.tzinfo is None:
        end = end.replace(tzinfo=timezone.utc)
    return max(0.0, (end - started).total_seconds())


def run_json(r: dict) -> dict:
    out = {k: r.get(k) for k in ("id", "command", "args", "hostname", "username", "pid",
                                 "status", "error")}
    out.update(started_at=iso(r["started_at"]), finished_at=iso(r["finished_at"]),
               heartbeat_at=iso(r.get("heartbeat_at")),
               duration_s=duration_s(r["started_at"], r["finished_at"]))
    if "totals" in r:
        out["totals"] = r["totals"]
    return out


def stage_json(s: dict) -> dict:
    return {"position": s["position"], "stage": s["stage"], "id": s["stage_id"],
            "params": s["params"], "status": s["status"], "counts": s["counts"] or {},
            "errors": s["errors"] or [], "started_at": iso(s["started_at"]),
            "finished_at": iso(s["finished_at"]),
            "duration_s": duration_s(s["started_at"], s["finished_at"])}


def run_progress(run: dict) -> dict | None:
    """The latest counters of a run (files, bytes, rate, ETA of its current stage), as
    its process records them about once a second wherever it runs (progress.RunBeat);
    once it has ended, those of its last stage with counters."""
    return run.get("progress") or None


def check_path(value: str | None, what: str) -> str:
    """A catalog path or prefix from a request: refused (400) when it holds a NUL or a
    '..' component, which no listing ever stores: a clear answer, not an empty page."""
    value = value or ""
    if "\0" in value:
        raise HTTPException(400, f"{what}: a NUL character is not allowed")
    if ".." in value.split("/"):
        raise HTTPException(400, f"{what}: '..' is not a path component the catalog holds")
    if len(value) > 4096:
        raise HTTPException(400, f"{what}: longer than 4096 characters")
    return value


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise HTTPException(422, f"limit: must be from 1 to {MAX_LIMIT}, not {limit}")
    return limit


def location_or_404(catalog: Catalog, text: str | int):
    """A location by id, name or URL; 404 naming it when the catalog has none."""
    text = str(text).strip()
    check_path(text, "location")
    if text.isdigit() and int(text) > MAX_ID:
        raise HTTPException(404, f"no location {text!r} in the catalog")
    loc = catalog.location_by_id(int(text)) if text.isdigit() else catalog.find_location(text)
    if loc is None:
        raise HTTPException(404, f"no location {text!r} in the catalog")
    return loc


def location_label(loc) -> str:
    return loc.name or loc.url


def iter_entries(catalog: Catalog, location_id: int, *, prefix: str = "",
                 after: str | None = None, updated_after: datetime | None = None):
    """Every entry, page by page (each page its own short query, by key): memory bounded
    by one page however many millions the location holds."""
    return catalog.entries_by_key(location_id, prefix=prefix, after=after,
                                  updated_after=updated_after, page=STREAM_PAGE)


# -- diffs ---------------------------------------------------------------------------------
# The listing order of a diff is the catalog's: the reference's paths (missing, changed)
# in path order, then the destination's extras in path order. A page's key names the part
# and the last path: "r/PATH" or "e/PATH".
def _key(d) -> str:
    return ("e/" if d.kind == "extra" else "r/") + d.path


def diff_page(catalog: Catalog, ref_id: int, dst_id: int, *, kind: str | None = None,
              after: str | None = None, limit: int = 100, checksum: str = "adler32") -> dict:
    """Counts by kind of the whole diff, and one page of it (kind filtered, after a key)."""
    if kind and kind not in DIFFERENCE_KINDS:
        raise HTTPException(422, f"kind: one of {', '.join(DIFFERENCE_KINDS)}, not {kind!r}")
    if after and not after.startswith(("r/", "e/")):
        raise HTTPException(422, "after: a key from the previous page (r/PATH or e/PATH)")
    counts = dict.fromkeys(DIFFERENCE_KINDS, 0)
    rows, more = [], False
    for d in catalog.diff(ref_id, dst_id, algorithm=checksum):
        counts[d.kind] += 1
        if kind and d.kind != kind:
            continue
        if after and _sort_key(_key(d)) <= _sort_key(after):
            continue
        if len(rows) < limit:
            rows.append(d)
        else:
            more = True
    return {"counts": counts, "total": sum(counts.values()),
            "differences": [difference_json(d, checksum) for d in rows],
            "next_after": _key(rows[-1]) if rows and more else None}


def _sort_key(key: str) -> tuple[int, str]:
    return (key[0] == "e", key[2:])


def difference_json(d, checksum: str = "adler32") -> dict:
    out = d.as_dict()
    if checksum == "adler32":
        for side in ("ref", "dst"):
            if side in out:
                out[side]["checksum"] = adler32_hex(out[side]["checksum"])
    return out


def all_differences(catalog: Catalog, ref_id: int, dst_id: int, kind: str | None = None,
                    checksum: str = "adler32"):
    for d in catalog.diff(ref_id, dst_id, algorithm=checksum):
        if not kind or d.kind == kind:
            yield difference_json(d, checksum)


# -- plots ---------------------------------------------------------------------------------
def plot_data(catalog: Catalog, files_location_id: int | None) -> dict:
    """The series the Plots page draws, from the run history and the entries:
    bytes per location over time (each index of it, then its size now), transfer
    throughput of each sync, files per day arriving in one location."""
    overview = catalog.location_overview()
    by_text: dict[str, int | None] = {}

    def location_of(text) -> int | None:
        if text not in by_text:
            loc = catalog.find_location(text) if isinstance(text, str) else None
            by_text[text] = loc.id if loc else None
        return by_text[text]

    series: dict[int, list] = {r["id"]: [] for r in overview}
    for s in reversed(catalog.stage_history("index")):
        loc_id = location_of((s["params"] or {}).get("location"))
        counts = s["counts"] or {}
        if loc_id in series and s["finished_at"] and s["status"] == "ok" and "bytes" in counts:
            series[loc_id].append({"x": _ms(s["finished_at"]), "y": int(counts["bytes"])})
    bytes_over_time = [{"label": r["name"] or r["url"], "data": series[r["id"]]}
                       for r in overview if series[r["id"]]]
    throughput = []
    for s in reversed(catalog.stage_history("sync")):
        took = duration_s(s["started_at"], s["finished_at"])
        moved = int((s["counts"] or {}).get("bytes") or 0)
        if s["finished_at"] and took:
            throughput.append({"x": _ms(s["finished_at"]), "y": moved / took,
                               "run": s["run_id"]})
    files = catalog.files_per_day(files_location_id) if files_location_id else []
    return {"bytes_per_location": {"labels": [r["name"] or r["url"] for r in overview],
                                   "data": [int(r["bytes"]) for r in overview]},
            "bytes_over_time": bytes_over_time, "throughput": throughput,
            "files_per_day": {"labels": [f["day"] for f in files],
                              "data": [f["files"] for f in files]}}


def _ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)
