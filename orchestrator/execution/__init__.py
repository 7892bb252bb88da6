"""Running a study's cells: stage plan, artifact cache, Ray or in-process executors, workers, the recording driver.
May import study, analysis (the summary that ends a run), rd3core, db and ray; never the CLI."""
