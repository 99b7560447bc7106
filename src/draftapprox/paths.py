"""Where draftapprox keeps what it downloads and converts."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir

CACHE_ENV = "DRAFTAPPROX_CACHE"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: the explicit override, else $DRAFTAPPROX_CACHE, else the platform's user cache dir."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path(user_cache_dir("draftapprox"))
