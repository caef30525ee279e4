"""Run a Python training script or module with a clock on every optimizer step, the same way for any trainer.

    python bench/step_timer.py TIMES_FILE script.py ARGS...      (or: -m module ARGS...)

Appends one ``time.perf_counter()`` per optimizer step to TIMES_FILE (a global torch optimizer hook: nothing in
the trainer changes), so the official DiffusionDPO ``train.py`` and ``rlaif train`` are timed identically.
On a GPU it also writes TIMES_FILE.memory.json: the CUDA memory allocated just after the first optimizer step
(model, optimizer state, caches and that step's gradients resident) and the peak allocated from then to the
process's exit (later steps, final save). A step skipped by fp16's GradScaler calls no optimizer step and gets no
time: two steps then read as one interval.
"""

import atexit
import json
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def run_command(command: list[str]) -> None:
    """Run ``script.py ARGS...`` or ``-m module ARGS...`` in this process, as Python would from the command line
    (so that hooks installed here see its optimizer steps)."""
    if command[0] == "-m":
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    times, *command = sys.argv[1:]
    log = open(times, "a", buffering=1)  # noqa: SIM115 - open for the whole run
    memory: dict[str, int] = {}

    def stamp(*_) -> None:
        log.write(f"{time.perf_counter()}\n")
        if torch.cuda.is_available() and not memory:  # after step 1: reset the high-water mark
            memory["after_step_1"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def write_memory() -> None:
        if memory:
            memory["peak_after_step_1"] = torch.cuda.max_memory_allocated()
            with open(times + ".memory.json", "w") as file:
                json.dump(memory, file)

    register_optimizer_step_post_hook(stamp)
    atexit.register(write_memory)
    run_command(command)


if __name__ == "__main__":
    main()
