"""per-epoch train accuracy and distillation temperature

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

The training loop reports both every epoch; schema 0002 dropped them. Existing
epoch rows keep every value and get NULL here: nothing unknown is invented.
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = ("train_top1", "temperature")


def upgrade() -> None:
    with op.batch_alter_table("epoch_metric") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("epoch_metric") as batch:
        for name in COLUMNS:
            batch.drop_column(name)
