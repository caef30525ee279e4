"""Run a Python training script or module under torch.profiler for a few optimizer steps, the same way for any
trainer (as bench/step_timer.py times them): where does a step's time go, and is the GPU busy?

    python bench/step_profile.py REPORT_FILE [--steps FIRST:LAST] script.py ARGS...   (or: -m module ARGS...)

Profiles from the end of optimizer step FIRST to the end of step LAST (default 5:10) and writes REPORT_FILE: the
wall time of those steps, the time the GPU spent in kernels over them, and the operators ranked by their own
device time, their own CPU time and their total CPU time (the last shows waits such as a DataLoader's).
"""

import sys
import time

import torch
from step_timer import run_command  # bench/ is on the path when this runs as a script
from torch.autograd import DeviceType
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile


def report(prof: profile, steps: int, seconds: float) -> str:
    """The profile of ``steps`` optimizer steps that took ``seconds`` of wall time, as text."""
    averages = prof.key_averages()
    # the kernels' own events (as the table's "Self CUDA time total"): an operator's device time repeats theirs
    device = sum(event.self_device_time_total for event in averages if event.device_type != DeviceType.CPU) / 1e6
    lines = [f"{steps} steps, wall {seconds * 1000 / steps:.1f} ms/step, kernels {device * 1000 / steps:.1f} ms/step "
             f"(GPU busy {device / seconds:.0%})" if device else f"{steps} steps, wall {seconds * 1000 / steps:.1f} "
             "ms/step (no device activity)"]
    for key in (["self_device_time_total"] if device else []) + ["self_cpu_time_total", "cpu_time_total"]:
        lines += ["", f"by {key}:", averages.table(sort_by=key, row_limit=30, max_name_column_width=70)]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    path, *command = sys.argv[1:]
    first, last = 5, 10
    if command[0] == "--steps":
        first, last = map(int, command[1].split(":"))
        command = command[2:]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)
    state = {"step": 0}

    def hook(*_) -> None:
        state["step"] += 1
        if state["step"] in (first, last) and torch.cuda.is_available():
            torch.cuda.synchronize()  # the steps' kernels are done when their time is read
        if state["step"] == first:
            state["started"] = time.perf_counter()
            prof.start()
        elif state["step"] == last:
            seconds = time.perf_counter() - state["started"]
            prof.stop()
            with open(path, "w") as file:
                file.write(report(prof, last - first, seconds) + "\n")

    register_optimizer_step_post_hook(hook)
    run_command(command)


if __name__ == "__main__":
    main()
