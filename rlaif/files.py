"""Atomic file writes: everything goes to a temporary name beside its target and is renamed when whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlaif.errors import RlaifError, first_line

TMP_MARK = ".tmp-"


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds ``path``, or would hold it (its nearest existing folder's)."""
    return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free


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


# What marks the output folder of each command (at its top), and the subfolder to suggest instead: one command's
# outputs per folder, so that no command's resume, --overwrite or input reading meets another's files
OUTPUTS = {"sample": ("run.json",), "train": ("train.json", "checkpoints"), "eval": ("eval.parquet",),
           "loop": ("loop.json",)}
SUBFOLDERS = {"sample": "samples", "train": "train", "eval": "eval", "loop": "loop"}


def check_out_dir(path: str | os.PathLike[str], option: str, command: str | None = None) -> None:
    """Refuse, before any work, an output folder that cannot be made: an existing file, a file among its
    parents, or a parent folder this user cannot write to; for ``command`` (sample, train, eval, loop), also a
    folder that holds another command's outputs or a model."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RlaifError(f"{option} {path} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise RlaifError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RlaifError(f"{option} {path}: {existing} is not writable")
    held = command and held_output(path, command)
    if held:
        raise RlaifError(f"{option} {path} holds {held}; give `rlaif {command}` a folder of its own, e.g. "
                         f"{path / SUBFOLDERS[command]}")


def held_output(path: Path, command: str | None = None) -> str | None:
    """What ``path`` holds of another command than ``command`` (``the output of `rlaif train` (train.json)``, a
    diffusers model), or None."""
    if not path.is_dir():
        return None
    found = [(other, marker) for other, markers in OUTPUTS.items() if other != command for marker in markers
             if (path / marker).exists()]
    if found:
        return f"the output of `rlaif {found[0][0]}` ({found[0][1]})"
    return "a diffusers model (model_index.json)" if (path / "model_index.json").exists() else None


def check_in_dir(path: str | os.PathLike[str], option: str) -> None:
    """Refuse, before any work, an input folder that does not exist."""
    if Path(path).is_file():
        raise RlaifError(f"{option} {path} is a file; give the folder that holds it, {Path(path).parent}")
    if not Path(path).is_dir():
        raise RlaifError(f"{option} {path} does not exist")


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


def file_identity(path: str | os.PathLike[str]) -> str:
    """A cheap identity of a file or folder: resolved path, sizes and modification times of its files (a file
    rewritten in place is a new identity; a hub snapshot's path holds its revision). Not a content hash: for
    tables and checkpoints of hundreds of GB, reading them whole would cost more than the work they guard."""
    path = Path(path)
    if not path.exists():  # not a file: a hub id, identified by name alone
        return str(path)
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def content_identity(path: str | os.PathLike[str]) -> str:
    """What identifies a checkpoint file or folder by its content alone (``weights_fingerprint``): no path or time,
    so every process and node, a copy, and a download raced by two processes name the same weights alike (a
    scorer's key must agree across ranks, or they disagree on what is left to score). A folder's hidden files
    (.git, a download's .cache metadata) are not its content."""
    path = Path(path)
    if not path.exists():  # not a file: a hub id, identified by name alone
        return str(path)
    return weights_fingerprint(_visible_files(path) if path.is_dir() else [path])


def _visible_files(folder: Path) -> list[Path]:
    """The files under ``folder``, sorted, but for hidden ones and those in hidden folders (.git, .cache)."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


HASHED_UP_TO = 32 * 2**20  # folder_identity hashes files up to this size whole, larger ones at both ends
_END = 2**20


def folder_identity(folder: Path, loaded_only: bool = False) -> str:
    """The identity of a model folder's content: each file by its path inside the folder, its size and a hash of
    its bytes (files up to 32 MiB: configs, tokenizers, small models, so a copy, a `touch` or a fresh clone is the
    same model), or for larger files (weights of GB, too costly to read whole) their modification time and a hash
    of their first and last MiB. Hidden files and folders (.git, a download cache's metadata) are not the model;
    with ``loaded_only`` neither are the files its pipeline does not load (``_loaded``)."""
    folder = folder.resolve()
    files = [(p, p.relative_to(folder).as_posix()) for p in _visible_files(folder)]
    return ";".join(f"{name}:{p.stat().st_size}:{_content_stamp(p)}" for p, name in files
                    if not loaded_only or _loaded(name))


def loaded_files_identity(identity: str) -> str:
    """An older record of a model folder's ``folder_identity``, which counted every file, as ``loaded_only`` gives
    it now; any other identity (a hub revision) as it is."""
    entries = [_ENTRY.match(entry) for entry in identity.split(";")]
    if not all(entries):
        return identity
    return ";".join(entry.group(0) for entry in entries if _loaded(entry["name"]))


def _loaded(name: str) -> bool:
    """Whether a model folder's file (its path inside the folder) is one its pipeline loads: model_index.json and
    the components' folders, not a README, a licence or a single-file checkpoint beside them."""
    return name == "model_index.json" or "/" in name


def _content_stamp(path: Path) -> str:
    """A file's bytes hashed (``b``HASH), or for a large one its modification time and its two ends' hash."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as handle:
        if size <= HASHED_UP_TO:
            digest.update(handle.read())
            return f"b{digest.hexdigest()}"
        digest.update(handle.read(_END))
        handle.seek(size - _END)
        digest.update(handle.read(_END))
    return f"{path.stat().st_mtime_ns}_{digest.hexdigest()}"


_SAMPLES = 64  # blocks of _SAMPLE bytes, evenly spaced, that weights_fingerprint hashes of a large file
_SAMPLE = 2**16


def weights_fingerprint(files: list[Path]) -> str:
    """What identifies weight files wherever they lie: each one's name, size and a hash of its bytes (whole up to
    HASHED_UP_TO, else its two ends and _SAMPLES blocks spread over it: 6 MiB of a 3 GB UNet), no path or time,
    so a copy, a clone or the hub cache's snapshot of the same weights give the same string."""
    def stamp(path: Path) -> str:
        size = path.stat().st_size
        if size <= HASHED_UP_TO:
            return _content_stamp(path)
        digest = hashlib.blake2b(digest_size=8)
        with open(path, "rb") as handle:
            for offset in (0, *range(_END, size - _END, (size - 2 * _END) // _SAMPLES or 1), size - _END):
                handle.seek(offset)
                digest.update(handle.read(_END if offset in (0, size - _END) else _SAMPLE))
        return f"s{digest.hexdigest()}"

    return ";".join(f"{p.name}:{p.stat().st_size}:{stamp(p)}" for p in sorted(files))


_ENTRY = re.compile(r"^(?P<name>.+):(?P<size>\d+):(?P<stamp>\w+)$")


def setting_change(key: str, then: Any, now: Any) -> str:
    """A changed setting in a few words, for a refusal to resume: ``key then -> now``, except for two
    ``file_identity`` / ``folder_identity`` values, which name the files added, removed or changed instead of
    printing both in full."""
    entries = [[_ENTRY.match(entry) for entry in value.split(";")] if isinstance(value, str) else [None]
               for value in (then, now)]
    if not all(all(entries_of) for entries_of in entries):
        return f"{key} {then!r} -> {now!r}"
    before, after = ({m["name"]: m.group(0) for m in entries_of} for entries_of in entries)
    if all(Path(name).is_absolute() for name in before) and not any(Path(name).is_absolute() for name in after):
        return (f"{key} (recorded by an older rlaif, which identified a model folder's files by their paths and "
                "times: finish with that rlaif, or start again in another --out)")
    differ = sorted(name for name in before.keys() & after.keys() if before[name] != after[name])
    parts = [(word, names) for word, names in (("changed", differ), ("added", sorted(after.keys() - before.keys())),
                                               ("removed", sorted(before.keys() - after.keys()))) if names]
    shown = "; ".join(f"{word}: {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
                      for word, names in parts)
    return f"{key} (files {shown})"


def changed_settings(then: dict, now: dict, keys: Iterable[str] | None = None) -> list[str]:
    """``setting_change`` for each of ``keys`` (default: every key of either) whose value differs between ``then``
    and ``now``: the list a refusal to resume or to replace names."""
    keys = dict.fromkeys([*then, *now]) if keys is None else keys
    return [setting_change(key, then.get(key), now.get(key)) for key in keys if then.get(key) != now.get(key)]


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporaries left by killed runs under ``folder``; return how many were removed."""
    removed = 0
    for path in folder.rglob(f".*{TMP_MARK}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
