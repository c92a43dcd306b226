"""Settings of the store as a whole; first: the mark of the storage root that belongs to it.

Every node that shares a store mounts the same storage root. The store keeps the identity written
into that root (``.petriage-storage``), so a node whose share is not mounted (an empty mount point
on its local disk) sees that the mark is missing and refuses to receive, instead of acknowledging
instances that no other node can read.

Revision ID: 0003
Revises: 0002
Created: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "settings",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("settings")
