"""Where the project caches trained checkpoints, fetched posteriors and other derived files."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "BAYESRETRIEVAL_CACHE_DIR"


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the cache root.

    The root is ``$BAYESRETRIEVAL_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/bayesretrieval``
    or ``~/.cache/bayesretrieval``. Nothing here is ever committed to git.

    Args:
        *parts: sub-folder names below the root.

    Returns:
        The folder, created if missing.
    """
    root = os.environ.get(CACHE_ENV)
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        root = str(Path(xdg) / "bayesretrieval")
    folder = Path(root).joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
