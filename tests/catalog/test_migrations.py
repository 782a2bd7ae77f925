"""Schema migrations: catalogs made by older castlibs open and upgrade with their data;
a catalog from a newer castlib is refused, never touched."""
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from castlib.catalog import Catalog
from castlib.catalog.database import HEAD_REVISION, MIGRATIONS, CatalogError, normalise_db_url
from tests.helpers import make_tree, run_cli

DATA = Path(__file__).with_name("data")


def _execute_script(db_url: str, sql: str) -> None:
    """Run an SQL script as the old castlib would have left the database."""
    engine = create_engine(normalise_db_url(db_url))
    try:
        if engine.dialect.name == "sqlite":
            raw = engine.raw_connection()
            raw.driver_connection.executescript(sql)
            raw.close()
        else:
            with engine.begin() as conn:
                conn.exec_driver_sql(sql)
    finally:
        engine.dispose()


def _dialect(db_url: str) -> str:
    return "sqlite" if db_url.startswith("sqlite") else "postgresql"


def test_head_revision_is_the_newest_migration_script():
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION


FIRST_SCHEMA_DATA = """
INSERT INTO nodes (id, scheme, host) VALUES (1, 'file', '');
INSERT INTO locations (id, node_id, url, root_path, name, created_at, indexed_at)
VALUES (1, 1, 'file:///data/run1', '/data/run1', 'daq', '2026-01-01 00:00:00', '2026-01-02 00:00:00');
INSERT INTO entries (id, location_id, path, parent_id, name, kind, size, mtime_ns, mode,
                     adler32, first_seen, last_seen, deleted)
VALUES (1, 1, 'sub', NULL, 'sub', 'd', NULL, 1700000000000000000, 493, NULL,
        '2026-01-01 00:00:00', '2026-01-01 00:00:00', {false}),
       (2, 1, 'sub/a.dat', 1, 'a.dat', 'f', 1234, 1700000000000000000, 420, '0a1b2c3d',
        '2026-01-01 00:00:00', '2026-01-01 00:00:00', {false}),
       (3, 1, 'gone.dat', NULL, 'gone.dat', 'f', 5, 1700000000000000000, 420, NULL,
        '2026-01-01 00:00:00', '2026-01-01 00:00:00', {true});
INSERT INTO runs (id, command, args, hostname, started_at, finished_at, status)
VALUES (1, 'index', '{{"location": "daq"}}', 'daq07', '2026-01-01 00:00:00', '2026-01-01 00:01:00', 'ok');
"""


def test_a_catalog_at_the_first_schema_upgrades_with_its_data(db_url):
    dialect = _dialect(db_url)
    schema = (DATA / f"schema_0001.{dialect}.sql").read_text()
    false, true = ("0", "1") if dialect == "sqlite" else ("false", "true")
    _execute_script(db_url, schema + FIRST_SCHEMA_DATA.format(false=false, true=true))
    if dialect == "postgresql":   # ids were given explicitly: move the sequences past them
        _execute_script(db_url, "SELECT setval('nodes_id_seq', 1); SELECT setval('locations_id_seq', 1);"
                                "SELECT setval('entries_id_seq', 3); SELECT setval('runs_id_seq', 1);")

    catalog = Catalog(db_url)
    try:
        assert catalog.upgraded_from == "0001"
        assert catalog.revision == HEAD_REVISION
        loc = catalog.find_location("daq")
        # the local location is on the host of the run that made it (0004)
        assert loc is not None and loc.url == "file://daq07/data/run1"
        live = list(catalog.entries(loc.id))
        assert [(e["path"], e["kind"], e["size"], e["adler32"], e["corrupted"]) for e in live] == [
            ("sub", "d", None, None, False), ("sub/a.dat", "f", 1234, "0a1b2c3d", False)]
        assert [e["path"] for e in catalog.entries(loc.id, include_deleted=True)
                if e["deleted"]] == ["gone.dat"]
        assert catalog.runs()[0]["args"] == {"location": "daq"}
        # and the upgraded catalog takes new records next to the old ones
        assert catalog.location("file://daq07/data/run2").id == 2
    finally:
        catalog.close()


def test_the_frozen_first_schema_is_what_migration_0001_creates(db_url):
    """Guards the test data itself: tables and columns of the frozen script equal those
    castlib's migration 0001 creates (run alone, on an empty database)."""
    from alembic import command
    from sqlalchemy import inspect

    def shape(url):
        engine = create_engine(normalise_db_url(url))
        try:
            insp = inspect(engine)
            return {t: sorted(c["name"] for c in insp.get_columns(t))
                    for t in insp.get_table_names()}
        finally:
            engine.dispose()

    engine = create_engine(normalise_db_url(db_url))
    try:
        with engine.begin() as conn:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
    finally:
        engine.dispose()
    made = shape(db_url)
    assert set(made) == {"alembic_version", "nodes", "locations", "entries", "runs", "stage_results"}
    schema = (DATA / f"schema_0001.{_dialect(db_url)}.sql").read_text()
    for table, columns in made.items():
        assert f"TABLE {table} (" in schema or f"TABLE public.{table} (" in schema
        for column in columns:
            assert column in schema


