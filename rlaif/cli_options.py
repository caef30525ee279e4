"""Typer options generated from a stage's config dataclass, so help texts and defaults live in one place, and
config files (TOML) read onto the same dataclasses."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any

import typer

from rlaif.errors import RlaifError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _field(config: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(config) if f.name == name)


@functools.cache
def _hints(config: type) -> dict[str, Any]:
    """The resolved field types of ``config``: resolving them is slow, and typer asks for every option often."""
    return typing.get_type_hints(config)


EMPTY_PATH = "is empty (an unset shell variable?); give a path, or . for the working folder"
# text settings that name a file, folder or hub id: empty, "" would be the working folder (Path("").exists())
NAMED_SOURCES = frozenset({"pairs", "prompts", "eval_prompts", "model", "base"})


def nonempty_path(value: str | Path) -> Path:
    """A path option's value, refusing an empty one: typer reads "" as the working folder (".") itself, so
    ``--out "$OUT"`` with OUT unset would write there."""
    return Path(nonempty_text(value))


def nonempty_text(value: str | Path) -> str:
    """A file, folder or hub id option's value (``NAMED_SOURCES``), refusing an empty one, as ``nonempty_path``."""
    if not str(value).strip():
        raise typer.BadParameter(EMPTY_PATH)
    return str(value)


PATH_OPTION = {"parser": nonempty_path, "metavar": "<path>"}  # for a path option typer.Option makes directly


def _names_a_path(config: type, name: str) -> bool:
    hint = _hints(config)[name]
    return hint is Path or Path in typing.get_args(hint) or name in NAMED_SOURCES


def _path_parser(config: type, name: str) -> dict[str, Any]:
    """``parser=nonempty_path`` for a field typed ``Path`` or ``Path | None`` (``nonempty_text`` for the text
    fields of ``NAMED_SOURCES``), else nothing."""
    hint = _hints(config)[name]
    if hint is Path or Path in typing.get_args(hint):
        return {"parser": nonempty_path}
    return {"parser": nonempty_text} if name in NAMED_SOURCES else {}


def option(config: type, name: str, *flags: str) -> Any:
    """A ``typer.Option`` for field ``name`` of dataclass ``config``, with the field's help text. A list field
    is an option given once per value, shown as ``--flag VALUE`` (its help says "repeatable"); a boolean one is
    ``--flag/--no-flag``."""
    spec = _field(config, name)
    flag = f"--{name.replace('_', '-')}"
    if not flags and _hints(config)[name] is bool:  # both forms: a flag can undo a `true` of a --config file
        flag += f"/--{flag[5:]}" if name.startswith("no_") else f"/--no-{flag[2:]}"
    flags = flags or (flag,)
    repeated = typing.get_origin(_hints(config)[name]) is list
    path = _path_parser(config, name)
    return typer.Option(*flags, help=spec.metadata["help"] + (" Repeatable." if repeated else ""),
                        metavar=spec.metadata.get("metavar", "VALUE") if repeated
                        else "<path>" if path.get("parser") is nonempty_path else None,
                        show_default=spec.default is not dataclasses.MISSING and not repeated, **path)


def argument(config: type, name: str) -> Any:
    """A positional ``typer.Argument`` for field ``name`` of ``config``, with the field's help text."""
    return typer.Argument(help=_field(config, name).metadata["help"], show_default=False,
                          **_path_parser(config, name))


