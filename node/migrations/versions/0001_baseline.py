"""Baseline: the tables of the store as they were before migrations (generated from node.store, then
frozen here: later revisions change the tables, never this file).

It also adopts a store made before migrations existed (no ``alembic_version``): tables it lacks are
created, nullable columns it lacks are added, and its rows stay as they are.

Revision ID: 0001
Revises: -
Created: 2026-12-04 07:23:50.033104
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

_META = sa.MetaData()
TABLES = [
    sa.Table(
        'events', _META,
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('detail', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.Index('ix_events_study_instance_uid', 'study_instance_uid'),
    ),
    sa.Table(
        'heartbeats', _META,
        sa.Column('component', sa.String(length=32), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('detail', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('component'),
    ),
    sa.Table(
        'instances', _META,
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
        sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('bytes', sa.Integer(), nullable=False),
        sa.Column('calling_ae_title', sa.String(length=16), nullable=False),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('sop_instance_uid'),
        sa.Index('ix_instances_study_instance_uid', 'study_instance_uid'),
    ),
    sa.Table(
        'jobs', _META,
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('priority', sa.Integer(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('lease_owner', sa.String(length=64), nullable=True),
        sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('result', sa.Text(), nullable=True),
        sa.Column('outbox', sa.Text(), nullable=True),
        sa.Column('delivered', sa.Text(), nullable=False),
        sa.Column('send_attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('trigger', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.Index('ix_jobs_state', 'state'),
        sa.Index('ix_jobs_study_instance_uid', 'study_instance_uid'),
    ),
    sa.Table(
        'notifications', _META,
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('channel', sa.String(length=16), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('payload', sa.Text(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.Index('ix_notifications_job_id', 'job_id'),
        sa.Index('ix_notifications_state', 'state'),
    ),
    sa.Table(
        'studies', _META,
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('instances', sa.Integer(), nullable=False),
        sa.Column('first_received_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_received_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('urgent', sa.Boolean(), nullable=False),
        sa.Column('wait_started_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('study_instance_uid'),
    ),
]


def upgrade() -> None:
    bind = op.get_bind()
    have = sa.inspect(bind)
    for table in TABLES:
        if not have.has_table(table.name):
            table.create(bind)
            continue
        present = {c["name"] for c in have.get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in present]
        if any(not c.nullable for c in missing):
            raise RuntimeError(f"table {table.name} of this store lacks required columns "
                               f"{[c.name for c in missing if not c.nullable]}: not a petriage store")
        with op.batch_alter_table(table.name) as batch:
            for column in missing:
                batch.add_column(sa.Column(column.name, column.type, nullable=True))


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table.name)
