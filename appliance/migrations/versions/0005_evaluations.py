"""Evaluations: models run on a test file and compared (issue 24)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import appliance.db.base

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('evaluations',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('file', sa.String(length=64), nullable=False),
    sa.Column('models', sa.JSON(), nullable=False),
    sa.Column('base_model', sa.String(length=128), nullable=False),
    sa.Column('samples', sa.Integer(), nullable=False),
    sa.Column('max_tokens', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=24), nullable=False),
    sa.Column('error', sa.JSON(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('results', sa.JSON(), nullable=False),
    sa.Column('result_file', sa.String(length=64), nullable=True),
    sa.Column('worker', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', appliance.db.base.UTCDateTime(), nullable=True),
    sa.Column('created_at', appliance.db.base.UTCDateTime(), nullable=False),
    sa.Column('started_at', appliance.db.base.UTCDateTime(), nullable=True),
    sa.Column('finished_at', appliance.db.base.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_evaluations_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations'))
    )
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evaluations_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluations_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluations_status'))
        batch_op.drop_index(batch_op.f('ix_evaluations_project_id'))
    op.drop_table('evaluations')
