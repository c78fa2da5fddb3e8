"""Hyperparameter search as a job (issue 24): a search job's spec and trials, a trial's search and number

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('search', sa.JSON(none_as_null=True), nullable=True))
        batch_op.add_column(sa.Column('search_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('trial_number', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_fine_tuning_jobs_search_id'), ['search_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fine_tuning_jobs_search_id'))
        batch_op.drop_column('trial_number')
        batch_op.drop_column('search_id')
        batch_op.drop_column('search')
