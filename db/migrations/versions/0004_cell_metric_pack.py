"""each cell's metrics packed on its row, for reading whole studies fast

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

``results_frame`` reads a whole study at once: from the metric table that is
one row per metric (1.2 million for 100,000 cells of 12 metrics), and turning
rows into Python objects is what it costs. The cell row now carries a packed
copy of its metric rows (db.types.pack_metrics: the names as a JSON array,
the values as little-endian float64), written with them in one transaction,
so the read is one row per cell. The metric table stays the record that SQL
reads. Existing cells are packed here from their metric rows.
"""
import itertools

import sqlalchemy as sa
from alembic import op

from db.types import join_float, pack_metrics

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cell") as batch:
        batch.add_column(sa.Column("metric_names", sa.Text(), nullable=True))
        batch.add_column(sa.Column("metric_values", sa.LargeBinary(), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT cell_id, name, value, is_nan FROM metric ORDER BY cell_id"))
    update = sa.text("UPDATE cell SET metric_names = :names, metric_values = :vals WHERE id = :cid") \
        .bindparams(sa.bindparam("vals", type_=sa.LargeBinary()))
    batch = []
    for cell_id, group in itertools.groupby(rows, key=lambda r: r[0]):
        names, values = pack_metrics({name: join_float(value, bool(is_nan)) for _, name, value, is_nan in group})
        batch.append({"cid": cell_id, "names": names, "vals": values})
        if len(batch) == 10_000:
            conn.execute(update, batch)
            batch = []
    if batch:
        conn.execute(update, batch)


def downgrade() -> None:
    with op.batch_alter_table("cell") as batch:
        batch.drop_column("metric_values")
        batch.drop_column("metric_names")
