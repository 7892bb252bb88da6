"""orchestrator: study (YAML -> cells) -> execution (stage graph -> Ray jobs -> results DB) -> analysis,
with the CLI (cli, query, __main__) on top; each room's __init__ says what it owns and may import."""
