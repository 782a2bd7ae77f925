"""castlib: keep file trees in sync across storage back-ends through a central SQL catalog.

The API (castlib.sync, castlib.diff, castlib.index, castlib.verify, castlib.run_pipeline)
is imported on first use, so `castlib --help` starts without loading SQLAlchemy.
"""
__version__ = "0.1.0"

_API = {"index", "diff", "sync", "verify", "run_pipeline", "open_catalog", "Catalog",
        "Pipeline", "RunReport"}


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'castlib' has no attribute {name!r}")


__all__ = sorted(_API)
