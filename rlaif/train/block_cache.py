"""Row groups of a remote pairs table kept on local disk while training reads them, shared by every DataLoader
worker and process of a machine. Each micro-batch draws its pairs from all the blocks of its shuffle window, so
without it every worker of every process fetched every row group: P x W times the table per epoch over the
network. With it a row group is fetched once per machine and read memory-mapped, so the workers also share one
copy of it in memory. Each machine keeps its own folder, also where the cache root is shared (an NFS home): a file
removed by one machine while another has it mapped would fault there."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from rlaif.errors import RlaifError
from rlaif.files import atomic_path

try:
    import fcntl
except ImportError:  # Windows, where a mapped file can be neither replaced nor removed: no cache (AVAILABLE)
    fcntl = None

AVAILABLE = fcntl is not None


@dataclass(frozen=True)
class BlockCache:
    """One table's row groups under ``folder``: at most ``keep`` of them, the oldest written removed first. A reader
    that finds a row group removed fetches it again, so ``keep`` trades disk for refetches, never correctness."""

    folder: Path
    keep: int

    def read(self, key: str, fetch: Callable[[], pa.Table]) -> pa.Table:
        """Row group ``key`` (a name unique to it in this table), memory-mapped from the cache; ``fetch`` reads it
        from the table, called by the first reader of the machine to ask while the others wait for its file."""
        path = self.folder / f"{_name(key)}.arrow"
        found = _mapped(path)
        if found is not None:
            return found
        with _locked(path.with_suffix(".lock")):
            found = _mapped(path)  # fetched by another reader while this one waited
            if found is not None:
                return found
            values = fetch()
            _write(path, values)
        self._evict()
        found = _mapped(path)
        return values if found is None else found  # None: others wrote `keep` more meanwhile and removed it

    def _evict(self) -> None:
        """Remove the oldest written row groups beyond ``keep`` (another reader may be removing them too)."""
        written = []
        for path in self.folder.glob("*.arrow"):
            try:
                written.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:
                continue
        for _, path in sorted(written)[:-self.keep]:
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the row groups kept (not the folder: another run on the same table may be reading through it)."""
        for path in [*self.folder.glob("*.arrow"), *self.folder.glob("*.lock")]:
            path.unlink(missing_ok=True)


def table_folder(root: Path, identity: str) -> Path:
    """This machine's folder under ``root`` of the table whose identity (its shards, at their commit or stamps) is
    ``identity``: a table changed upstream is another table, never served from the old one's row groups."""
    return root / f"{_name(identity)[:16]}-{socket.gethostname()}"


def _name(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _mapped(path: Path) -> pa.Table | None:
    """The row group in ``path``, memory-mapped (its pages shared by every process that maps it); None when it is
    not there, or not whole: a file is complete when it has its name (written under another, then renamed), but
    nothing is synced to disk, so after a power loss it may be empty; then it is removed, to be fetched again."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except FileNotFoundError:
        return None
    except pa.ArrowInvalid:
        path.unlink(missing_ok=True)
        return None


def _write(path: Path, values: pa.Table) -> None:
    try:
        with atomic_path(path) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, values.schema) as out:
                out.write_table(values)
            now = time.time_ns()  # the file system's own clock ticks coarser: files written together would tie
            os.utime(tmp, ns=(now, now))
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)
        raise RlaifError(f"cannot keep a row group of the remote pairs table under {path.parent} "
                         f"({'no space left' if full else exc}); free space there, or set RLAIF_CACHE to a folder "
                         "with room for a few shuffle windows of the table") from exc


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if need be, its folder too) across processes, released when the block
    ends. A lock file removed while held (``BlockCache.clear``) costs at most a row group fetched twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
