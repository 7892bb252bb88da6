"""orchestrator: studies -> cells -> stage graph -> Ray jobs -> results DB,
and the analysis that reads it back."""
