"""The optional C accelerator of the index (castlib/_accel.c, docs/architecture.md):
built when a compiler and the SQLite headers are there; without them the install goes on
and castlib takes its pure-Python path. Everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "castlib._accel", ["castlib/_accel.c"],
    # the system's libsqlite3, the one Python's own _sqlite3 links here: two copies of
    # SQLite in one process break POSIX locking (catalog/accel.py checks the versions)
    libraries=["sqlite3"],
    extra_compile_args=["-O2", "-pthread", "-Wall"],
    extra_link_args=["-pthread"],
    optional=True,
)])
