"""castlib's web view and HTTP API (`castlib web`, `pip install castlib[web]`).

`create_app(catalog_url, token=None)` builds the FastAPI application: server-rendered
pages (Jinja2, htmx and Chart.js vendored in static/, nothing from a CDN) and a JSON API
under /api/v1. Every read and write of the catalog is a `castlib.catalog.Catalog` method;
actions run as castlib runs do, in a child process of the server (actions.py).
"""
from .app import create_app

__all__ = ["create_app"]
