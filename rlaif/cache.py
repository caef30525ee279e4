"""Where rlaif keeps what it downloads or builds once: ``$RLAIF_CACHE`` or ``~/.cache/rlaif``."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from rlaif.errors import RlaifError
from rlaif.files import atomic_path


def cache_dir() -> Path:
    """The cache root; ``RLAIF_CACHE`` overrides ``$XDG_CACHE_HOME/rlaif`` (default ``~/.cache/rlaif``)."""
    if os.environ.get("RLAIF_CACHE"):
        return Path(os.environ["RLAIF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rlaif"


def cached_download(url: str, name: str) -> Path:
    """Return the cached copy of ``url`` (as ``cache_dir()/downloads/name``), downloading it once."""
    target = cache_dir() / "downloads" / name
    if target.exists():
        return target
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(target) as tmp:
            tmp.write_bytes(response.read())
    except (urllib.error.URLError, OSError) as exc:
        raise RlaifError(f"cannot download {url} ({exc}); put the file at {target} to use it offline") from exc
    return target
