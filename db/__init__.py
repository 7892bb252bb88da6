"""db: the results database (schema, sessions, queries). Imports neither
rd3core nor orchestrator; analysis reads through db.queries only."""
