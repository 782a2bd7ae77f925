"""The Catalog every caller gets, and its lean SQLite path.

On an SQLite catalog at the newest schema revision, the paths a routine run takes (open,
locations, the run's records, the index's baseline read and writes, the diff and the
folder/link mtime comparison of a no-op sync) run on the `sqlite3` module directly. That
spares every such run the import of SQLAlchemy and its ORM (0.2-0.4 s of a 1.5 s index of
100k files) and SQLAlchemy's per-row work. Anything else (PostgreSQL, migrations, a
catalog to repair or refuse, the rarer commands) goes to the general SQLAlchemy Catalog of
catalog.py, made on first use: attributes this class does not define are that one's.

One schema: a new catalog is made from sqlite_ddl.DDL, which is what the models make
(tested), and every statement here writes the values the general path writes, column for
column (tests/catalog/test_lite.py compares the catalogs both paths make).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime
from typing import Iterable, Iterator

from ..errors import ConfigError
from ..hosts import local_hostname
from ..location import LocationURL, parse_location, scrub_secrets
from .database import (HEAD_REVISION, _refuse_empty, _upgrade_lock, default_db_url,
                       driver_errors, normalise_db_url)
from .index_lock import index_lock
from .records import (BATCH, CHECKSUM_COLUMNS, DIFFERENCE_KINDS, WRITES_KEY, Difference,
                      IndexedEntry, LocationRecord, Side, _classify, _drifted, _username,
                      fill_checksums, pair_conditions, run_seems_dead, utcnow)

CHUNK = 500   # values in one IN (...) list
_FEW = 50_000   # paths looked up one IN list at a time rather than found by a join
_GENERAL_MADE = threading.Lock()


def sqlite_path(db_url: str) -> str | None:
    """The file of an SQLite catalog URL the lean path can open, else None (another
    database, an in-memory one, or a URL with options: the general path's)."""
    url = normalise_db_url(db_url)
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            path = url[len(prefix):]
            if not path or path == ":memory:" or "?" in path:
                return None
            return path
    return None


def stamp(value: datetime | None) -> str | None:
    """A timestamp as the general path stores it in SQLite (SQLAlchemy's DATETIME text:
    the fields as given, the zone left out)."""
    if value is None:
        return None
    return (f"{value.year:04d}-{value.month:02d}-{value.day:02d} {value.hour:02d}:"
            f"{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}")


def unstamp(value: str | None) -> datetime | None:
    """A stored timestamp as the general path reads it back (naive, like SQLAlchemy's)."""
    return None if value is None else datetime.fromisoformat(value)


def _json(value) -> str:
    return json.dumps(value)   # SQLAlchemy's JSON type: json.dumps; None is JSON null


class LiteStore:
    """One sqlite3 connection in autocommit mode; write() and read() take it in turn
    (the Catalog is shared between threads), write() in one IMMEDIATE transaction."""

    def __init__(self, path: str):
        self.path = path
        self.conn = sqlite3.connect(path, timeout=60, isolation_level=None,
                                    check_same_thread=False)
        self.lock = threading.RLock()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                       "busy_timeout=60000", "cache_size=-16384", "temp_store=MEMORY"):
            self.conn.execute(f"PRAGMA {pragma}")   # as database._sqlite_pragmas

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        with self.lock, driver_errors(self.path):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self.lock, driver_errors(self.path):
            yield self.conn

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own in one read transaction: what several statements read
        is one state of the catalog (a writer committing meanwhile is not seen), and the
        shared connection stays free for the run's other threads."""
        with driver_errors(self.path):
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            try:
                for pragma in ("busy_timeout=60000", "cache_size=-16384", "temp_store=MEMORY"):
                    conn.execute(f"PRAGMA {pragma}")
                conn.execute("BEGIN")
                yield conn
            finally:
                conn.close()   # ends the read transaction

    def close(self) -> None:
        self.conn.close()


def open_lite(path: str) -> LiteStore | None:
    """The lean store of the SQLite catalog at `path`, made (whole, under a temporary
    name) if there is none; None when the file needs the general path: an older schema
    to migrate, or a file that is empty, damaged or not a catalog (refused there)."""
    try:
        if os.path.getsize(path) == 0:
            return None
    except OSError:
        if not os.path.isdir(os.path.dirname(path) or "."):
            return None   # said in one line by the general path
        _create(path)
    try:
        store = LiteStore(path)
    except sqlite3.Error:
        return None
    try:
        row = store.conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        row = None
    if row is None or row[0] != HEAD_REVISION:
        store.close()
        return None
    return store


