"""The first catalog schema: nodes, locations, entries, runs, stage results.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

PathText = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("scheme", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.UniqueConstraint("scheme", "host", name="uq_nodes_scheme_host"),
    )
    op.create_table(
        "locations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("node_id", sa.Integer, sa.ForeignKey("nodes.id"), nullable=False),
        sa.Column("url", PathText, nullable=False, unique=True),
        sa.Column("root_path", PathText, nullable=False),
        sa.Column("name", sa.String(255), unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("indexed_at", TS),
    )
    op.create_table(
        "entries",
        sa.Column("id", Id, primary_key=True),
        sa.Column("location_id", sa.Integer,
                  sa.ForeignKey("locations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("path", PathText, nullable=False),
        sa.Column("parent_id", Id),
        sa.Column("name", PathText, nullable=False),
        sa.Column("kind", sa.String(1), nullable=False),
        sa.Column("size", sa.BigInteger),
        sa.Column("mtime_ns", sa.BigInteger),
        sa.Column("mode", sa.Integer),
        sa.Column("link_target", sa.Text),
        sa.Column("adler32", sa.String(8)),
        sa.Column("md5", sa.String(32)),
        sa.Column("sha256", sa.String(64)),
        sa.Column("online", sa.Boolean),
        sa.Column("first_seen", TS, nullable=False),
        sa.Column("last_seen", TS, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.UniqueConstraint("location_id", "path", name="uq_entries_location_path"),
    )
    op.create_index("ix_entries_parent", "entries", ["parent_id"])
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("command", sa.String(64), nullable=False),
        sa.Column("pipeline", sa.Text),
        sa.Column("args", sa.JSON),
        sa.Column("hostname", sa.String(255)),
        sa.Column("username", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "stage_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("stage_id", sa.String(255)),
        sa.Column("params", sa.JSON),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("counts", sa.JSON),
        sa.Column("errors", sa.JSON),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
    )
    op.create_index("ix_stage_results_run", "stage_results", ["run_id"])


def downgrade() -> None:
    for table in ("stage_results", "runs", "entries", "locations", "nodes"):
        op.drop_table(table)
