"""Reading a study's results back: summary tables, attribution with intervals, comparisons, plots, report.
May import study (names, presets), db (through db.queries) and rd3core; never execution or the CLI."""
