"""Atomic file writes: everything goes to a temporary name beside its target and is renamed when whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlaif.errors import RlaifError, first_line

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


def check_out_dir(path: str | os.PathLike[str], option: str) -> None:
    """Refuse, before any work, an output folder that cannot be made: an existing file, a file among its
    parents, or a parent folder this user cannot write to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RlaifError(f"{option} {path} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise RlaifError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RlaifError(f"{option} {path}: {existing} is not writable")


def write_json(data: Any, target: str | os.PathLike[str]) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str], remedy: str) -> dict | None:
    """The JSON object that ``write_json`` wrote to ``path``; None when there is no such file. Anything else there
    (not JSON, not an object) is refused in one line that names the file and says ``remedy``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        return None
    except ValueError as exc:  # not JSON, or not UTF-8; a permission fault stays an OSError, reported as such
        raise RlaifError(f"{path} is not a record rlaif wrote ({first_line(exc)}); {remedy}") from exc
    if not isinstance(data, dict):
        raise RlaifError(f"{path} is not a record rlaif wrote (a JSON {type(data).__name__}); {remedy}")
    return data


def publish(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes of any other output: libraries that
    write through private temporary files leave 0600, unreadable by the group that shares the results."""
    umask = os.umask(0)
    os.umask(umask)
    for entry in [Path(path), *(Path(path).rglob("*") if Path(path).is_dir() else [])]:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


HASHED_UP_TO = 32 * 2**20  # file_identity hashes files up to this size, and times larger ones


def file_identity(path: str | os.PathLike[str]) -> str:
    """A cheap identity of a file (by its resolved path) or a folder (by its files' paths inside it): for each file,
    its size and either a hash of its bytes (up to 32 MiB: configs, tokenizers, small models, so a copy, a touched
    file or a fresh clone is the same identity) or its modification time (larger files, rewritten in place, are a
    new identity: hashing weights and tables of hundreds of GB would cost more than the work they guard)."""
    path = Path(path)
    if not path.exists():  # not a file: a hub id, identified by name alone
        return str(path)
    path = path.resolve()
    if not path.is_dir():
        return _identity_entry(str(path), path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return ";".join(_identity_entry(p.relative_to(path).as_posix(), p) for p in files)


def _identity_entry(name: str, path: Path) -> str:
    size = path.stat().st_size
    stamp = hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest() if size <= HASHED_UP_TO \
        else f"t{path.stat().st_mtime_ns}"
    return f"{name}:{size}:{stamp}"


_ENTRY = re.compile(r"^(?P<name>.+):(?P<size>\d+):(?P<stamp>\w+)$")


def setting_change(key: str, then: Any, now: Any) -> str:
    """A changed setting in a few words, for a refusal to resume: ``key then -> now``, except for two
    ``file_identity`` values, which name the files added, removed or changed instead of printing both in full."""
    entries = [[_ENTRY.match(entry) for entry in value.split(";")] if isinstance(value, str) else [None]
               for value in (then, now)]
    if not all(all(entries_of) for entries_of in entries):
        return f"{key} {then!r} -> {now!r}"
    before, after = ({m["name"]: m.group(0) for m in entries_of} for entries_of in entries)
    differ = sorted(name for name in before.keys() & after.keys() if before[name] != after[name])
    parts = [(word, names) for word, names in (("changed", differ), ("added", sorted(after.keys() - before.keys())),
                                               ("removed", sorted(before.keys() - after.keys()))) if names]
    shown = "; ".join(f"{word}: {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
                      for word, names in parts)
    return f"{key} (files {shown})"


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporaries left by killed runs under ``folder``; return how many were removed."""
    removed = 0
    for path in folder.rglob(f".*{TMP_MARK}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
