"""Alembic environment: run with a connection handed in by db.schema.upgrade
(no alembic.ini needed). Batch mode so ALTERs work on SQLite."""
from alembic import context

from db.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
