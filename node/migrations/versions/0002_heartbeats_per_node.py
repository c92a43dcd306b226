"""Heartbeats per node: several nodes share one store, so a heartbeat row belongs to a node (its
configured name, by default the host name) and one of its components, not to the component alone.
Rows of a single-node store keep their data, with the host as the node's name.

Revision ID: 0002
Revises: 0001
Created: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.rename_table("heartbeats", "heartbeats_0001")
    op.create_table(
        "heartbeats",
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("component", sa.String(length=32), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("node", "component"),
    )
    op.execute("INSERT INTO heartbeats (node, component, host, pid, at, detail) "
               "SELECT host, component, host, pid, at, detail FROM heartbeats_0001")
    op.drop_table("heartbeats_0001")


def downgrade() -> None:
    op.rename_table("heartbeats", "heartbeats_0002")
    op.create_table(
        "heartbeats",
        sa.Column("component", sa.String(length=32), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("component"),
    )
    op.execute("INSERT INTO heartbeats (component, host, pid, at, detail) "  # the newest beat of each component
               "SELECT component, host, pid, at, detail FROM heartbeats_0002 AS h WHERE at = "
               "(SELECT MAX(at) FROM heartbeats_0002 WHERE component = h.component)")
    op.drop_table("heartbeats_0002")
