"""Where cq keeps its files: ``CQ_HOME`` (default ``~/.cq``)."""

from __future__ import annotations

import os
from pathlib import Path


def cq_home() -> Path:
    """The cq home folder: ``$CQ_HOME`` or ``~/.cq`` (always absolute)."""
    return Path(os.environ.get("CQ_HOME") or Path.home() / ".cq").expanduser().resolve()
