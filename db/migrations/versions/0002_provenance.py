"""attempts, provenance, artifacts, typed factors, faithful NaN

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Existing rows are kept and the new structures are filled from them: every
cell's factors get typed rows; every cell that ran (done, failed, running) gets
attempt 1 with its status, and its metrics and epochs point at that attempt.
Nothing unknown is invented: old attempts have no times, host or provenance,
and a NaN that schema 0001 already stored as NULL stays NULL (is_nan false).
"""
import sqlalchemy as sa
from alembic import op

from db.types import encode_factor

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STATUS = sa.Enum("pending", "running", "done", "failed", name="cellstatus", native_enum=False, length=16)
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "cell_factor",
        sa.Column("cell_id", sa.Integer(), sa.ForeignKey("cell.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("kind", sa.Enum("int", "float", "str", "bool", "null", "json", name="factorkind",
                                  native_enum=False, length=8), nullable=False),
        sa.Column("value_int", sa.BigInteger(), nullable=True),
        sa.Column("value_float", sa.Float(), nullable=True),
        sa.Column("value_str", sa.Text(), nullable=True),
        sa.Column("value_bool", sa.Boolean(), nullable=True),
    )
    op.create_table(
        "attempt",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("cell_id", sa.Integer(), sa.ForeignKey("cell.id", ondelete="CASCADE"), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("started_at", UTC, nullable=True),
        sa.Column("ended_at", UTC, nullable=True),
        sa.Column("heartbeat_at", UTC, nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("device", sa.String(64), nullable=True),
        sa.Column("error_type", sa.String(200), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.UniqueConstraint("cell_id", "number"),
    )
    op.create_index("ix_attempt_cell_id", "attempt", ["cell_id"])
    op.create_table(
        "provenance",
        sa.Column("attempt_id", sa.Integer(), sa.ForeignKey("attempt.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("git_commit", sa.String(64), nullable=True),
        sa.Column("git_dirty", sa.Boolean(), nullable=True),
        sa.Column("project_version", sa.String(64), nullable=True),
        sa.Column("python", sa.String(64), nullable=True),
        sa.Column("torch", sa.String(64), nullable=True),
        sa.Column("torchvision", sa.String(64), nullable=True),
        sa.Column("timm", sa.String(64), nullable=True),
        sa.Column("ray", sa.String(64), nullable=True),
        sa.Column("cuda", sa.String(32), nullable=True),
        sa.Column("gpu", sa.String(200), nullable=True),
        sa.Column("dataset_fingerprint", sa.String(128), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("env", sa.JSON(), nullable=False),
        sa.Column("recorded_at", UTC, nullable=False),
    )
    op.create_table(
        "artifact",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.UniqueConstraint("stage", "key", "path"),
    )
    op.create_table(
        "artifact_use",
        sa.Column("attempt_id", sa.Integer(), sa.ForeignKey("attempt.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("artifact_id", sa.Integer(), sa.ForeignKey("artifact.id", ondelete="CASCADE"), primary_key=True),
    )
    op.create_index("ix_artifact_use_artifact_id", "artifact_use", ["artifact_id"])
    for table, extra in (("metric", sa.Column("is_nan", sa.Boolean(), nullable=False, server_default=sa.false())),
                         ("epoch_metric", sa.Column("nan_fields", sa.String(200), nullable=True))):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("attempt_id", sa.Integer(), nullable=True))
            batch.add_column(extra)
            batch.create_foreign_key(f"fk_{table}_attempt_id_attempt", "attempt", ["attempt_id"], ["id"],
                                     ondelete="SET NULL")
            batch.create_index(f"ix_{table}_attempt_id", ["attempt_id"])
        # Redundant with the unique (cell_id, ...) index, and written on every result.
        op.drop_index(f"ix_{table}_cell_id", table_name=table)
    _backfill()


def _backfill() -> None:
    bind = op.get_bind()
    cell = sa.table("cell", sa.column("id", sa.Integer), sa.column("status", sa.String),
                    sa.column("factors", sa.JSON))
    factor = sa.table("cell_factor", *(sa.column(c) for c in
                                       ("cell_id", "name", "kind", "value_int", "value_float", "value_str",
                                        "value_bool")))
    attempt = sa.table("attempt", sa.column("cell_id"), sa.column("number"), sa.column("status"),
                       sa.column("id"))
    rows, attempts = [], []
    for cell_id, status, factors in bind.execute(sa.select(cell.c.id, cell.c.status, cell.c.factors)):
        for name, value in (factors or {}).items():
            encoded = encode_factor(value)
            rows.append({"cell_id": cell_id, "name": name, **encoded, "kind": encoded["kind"].value})
        if status != "pending":
            attempts.append({"cell_id": cell_id, "number": 1, "status": status})
    if rows:
        bind.execute(factor.insert(), rows)
    if attempts:
        bind.execute(attempt.insert(), attempts)
    for table in ("metric", "epoch_metric"):
        target = sa.table(table, sa.column("cell_id"), sa.column("attempt_id"))
        first = (sa.select(attempt.c.id).where(attempt.c.cell_id == target.c.cell_id, attempt.c.number == 1)
                 .scalar_subquery())
        bind.execute(target.update().values(attempt_id=first))


def downgrade() -> None:
    for table in ("epoch_metric", "metric"):
        op.create_index(f"ix_{table}_cell_id", table, ["cell_id"])
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_attempt_id")
            batch.drop_constraint(f"fk_{table}_attempt_id_attempt", type_="foreignkey")
            batch.drop_column("attempt_id")
            batch.drop_column("is_nan" if table == "metric" else "nan_fields")
    op.drop_table("artifact_use")
    op.drop_table("artifact")
    op.drop_table("provenance")
    op.drop_table("attempt")
    op.drop_table("cell_factor")
