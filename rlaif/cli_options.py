"""Typer options generated from a stage's config dataclass, so help texts and defaults live in one place."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer


def _field(config: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(config) if f.name == name)


def option(config: type, name: str, *flags: str) -> Any:
    """A ``typer.Option`` for field ``name`` of dataclass ``config``, with the field's help text."""
    spec = _field(config, name)
    flags = flags or (f"--{name.replace('_', '-')}",)
    return typer.Option(*flags, help=spec.metadata["help"], show_default=spec.default is not dataclasses.MISSING)


def argument(config: type, name: str) -> Any:
    """A positional ``typer.Argument`` for field ``name`` of ``config``, with the field's help text."""
    return typer.Argument(help=_field(config, name).metadata["help"], show_default=False)


def default(config: type, name: str) -> Any:
    """The default of field ``name`` of ``config`` (for the CLI function's signature)."""
    return _field(config, name).default
