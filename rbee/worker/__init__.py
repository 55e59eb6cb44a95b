"""`llm-worker-rbee`: see DESIGN.md and the README."""
