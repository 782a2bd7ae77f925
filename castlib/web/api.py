"""The JSON API under /api/v1: the pages' data, and POST /runs to start work."""
from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime, timezone
from typing import Annotated, Literal
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import __version__
from ..catalog.paths import from_catalog
from ..checksum import ALGORITHMS
from ..stages.report import DIFF_CSV_FIELDS, flat_difference
from . import views
from .actions import ActionRefused, parse_request

router = APIRouter(prefix="/api/v1")
NDJSON = "application/x-ndjson"


def _catalog(request: Request):
    return request.app.state.catalog


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(
        timezone.utc)


@router.get("/locations", summary="Every location with its counts")
def locations(request: Request):
    rows = _catalog(request).location_overview()
    return {"locations": [{**views.location_json(r),
                           "entries_url": f"/api/v1/locations/{r['id']}/entries"}
                          for r in rows]}


@router.get("/locations/{location_id}/entries",
            summary="A location's entries, by key; NDJSON streams all; Metalink 4",
            responses={200: {"content": {NDJSON: {}, "application/metalink4+xml": {}}}})
def entries(request: Request, location_id: views.PathId,
            prefix: str = Query("", description="paths starting with this text"),
            after: str | None = Query(None, description="the last path of the previous page"),
            updated_after: datetime | None = Query(
                None, description="only entries created, changed or vanished since (ISO 8601)"),
            limit: int = Query(1000, description=f"entries per page, 1 to {views.MAX_LIMIT}"),
            format: Literal["json", "ndjson", "metalink"] = "json"):
    catalog = _catalog(request)
    prefix = views.check_path(prefix, "prefix")
    after = views.check_path(after, "after") or None
    views.check_limit(limit)
    loc = catalog.location_by_id(location_id)
    if loc is None:
        raise HTTPException(404, f"no location with id {location_id}")
    since = _utc(updated_after)
    if format == "metalink":
        return StreamingResponse(_metalink(catalog, loc, prefix, after, since),
                                 media_type="application/metalink4+xml")
    if format == "ndjson" or NDJSON in request.headers.get("accept", ""):
        return StreamingResponse(_ndjson(catalog, loc.id, prefix, after, since),
                                 media_type=NDJSON)
    page = catalog.entries_page(loc.id, prefix=prefix, after=after, updated_after=since,
                                limit=limit + 1)
    more = len(page) > limit
    page = page[:limit]
    return {"location": {"id": loc.id, "name": loc.name, "url": loc.url},
            "entries": [views.entry_json(e) for e in page],
            "next_after": page[-1]["path"] if more else None}


def _ndjson(catalog, location_id, prefix, after, since):
    """The entries as NDJSON, one chunk a catalog page: a chunk a line costs the server
    (and the client) a send each, and made the stream 10x slower."""
    lines: list[str] = []
    for e in views.iter_entries(catalog, location_id, prefix=prefix, after=after,
                                updated_after=since):
        lines.append(json.dumps(views.entry_json(e)))
        if len(lines) == views.STREAM_PAGE:
            yield "\n".join(lines) + "\n"
            lines = []
    if lines:
        yield "\n".join(lines) + "\n"


def _metalink(catalog, loc, prefix, after, since):
    """A Metalink 4 (RFC 5854) document of the location's files, written as it is read."""
    yield ('<?xml version="1.0" encoding="UTF-8"?>\n'
           '<metalink xmlns="urn:ietf:params:xml:ns:metalink">\n'
           f"  <generator>castlib/{escape(__version__)}</generator>\n")
    root = loc.url.rstrip("/")
    chunk: list[str] = []
    for e in views.iter_entries(catalog, loc.id, prefix=prefix, after=after,
                                updated_after=since):
        if e["kind"] != "f" or e["deleted"]:
            continue
        url = root + "/" + quote(from_catalog(e["path"]).encode("utf-8", "surrogateescape"))
        parts = [f"  <file name={quoteattr(_xml_text(e['path']))}>\n"]
        if e["size"] is not None:
            parts.append(f"    <size>{e['size']}</size>\n")
        for algo, name in (("adler32", "adler32"), ("md5", "md5"), ("sha256", "sha-256")):
            value = views.adler32_hex(e[algo]) if algo == "adler32" else e[algo]
            if value:
                parts.append(f'    <hash type="{name}">{escape(value)}</hash>\n')
        parts.append(f"    <url>{escape(url)}</url>\n  </file>\n")
        chunk.append("".join(parts))
        if len(chunk) == views.STREAM_PAGE:   # one send a page, as _ndjson
            yield "".join(chunk)
            chunk = []
    yield "".join(chunk) + "</metalink>\n"


