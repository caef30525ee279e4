"""One rlaif command at a time per output. A second one writing into the same --out (a resume started while the
first still runs, say by the workers a killed torchrun launcher leaves running) interleaved its steps, logs and
checkpoints with the first's, and both finished as if alone."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
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
    held, holder = _take(out, command) if state.is_main_process else (None, None)
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
        if held is not None:
            os.close(held)  # releases the lock


def lock_dir(out: Path) -> Path:
    """Where the lock of output ``out`` lives: in this machine's temporary folder, so that a refused command makes
    nothing in ``out`` and --no-cache nothing in the cache. A folder, locked itself: systemd-tmpfiles' ageing skips
    a locked folder and what it holds (before 2023 it saw locks on folders only), so a run of weeks keeps its lock."""
    user = os.getuid() if hasattr(os, "getuid") else 0
    name = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"rlaif-locks-{user}" / name


def _take(out: Path, command: str) -> tuple[int | None, str | None]:
    """(the locked folder's descriptor, None) when this process now holds ``out``; (None, who holds it) when another
    does; (None, None) where no lock can be taken (no fcntl, a temporary folder that cannot be written): then
    nothing is checked."""
    if fcntl is None:
        return None, None
    path = lock_dir(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        held = os.open(path, os.O_RDONLY)
    except OSError:
        return None, None
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(held)
        return None, _holder(path)
    except OSError:  # no locks on this file system (ENOLCK on some NFS mounts)
        os.close(held)
        return None, None
    with contextlib.suppress(OSError):  # who holds it, for the refusal of the next: a full disk only loses that
        (path / "holder").write_text(f"{command} (process {os.getpid()} on {socket.gethostname()})")
    return held, None


def held_by(out: Path) -> str | None:
    """Which rlaif command on this machine is writing ``out`` now (as ``train (process N on HOST)``), if one is:
    a folder of checkpoints only is then a run still going, not one to resume."""
    path = lock_dir(out)
    if fcntl is None or not path.is_dir():
        return None
    try:
        probe = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at once by the close below
    except BlockingIOError:
        return _holder(path)
    except OSError:
        return None
    finally:
        os.close(probe)
    return None


def _holder(path: Path) -> str:
    """The command that holds lock folder ``path``, as it wrote itself there."""
    try:
        return (path / "holder").read_text().strip() or "command"
    except OSError:  # locked before it could say by whom
        return "command"
