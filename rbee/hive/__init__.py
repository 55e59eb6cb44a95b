"""`rbee-hive`: see DESIGN.md and the README."""
