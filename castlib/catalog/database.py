"""Opening a catalog: the database URL, connection settings, and schema upgrades on open."""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import CastlibError, ConfigError
from ..location import redact

MIGRATIONS = Path(__file__).with_name("migrations")
HEAD_REVISION = "0004"   # kept equal to the newest file in migrations/versions (tested)

if TYPE_CHECKING:   # SQLAlchemy is imported where it is used: not on the lean SQLite path
    from sqlalchemy.engine import Engine


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


# SQLite's primary result codes (the low byte of an extended code) and PostgreSQL's
# SQLSTATEs for a catalog that cannot take a write: the user can act on these, they are
# not castlib's bugs
_SQLITE_READONLY, _SQLITE_FULL = 8, 13
_PG_DISK_FULL, _PG_READ_ONLY = "53100", "25006"


def catalog_fault(engine: Engine | str, exc: BaseException) -> CatalogError | None:
    """The one line to say for a catalog that is full or read-only, or None: `exc` from
    the database driver (or an OSError about the catalog's own files). `engine` is the
    catalog's engine, or the path of an SQLite catalog (the lean path has no engine)."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlite_errorcode", None)
    if code is None and type(orig).__module__ == "sqlite3":   # Python < 3.11: no code
        text_ = str(orig)
        code = (_SQLITE_READONLY if "readonly database" in text_
                else _SQLITE_FULL if "disk is full" in text_ else None)
    state = getattr(orig, "sqlstate", None)
    errno_ = getattr(orig, "errno", None) if isinstance(orig, OSError) else None
    full = ((code is not None and code & 0xFF == _SQLITE_FULL) or state == _PG_DISK_FULL
            or errno_ in (errno.ENOSPC, errno.EDQUOT))
    read_only = ((code is not None and code & 0xFF == _SQLITE_READONLY)
                 or state == _PG_READ_ONLY
                 or errno_ in (errno.EROFS, errno.EACCES, errno.EPERM))
    if not (full or read_only):
        return None
    where = _where(engine)
    if full:
        return CatalogError(f"catalog: disk full ({where}): the run stopped; free some space "
                            "and run again")
    return CatalogError(f"catalog is read-only ({where}): castlib records every run and "
                        "listing in it, so it needs write access")


def _where(engine: Engine | str) -> str:
    if isinstance(engine, str):
        return engine
    if engine.dialect.name == "sqlite" and engine.url.database:
        return engine.url.database
    return redact(str(engine.url))


def _translate_fault(context) -> None:
    """SQLAlchemy's handle_error hook: a full or read-only catalog is said in one line."""
    fault = catalog_fault(context.engine, context.original_exception)
    if fault is not None:
        raise fault


@contextmanager
def driver_errors(engine: Engine | str) -> Iterator[None]:
    """The same for code that drives the DBAPI cursor itself (the hot paths of indexing),
    which SQLAlchemy's hook never sees."""
    try:
        yield
    except Exception as exc:
        fault = catalog_fault(engine, exc)
        if fault is None:
            raise
        raise fault from None


def create_catalog_engine(url: str) -> Engine:
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    url = normalise_db_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"not a database URL: {redact(url)!r}") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"catalog {redact(url)!r}: only sqlite:// and postgresql:// "
                          "catalogs are supported")
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
    event.listen(engine, "handle_error", _translate_fault)
    return engine


def current_revision(engine: Engine) -> str | None:
    from sqlalchemy import inspect, text

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; returns (from, to). Never drops data.

    Several processes may open a new catalog at once (indexers on several hosts, cron jobs
    starting together): the check and the migration run under one lock, so none of them
    sees another's half-made schema. A new SQLite catalog is made whole under a temporary
    name and renamed into place, so a catalog file is never empty: an empty one was
    truncated (or is not castlib's), and is refused rather than started afresh."""
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import SQLAlchemyError

    database = _sqlite_file(engine)
    if database is not None:
        _refuse_empty(database)
        if not os.path.exists(database):
            with _upgrade_lock(engine):
                if not os.path.exists(database):   # not made by another process meanwhile
                    _create_sqlite_file(engine, database)
                    return None, HEAD_REVISION
    try:
        before = current_revision(engine)
    except CatalogError:
        raise
    except SQLAlchemyError as exc:   # unreachable server, refused login, not a database...
        if database is not None and not _writable(database):
            raise catalog_fault(engine, OSError(errno.EROFS, "read-only")) from None
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"]
        raise CatalogError(f"cannot open catalog {redact(str(engine.url))}: "
                           f"{reason[0]}") from None
    if before == HEAD_REVISION:
        return before, before
    with _upgrade_lock(engine), engine.begin() as conn:
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


def _sqlite_file(engine: Engine) -> str | None:
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        return None
    return database


def _refuse_empty(database: str) -> None:
    try:
        size = os.path.getsize(database)
    except OSError:
        return
    if size == 0:
        raise CatalogError(
            f"catalog {database} is an empty file (0 bytes): castlib never leaves one, so it "
            "was truncated or is not a catalog; refusing to start a new catalog over it "
            "(restore it from a backup, or remove it to start afresh)")


def _writable(database: str) -> bool:
    """Whether the catalog file (or, for a new one, its folder) can be written: False on
    a read-only mount, whoever asks."""
    return os.access(database if os.path.exists(database)
                     else os.path.dirname(database) or ".", os.W_OK)


def _create_sqlite_file(engine: Engine, database: str) -> None:
    """A new SQLite catalog: schema and WAL mode under a temporary name, then renamed to
    `database` (the caller holds the upgrade lock and saw nothing there). SQLite would
    otherwise create an empty file at the first connection, which another process could
    not tell from a truncated catalog."""
    from sqlalchemy import create_engine, event

    temporary = f"{database}.new-{os.getpid()}"
    scratch = create_engine(f"sqlite:///{temporary}", future=True,
                            connect_args={"timeout": 60})
    event.listen(scratch, "connect", _sqlite_pragmas)
    try:
        with driver_errors(engine), scratch.begin() as conn:
            create_schema(conn)
        scratch.dispose()   # the last connection gone, SQLite folds its WAL into the file
        os.rename(temporary, database)
    except BaseException:
        scratch.dispose()
        for leftover in (temporary, temporary + "-wal", temporary + "-shm"):
            try:
                os.unlink(leftover)
            except OSError:
                pass
        raise


def create_schema(conn) -> None:
    """A new catalog: the current schema straight from the models, stamped with the head
    revision. Running every migration from the first would give the same schema (a test
    compares the two) but costs a new catalog the import of Alembic."""
    from sqlalchemy import text

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
def _upgrade_lock(engine: Engine | str) -> Iterator[None]:
    """SQLite runs DDL outside the transaction, so a second opener could see the tables
    before their version row: a file lock beside the database keeps openers in line.
    (PostgreSQL takes an advisory lock inside the migration's transaction instead.)"""
    if isinstance(engine, str):   # the lean path: the SQLite file's own path
        database = engine
    else:
        database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    from .process_locks import file_lock   # (made, refused and removed as the others are)

    with file_lock(f"{database}.upgrade-lock"):
        yield


def current_revision_conn(conn) -> str | None:
    from sqlalchemy import inspect, text

    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
