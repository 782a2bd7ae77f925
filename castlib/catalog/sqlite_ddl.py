"""The SQLite catalog's schema as DDL, for the lean path (catalog.lite) to make a new
catalog without importing SQLAlchemy. Not a second definition: it is what the models of
catalog.schema make on SQLite (Base.metadata.create_all, then the alembic_version stamp of
database.create_schema), statement for statement, and tests/catalog/test_lite.py fails
the day the two differ. After a schema change, regenerate it with
`python -m castlib.catalog.sqlite_ddl` (prints the new text of this file's DDL)."""

DDL = (
    'CREATE TABLE nodes (\n\tid INTEGER NOT NULL, \n\tscheme VARCHAR(32) NOT NULL, \n\thost VARCHAR(255) NOT NULL, \n\tPRIMARY KEY (id), \n\tCONSTRAINT uq_nodes_scheme_host UNIQUE (scheme, host)\n)',
    'CREATE TABLE runs (\n\tid INTEGER NOT NULL, \n\tcommand VARCHAR(64) NOT NULL, \n\tpipeline TEXT, \n\targs JSON, \n\thostname VARCHAR(255), \n\tusername VARCHAR(255), \n\tpid INTEGER, \n\tstarted_at DATETIME NOT NULL, \n\tfinished_at DATETIME, \n\tstatus VARCHAR(16) NOT NULL, \n\terror TEXT, \n\theartbeat_at DATETIME, \n\tprogress JSON, \n\tcancel_requested BOOLEAN DEFAULT 0 NOT NULL, \n\ttasks JSON, \n\tPRIMARY KEY (id)\n)',
    'CREATE TABLE settings (\n\tname VARCHAR(64) NOT NULL, \n\tvalue TEXT NOT NULL, \n\tPRIMARY KEY (name)\n)',
    'CREATE TABLE locations (\n\tid INTEGER NOT NULL, \n\tnode_id INTEGER NOT NULL, \n\turl TEXT NOT NULL, \n\troot_path TEXT NOT NULL, \n\tname VARCHAR(255), \n\tcreated_at DATETIME NOT NULL, \n\tindexed_at DATETIME, \n\tPRIMARY KEY (id), \n\tFOREIGN KEY(node_id) REFERENCES nodes (id), \n\tUNIQUE (url), \n\tUNIQUE (name)\n)',
    'CREATE TABLE stage_results (\n\tid INTEGER NOT NULL, \n\trun_id INTEGER NOT NULL, \n\tposition INTEGER NOT NULL, \n\tstage VARCHAR(64) NOT NULL, \n\tstage_id VARCHAR(255), \n\tparams JSON, \n\tstatus VARCHAR(16) NOT NULL, \n\tcounts JSON, \n\terrors JSON, \n\tstarted_at DATETIME NOT NULL, \n\tfinished_at DATETIME, \n\thostname VARCHAR(255), \n\tsummary TEXT, \n\tPRIMARY KEY (id), \n\tFOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE\n)',
    'CREATE INDEX ix_stage_results_run ON stage_results (run_id)',
    'CREATE TABLE entries (\n\tid INTEGER NOT NULL, \n\tlocation_id INTEGER NOT NULL, \n\tpath TEXT NOT NULL, \n\tparent_id INTEGER, \n\tname TEXT NOT NULL, \n\tkind VARCHAR(1) NOT NULL, \n\tsize BIGINT, \n\tmtime_ns BIGINT, \n\tmode INTEGER, \n\tlink_target TEXT, \n\tadler32 VARCHAR(8), \n\tmd5 VARCHAR(32), \n\tsha256 VARCHAR(64), \n\tonline BOOLEAN, \n\tfirst_seen DATETIME NOT NULL, \n\tlast_seen DATETIME NOT NULL, \n\tdeleted BOOLEAN NOT NULL, \n\tcorrupted BOOLEAN DEFAULT 0 NOT NULL, \n\tPRIMARY KEY (id), \n\tCONSTRAINT uq_entries_location_path UNIQUE (location_id, path), \n\tFOREIGN KEY(location_id) REFERENCES locations (id) ON DELETE CASCADE\n)',
    'CREATE INDEX ix_entries_parent ON entries (parent_id)',
    'CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))',
)


def _from_models() -> tuple[str, ...]:
    """The DDL the models make, read back from a new in-memory catalog."""
    from sqlalchemy import create_engine

    from .database import create_schema

    engine = create_engine("sqlite://", future=True)
    with engine.begin() as conn:
        create_schema(conn)
        rows = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL "
                                    "ORDER BY rowid").all()
    engine.dispose()
    return tuple(r[0] for r in rows)


if __name__ == "__main__":
    for statement in _from_models():
        print(f"    {statement!r},")