def _create(path: str) -> None:
    """A new catalog, as database._create_sqlite_file makes one: the schema under a
    temporary name, then renamed into place, under the upgrade lock."""
    from .sqlite_ddl import DDL

    _refuse_empty(path)
    with _upgrade_lock(path):
        if os.path.exists(path):   # made by another process meanwhile
            return
        temporary = f"{path}.new-{os.getpid()}"
        try:
            with driver_errors(path):
                conn = sqlite3.connect(temporary, isolation_level=None)
                try:
                    # a file no one else opens until it is renamed: written without a
                    # journal or a sync of its own, then put in WAL mode and synced once
                    # before the rename (a new catalog cost four syncs)
                    conn.execute("PRAGMA journal_mode=OFF")
                    conn.execute("PRAGMA synchronous=OFF")
                    conn.execute("BEGIN")
                    for statement in DDL:
                        conn.execute(statement)
                    conn.execute("INSERT INTO alembic_version (version_num) VALUES (?)",
                                 (HEAD_REVISION,))
                    conn.execute("COMMIT")
                    conn.execute("PRAGMA journal_mode=WAL")
                finally:
                    conn.close()
                fd = os.open(temporary, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temporary, path)
        except BaseException:
            for leftover in (temporary, temporary + "-wal", temporary + "-shm"):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
            raise


