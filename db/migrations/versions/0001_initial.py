"""initial schema: study, cell, metric, epoch_metric

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("spec_text", sa.Text(), nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "cell",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("study.id", ondelete="CASCADE"), nullable=False),
        sa.Column("cell_key", sa.String(32), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("factors", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.Enum("pending", "running", "done", "failed", name="cellstatus",
                                    native_enum=False, length=16), nullable=False),
        sa.UniqueConstraint("study_id", "cell_key"),
    )
    op.create_index("ix_cell_study_id", "cell", ["study_id"])
    op.create_table(
        "metric",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("cell_id", sa.Integer(), sa.ForeignKey("cell.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.UniqueConstraint("cell_id", "name"),
    )
    op.create_index("ix_metric_cell_id", "metric", ["cell_id"])
    op.create_table(
        "epoch_metric",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("cell_id", sa.Integer(), sa.ForeignKey("cell.id", ondelete="CASCADE"), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("lr", sa.Float(), nullable=True),
        sa.Column("test_top1", sa.Float(), nullable=True),
        sa.Column("heldout_top1", sa.Float(), nullable=True),
        sa.Column("time_s", sa.Float(), nullable=True),
        sa.UniqueConstraint("cell_id", "epoch"),
    )
    op.create_index("ix_epoch_metric_cell_id", "epoch_metric", ["cell_id"])


def downgrade() -> None:
    op.drop_table("epoch_metric")
    op.drop_table("metric")
    op.drop_table("cell")
    op.drop_table("study")
