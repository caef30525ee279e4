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
from typing import IO

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
    handle, holder = _take(out, command) if state.is_main_process else (None, None)
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
        if handle is not None:
            handle.close()  # releases the lock


def lock_file(out: Path) -> Path:
    """Where the lock of output ``out`` lives: in this machine's temporary folder, so that a refused command makes
    nothing in ``out`` and --no-cache nothing in the cache."""
    user = os.getuid() if hasattr(os, "getuid") else 0
    return (Path(tempfile.gettempdir()) / f"rlaif-locks-{user}"
            / f"{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:24]}.lock")


def _take(out: Path, command: str) -> tuple[IO[str] | None, str | None]:
    """(the open lock file, None) when this process now holds ``out``; (None, who holds it) when another does;
    (None, None) where no lock can be taken (no fcntl, a cache that cannot be written): then nothing is checked."""
    if fcntl is None:
        return None, None
    path = lock_file(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError:
        return None, None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "command"
        handle.close()
        return None, holder
    except OSError:  # no locks on this file system (ENOLCK on some NFS mounts)
        handle.close()
        return None, None
    with contextlib.suppress(OSError):  # who holds it, for the refusal of the next: a full disk only loses that
        handle.seek(0)
        handle.truncate()
        handle.write(f"{command} (process {os.getpid()} on {socket.gethostname()})")
        handle.flush()
    return handle, None
