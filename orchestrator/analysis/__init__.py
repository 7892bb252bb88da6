"""Analysis of a study's results: summary tables, attribution, plots, report.
Reads the database only through db.queries."""
