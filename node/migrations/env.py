"""Alembic environment for the node's store: run in-process by node.store.migrate, on the connection
it hands over (``config.attributes["connection"]``), against the tables defined in node.store."""

from __future__ import annotations

from alembic import context

from node.store import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=True)  # SQLite changes tables by copying them; PostgreSQL alters in place
with context.begin_transaction():
    context.run_migrations()
