"""Alembic environment: migrations run on the connection castlib hands over."""
from alembic import context

from castlib.catalog.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - castlib always passes its connection
    raise RuntimeError("castlib migrations run through castlib.catalog.Catalog")

context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