# Characters XML 1.0 cannot hold, not even as a character reference: a file name with
# one (a control character is a valid byte of a POSIX name) made the whole document
# ill-formed, so that no client could read any file of it
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _xml_text(name: str) -> str:
    """A name as XML holds it: a character XML cannot hold as %XX of its UTF-8 bytes,
    as the URL beside it (and the catalog a name that is not UTF-8) writes it."""
    return _NOT_XML.sub(lambda m: quote(m.group().encode("utf-8", "surrogatepass")), name)


@router.get("/diff", summary="Differences between two locations, from the catalog")
def diff(request: Request, ref: str, dst: str, kind: str | None = None,
         after: str | None = None, limit: int = 100,
         checksum: str = Query("adler32", description=f"one of {', '.join(ALGORITHMS)}"),
         format: Literal["json", "jsonl", "csv"] = "json"):
    catalog = _catalog(request)
    views.check_limit(limit)
    if checksum not in ALGORITHMS:
        raise HTTPException(422, f"checksum: one of {', '.join(ALGORITHMS)}, not {checksum!r}")
    after = views.check_path(after, "after") or None
    r, d = views.location_or_404(catalog, ref), views.location_or_404(catalog, dst)
    if format != "json":
        rows = views.all_differences(catalog, r.id, d.id, kind or None, checksum)
        name = f"diff-{r.id}-{d.id}.{format}"
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        if format == "jsonl":
            return StreamingResponse((json.dumps(x) + "\n" for x in rows),
                                     media_type=NDJSON, headers=headers)
        return StreamingResponse(_csv(rows), media_type="text/csv", headers=headers)
    page = views.diff_page(catalog, r.id, d.id, kind=kind or None, after=after, limit=limit,
                           checksum=checksum)
    return {"ref": {"id": r.id, "name": r.name, "url": r.url},
            "dst": {"id": d.id, "name": d.name, "url": d.url}, "checksum": checksum, **page}


def _csv(rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, DIFF_CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(flat_difference(row))
        if buf.tell() > 65536:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


@router.get("/runs", summary="The run history, newest first")
def runs(request: Request, status: str | None = None, command: str | None = None,
         before: Annotated[int | None, Query(
             ge=0, le=views.MAX_ID, description="ids below this (the next page)")] = None,
         limit: int = 50):
    views.check_limit(limit)
    rows = _catalog(request).runs(limit, status=status or None, command=command or None,
                                  before_id=before)
    return {"runs": [views.run_json(r) for r in rows],
            "next_before": rows[-1]["id"] if len(rows) == limit else None}


@router.get("/runs/{run_id}", summary="One run: each stage's counts and every error")
def run(request: Request, run_id: views.PathId):
    details = _catalog(request).run_details(run_id)
    if details is None:
        raise HTTPException(404, f"no run with id {run_id}")
    r, stages = details
    return {"run": views.run_json(r), "stages": [views.stage_json(s) for s in stages],
            "progress": views.run_progress(r)}


@router.post("/runs", status_code=202, summary="Start a stage or a pipeline (needs the token)")
async def start_run(request: Request):
    app = request.app
    app.state.auth.require(request)            # before the body is even read
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    try:
        run_request = parse_request(body, app.state.pipelines_dir)
        from starlette.concurrency import run_in_threadpool

        run_id = await run_in_threadpool(app.state.dispatcher.submit, run_request)
    except ActionRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return JSONResponse({"run_id": run_id, "url": f"/runs/{run_id}",
                         "api_url": f"/api/v1/runs/{run_id}"}, status_code=202,
                        headers={"Location": f"/api/v1/runs/{run_id}"})