def default(config: type, name: str) -> Any:
    """The default of field ``name`` of ``config`` (for the CLI function's signature)."""
    return _field(config, name).default


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` (from TOML) as type ``hint`` (a config field's annotation), or a one-line error at ``where``."""
    choices = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for choice in choices:
        if choice is bool and isinstance(value, bool):
            return value
        if choice in (int, float) and isinstance(value, int | float) and not isinstance(value, bool):
            if choice is float or isinstance(value, int):
                return choice(value)
        if choice is str and isinstance(value, str):
            return value
        if choice is Path and isinstance(value, str):
            return Path(value)
        if typing.get_origin(choice) is list and isinstance(value, list):
            return [_coerce(item, typing.get_args(choice)[0], where) for item in value]
    names = " or ".join(getattr(c, "__name__", str(c)) for c in choices if c is not type(None))
    raise RlaifError(f"{where}: expected {names}, got {value!r}")


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML config file as a dict; an unreadable or malformed one is a one-line error."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))  # TOML is UTF-8 whatever the locale
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RlaifError(f"config file {path} cannot be read: {exc}") from exc


def read_settings(path: Path, config: type, section: str | None = None, unlisted: Collection[str] = ()
                  ) -> dict[str, Any]:
    """Settings for dataclass ``config`` from TOML file ``path`` (or its table ``section``), checked by name and
    type; paths stay as written (relative ones are relative to the working directory). ``unlisted``: settings
    not offered among the known names when a misspelling is reported (the caller sets them)."""
    data = read_toml(path)
    where = f"{path}" + (f" [{section}]" if section else "")
    if section is not None:
        data = data.get(section, {})
        if not isinstance(data, dict):
            raise RlaifError(f"{path}: {section} must be a [{section}] table of settings, got {data!r}")
    hints = typing.get_type_hints(config)
    unknown = sorted(set(data) - set(hints))
    table = next((name for name in unknown if isinstance(data[name], dict)), None)
    if table is not None and section is None:  # `rlaif loop`'s layout given to a single command
        raise RlaifError(f"{where}: settings go at the top level of a --config file, not in a [{table}] table (the "
                         "tables are `rlaif loop`'s layout)")
    if unknown:
        known = [name for name in hints if name not in unlisted]
        close = difflib.get_close_matches(unknown[0], known, n=1)
        if close:
            raise RlaifError(f"{where}: unknown setting {unknown[0]!r}; did you mean {close[0]!r}?")
        raise RlaifError(f"{where}: unknown setting {unknown[0]!r}; known: {', '.join(known)}")
    empty = next((name for name, value in data.items() if isinstance(value, str) and not value.strip()
                  and _names_a_path(config, name)), None)
    if empty is not None:  # as on the command line: "" would be the working folder
        raise RlaifError(f"{where} {empty}: {EMPTY_PATH}")
    return {name: _coerce(value, hints[name], f"{where} {name}") for name, value in data.items()}


def config_from_cli(config: type, ctx: typer.Context, values: dict[str, Any], config_file: Path | None) -> Any:
    """Build ``config`` from a command's parameter ``values``: settings from ``config_file`` fill every
    parameter not given on the command line (flags override the file); required fields must come from one. A
    value refused by ``check_values`` that came from the file is said to."""
    merged = {f.name: values[f.name] for f in dataclasses.fields(config)}
    from_file = []
    if config_file is not None:
        for name, value in read_settings(config_file, config).items():
            source = ctx.get_parameter_source(name)  # typer may vendor click: compare by name
            if getattr(source, "name", None) != "COMMANDLINE":
                merged[name] = value
                from_file.append(name)
    for spec in dataclasses.fields(config):
        if spec.default is dataclasses.MISSING and merged[spec.name] is None:
            flag = next((p.opts[0] if p.param_type_name == "option" else p.name.upper()
                         for p in ctx.command.params if p.name == spec.name), spec.name)
            raise RlaifError(f"missing {flag}: give it on the command line or in --config")
    built = config(**merged)
    unused = getattr(built, "inapplicable", dict)()
    dropped = [name for name in unused if name in from_file]
    if dropped:  # a recipe for another kind of run (DPO with LoRA) taken to --loss sft or --full: its extras go
        built = config(**(merged | {name: unused[name] for name in dropped}))
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in dropped)
        typer.echo(f"note: {flags} from --config {config_file} left out: unused with this run's --loss / --full",
                   err=True)
    try:
        built.check_values()
    except RlaifError as exc:  # a refusal of a value the user did not type names where it came from
        named = next((name for name in from_file if f"--{name.replace('_', '-')}" in str(exc)), None)
        if named is None:
            raise
        raise RlaifError(f"{exc} (--{named.replace('_', '-')} is set by --config {config_file})") from exc
    return built
