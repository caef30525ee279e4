"""Read prompt lists from .txt, .csv, .tsv, .jsonl or .parquet files, or a named set shipped with rlaif
(``parti``, ``demo-train``, ``demo-eval``, ``shapes``: the files of the top-level ``data/`` folder)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import polars as pl

from rlaif.errors import RlaifError, first_line
from rlaif.tables import prompt_id

# Named prompt sets -> files of data/ (installed as the package rlaif.data; provenance in data/README.md).
PROMPT_SETS = {
    "parti": "PartiPrompts.tsv",  # google-research/parti, Apache-2.0 (data/LICENSE.parti)
    "demo-train": "demo_train_prompts.txt",  # the tiny world's 96 training scenes (`rlaif demo`)
    "demo-eval": "demo_eval_prompts.txt",  # its 48 held-out scenes
    "shapes": "shapes.txt",  # 8 scenes of the tiny world (bench/)
}
DEFAULT_COLUMNS = ("prompt", "Prompt", "caption")
SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
CATEGORY_COLUMNS = ("Category", "Challenge", "category")


def load_prompts(source: str, column: str | None = None, limit: int | None = None) -> list[str]:
    """Return the distinct, non-blank prompts of ``source`` in file order (``limit``: only that many, see
    ``load_prompt_table``).

    ``source`` is a file path or the name of a bundled set (``PROMPT_SETS``: ``parti`` is PartiPrompts.tsv).
    Tables take the ``column`` given, else the first of ``prompt``, ``Prompt``, ``caption`` that exists.
    """
    return load_prompt_table(source, column, limit)["prompt"].to_list()


def load_prompt_table(source: str, column: str | None = None, limit: int | None = None) -> pl.DataFrame:
    """The distinct prompts of ``source`` (see ``load_prompts``) as column ``prompt``, with the category columns
    the file has (PartiPrompts' ``Category`` and ``Challenge``), taken from each prompt's first row. ``limit``
    keeps that many, in file order: those whose text hashes lowest (``rlaif.tables.prompt_id``), a spread over
    the file rather than its first rows (PartiPrompts runs category by category), the same for every model and
    run."""
    table = _read_prompt_table(source, column)
    if limit is None or limit >= table.height:
        return table
    ids = pl.Series([prompt_id(text) for text in table["prompt"]], dtype=pl.String)
    return table.filter(ids.is_in(ids.sort().head(limit).implode()))


def _read_prompt_table(source: str, column: str | None) -> pl.DataFrame:
    path = prompt_set_path(source) if source in PROMPT_SETS else Path(source)
    if path.is_dir():
        raise RlaifError(f"prompts file {path} is a folder; give a file of prompts ({', '.join(SUFFIXES)})")
    if not path.is_file():
        raise RlaifError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise RlaifError(f"prompts file {path}: unsupported type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    if suffix == ".txt":
        if column is not None:  # one prompt per line: a column would be silently ignored
            raise RlaifError(f"--prompt-column {column!r}: prompts file {path} is plain text, one prompt per line; "
                             "it has no columns")
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: Notepad's byte-order mark is not text
        check_not_a_table(path, lines)
        table = pl.DataFrame({"prompt": lines}, schema={"prompt": pl.String})
    elif suffix == ".jsonl":
        table = pl.DataFrame({"prompt": _jsonl_prompts(path, column or "prompt")}, schema={"prompt": pl.String})
    else:
        raw = _read_table(path, suffix)
        categories = [c for c in CATEGORY_COLUMNS if c in raw.columns and c != column]
        table = pl.DataFrame({"prompt": _table_column(raw, path, column)}, schema={"prompt": pl.String})
        table = table.with_columns(raw.select(pl.col(c).cast(pl.String) for c in categories))
    table = (table.with_columns(pl.col("prompt").str.strip_chars()).filter(pl.col("prompt").str.len_chars() > 0)
             .unique("prompt", keep="first", maintain_order=True))
    if table.is_empty():
        raise RlaifError(f"prompts file {path} holds no prompts")
    return table


def check_not_a_table(path: Path, lines: list[str]) -> None:
    """Refuse a plain-text prompts file whose first line is a table's header (``prompt,category``): read one
    prompt per line, the header would be sampled as a prompt and every row with its other columns."""
    first = next((line.strip() for line in lines if line.strip()), "")
    names = [field.strip().strip('"') for field in re.split(r"[,\t]", first)]
    while len(names) > 1 and not names[-1]:  # a trailing separator
        names.pop()
    # a header names columns: its first is a prompt column's name, and every field is a name, without spaces
    # ("caption, a neon sign" is a prompt)
    if names[0].casefold() in {c.casefold() for c in DEFAULT_COLUMNS} and all(re.fullmatch(r"[\w.-]+", n)
                                                                             for n in names):
        kind = ".tsv" if "\t" in first else ".csv"
        raise RlaifError(f"prompts file {path}: its first line {first!r} is a table's header, and a .txt file is read "
                         f"one prompt per line; name it {kind} to read it as a table, or remove the header")


def prompt_set_path(name: str) -> Path:
    """The installed file of the bundled prompt set ``name`` (a key of ``PROMPT_SETS``)."""
    return data_dir() / PROMPT_SETS[name]


def data_dir() -> Path:
    """The project's data folder: the package ``rlaif.data`` when installed (a wheel or ``pip install -e``),
    else, for a source checkout imported without installing it, ``data/`` beside ``rlaif/``."""
    try:
        return Path(str(resources.files("rlaif.data")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "data"


def resolve_prompt_source(source: str, base: Path) -> str:
    """``source`` as given in a config file in folder ``base``: a bundled set's name or an absolute path stays
    as it is, a relative path is taken relative to ``base``."""
    if source in PROMPT_SETS or Path(source).is_absolute():
        return source
    return str(Path(base) / source)


def _read_table(path: Path, suffix: str) -> pl.DataFrame:
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        # PartiPrompts.tsv has unbalanced quotes inside prompts, so TSV is read without quoting.
        tsv = suffix == ".tsv"
        return pl.read_csv(path, separator="\t" if tsv else ",", quote_char=None if tsv else '"',
                           infer_schema=False)
    except Exception as exc:
        raise RlaifError(f"prompts file {path} cannot be read: {first_line(exc)}") from exc


def _table_column(table: pl.DataFrame, path: Path, column: str | None) -> list[str]:
    candidates = [column] if column else [c for c in DEFAULT_COLUMNS if c in table.columns]
    if not candidates or candidates[0] not in table.columns:
        wanted = repr(column) if column else " or ".join(repr(c) for c in DEFAULT_COLUMNS)
        plain = "; or, if it is a list of prompts, one per line, name it .txt" if len(table.columns) == 1 else ""
        header = table.columns[0] if len(table.columns) == 1 and path.suffix.lower() == ".csv" else ""
        first = str(table.item(0, 0)) if header and table.height else ""
        separator = next((mark for mark in (";", "\t", "|")  # as many fields in the first row as in the header
                          if mark in header and first.count(mark) == header.count(mark)), None)
        if separator is not None:  # one column whose name holds the real separator: "caption;notes"
            raise RlaifError(f"prompts file {path} reads as one column {table.columns[0]!r}: its fields seem separated "
                             f"by {separator!r}, and rlaif reads a .csv's by commas and a .tsv's by tabs; save it with "
                             f"commas (or tabs, as .tsv){plain}")
        raise RlaifError(
            f"prompts file {path} has no column {wanted} (columns: {', '.join(table.columns)}); "
            f"choose one with --prompt-column{plain}"
        )
    return table.get_column(candidates[0]).cast(pl.String).to_list()


def _jsonl_prompts(path: Path, key: str) -> list[str]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RlaifError(f"prompts file {path}, line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise RlaifError(f"prompts file {path}, line {number}: no string field {key!r} (name the field with "
                             "--prompt-column)")
        prompts.append(record[key])
    return prompts
