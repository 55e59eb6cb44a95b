"""`rbee-keeper`: see DESIGN.md and the README."""