class Catalog:
    """An open catalog database. Safe to share between threads; each call is short.
    See the module's docstring for which calls take the lean path."""

    def __init__(self, db_url: str | None = None, *, lean: bool = True):
        """lean=False takes the general path for every call (tests compare the two)."""
        self.db_url = db_url or default_db_url()
        self._general = None
        self._lite: LiteStore | None = None
        path = sqlite_path(self.db_url) if lean else None
        existed = path is not None and os.path.exists(path)
        if path is not None:
            self._lite = open_lite(path)
        if self._lite is None:   # the general path opens (migrates, or refuses) it
            general = self._sql
            self.upgraded_from, self.revision = general.upgraded_from, general.revision
            if path is not None:
                self._lite = open_lite(path)
        else:
            self.upgraded_from = HEAD_REVISION if existed else None
            self.revision = HEAD_REVISION

    @property
    def _sql(self):
        """The general (SQLAlchemy) Catalog of the same database, made on first use."""
        if self._general is None:
            with _GENERAL_MADE:   # threads of one sync: one engine, not one each
                if self._general is None:
                    from .catalog import SqlCatalog

                    self._general = SqlCatalog(self.db_url)
        return self._general

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_general", "_lite"):
            raise AttributeError(name)
        return getattr(self._sql, name)

    @property
    def dialect(self) -> str:
        return "sqlite" if self._lite is not None else self._sql.dialect

    @property
    def sqlite_file(self) -> str | None:
        """The file of an SQLite catalog (its locks live beside it), else None."""
        return self._lite.path if self._lite is not None else self._sql.sqlite_file

    def close(self) -> None:
        if self._lite is not None:
            self._lite.close()
        if self._general is not None:
            self._general.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- settings --------------------------------------------------------------------------
    def setting(self, name: str) -> str | None:
        if self._lite is None:
            return self._sql.setting(name)
        with self._lite.read() as conn:
            row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def add_setting(self, name: str, value: str) -> None:
        """Make a setting; one another process made meanwhile is kept."""
        if self._lite is None:
            return self._sql.add_setting(name, value)
        with self._lite.write() as conn:
            conn.execute("INSERT OR IGNORE INTO settings (name, value) VALUES (?, ?)",
                         (name, value))

    # -- locations -------------------------------------------------------------------------
    def location(self, url: LocationURL | str, name: str | None = None) -> LocationRecord:
        """The catalog's record of a location, created on first use."""
        if self._lite is None:
            return self._sql.location(url, name)
        if isinstance(url, str):
            url = parse_location(url)
        canonical = str(url)
        for _attempt in range(3):
            with self._lite.write() as conn:
                row = conn.execute("SELECT id, url, name, indexed_at FROM locations "
                                   "WHERE url = ?", (canonical,)).fetchone()
                if row is not None:
                    if name and row[2] != name:
                        self._check_name_free(conn, name, row[0])
                        conn.execute("UPDATE locations SET name = ? WHERE id = ?",
                                     (name, row[0]))
                        return LocationRecord(row[0], row[1], name, unstamp(row[3]))
                    return LocationRecord(row[0], row[1], row[2], unstamp(row[3]))
                try:
                    node = conn.execute("SELECT id FROM nodes WHERE scheme = ? AND host = ?",
                                        (url.scheme, url.host)).fetchone()
                    node_id = node[0] if node else conn.execute(
                        "INSERT INTO nodes (scheme, host) VALUES (?, ?)",
                        (url.scheme, url.host)).lastrowid
                    if name:
                        self._check_name_free(conn, name, None)
                    loc_id = conn.execute(
                        "INSERT INTO locations (node_id, url, root_path, name, created_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (node_id, canonical, url.path, name, stamp(utcnow()))).lastrowid
                    return LocationRecord(loc_id, canonical, name, None)
                except sqlite3.IntegrityError:   # cannot happen under IMMEDIATE; as general
                    continue
        raise ConfigError(f"cannot register location {canonical}")

    @staticmethod
    def _check_name_free(conn, name: str, loc_id: int | None) -> None:
        other = conn.execute("SELECT id, url FROM locations WHERE name = ?", (name,)).fetchone()
        if other is not None and other[0] != loc_id:
            raise ConfigError(f"location name {name!r} already names {other[1]}")

    def find_location(self, text_: str) -> LocationRecord | None:
        """A location by its name or URL, without creating it."""
        if self._lite is None:
            return self._sql.find_location(text_)
        cols = "SELECT id, url, name, indexed_at FROM locations"
        with self._lite.read() as conn:
            row = conn.execute(f"{cols} WHERE name = ?", (text_,)).fetchone()
            if row is None:
                try:
                    canonical = str(parse_location(text_))
                except ConfigError:
                    return None
                # the URL as stored too (see the general find_location)
                row = conn.execute(f"{cols} WHERE url IN (?, ?) ORDER BY url = ? DESC",
                                   (canonical, text_, canonical)).fetchone()
        return LocationRecord(row[0], row[1], row[2], unstamp(row[3])) if row else None

    def listed_locations_of(self, scheme: str, host: str) -> list[LocationRecord]:
        if self._lite is None:
            return self._sql.listed_locations_of(scheme, host)
        with self._lite.read() as conn:
            rows = conn.execute(
                "SELECT l.id, l.url, l.name, l.indexed_at FROM locations l "
                "JOIN nodes n ON n.id = l.node_id WHERE n.scheme = ? AND n.host = ? "
                "AND l.indexed_at IS NOT NULL ORDER BY l.id", (scheme, host)).fetchall()
        return [LocationRecord(r[0], r[1], r[2], unstamp(r[3])) for r in rows]

    # -- index -----------------------------------------------------------------------------
    def live_count(self, location_id: int) -> int:
        if self._lite is None:
            return self._sql.live_count(location_id)
        with self._lite.read() as conn:
            return conn.execute("SELECT count(*) FROM entries WHERE location_id = ? AND "
                                "deleted = 0 AND kind = 'f'", (location_id,)).fetchone()[0]

    def has_live_files(self, location_id: int) -> bool:
        """live_count() > 0, without counting them all (the accelerated index counts)."""
        if self._lite is None:
            return self._sql.live_count(location_id) > 0
        with self._lite.read() as conn:
            return conn.execute("SELECT 1 FROM entries WHERE location_id = ? AND deleted = 0 "
                                "AND kind = 'f' LIMIT 1", (location_id,)).fetchone() is not None

    def load_entries(self, location_id: int) -> dict[str, IndexedEntry]:
        """Every entry (deleted ones too) of a location by catalog path: the baseline."""
        if self._lite is None:
            return self._sql.load_entries(location_id)
        make = IndexedEntry._make
        out: dict[str, IndexedEntry] = {}
        with self._lite.read() as conn:
            cursor = conn.execute(
                "SELECT path, id, kind, size, mtime_ns, mode, link_target, deleted, adler32, "
                "md5, sha256, corrupted FROM entries WHERE location_id = ?", (location_id,))
            while True:
                rows = cursor.fetchmany(BATCH)
                if not rows:
                    break
                for row in rows:
                    out[row[0]] = make(row[1:])
        return out

    def index_writer(self, location_id: int, now: datetime):
        """The writer of one index of a location listed at `now`."""
        if self._lite is None:
            return self._sql.index_writer(location_id, now)
        return LiteIndexWriter(self._lite, location_id, now)

    def index_accelerator(self):
        """The C accelerator of the index (catalog.accel) when this catalog can take it
        (an SQLite catalog on the lean path) and it is built and usable, else None."""
        if self._lite is None:
            return None
        from .accel import accelerator

        return accelerator()

    def accelerated_index(self, location_id: int, root: str, now: datetime, is_temp,
                          progress):
        """One index of the local folder `root` by the accelerator (index_accelerator()
        said it can): see catalog.accel.AcceleratedIndex."""
        from .accel import AcceleratedIndex

        return AcceleratedIndex(self.index_accelerator(), self._lite.path,
                                self.index_writer(location_id, now), location_id, root, now,
                                is_temp, progress)

    # -- entries after a transfer: the general path, and nothing at all when there is none
    # -- entries after a transfer (as catalog.Catalog's, whose docstrings say what each does)
    def record_entries(self, location_id: int, rows: list[dict]) -> None:
        if not rows:
            return
        if self._lite is None:
            return self._sql.record_entries(location_id, rows)
        now = utcnow()
        writer = LiteIndexWriter(self._lite, location_id, now)
        with index_lock(self, location_id), self._lite.write() as conn:
            existing = _ids_of(conn, location_id, [r["path"] for r in rows])
            changed = []
            for r in rows:
                old_id = existing.get(r["path"])
                if old_id is not None:
                    full = {"adler32": None, "md5": None, "sha256": None, **r}
                    del full["path"], full["name"]
                    # what a sync wrote was verified: no longer corrupted
                    full.update(b_id=old_id, deleted=False, corrupted=False, last_seen=now)
                    changed.append(full)
                else:
                    parent = r["path"].rpartition("/")[0]
                    writer._inserts.append([r["path"], parent, r["name"], r["kind"], r["size"],
                                            r["mtime_ns"], r["mode"], r.get("adler32"),
                                            r.get("md5"), r.get("sha256"), r["link_target"],
                                            None])
            if writer._inserts:
                writer._insert(conn, writer._inserts)
                _link_parents(conn, location_id, writer._first_new_id)
            _update_entries(conn, changed)
            _entries_written(conn, location_id)

    def forget_entries(self, location_id: int, paths: list[str]) -> None:
        if not paths:
            return
        if self._lite is None:
            return self._sql.forget_entries(location_id, paths)
        now = stamp(utcnow())
        with index_lock(self, location_id), self._lite.write() as conn:
            for i in range(0, len(paths), CHUNK):
                part = paths[i:i + CHUNK]
                conn.execute(f"UPDATE entries SET deleted = 1, last_seen = ? WHERE location_id "
                             f"= ? AND path IN ({', '.join('?' * len(part))})",
                             (now, location_id, *part))
            _entries_written(conn, location_id)

    def record_checksums(self, location_id: int, algo: str, values) -> None:
        values = list(values)
        if not values:
            return
        if self._lite is None or algo not in CHECKSUM_COLUMNS:
            return self._sql.record_checksums(location_id, algo, values)
        with self._lite.write() as conn:
            conn.executemany(f"UPDATE entries SET {algo} = ? WHERE location_id = "
                             f"{int(location_id)} AND path = ?", [(v, p) for p, v in values])

    def set_metadata(self, location_id: int, rows) -> None:
        if not rows:
            return
        if self._lite is None:
            return self._sql.set_metadata(location_id, rows)
        with self._lite.write() as conn:
            conn.executemany("UPDATE entries SET mtime_ns = coalesce(?, mtime_ns), mode = "
                             f"coalesce(?, mode) WHERE location_id = {int(location_id)} AND "
                             "path = ?", [(m, md, p) for p, m, md in rows])

    def lookup(self, location_id: int, paths: Iterable[str],
               algorithm: str = "adler32") -> dict[str, Side]:
        """The live entries at `paths` of a location, as Sides, by path."""
        if self._lite is None:
            return self._sql.lookup(location_id, paths, algorithm)
        if algorithm not in CHECKSUM_COLUMNS:
            raise ConfigError(f"unknown checksum algorithm {algorithm!r}")
        paths = list(paths)
        out: dict[str, Side] = {}
        with self._lite.read() as conn:
            for i in range(0, len(paths), CHUNK):
                part = paths[i:i + CHUNK]
                for row in conn.execute(
                        f"SELECT path, kind, size, mtime_ns, {algorithm}, link_target, mode "
                        "FROM entries WHERE location_id = ? AND deleted = 0 AND path IN "
                        f"({', '.join('?' * len(part))})", (location_id, *part)):
                    out[row[0]] = Side(*row[1:])
        return out

    # -- differences -----------------------------------------------------------------------
    def diff(self, ref_id: int, dst_id: int, *, algorithm: str = "adler32",
             mtime_tolerance_ns: int | None = 0, kinds: Iterable[str] = DIFFERENCE_KINDS,
             prefix: str = "") -> Iterator[Difference]:
        """As the general diff (its docstring says what each kind is): compare()'s."""
        if self._lite is None:
            yield from self._sql.diff(ref_id, dst_id, algorithm=algorithm,
                                      mtime_tolerance_ns=mtime_tolerance_ns, kinds=kinds,
                                      prefix=prefix)
            return
        yield from self.compare(ref_id, dst_id, algorithm=algorithm,
                                mtime_tolerance_ns=mtime_tolerance_ns, kinds=kinds,
                                prefix=prefix)[0]

    def compare(self, ref_id: int, dst_id: int, *, algorithm: str = "adler32",
                mtime_tolerance_ns: int | None = 0, kinds: Iterable[str] = DIFFERENCE_KINDS,
                prefix: str = "", drift_kinds: Iterable[str] = (),
                drift_tolerance_ns: int = 0) -> tuple[list[Difference], list[Difference]]:
        """diff() and mtime_drift(kinds=drift_kinds) at once (see the general compare).

        One pass over the reference's entries, each looked up in the destination by path,
        read in one snapshot on a connection of its own. The extras are settled by counts
        where they can be: the pass also returns the reference's deleted rows (counted,
        not reported), so that index-only counts of all rows prove "no extra" in the usual
        case (no deleted rows in the destination) without a pass over the destination's
        rows. When the reference holds a quarter of the table or more (and the destination
        at least half as many rows), the table is read in rowid order (a sequential read,
        its other locations' rows skipped) instead of each of the reference's rows looked
        up from the index (0.43 s less CPU at 1M entries of 2M), and the rows it returns
        are sorted by path."""
        if self._lite is None:
            return self._sql.compare(ref_id, dst_id, algorithm=algorithm,
                                     mtime_tolerance_ns=mtime_tolerance_ns, kinds=kinds,
                                     prefix=prefix, drift_kinds=drift_kinds,
                                     drift_tolerance_ns=drift_tolerance_ns)
        if algorithm not in CHECKSUM_COLUMNS:
            raise ConfigError(f"unknown checksum algorithm {algorithm!r}")
        kinds = set(kinds)
        drift = sorted({k for k in drift_kinds if k in ("d", "l")})
        extra = "extra" in kinds
        args: dict = {"ref": ref_id, "dst": dst_id, "tol": mtime_tolerance_ns,
                      "dtol": drift_tolerance_ns}
        within = ""
        if prefix:
            from .paths import subtree_range

            args["low"], args["high"] = subtree_range(prefix)
            within = " AND {t}.path >= :low AND {t}.path < :high"
        conds = _difference_conditions(kinds, algorithm, mtime_tolerance_ns, drift, extra)
        differences: list[Difference] = []
        drifted: list[Difference] = []
        if not conds:
            return differences, drifted
        side = lambda t: (f"{t}.kind, {t}.size, {t}.mtime_ns, {t}.{algorithm}, "  # noqa: E731
                          f"{t}.link_target, {t}.mode")
        count = ("SELECT count(*) FROM entries WHERE location_id = ?"
                 + within.format(t="entries").replace(":low", "?").replace(":high", "?"))
        span = (args["low"], args["high"]) if prefix else ()
        with self._lite.snapshot() as conn:
            n_ref = conn.execute(count, (ref_id, *span)).fetchone()[0]
            n_dst = conn.execute(count, (dst_id, *span)).fetchone()[0]
            # the table in rowid order when the reference is a large share of it, and the
            # destination not much smaller (else many rows come back, which the sort
            # would hold: 1M missing took 90 MB more than the index order's stream)
            table = conn.execute("SELECT max(rowid) FROM entries").fetchone()[0] or 0
            in_table_order = lambda n, other: (  # noqa: E731
                not prefix and n >= 10_000 and 2 * other >= n and 4 * n >= table)
            if in_table_order(n_ref, n_dst):
                ref_rows = "+r.location_id = :ref"   # a scan of the table, in rowid order
            else:
                ref_rows = "r.location_id = :ref" + within.format(t="r")
            live = f"r.deleted = 0 AND ({conds})"
            sql = (f"SELECT r.path, {side('r')}, d.id, {side('d')}, r.corrupted, d.corrupted, "
                   f"r.deleted FROM entries AS r LEFT OUTER JOIN entries AS d ON "
                   f"d.location_id = :dst AND d.path = r.path AND d.deleted = 0 "
                   f"WHERE {ref_rows} AND " + (f"(r.deleted != 0 OR {live})" if extra else live)
                   + " ORDER BY r.path")
            gone = missing = 0
            ref_gone: list[str] = []   # the paths of the reference's deleted rows (a few)
            tol = mtime_tolerance_ns
            cursor = conn.execute(sql, args)
            while True:
                rows = cursor.fetchmany(BATCH)
                if not rows:
                    break
                for row in rows:
                    if row[16]:
                        gone += 1
                        if len(ref_gone) < _FEW:
                            ref_gone.append(row[0])
                        continue
                    ref = Side(*row[1:7], corrupted=bool(row[14]))
                    if row[7] is None:
                        missing += 1
                        if "missing" in kinds:
                            differences.append(Difference(row[0], "missing", ref, None))
                        continue
                    dst = Side(*row[8:14], corrupted=bool(row[15]))
                    kind = _classify(ref, dst, tol, kinds)
                    if kind:
                        differences.append(Difference(row[0], kind, ref, dst))
                    if drift and _drifted(ref, dst, drift, drift_tolerance_ns):
                        drifted.append(Difference(row[0], "mtime", Side(*row[1:7]),
                                                  Side(*row[8:14])))
            if not extra:
                return differences, drifted
            # paths are unique per location: the destination's live rows at paths the
            # reference has live number n_ref - gone - missing; if that is all of its rows
            # (or all of its live ones), it has nothing the reference lacks
            shared = n_ref - gone - missing
            if n_dst == shared:
                return differences, drifted
            # the destination's paths the reference has no row at, from the two index
            # ranges merged (no row read: 0.26 s at 1M a side), and those of the
            # reference's deleted rows: where its extras can be, looked up when few
            # (measured 1.0 s less than a count of its live rows and the join below)
            paths = ("SELECT path FROM entries WHERE location_id = ?"
                     + within.format(t="entries").replace(":low", "?").replace(":high", "?"))
            where = conn.execute(f"{paths} EXCEPT {paths} ORDER BY 1 LIMIT {_FEW + 1}",
                                 (dst_id, *span, ref_id, *span)).fetchall()
            if len(where) <= _FEW and gone == len(ref_gone):
                where = sorted({p for (p,) in where}.union(ref_gone))
                found = []
                for i in range(0, len(where), CHUNK):
                    part = where[i:i + CHUNK]
                    found += conn.execute(
                        f"SELECT path, kind, size, mtime_ns, {algorithm}, link_target, mode, "
                        f"corrupted FROM entries WHERE location_id = ? AND deleted = 0 AND "
                        f"path IN ({', '.join('?' * len(part))})", (dst_id, *part)).fetchall()
                found.sort()   # by path: code point order, SQLite's for UTF-8 text
                differences.extend(Difference(row[0], "extra", None,
                                              Side(*row[1:-1], corrupted=bool(row[-1])))
                                   for row in found)
                return differences, drifted
            if conn.execute(count + " AND deleted = 0", (dst_id, *span)).fetchone()[0] != shared:
                dst_rows = ("+d.location_id = :dst" if in_table_order(n_dst, n_ref) else
                            "d.location_id = :dst" + within.format(t="d"))
                sql = (f"SELECT d.path, {side('d')}, d.corrupted FROM entries AS d "
                       f"LEFT OUTER JOIN entries AS r ON r.location_id = :ref AND "
                       f"r.path = d.path AND r.deleted = 0 WHERE {dst_rows} AND "
                       "d.deleted = 0 AND r.id IS NULL ORDER BY d.path")
                cursor = conn.execute(sql, args)
                while True:
                    rows = cursor.fetchmany(BATCH)
                    if not rows:
                        break
                    differences.extend(Difference(row[0], "extra", None,
                                                  Side(*row[1:-1], corrupted=bool(row[-1])))
                                       for row in rows)
        return differences, drifted

    def mtime_drift(self, ref_id: int, dst_id: int, *, kinds: Iterable[str] = ("d", "l"),
                    algorithm: str = "adler32", tolerance_ns: int = 0,
                    prefix: str = "") -> Iterator[Difference]:
        """As the general mtime_drift: folders and links alike on both sides whose mtimes
        differ by more than tolerance_ns."""
        if self._lite is None:
            yield from self._sql.mtime_drift(ref_id, dst_id, kinds=kinds, algorithm=algorithm,
                                             tolerance_ns=tolerance_ns, prefix=prefix)
            return
        kinds = [k for k in kinds if k in ("d", "l")]
        if not kinds:
            return
        if algorithm not in CHECKSUM_COLUMNS:
            raise ConfigError(f"unknown checksum algorithm {algorithm!r}")
        args: dict = {"ref": ref_id, "dst": dst_id, "tol": tolerance_ns}
        live_r = ("r.location_id = :ref AND r.deleted = 0 AND r.kind IN ("
                  + ", ".join(f"'{k}'" for k in kinds) + ")")
        if prefix:
            from .paths import subtree_range

            args["low"], args["high"] = subtree_range(prefix)
            live_r += " AND r.path >= :low AND r.path < :high"
        side = lambda t: (f"{t}.kind, {t}.size, {t}.mtime_ns, {t}.{algorithm}, "  # noqa: E731
                          f"{t}.link_target, {t}.mode")
        sql = (f"SELECT r.path, {side('r')}, {side('d')} FROM entries AS r JOIN entries AS d "
               "ON d.location_id = :dst AND d.path = r.path AND d.deleted = 0 AND "
               "d.kind = r.kind AND coalesce(r.link_target, '') = coalesce(d.link_target, '') "
               f"WHERE {live_r} AND abs(r.mtime_ns - d.mtime_ns) > :tol ORDER BY r.path")
        for row in self._rows(sql, args):
            yield Difference(row[0], "mtime", Side(*row[1:7]), Side(*row[7:13]))

    def _rows(self, sql: str, args: dict) -> Iterator[tuple]:
        """The rows of a query, fetched in batches; the store is held per batch only."""
        with self._lite.read() as conn:
            cursor = conn.execute(sql, args)
            rows = cursor.fetchmany(BATCH)
        while rows:
            yield from rows
            with self._lite.read():
                rows = cursor.fetchmany(BATCH)

    # -- runs ------------------------------------------------------------------------------
    def start_run(self, command: str, args: dict | None = None, pipeline: str | None = None) -> int:
        """As the general start_run: credentials scrubbed, runs that ended without saying
        so marked 'died' (records.run_seems_dead)."""
        if self._lite is None:
            return self._sql.start_run(command, args, pipeline)
        host, now = local_hostname(), utcnow()
        with self._lite.write() as conn:
            dead = [r[0] for r in conn.execute(
                "SELECT id, pid, hostname, heartbeat_at, started_at FROM runs "
                "WHERE status = 'running'")
                if run_seems_dead(r[2], r[1], unstamp(r[3]), unstamp(r[4]), host, now,
                                  silent_here_is_dead=True)]
            for i in range(0, len(dead), CHUNK):
                part = dead[i:i + CHUNK]
                conn.execute(f"UPDATE runs SET status = 'died', finished_at = ?, error = ? "
                             f"WHERE status = 'running' AND id IN ({', '.join('?' * len(part))})",
                             (stamp(utcnow()), "the process ended without finishing the run "
                              "(killed, or the machine stopped)", *part))
            return conn.execute(
                "INSERT INTO runs (command, pipeline, args, hostname, username, pid, "
                "started_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
                (command, pipeline, _json(scrub_secrets(args)), host, _username(),
                 os.getpid(), stamp(utcnow()))).lastrowid

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        if self._lite is None:
            return self._sql.finish_run(run_id, status, error)
        with self._lite.write() as conn:
            # its last counters (progress) stay, as what it did last
            conn.execute("UPDATE runs SET finished_at = ?, status = ?, error = ?, pid = NULL "
                         "WHERE id = ?",
                         (stamp(utcnow()), status, error, run_id))

    def heartbeat(self, run_id: int, progress: dict | None) -> bool:
        """As the general heartbeat: a running run's sign of life and live counters,
        about once a second (progress.RunBeat); True when a cancel was asked for."""
        if self._lite is None:
            return self._sql.heartbeat(run_id, progress)
        with self._lite.write() as conn:
            conn.execute("UPDATE runs SET heartbeat_at = ?, progress = ? WHERE id = ? AND "
                         "status = 'running'",
                         (stamp(utcnow()), None if progress is None else _json(progress),
                          run_id))
            row = conn.execute("SELECT cancel_requested FROM runs WHERE id = ?",
                               (run_id,)).fetchone()
        return bool(row and row[0])

    def record_stage(self, run_id: int, position: int, stage: str, stage_id: str | None,
                     params: dict, status: str, counts: dict, errors: list,
                     started_at: datetime, summary: str | None = None) -> None:
        if self._lite is None:
            return self._sql.record_stage(run_id, position, stage, stage_id, params, status,
                                          counts, errors, started_at, summary)
        with self._lite.write() as conn:
            conn.execute(
                "INSERT INTO stage_results (run_id, position, stage, stage_id, params, status, "
                "counts, errors, started_at, finished_at, hostname, summary) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, position, stage, stage_id, _json(scrub_secrets(params)), status,
                 _json(counts), _json(errors[:1000]), stamp(started_at), stamp(utcnow()),
                 local_hostname(), summary or None))


