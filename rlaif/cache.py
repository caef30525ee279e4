"""Where rlaif keeps what it downloads or builds once: ``$RLAIF_CACHE`` or ``~/.cache/rlaif``; and the files it
fetches into the Hugging Face cache (``hub_file``)."""

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


# What lives under the cache root, by part: what `rlaif cache info` lists and `rlaif cache clear PART` removes.
CACHE_PARTS = {
    "latents": ("train/latents", "VAE latents of training images (per VAE and --cache-dtype)"),
    "text": ("train/text", "text-encoder outputs of training captions (per text encoders)"),
    "blocks": ("train/blocks", "row groups of remote pairs tables being trained on, shared by the machine's readers"),
    "relabel": ("relabel", "scores of `label --relabel` chunks (per table, scorer and chunk size)"),
    "models": ("models", "the tiny offline models built on first use"),
    "downloads": ("downloads", "files downloaded once (e.g. scorer heads)"),
}


def folder_size(folder: Path) -> tuple[int, int]:
    """(files, bytes) under ``folder`` (0, 0 when it does not exist)."""
    files = size = 0
    for root, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += (Path(root) / name).stat().st_size
    return files, size


def clear_cache(part: str | None) -> int:
    """Remove one part of the cache (or all of it); return the bytes freed."""
    import shutil

    if part is not None and part not in CACHE_PARTS:
        raise RlaifError(f"no cache part {part!r}; parts: {', '.join(CACHE_PARTS)}")
    folder = cache_dir() / CACHE_PARTS[part][0] if part else cache_dir()
    freed = folder_size(folder)[1]
    shutil.rmtree(folder, ignore_errors=True)
    return freed


def hub_file(repo: str, filename: str) -> str:
    """The local path of ``filename`` of hub model ``repo`` (``hf_hub_download``: the Hugging Face cache's copy,
    downloaded once); when it is neither cached nor downloadable, an error that names the file (huggingface_hub's
    own does not), with the hub's error as its cause for ``rlaif.errors.hub_unavailable`` to read."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download(repo, filename)
    except LocalEntryNotFoundError as exc:
        raise OSError(f"{filename} of {repo} is not in the local Hugging Face cache. {exc}") from exc
