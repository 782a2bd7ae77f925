"""Several hosts: local locations name their host (file://daq01/data), and runs carry
what a worker and the client waiting on it share (heartbeat, progress, a cancel request,
the broker's task ids); each stage records the host it ran on and its summary line.

A local location of an older catalog (file:///data) was created by a run on some machine:
the run that created it is the latest one started before the location was; its host is
that run's `hostname`. A location no run explains (made by a script through the API
before any run was recorded) gets the host that runs this migration.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""
import re

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*$")


def upgrade() -> None:
    op.add_column("runs", sa.Column("heartbeat_at", sa.DateTime(timezone=True)))
    op.add_column("runs", sa.Column("progress", sa.JSON))
    op.add_column("runs", sa.Column("cancel_requested", sa.Boolean, nullable=False,
                                    server_default=sa.false()))
    op.add_column("runs", sa.Column("tasks", sa.JSON))
    op.add_column("stage_results", sa.Column("hostname", sa.String(255)))
    op.add_column("stage_results", sa.Column("summary", sa.Text))
    _locations_get_their_host(op.get_bind())


def _locations_get_their_host(conn) -> None:
    from castlib.hosts import local_hostname

    meta = sa.MetaData()
    nodes = sa.Table("nodes", meta, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("scheme", sa.String), sa.Column("host", sa.String))
    locations = sa.Table("locations", meta, sa.Column("id", sa.Integer, primary_key=True),
                         sa.Column("node_id", sa.Integer), sa.Column("url", sa.Text),
                         sa.Column("created_at", sa.DateTime(timezone=True)))
    runs = sa.Table("runs", meta, sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("hostname", sa.String),
                    sa.Column("started_at", sa.DateTime(timezone=True)))
    local = conn.execute(sa.select(locations.c.id, locations.c.url, locations.c.created_at)
                         .where(locations.c.url.like("file:///%"))).all()
    if not local:
        return
    here = None
    node_ids: dict[str, int] = {}
    for loc_id, url, created_at in local:
        host = conn.execute(sa.select(runs.c.hostname)
                            .where(runs.c.started_at <= created_at,
                                   runs.c.hostname.is_not(None))
                            .order_by(runs.c.started_at.desc(), runs.c.id.desc())
                            .limit(1)).scalar()
        host = (host or "").strip().lower()
        if not _HOST_NAME.match(host):
            if here is None:
                here = local_hostname()
            host = here
        if host not in node_ids:
            found = conn.execute(sa.select(nodes.c.id).where(nodes.c.scheme == "file",
                                                             nodes.c.host == host)).scalar()
            if found is None:
                found = conn.execute(sa.insert(nodes).values(scheme="file", host=host)
                                     ).inserted_primary_key[0]
            node_ids[host] = found
        conn.execute(sa.update(locations).where(locations.c.id == loc_id).values(
            url="file://" + host + url[len("file://"):], node_id=node_ids[host]))
    # the host-less node of local storage names no machine: nothing may refer to it now
    conn.execute(sa.delete(nodes).where(
        nodes.c.scheme == "file", nodes.c.host == "",
        ~sa.exists().where(locations.c.node_id == nodes.c.id)))


def downgrade() -> None:
    # the host stays in the URLs: an older castlib reads file://daq01/data as a host it
    # refuses, which is the truth (it cannot tell whose disk /data is)
    with op.batch_alter_table("stage_results") as batch:
        batch.drop_column("summary")
        batch.drop_column("hostname")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("tasks")
        batch.drop_column("cancel_requested")
        batch.drop_column("progress")
        batch.drop_column("heartbeat_at")
