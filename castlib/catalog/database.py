"""Opening a catalog: the database URL, connection settings, and schema upgrades on open."""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from ..errors import CastlibError, ConfigError
from ..location import redact

MIGRATIONS = Path(__file__).with_name("migrations")
HEAD_REVISION = "0003"   # kept equal to the newest file in migrations/versions (tested)


class CatalogError(CastlibError):
    """The catalog database cannot be opened or upgraded."""


def default_db_url() -> str:
    """CASTLIB_DB if set, else an SQLite file in the user's data directory."""
    env = os.environ.get("CASTLIB_DB")
    if env:
        return env
    from platformdirs import user_data_dir

    folder = Path(user_data_dir("castlib", appauthor=False))
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'catalog.sqlite'}"


def normalise_db_url(url: str) -> str:
    """Accept what a user types: a bare file path means SQLite; postgresql:// means psycopg 3."""
    if "://" not in url:
        return f"sqlite:///{os.path.abspath(os.path.expanduser(url))}"
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    # 16 MiB of page cache: 64 MiB made no measurable difference (index of 100k and 1M
    # files, diff of two 1M-entry locations) and cost 50 MB of peak memory
    cur.execute("PRAGMA cache_size=-16384")
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.close()


def create_catalog_engine(url: str) -> Engine:
    url = normalise_db_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"not a database URL: {redact(url)!r}") from None
    kwargs: dict = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().parent
            if not folder.is_dir():
                raise CatalogError(f"catalog folder does not exist: {folder}")
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(url, **kwargs)
    except (ImportError, ModuleNotFoundError) as exc:
        raise CatalogError(f"database driver {exc.name} is not installed for "
                           f"{parsed.get_backend_name()}: pip install 'castlib[postgresql]'") from None
    except (ArgumentError, SQLAlchemyError) as exc:
        raise ConfigError(f"cannot use database {redact(url)!r}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; returns (from, to). Never drops data.

    Several processes may open a new catalog at once (indexers on several hosts, cron jobs
    starting together): the check and the migration run under one lock, so none of them
    sees another's half-made schema. A new SQLite file is locked from the first connection
    on: turning it to WAL mode needs the file to itself."""
    with ExitStack() as lock:
        new_file = _new_sqlite_file(engine)
        if new_file:
            lock.enter_context(_upgrade_lock(engine))
        try:
            before = current_revision(engine)
        except SQLAlchemyError as exc:   # unreachable server, refused login, not a database...
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"]
            raise CatalogError(f"cannot open catalog {redact(str(engine.url))}: "
                               f"{reason[0]}") from None
        if before == HEAD_REVISION:
            return before, before
        if not new_file:
            lock.enter_context(_upgrade_lock(engine))
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7305114)"))
            before = current_revision_conn(conn)   # another process may have done it meanwhile
            if before == HEAD_REVISION:
                return before, before
            if before is None:
                if inspect(conn).has_table("entries"):
                    raise CatalogError("the database holds castlib-like tables but no schema "
                                       "version; refusing to touch it")
                create_schema(conn)
                return before, HEAD_REVISION
            head = run_migrations(conn, before)
    return before, head


def _new_sqlite_file(engine: Engine) -> bool:
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        return False
    try:
        return os.path.getsize(database) == 0
    except OSError:
        return True


def create_schema(conn) -> None:
    """A new catalog: the current schema straight from the models, stamped with the head
    revision. Running every migration from the first would give the same schema (a test
    compares the two) but costs a new catalog the import of Alembic."""
    from .schema import Base

    Base.metadata.create_all(conn)
    conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                      "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"))
    conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"),
                 {"v": HEAD_REVISION})


def run_migrations(conn, before: str | None) -> str:
    """Run the Alembic migrations from revision `before` (None: an empty database) to the
    newest one, on conn's transaction; returns that newest revision."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    scripts = ScriptDirectory.from_config(cfg)
    head = scripts.get_current_head()
    if before is not None and before not in {s.revision for s in scripts.walk_revisions()}:
        raise CatalogError(f"catalog schema {before} is newer than this castlib knows "
                           f"({head}); upgrade castlib")
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")
    return head


@contextmanager
def _upgrade_lock(engine: Engine) -> Iterator[None]:
    """SQLite runs DDL outside the transaction, so a second opener could see the tables
    before their version row: a file lock beside the database keeps openers in line.
    (PostgreSQL takes an advisory lock inside the migration's transaction instead.)"""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    import fcntl

    fd = os.open(f"{database}.upgrade-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # released by the kernel if this process dies
        yield
    finally:
        os.close(fd)


def current_revision_conn(conn) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
