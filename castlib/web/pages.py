"""The server-rendered pages (Jinja2; htmx for partial updates; Chart.js for plots)."""
from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ..catalog.records import DIFFERENCE_KINDS
from ..catalog.paths import printable
from ..progress import human_bytes
from . import views
from .actions import STAGES, ActionRefused, list_pipelines, parse_request
from .auth import COOKIE

router = APIRouter(include_in_schema=False)
PAGE = 200
RUN_STATES = ("running", "ok", "failed", "error", "died", "interrupted", "cancelled")


def common(request: Request) -> dict:
    auth = request.app.state.auth
    return {"read_only": auth.read_only, "logged_in": auth.allowed(request),
            "human_bytes": human_bytes, "printable": printable, "iso": views.iso,
            "iso_ns": views.iso_ns, "adler": views.adler32_hex}


def render(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
    return request.app.state.templates.TemplateResponse(
        request, name, {**common(request), **context}, status_code=status_code)


def _catalog(request: Request):
    return request.app.state.catalog


@router.get("/")
def home():
    return RedirectResponse("/locations", status_code=302)


@router.get("/locations")
def locations(request: Request):
    rows = [views.location_json(r) for r in _catalog(request).location_overview()]
    chart = {"labels": [r["name"] or r["url"] for r in rows], "data": [r["bytes"] for r in rows]}
    return render(request, "locations.html", locations=rows, chart=chart)


def _crumbs(folder: str) -> list[tuple[str, str]]:
    parts = [p for p in folder.split("/") if p]
    return [(p, "/".join(parts[:i + 1])) for i, p in enumerate(parts)]


@router.get("/locations/{location_id}")
def browse(request: Request, location_id: views.PathId, path: str = "", after: str | None = None,
           prefix: str = ""):
    """A folder of a location: its entries by key, `after` the last name shown; with
    `prefix`, the paths starting with that text anywhere below the location."""
    catalog = _catalog(request)
    folder = views.check_path(path, "path").strip("/")
    after = views.check_path(after, "after") or None
    prefix = views.check_path(prefix, "prefix")
    loc = catalog.location_by_id(location_id)
    if loc is None:
        raise HTTPException(404, f"no location with id {location_id}")
    if prefix:
        rows = catalog.entries_page(loc.id, prefix=prefix, after=after, limit=PAGE + 1)
    else:
        rows = catalog.entries_page(loc.id, folder=folder, after=after, limit=PAGE + 1)
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    next_url = None
    if more:
        query = {"path": folder, "after": rows[-1]["path"], **({"prefix": prefix} if prefix else {})}
        next_url = f"/locations/{loc.id}?{urlencode(query)}"
    context = dict(location=loc, folder=folder, crumbs=_crumbs(folder), rows=rows,
                   next_url=next_url, prefix=prefix)
    if request.headers.get("hx-request") and after:
        return render(request, "_entry_rows.html", **context)   # the next page's rows
    return render(request, "browse.html", **context)


@router.get("/locations/{location_id}/file")
def file_page(request: Request, location_id: views.PathId, path: str):
    catalog = _catalog(request)
    path = views.check_path(path, "path")
    loc = catalog.location_by_id(location_id)
    if loc is None:
        raise HTTPException(404, f"no location with id {location_id}")
    entry = catalog.entry(loc.id, path)
    if entry is None:
        raise HTTPException(404, f"no entry {printable(path)!r} in location {loc.id}")
    folder = path.rpartition("/")[0]
    return render(request, "file.html", location=loc, entry=entry,
                  crumbs=_crumbs(folder), folder=folder,
                  elsewhere=catalog.same_path_elsewhere(loc.id, path))


@router.get("/diff")
def diff(request: Request, ref: str = "", dst: str = "", kind: str = "",
         after: str | None = None):
    catalog = _catalog(request)
    locations = catalog.location_overview()
    context = dict(locations=locations, ref=ref, dst=dst, kind=kind, kinds=DIFFERENCE_KINDS,
                   result=None, next_url=None)
    if ref and dst:
        r, d = views.location_or_404(catalog, ref), views.location_or_404(catalog, dst)
        after = views.check_path(after, "after") or None
        result = views.diff_page(catalog, r.id, d.id, kind=kind or None, after=after,
                                 limit=PAGE)
        if result["next_after"]:
            next_url = "/diff?" + urlencode({"ref": ref, "dst": dst, "kind": kind,
                                             "after": result["next_after"]})
            context["next_url"] = next_url
        query = urlencode({"ref": ref, "dst": dst, "kind": kind})
        context.update(result=result, ref_loc=r, dst_loc=d,
                       jsonl_url=f"/api/v1/diff?{query}&format=jsonl",
                       csv_url=f"/api/v1/diff?{query}&format=csv")
    return render(request, "diff.html", **context)


@router.get("/runs")
def runs(request: Request, status: str = "", command: str = "",
         before: views.QueryId = None):
    rows = _catalog(request).runs(PAGE, status=status or None, command=command or None,
                                  before_id=before)
    next_url = None
    if len(rows) == PAGE:
        next_url = "/runs?" + urlencode({"status": status, "command": command,
                                         "before": rows[-1]["id"]})
    return render(request, "runs.html", runs=[views.run_json(r) for r in rows],
                  status=status, command=command, states=RUN_STATES, next_url=next_url)


def _run_context(request: Request, run_id: int) -> dict:
    details = _catalog(request).run_details(run_id)
    if details is None:
        raise HTTPException(404, f"no run with id {run_id}")
    r, stages = details
    run = views.run_json(r)
    return {"run": run, "stages": [views.stage_json(s) for s in stages],
            "progress": views.run_progress(r),
            "plan": _plan(request, run)}


def _plan(request: Request, run: dict) -> dict | None:
    """What a finished dry-run sync would do, from the listings it just made: the
    differences between its two locations (the first page of them)."""
    args = run.get("args") or {}
    if run["command"] != "sync" or not args.get("dry_run") or run["status"] == "running":
        return None
    catalog = _catalog(request)
    ref, dst = catalog.find_location(args.get("ref") or ""), catalog.find_location(
        args.get("dst") or "")
    if ref is None or dst is None:
        return None
    return views.diff_page(catalog, ref.id, dst.id, limit=50)


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: views.PathId):
    return render(request, "run.html", **_run_context(request, run_id))


