"""castlib: keep file trees in sync across storage back-ends through a central SQL catalog.

The API (castlib.sync, castlib.diff, castlib.index, castlib.verify, castlib.run_pipeline)
is imported on first use, so `castlib --help` starts without loading SQLAlchemy.
"""
__version__ = "0.1.0"

_API = {"index", "diff", "sync", "verify", "run_pipeline", "open_catalog", "Catalog",
        "Pipeline", "RunReport"}


def _fewer_collections() -> None:
    """Collect cyclic garbage every 50,000 net new objects instead of Python's default: a
    command's start allocates its modules, classes and options, which all live, and the
    default had the collector run ~50 times over them in a sync of 300 small files, ~10
    ms of its time; a copy frees what it made as it goes (reference counting), so a long
    run's cycles still get collected. For the command's process only (cli.main, and
    `python -m castlib` before its imports); castlib used as a library leaves the
    collector as it is."""
    import gc

    if gc.get_threshold()[0] < 50_000:
        gc.set_threshold(50_000, *gc.get_threshold()[1:])


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'castlib' has no attribute {name!r}")


__all__ = sorted(_API)