def test_a_catalog_from_a_newer_castlib_is_refused_and_left_alone(db_url, tmp_path):
    Catalog(db_url).close()
    engine = create_engine(normalise_db_url(db_url))
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()

    with pytest.raises(CatalogError, match="9999_future is newer than this castlib"):
        Catalog(db_url)
    r = run_cli("locations", db=db_url)
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and "9999_future" in err[0] and "Traceback" not in r.stderr

    engine = create_engine(normalise_db_url(db_url))
    with engine.connect() as conn:   # nothing dropped, nothing restamped
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "9999_future"
        assert conn.execute(text("SELECT count(*) FROM entries")).scalar() == 0
    engine.dispose()


def test_db_upgrade_and_info_commands(db_url, tmp_path):
    r = run_cli("db", "upgrade", db=db_url, check=0)
    assert f"upgraded from empty to {HEAD_REVISION}" in r.stdout
    r = run_cli("db", "upgrade", db=db_url, check=0)
    assert f"newest schema, {HEAD_REVISION}" in r.stdout

    src = make_tree(tmp_path / "src", {"a.dat": b"aaa", "d/b.dat": b"bb"})
    run_cli("index", str(src), db=db_url, check=0)
    info = run_cli("db", "info", db=db_url, check=0).stdout
    assert f"schema version: {HEAD_REVISION}" in info
    assert "locations: 1" in info
    assert "live files: 2" in info
    assert "entries: 3" in info          # two files and a folder
    size_line = next(l for l in info.splitlines() if l.startswith("size:"))
    assert int(size_line.split()[1]) > 0   # bytes on disk (file or pg_database_size)


def test_migrations_from_an_empty_database_give_the_schema_a_new_catalog_gets(db_url):
    """A new catalog is made from the models (no Alembic run); one made by running every
    migration must be the same schema: tables, columns, types, indexes, constraints."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from castlib.catalog.database import run_migrations
    from castlib.catalog.schema import Base

    engine = create_engine(normalise_db_url(db_url))
    try:
        with engine.begin() as conn:
            assert run_migrations(conn, None) == HEAD_REVISION
        with engine.connect() as conn:
            differences = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert differences == []
    finally:
        engine.dispose()


def _catalog_at(db_url: str, revision: str) -> None:
    """An empty catalog as the castlib of `revision` made it."""
    from alembic import command

    engine = create_engine(normalise_db_url(db_url))
    try:
        with engine.begin() as conn:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def test_local_locations_move_to_the_host_of_the_run_that_created_them(db_url, tmp_path,
                                                                       monkeypatch):
    """0004 on a catalog the code of 0003 filled: two machines indexed /data/cdr into one
    catalog and got ONE location (file:///data/cdr); a third folder was made by daq02
    later. Each local location gets the host of the latest run started before it was
    created; remote ones stay as they were; the entries stay with their location."""
    _catalog_at(db_url, "0003")
    false = "0" if _dialect(db_url) == "sqlite" else "false"
    _execute_script(db_url, f"""
INSERT INTO nodes (id, scheme, host) VALUES (1, 'file', ''), (2, 'root', 'eos.example.org');
INSERT INTO runs (id, command, hostname, started_at, status) VALUES
  (1, 'index', 'DAQ01', '2026-01-01 10:00:00', 'ok'),
  (2, 'sync', 'daq02', '2026-01-02 10:00:00', 'ok'),
  (3, 'index', 'not a host!', '2026-01-03 10:00:00', 'ok');
INSERT INTO locations (id, node_id, url, root_path, name, created_at) VALUES
  (1, 1, 'file:///data/cdr', '/data/cdr', 'cdr', '2026-01-01 10:00:01'),
  (2, 2, 'root://eos.example.org//eos/cdr', '/eos/cdr', NULL, '2026-01-02 10:00:01'),
  (3, 1, 'file:///data/other', '/data/other', NULL, '2026-01-02 10:00:02'),
  (4, 1, 'file:///scratch', '/scratch', NULL, '2026-01-03 10:00:01'),
  (5, 1, 'file:///early', '/early', NULL, '2025-12-31 00:00:00');
INSERT INTO entries (id, location_id, path, name, kind, size, first_seen, last_seen, deleted)
VALUES (1, 3, 'a.dat', 'a.dat', 'f', 3, '2026-01-02 10:00:03', '2026-01-02 10:00:03', {false});
""")
    if _dialect(db_url) == "postgresql":   # ids were given explicitly: move the sequences past them
        _execute_script(db_url, "SELECT setval('nodes_id_seq', 2); SELECT setval('runs_id_seq', 3);"
                                "SELECT setval('locations_id_seq', 5); SELECT setval('entries_id_seq', 1);")
    monkeypatch.setenv("CASTLIB_HOSTNAME", "migrator")
    catalog = Catalog(db_url)
    try:
        assert catalog.upgraded_from == "0003"
        urls = {r["id"]: r["url"] for r in catalog.locations()}
        assert urls == {1: "file://daq01/data/cdr", 2: "root://eos.example.org//eos/cdr",
                        3: "file://daq02/data/other",
                        4: "file://migrator/scratch",    # its run's host is no host name
                        5: "file://migrator/early"}      # no run before it
        assert [e["path"] for e in catalog.entries(3)] == ["a.dat"]
        # the host is the storage node: daq01's and daq02's disks are two nodes
        assert catalog.find_location("file://daq02/data/other").id == 3
        with catalog.engine.connect() as conn:
            nodes = set(conn.execute(text("SELECT scheme, host FROM nodes")).all())
        assert nodes == {("file", "daq01"), ("file", "daq02"), ("file", "migrator"),
                         ("root", "eos.example.org")}
        # and the same path indexed on another host now is another location
        assert catalog.location("file://daq02/data/cdr").id not in urls
    finally:
        catalog.close()
