"""The study language: a YAML file -> a validated Study -> its cells (factors, designs, resources, teachers).
May import rd3core and db only; nothing of execution, analysis or the CLI."""