def _difference_conditions(kinds: set[str], algorithm: str, tolerance: int | None,
                           drift: list[str], missing: bool) -> str:
    """The SQL condition on a row of the reference (r) joined to the destination's row at
    its path (d, NULL when there is none) that holds when the row may be a difference of
    `kinds` (or a folder or link of `drift` whose mtime moved, or, with `missing`, one the
    destination lacks): the general diff's conditions, factored by kind, behind a test
    that two rows are alike in every compared column (most are: measured 0.35 s less CPU
    than the conditions one by one at 1M rows). Empty when no row can be one. Python
    classifies what it selects (records._classify, _drifted)."""
    rc, dc = f"r.{algorithm}", f"d.{algorithm}"
    conds = ["d.id IS NULL"] if missing or "missing" in kinds else []
    conds += pair_conditions(kinds, algorithm, tolerance, drift, bind=lambda n: f":{n}",
                             truth=lambda column: f"{column} = 1")
    if not conds:
        return ""
    alike = (f"r.kind = d.kind AND r.size IS d.size AND r.mtime_ns IS d.mtime_ns AND "
             f"r.mode IS d.mode AND {rc} IS {dc} AND r.link_target IS d.link_target AND "
             "r.corrupted = 0 AND d.corrupted = 0")
    if conds == ["d.id IS NULL"]:
        return conds[0]
    return f"d.id IS NULL OR NOT ({alike}) AND (" + " OR ".join(f"({c})" for c in conds) + ")"


