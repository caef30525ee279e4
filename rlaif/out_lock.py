"""One rlaif command at a time per output. A second one writing into the same --out (a resume started while the
first still runs, say by the workers a killed torchrun launcher leaves running) interleaved its steps, logs and
checkpoints with the first's, and both finished as if alone."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from rlaif.distributed import process_state
from rlaif.errors import RlaifError

try:
    import fcntl
except ImportError:  # Windows: no lock (two runs into one folder are not told apart there)
    fcntl = None


@contextlib.contextmanager
def writing(out: Path, command: str) -> Iterator[None]:
    """Hold ``out`` while ``command`` runs: the main process locks it and tells every process whether it could;
    when another command holds it, every process stops with one line saying which and what to do."""
    state = process_state()
    held, holder = _take(out, command) if state.is_main_process else ([], None)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        holder = broadcast_object_list([holder])[0]
    if holder is not None:
        raise RlaifError(f"{out} is being written by another `rlaif {holder}`; wait for it to end, or stop it (the "
                         "workers of a killed torchrun or accelerate launcher go on running: stop them too), then run "
                         "this again")
    try:
        yield
    finally:
        for descriptor in held:
            os.close(descriptor)  # releases the locks


def lock_dir(out: Path) -> Path:
    """Where the lock of output ``out`` lives: in this machine's temporary folder, so that a refused command makes
    nothing in ``out`` and --no-cache nothing in the cache. A folder holding the lock file, both locked:
    systemd-tmpfiles' ageing skips a locked folder and what it holds (before 2023 it saw locks on folders only), so
    a run of weeks keeps its lock; the file's lock is the one that counts (NFS emulates flock with write locks,
    which a folder cannot take)."""
    user = os.getuid() if hasattr(os, "getuid") else 0
    name = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"rlaif-locks-{user}" / name


TRIES = 5  # a lock found taken is tried again this many times, 0.1 s apart: a probe holds it for an instant


def _take(out: Path, command: str) -> tuple[list[int], str | None]:
    """(the locked descriptors, None) when this process now holds ``out``; ([], who holds it) when another does;
    ([], None) where no lock can be taken (no fcntl, a temporary folder that cannot be written, no locks on its
    file system): then nothing is checked. An older rlaif's lock file beside the folder is taken too, so that its
    commands (a killed launcher's workers, say) are seen."""
    if fcntl is None:
        return [], None
    folder = lock_dir(out)
    held: list[int] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path in (folder / "lock", folder.with_name(f"{folder.name}.lock")):  # ours, then an older rlaif's
            if path.name == "lock" or path.exists():
                held.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
                if not _locked(held[-1]):
                    holder = _holder(folder if path.name == "lock" else path)
                    _close(held)
                    return [], holder
        with contextlib.suppress(OSError):  # the folder too, for systemd-tmpfiles' ageing: best effort
            held.append(os.open(folder, os.O_RDONLY))
            fcntl.flock(held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # no locks on this file system (ENOLCK on some NFS mounts), or no folder: nothing checked
        _close(held)
        return [], None
    with contextlib.suppress(OSError):  # who holds it, for the refusal of the next: a full disk only loses that
        (folder / "holder").write_text(f"{command} (process {os.getpid()} on {socket.gethostname()})")
    return held, None


def _locked(descriptor: int) -> bool:
    """Take ``descriptor``'s exclusive lock, trying again for a moment; False when another process keeps it."""
    for attempt in range(TRIES):
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < TRIES - 1:
                time.sleep(0.1)
    return False


def _close(descriptors: list[int]) -> None:
    for descriptor in descriptors:
        os.close(descriptor)


def held_by(out: Path) -> str | None:
    """Which rlaif command on this machine is writing ``out`` or a folder above it now (as ``train (process N on
    HOST)``; a loop holds its rounds' folders), if one is: a folder of checkpoints only is then a run still going,
    not one to resume."""
    if fcntl is None:
        return None
    for folder in (out, *out.resolve().parents):
        path = lock_dir(folder) / "lock"
        if not path.is_file():
            continue
        try:
            probe = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at once by the close below
        except BlockingIOError:
            return _holder(path.parent)
        except OSError:
            continue
        finally:
            os.close(probe)
    return None


def _holder(path: Path) -> str:
    """The command that holds lock folder ``path`` (or an older rlaif's lock file), as it wrote itself there."""
    try:
        return (path / "holder" if path.is_dir() else path).read_text().strip() or "command"
    except OSError:  # locked before it could say by whom
        return "command"
