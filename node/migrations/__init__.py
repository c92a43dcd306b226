"""Schema migrations of the node's store (Alembic; node.store.migrate runs them at start)."""
