"""Entries carry a `corrupted` mark: what verify found (bit-rot under an unchanged size and
mtime), so that a sync repairs such a destination file and never copies such a reference.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NOT NULL with a default: every existing entry starts unmarked, in one statement
    # (SQLite adds such a column without rebuilding the table)
    op.add_column("entries", sa.Column("corrupted", sa.Boolean, nullable=False,
                                       server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("entries") as batch:
        batch.drop_column("corrupted")
