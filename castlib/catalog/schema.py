"""The catalog's tables: storage nodes, locations, entries (materialised paths), runs."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer,
                        String, Text, UniqueConstraint, false)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Paths compare byte-wise on every database: PostgreSQL's default collations would
# otherwise order "a/b" and "a-b" by locale rules and break prefix (subtree) ranges.
PathText = Text().with_variant(Text(collation="C"), "postgresql")
# 64-bit ids on PostgreSQL; SQLite's INTEGER PRIMARY KEY is already 64-bit and must stay
# plain INTEGER to be the rowid alias.
Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class StorageNode(Base):
    """A storage service: one scheme on one host (a DAQ machine's disk, an EOS instance)."""

    __tablename__ = "nodes"
    __table_args__ = (UniqueConstraint("scheme", "host", name="uq_nodes_scheme_host"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scheme: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(String(255))


class Location(Base):
    """A named root URL on a node: the unit that is indexed, diffed and synced."""

    __tablename__ = "locations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))
    url: Mapped[str] = mapped_column(PathText, unique=True)   # canonical, credential-free
    root_path: Mapped[str] = mapped_column(PathText)
    name: Mapped[str | None] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    indexed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Entry(Base):
    """A file, folder or link at a location, by its path relative to the location root.

    `path` is the materialised path ("run1/cdr01001.dat"): a subtree is a range query on
    it. Names that are not valid UTF-8 are stored escaped (see catalog.paths).
    Checksums are kept per algorithm and trusted while size and mtime stay unchanged.
    A vanished entry is marked deleted, not removed, so history survives.
    `corrupted` is set by verify when a file's bytes no longer match its checksum while its
    size and mtime are unchanged (bit-rot); the checksum kept is the good one. A sync
    replaces such a destination file and never copies such a reference file; see
    stages/index.py for what clears the mark.
    `last_seen` is written when an entry is created, changed or found vanished; a live
    entry was also seen by every later listing of its location (`locations.indexed_at`),
    which is not copied into each row (Catalog.entries gives the later of the two).
    """

    __tablename__ = "entries"
    __table_args__ = (
        UniqueConstraint("location_id", "path", name="uq_entries_location_path"),
        Index("ix_entries_parent", "parent_id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    location_id: Mapped[int] = mapped_column(ForeignKey("locations.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(PathText)
    parent_id: Mapped[int | None] = mapped_column(Id)
    name: Mapped[str] = mapped_column(PathText)
    kind: Mapped[str] = mapped_column(String(1))          # f, d, l
    size: Mapped[int | None] = mapped_column(BigInteger)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    mode: Mapped[int | None] = mapped_column(Integer)
    link_target: Mapped[str | None] = mapped_column(Text)
    adler32: Mapped[str | None] = mapped_column(String(8))
    md5: Mapped[str | None] = mapped_column(String(32))
    sha256: Mapped[str | None] = mapped_column(String(64))
    online: Mapped[bool | None] = mapped_column(Boolean)   # False: on tape only
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    # a server default: the index's bulk insert names only the columns it fills
    corrupted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Run(Base):
    """One command or pipeline run, with its outcome."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    command: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str | None] = mapped_column(Text)
    args: Mapped[dict | None] = mapped_column(JSON)
    hostname: Mapped[str | None] = mapped_column(String(255))
    username: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # queued (sent to a worker), running, ok, failed, error, interrupted, died, cancelled
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    # a run on a worker (castlib.dispatch): the worker's sign of life, where its current
    # stage is (files, bytes, totals) for the client waiting, `castlib runs cancel`'s
    # request, and the broker's ids of its tasks (revoked on cancel)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # progress=None is SQL NULL (not JSON null), as the lean path writes it
    progress: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False,
                                                   server_default=false())
    tasks: Mapped[list | None] = mapped_column(JSON)


class StageResult(Base):
    """What one stage of a run did: its counts, bytes, errors and duration."""

    __tablename__ = "stage_results"
    __table_args__ = (Index("ix_stage_results_run", "run_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(64))
    stage_id: Mapped[str | None] = mapped_column(String(255))
    params: Mapped[dict | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    counts: Mapped[dict | None] = mapped_column(JSON)
    errors: Mapped[list | None] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    hostname: Mapped[str | None] = mapped_column(String(255))   # where it ran
    summary: Mapped[str | None] = mapped_column(Text)             # its closing line(s)


class Setting(Base):
    """A catalog-wide value by name, made once and shared by every host using the catalog:
    the key that tags castlib's temporary file names (see catalog.settings)."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


from .records import CHECKSUM_COLUMNS  # noqa: E402,F401  (one definition)
