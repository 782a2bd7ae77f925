"""The application factory: the catalog, the token, the dispatcher, the routes."""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..catalog import Catalog
from ..errors import CastlibError
from .actions import LocalDispatcher
from .auth import Auth

HERE = Path(__file__).parent


def create_app(catalog_url: str | None, token: str | None = None, *,
               pipelines_dir: str | None = None, dispatcher=None,
               log_dir: str | None = None, allowed_hosts=None,
               login_limit=None) -> FastAPI:
    """The web view and API over the catalog at `catalog_url`. With `token`, actions
    (starting runs) are allowed to its holder; without, the server is read-only.
    `pipelines_dir`: the folder whose pipeline files may be started by name.
    `dispatcher`: what carries out actions (default: a child process of the server,
    see actions.py; workers on other hosts plug in here).
    `allowed_hosts`: the names a request's Host header may give (HostCheck); None: any.
    `login_limit`: how many wrong tokens a client address may send (auth.LoginLimit;
    default 10 a minute)."""
    catalog = Catalog(catalog_url)

    @asynccontextmanager
    async def lifespan(app):
        yield
        catalog.close()

    app = FastAPI(title="castlib", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan,
                  openapi_url="/api/v1/openapi.json",
                  description="The castlib catalog: locations, entries, diffs, runs.")
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, names=allowed_hosts)
    app.state.catalog = catalog
    app.state.auth = Auth(token, login_limit)
    app.state.pipelines_dir = pipelines_dir
    app.state.dispatcher = dispatcher or LocalDispatcher(catalog.db_url, log_dir,
                                                         temporary_logs=True)
    app.state.templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    from . import api, pages

    app.include_router(api.router)
    app.include_router(pages.router)

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def error(request: Request, status: int, message: str, headers=None):
        if wants_json(request):
            return JSONResponse({"error": message}, status_code=status, headers=headers)
        return app.state.templates.TemplateResponse(
            request, "error.html", {"status": status, "message": message,
                                    **pages.common(request)},
            status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        # one line naming the parameter, not pydantic's nested structure
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {e.get('msg')}")
        return error(request, 422, "; ".join(parts))

    @app.exception_handler(CastlibError)
    async def castlib_error(request: Request, exc: CastlibError):
        return error(request, 422, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # a fault of the server (a catalog gone bad, a bug): one line and a 500 in the
        # page's or the API's form, not the plain-text answer of the server beneath; the
        # exception's own words stay in the server's log (Starlette logs the traceback
        # after this answer), as they may name paths or a database's URL
        return error(request, 500, f"internal error ({type(exc).__name__}): the server's "
                                   "log has the details")

    return app


class HostCheck:
    """Answers only requests that name this server in their Host header. A server bound
    to 127.0.0.1 is otherwise open to any web site its user visits, by DNS rebinding: a
    page of evil.example, whose name then resolves to 127.0.0.1, reads the catalog (every
    file name, location URL and run) as its own origin. Such a request still says
    `Host: evil.example`: refused here, in one line, before any route (a pure ASGI
    middleware, so streamed answers stay streamed)."""

    def __init__(self, app, names):
        self.app = app
        self.names = {n.lower().strip("[]") for n in names}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.allowed(scope):
            message = ("this server does not answer to that host name (castlib web "
                       "--allow-host NAME)")
            if scope.get("path", "").startswith("/api/"):
                response = JSONResponse({"error": message}, status_code=400)
            else:
                from fastapi.responses import PlainTextResponse

                response = PlainTextResponse(message + "\n", status_code=400)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def allowed(self, scope) -> bool:
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                     if k == b"host"), "")
        if host.startswith("["):                      # [::1]:8080
            name = host[1:].partition("]")[0]
        else:
            name = host.rpartition(":")[0] if ":" in host else host
        return name.lower() in self.names
