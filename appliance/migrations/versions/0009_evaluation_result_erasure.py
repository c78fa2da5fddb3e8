"""Evaluations: a result file erased with its test file or one of its fine-tunes (when and why)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import appliance.db.base

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('result_erased_at', appliance.db.base.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('result_erased_reason', sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_column('result_erased_reason')
        batch_op.drop_column('result_erased_at')
