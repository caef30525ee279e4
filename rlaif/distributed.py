"""The one place rlaif asks accelerate which process it is.

accelerate treats torchrun's processes as a group only on an accelerator, or when told it runs on the
CPU; rlaif tells it so whenever no CUDA device is visible, so `torchrun --nproc_per_node N` shards the work
on CPU-only machines (gloo) exactly as on GPUs. Every caller must use this (accelerate's state is a
singleton: the first construction decides).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from accelerate import PartialState
from accelerate.utils import gather_object


def cpu_only() -> bool:
    """True when no CUDA device is visible (then processes talk over gloo)."""
    return not torch.cuda.is_available()


def process_state() -> PartialState:
    """This process's rank, world size and device (a single process is the world of one)."""
    return PartialState(cpu=cpu_only())


def same_on_every_process(value: Hashable) -> bool:
    """Whether every process holds ``value``: the same answer on all of them (a collective: all must ask)."""
    if process_state().num_processes == 1:
        return True
    return len(set(gather_object([value]))) == 1
