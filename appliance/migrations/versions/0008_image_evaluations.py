"""Evaluations of image models (issue 24): the evaluation's kind, its generation settings and how fidelity was measured

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='llm', nullable=False))
        batch_op.add_column(sa.Column('images', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('fidelity', sa.JSON(), nullable=True))
        batch_op.alter_column('max_tokens', existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    op.execute("UPDATE evaluations SET max_tokens = 64 WHERE max_tokens IS NULL")
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.alter_column('max_tokens', existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column('fidelity')
        batch_op.drop_column('images')
        batch_op.drop_column('kind')
