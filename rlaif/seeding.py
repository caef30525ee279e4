"""Per-image seeds: a pure function of (run seed, prompt text, candidate index)."""

from __future__ import annotations

import hashlib

import torch


def image_seed(run_seed: int, prompt: str, candidate: int) -> int:
    """A 63-bit seed that depends only on its arguments, never on batch position, rank or resume point."""
    digest = hashlib.sha256(f"{run_seed}\x00{candidate}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``; CPU noise is identical on every device the model runs on."""
    return torch.Generator("cpu").manual_seed(seed)


def keyed_seed(*key: object) -> int:
    """A 63-bit seed that is a pure function of ``key`` (e.g. ("noise", run seed, pair position))."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & (2**63 - 1)
