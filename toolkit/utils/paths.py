"""Where the toolkit keeps files it derives once and reuses (trained teachers, converted models)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$TOOLKIT_CACHE`, else `~/.cache/toolkit`."""
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "toolkit"))
