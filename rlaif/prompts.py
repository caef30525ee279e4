"""Read prompt lists from .txt, .csv, .tsv, .jsonl or .parquet files, or the named set ``parti``."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from rlaif.cache import cached_download
from rlaif.errors import RlaifError

PARTI_URL = "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv"
DEFAULT_COLUMNS = ("prompt", "Prompt", "caption")
SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")


def load_prompts(source: str, column: str | None = None) -> list[str]:
    """Return the distinct, non-blank prompts of ``source`` in file order.

    ``source`` is a file path or ``parti`` (PartiPrompts.tsv, downloaded once and cached). Tables take the
    ``column`` given, else the first of ``prompt``, ``Prompt``, ``caption`` that exists.
    """
    path = cached_download(PARTI_URL, "PartiPrompts.tsv") if source == "parti" else Path(source)
    if not path.is_file():
        raise RlaifError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise RlaifError(f"prompts file {path}: unsupported type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    if suffix == ".txt":
        prompts = path.read_text(encoding="utf-8").splitlines()
    elif suffix == ".jsonl":
        prompts = _jsonl_prompts(path, column or "prompt")
    else:
        prompts = _table_column(_read_table(path, suffix), path, column)
    distinct = list(dict.fromkeys(p.strip() for p in prompts if p is not None and p.strip()))
    if not distinct:
        raise RlaifError(f"prompts file {path} holds no prompts")
    return distinct


def _read_table(path: Path, suffix: str) -> pl.DataFrame:
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        # PartiPrompts.tsv has unbalanced quotes inside prompts, so TSV is read without quoting.
        tsv = suffix == ".tsv"
        return pl.read_csv(path, separator="\t" if tsv else ",", quote_char=None if tsv else '"',
                           infer_schema=False)
    except Exception as exc:
        raise RlaifError(f"prompts file {path} cannot be read: {str(exc).splitlines()[0]}") from exc


def _table_column(table: pl.DataFrame, path: Path, column: str | None) -> list[str]:
    candidates = [column] if column else [c for c in DEFAULT_COLUMNS if c in table.columns]
    if not candidates or candidates[0] not in table.columns:
        wanted = repr(column) if column else " or ".join(repr(c) for c in DEFAULT_COLUMNS)
        raise RlaifError(
            f"prompts file {path} has no column {wanted} (columns: {', '.join(table.columns)}); "
            "choose one with --prompt-column"
        )
    return table.get_column(candidates[0]).cast(pl.String).to_list()


def _jsonl_prompts(path: Path, key: str) -> list[str]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RlaifError(f"prompts file {path}, line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise RlaifError(f"prompts file {path}, line {number}: no string field {key!r}")
        prompts.append(record[key])
    return prompts
