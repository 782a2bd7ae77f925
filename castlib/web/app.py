"""The application factory: the catalog, the token, the dispatcher, the routes."""
from __future__ import annotations

import tempfile
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
               log_dir: str | None = None) -> FastAPI:
    """The web view and API over the catalog at `catalog_url`. With `token`, actions
    (starting runs) are allowed to its holder; without, the server is read-only.
    `pipelines_dir`: the folder whose pipeline files may be started by name.
    `dispatcher`: what carries out actions (default: a child process of the server,
    see actions.py; workers on other hosts plug in here)."""
    catalog = Catalog(catalog_url)

    @asynccontextmanager
    async def lifespan(app):
        yield
        catalog.close()

    app = FastAPI(title="castlib", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan,
                  openapi_url="/api/v1/openapi.json",
                  description="The castlib catalog: locations, entries, diffs, runs.")
    app.state.catalog = catalog
    app.state.auth = Auth(token)
    app.state.pipelines_dir = pipelines_dir
    app.state.dispatcher = dispatcher or LocalDispatcher(
        catalog.db_url, log_dir or tempfile.mkdtemp(prefix="castlib-web-"))
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
