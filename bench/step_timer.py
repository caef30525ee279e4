"""Run a Python training script or module with a clock on every optimizer step, the same way for any trainer.

    python bench/step_timer.py TIMES_FILE script.py ARGS...      (or: -m module ARGS...)

Appends one ``time.perf_counter()`` per optimizer step to TIMES_FILE (a global torch optimizer hook: nothing in
the trainer changes), so the official DiffusionDPO ``train.py`` and ``rlaif train`` are timed identically.
"""

import runpy
import sys
import time

from torch.optim.optimizer import register_optimizer_step_post_hook


def main() -> None:
    times, *command = sys.argv[1:]
    log = open(times, "a", buffering=1)  # noqa: SIM115 - open for the whole run
    register_optimizer_step_post_hook(lambda *_: log.write(f"{time.perf_counter()}\n"))
    if command[0] == "-m":
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main()