class LiteIndexWriter:
    """The lean IndexWriter (catalog.IndexWriter says what each call does). Each batch
    goes in one IMMEDIATE transaction, so no other writer of the catalog inserts between
    the largest id read and the rows inserted: the writer numbers its rows itself, and
    gives each its parent's id from the folders it inserted or looked up, instead of a
    subquery per row. The run's constants (location, timestamps) are written into the
    statement; a row binds its own values only."""

    _SUM_AT = {a: 7 + i for i, a in enumerate(CHECKSUM_COLUMNS)}   # in an add()ed row

    def __init__(self, store: LiteStore, location_id: int, now: datetime):
        self.store = store
        self.location_id = int(location_id)
        self.now = now
        self._stamp = stamp(now)
        self._inserts: list[list] = []
        self._dir_ids: dict[str, int | None] = {}   # folder path -> id (None: not there)
        self._first_new_id: int | None = None
        values = (f"?, {self.location_id}, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                  f"'{self._stamp}', '{self._stamp}', 0")
        self._insert_sql = ("INSERT INTO entries (id, location_id, path, parent_id, name, kind, "
                            "size, mtime_ns, mode, adler32, md5, sha256, link_target, online, "
                            f"first_seen, last_seen, deleted) VALUES ({values})")
        # most rows (no checksum, link target or tape state) bind 8 values, not 13: the
        # columns left out are NULL either way (SQLite's cost grows with the values bound)
        self._plain_sql = ("INSERT INTO entries (id, location_id, path, parent_id, name, kind, "
                           "size, mtime_ns, mode, first_seen, last_seen, deleted) VALUES "
                           f"(?, {self.location_id}, ?, ?, ?, ?, ?, ?, ?, "
                           f"'{self._stamp}', '{self._stamp}', 0)")

    def add(self, path: str, st, algo: str | None = None, checksum: str | None = None) -> None:
        """A new entry at catalog path `path`, from a Stat-like `st`."""
        parent, _, name = path.rpartition("/")
        row = [path, parent, name, st.kind, st.size, st.mtime_ns, st.mode, None, None, None,
               st.link_target, st.online]
        if checksum:
            row[self._SUM_AT[algo]] = checksum
        self._inserts.append(row)

    def write(self, updates: list[dict], checksums: dict[str, dict[str, str]],
              sound: Iterable[str] = ()) -> None:
        inserts, loc_id = self._inserts, self.location_id
        rest = fill_checksums(inserts, checksums, self._SUM_AT, path_at=0)
        sound = list(sound)
        with self.store.write() as conn:
            if inserts:
                self._insert(conn, inserts)
            _update_entries(conn, updates)
            for algo, values in rest.items():
                if values:
                    conn.executemany(f"UPDATE entries SET {algo} = ? WHERE location_id = "
                                     f"{loc_id} AND path = ?",
                                     [(v, p) for p, v in values.items()])
            for i in range(0, len(sound), CHUNK):
                part = sound[i:i + CHUNK]
                conn.execute(f"UPDATE entries SET corrupted = 0 WHERE location_id = {loc_id} "
                             f"AND path IN ({', '.join('?' * len(part))})", part)
            if inserts or updates:
                _entries_written(conn, loc_id)
        self._inserts = []

    def _insert(self, conn, inserts: list[list]) -> None:
        last = conn.execute("SELECT max(id) FROM entries").fetchone()[0] or 0
        if self._first_new_id is None:
            self._first_new_id = last
        dir_ids = self._dir_ids
        rows = []
        unknown: set[str] = set()
        for row in inserts:
            last += 1
            path, parent = row[0], row[1]
            if row[3] == "d":
                dir_ids[path] = last
            if parent not in dir_ids:
                unknown.add(parent)
            # id, path, parent (resolved below), name, kind, size, mtime, mode, sums,
            # link target, online
            rows.append([last, path, parent, *row[2:]])
        unknown.difference_update(dir_ids)   # folders of this batch listed after content
        if unknown:   # folders of earlier runs: looked up once each
            wanted = sorted(unknown)
            for i in range(0, len(wanted), CHUNK):
                part = wanted[i:i + CHUNK]
                dir_ids.update(conn.execute(
                    f"SELECT path, id FROM entries WHERE location_id = {self.location_id} "
                    f"AND path IN ({', '.join('?' * len(part))})", part).fetchall())
            for path in wanted:
                dir_ids.setdefault(path, None)   # none (the root, or listed later)
        get = dir_ids.get
        plain, full, nothing = [], [], [None] * 5
        for r in rows:
            r[2] = get(r[2])
            if r[8:] == nothing:
                plain.append(r[:8])
            else:
                full.append(r)
        if plain:
            conn.executemany(self._plain_sql, plain)
        if full:
            conn.executemany(self._insert_sql, full)

    def inserted_after(self, last_id: int | None) -> None:
        """Rows were inserted (by the C accelerator, catalog.accel) with ids above last_id:
        finish() links those without a parent as it links its own."""
        if last_id is not None and self._first_new_id is None:
            self._first_new_id = last_id

    def finish(self, vanished: list[int]) -> None:
        """The end of the listing, in one transaction: the `vanished` ids marked deleted,
        parents linked for folders listed after their content, indexed_at set."""
        loc_id, now = self.location_id, self._stamp
        with self.store.write() as conn:
            for i in range(0, len(vanished), CHUNK):
                part = vanished[i:i + CHUNK]
                conn.execute(f"UPDATE entries SET deleted = 1, last_seen = ? WHERE id IN "
                             f"({', '.join('?' * len(part))})", (now, *part))
            if vanished:
                _entries_written(conn, loc_id)
            _link_parents(conn, loc_id, self._first_new_id)
            conn.execute("UPDATE locations SET indexed_at = ? WHERE id = ?", (now, loc_id))


def _link_parents(conn, location_id: int, after_id: int | None) -> None:
    """As Catalog.link_parents: the parent of each entry inserted after `after_id` that has
    none yet (a folder written after its content), found by its path."""
    if after_id is not None:
        conn.execute(
            "UPDATE entries SET parent_id = (SELECT p.id FROM entries AS p WHERE "
            "p.location_id = entries.location_id AND p.path = substr(entries.path, 1, "
            "length(entries.path) - length(entries.name) - 1)) WHERE "
            "entries.location_id = ? AND entries.parent_id IS NULL AND "
            "length(entries.path) > length(entries.name) AND entries.id > ?",
            (location_id, after_id))


def _ids_of(conn, location_id: int, paths: list[str]) -> dict[str, int]:
    """The ids of those of `paths` the location has, by path."""
    out: dict[str, int] = {}
    for i in range(0, len(paths), CHUNK):
        part = paths[i:i + CHUNK]
        out.update(conn.execute(f"SELECT path, id FROM entries WHERE location_id = ? AND path "
                                f"IN ({', '.join('?' * len(part))})", (location_id, *part)))
    return out


def _entries_written(conn, location_id: int) -> None:
    """As Catalog.entries_written: a new token says the location's entries changed, in the
    transaction that changed them (the overview's kept counts of it are then stale)."""
    conn.execute("INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO "
                 "UPDATE SET value = excluded.value",
                 (f"{WRITES_KEY}{location_id}", os.urandom(16).hex()))


def _update_entries(conn, rows: list[dict]) -> None:
    """As Catalog.update_entries: by id (`b_id`), one statement per set of columns."""
    groups: dict[frozenset, list[dict]] = {}
    for row in rows:
        groups.setdefault(frozenset(row), []).append(row)
    for keys, group in groups.items():
        cols = sorted(k for k in keys if k != "b_id")
        sql = f"UPDATE entries SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?"
        conn.executemany(sql, [[_value(r[c]) for c in cols] + [r["b_id"]] for r in group])


def _value(v):
    return stamp(v) if isinstance(v, datetime) else v