@router.get("/runs/{run_id}/progress")
def run_progress(request: Request, run_id: views.PathId):
    """The part of a run's page that a running run refreshes (htmx, every 2 s)."""
    return render(request, "_run_progress.html", **_run_context(request, run_id))


@router.get("/plots")
def plots(request: Request, location: views.QueryId = None):
    catalog = _catalog(request)
    overview = catalog.location_overview()
    chosen = location if location is not None else (overview[0]["id"] if overview else None)
    return render(request, "plots.html", data=views.plot_data(catalog, chosen),
                  locations=overview, chosen=chosen)


# -- actions -----------------------------------------------------------------------------
@router.get("/actions")
def actions(request: Request, message: str = ""):
    return render(request, "actions.html", stages=STAGES, message=message,
                  pipelines=list_pipelines(request.app.state.pipelines_dir),
                  locations=_catalog(request).location_overview())


@router.post("/actions")
async def start_action(request: Request):
    """A form of the Actions page (or a run's page: 'sync for real'): started as the API
    starts it, then the run's page."""
    request.app.state.auth.require(request)
    form = await request.form()
    stage, pipeline = form.get("stage") or None, form.get("pipeline") or None
    body: dict = {"pipeline": pipeline} if pipeline else {"stage": stage, "params": {}}
    if stage:
        for name in STAGES.get(stage, ()):
            body["params"][name] = (form.get(name) or "").strip()
        if stage == "sync" and form.get("delete") == "on":
            body["params"]["delete"] = True
    if form.get("dry_run") == "on":
        body["dry_run"] = True
    try:
        run_request = parse_request(body, request.app.state.pipelines_dir)
        from starlette.concurrency import run_in_threadpool

        run_id = await run_in_threadpool(request.app.state.dispatcher.submit, run_request)
    except ActionRefused as exc:
        return render(request, "actions.html", status_code=exc.status, stages=STAGES,
                      message=str(exc), pipelines=list_pipelines(request.app.state.pipelines_dir),
                      locations=_catalog(request).location_overview())
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


@router.get("/login")
def login_form(request: Request):
    return render(request, "login.html", message="")


@router.post("/login")
def login(request: Request, token: str = Form("")):
    auth = request.app.state.auth
    if auth.read_only:
        return render(request, "login.html", status_code=403,
                      message="this server is read-only: no token is configured")
    matched, wait = auth.attempt(request, token)
    if wait:
        response = render(request, "login.html", status_code=429,
                          message=f"too many wrong tokens from this address: try again "
                                  f"in {wait} s")
        response.headers["Retry-After"] = str(wait)
        return response
    if not matched:
        return render(request, "login.html", status_code=401, message="wrong token")
    response = RedirectResponse("/actions", status_code=303)
    response.set_cookie(COOKIE, auth.session_value(), httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout():
    response = RedirectResponse("/locations", status_code=303)
    response.delete_cookie(COOKIE)
    return response

