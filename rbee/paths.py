"""Where rbee keeps its state on disk (``RBEE_HOME``, default ``~/.rbee``)."""

from __future__ import annotations

import os
from pathlib import Path


def rbee_home() -> Path:
    """The state directory: ``$RBEE_HOME`` or ``~/.rbee``; created on first use."""
    home = Path(os.environ.get("RBEE_HOME") or Path.home() / ".rbee").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def models_dir() -> Path:
    """Downloaded and assembled GGUF files live here."""
    path = rbee_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
