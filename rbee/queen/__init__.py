"""`queen-rbee`: see DESIGN.md and the README."""
