"""results for plain SQL: the ``results`` and ``results_<study>`` views

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

One row per cell with typed columns (study, method, seed, status, the main
metrics; per study, one column per factor), so plain SQL and BI tools read
results without the packed metric blob (db/views.py defines them).

The views are derived from the tables, so this step changes no table and
fills nothing: db.schema drops them before any migration step and creates
them with the running code when the schema reaches head, rows of every
revision included. Creating them here, with code that later revisions may
change, could fail on the way to a later head, and a later migration that
rebuilds a table they read (SQLite batch mode) or drops a column of it
(PostgreSQL) would trip over them. A database at this revision has them; code
older than it refuses the database, and a downgrade below it leaves none.
"""

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # db.schema creates the views at head (above)


def downgrade() -> None:
    pass  # db.schema dropped the views before this step
