"""Typer options generated from a stage's config dataclass, so help texts and defaults live in one place."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer


def option(config: type, name: str, *flags: str) -> Any:
    """A ``typer.Option`` for field ``name`` of dataclass ``config``: its help text, and required if no default."""
    spec = next(f for f in dataclasses.fields(config) if f.name == name)
    flags = flags or (f"--{name.replace('_', '-')}",)
    return typer.Option(*flags, help=spec.metadata["help"], show_default=spec.default is not dataclasses.MISSING)


def default(config: type, name: str) -> Any:
    """The default of field ``name`` of ``config`` (``...`` when the field is required)."""
    spec = next(f for f in dataclasses.fields(config) if f.name == name)
    return ... if spec.default is dataclasses.MISSING else spec.default
