"""Atomic file writes: everything goes to a temporary name beside its target and is renamed when whole."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(data: Any, target: str | os.PathLike[str]) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporaries left by killed runs under ``folder``; return how many were removed."""
    removed = 0
    for path in folder.rglob(f".*{TMP_MARK}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
