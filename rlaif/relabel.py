"""``rlaif label --relabel``: AI labels beside the human ones of a Pick-a-Pic style table of any size.

The table (a parquet file or a folder of shards) is read a chunk of rows at a time. Under accelerate/torchrun
each process reads and scores whole row groups of its own (a row group is the least a parquet reader reads), so
the processes read the table once between them. Each scorer's scores of a chunk are saved as they are made, keyed
by the table's files, the scorer's key and the chunk size, so a killed run loses at most one chunk per process and
its rerun scores only what is missing. The output is then written chunk by
chunk as row groups of one parquet file: no stage holds the table, its images or its scores whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from accelerate.utils import broadcast_object_list, gather_object

from rlaif.cache import cache_dir
from rlaif.config import LabelConfig
from rlaif.distributed import process_state
from rlaif.errors import RlaifError
from rlaif.files import TMP_MARK, atomic_path, free_bytes
from rlaif.label import (
    SCORER_KEYS,
    Progress,
    check_same_labelling,
    labelling_settings,
    load_scorers,
    pairs_out,
    score_here,
)
from rlaif.pairing import preference
from rlaif.scoring import parse_weights, weighted_names
from rlaif.tables import LABELLING_METADATA
from rlaif.train.pair_table import (
    DIFFERENT_COLUMN,
    check_caption_type,
    check_captions,
    checked_labels,
    different_images,
    image_cell,
    is_datasets_folder,
    is_text,
    local_identity,
    missing_images,
    open_parquet,
    parquet_files,
)

RELABEL_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
TYPED_METADATA = (b"huggingface", b"pandas")  # schema metadata that names column types (datasets, pandas read them)


@dataclass(frozen=True)
class Agreement:
    """How often the AI labels agree with the human ones, on pairs the humans did not call a tie, of two pictures (as
    `rlaif train` and `rlaif eval --pairs` leave out a pair of one picture twice); an AI tie there counts half, as a
    coin toss would (the rule of `rlaif eval --pairs`)."""

    pairs: int
    compared: int
    agree: int
    ai_ties: int
    ai_ties_compared: int  # AI ties among the compared pairs
    same_images: int  # pairs the humans did not call a tie, left out: one picture twice (are_different false)

    @property
    def accuracy(self) -> float:
        return (self.agree + self.ai_ties_compared / 2) / self.compared if self.compared else float("nan")


@dataclass(frozen=True)
class Chunk:
    """Rows ``first`` .. ``first + count - 1`` of one file of the table, inside one of its row groups: defined
    by the files' metadata alone, so every process agrees on the chunks without reading them."""

    number: int  # of the file
    file: str
    group: int
    first: int  # row in the file
    offset: int  # row in the row group
    count: int

    @property
    def name(self) -> str:
        """The chunk's score file name: which rows, so scores can never be matched to other rows."""
        return f"chunk-{self.number:05d}-{self.first:012d}-{self.count}.parquet"


def table_files(source: Path) -> tuple[list[str], pa.Schema]:
    """The parquet files of a relabel source (a file, or a folder of shards), checked for the columns, and the one
    schema of the output table that every shard casts to without loss (``_common_schema``)."""
    if not source.exists():
        raise RlaifError(f"table {source} does not exist")
    if is_datasets_folder(source):
        raise RlaifError(f"table {source} is a datasets.save_to_disk folder, and --relabel reads parquet: write it "
                         "as parquet first (datasets.load_from_disk(DIR).to_parquet(FILE), a DatasetDict by split)")
    files = parquet_files(source)
    schemas, absent = [], []
    for file in files:
        found = open_parquet(file).schema_arrow
        missing = [c for c in RELABEL_COLUMNS if c not in found.names]
        if missing:
            raise RlaifError(f"table {file} lacks column(s) {', '.join(missing)}")
        check_caption_type(found, file)  # `rlaif train` would refuse the output, after hours of scoring
        schemas.append(found)
        # the human labels, the captions, are_different and image paths, as `rlaif train` checks them, before any
        # scoring
        same = [DIFFERENT_COLUMN] if DIFFERENT_COLUMN in found.names else []
        paths = [column for column in ("jpg_0", "jpg_1") if is_text(found.field(column).type)]
        read = open_parquet(file).read(columns=["label_0", "caption", *same, *paths])
        checked_labels(read.column("label_0"), file, "label_0", 0,
                       missing_ok=True)  # a pair no human labelled: AI-labelled, left out of the agreement
        check_captions(read.column("caption"), file, 0)
        different_images(read, file)
        absent += missing_images(read, paths, np.ones(read.num_rows, dtype=bool), file, 0)
    if absent:  # met while scoring, they stopped the run there
        raise RlaifError(f"{len(absent)} images of table {source} do not exist (first: {absent[0]}); restore them, "
                         "or remove their rows, before relabelling")
    return files, _common_schema(files, schemas)


def _common_schema(files: list[str], schemas: list[pa.Schema]) -> pa.Schema:
    """The schema every shard's columns cast to without loss (the first shard's, its types widened where shards
    differ: ``_common_type``); shards with other column names, or types of another kind, are refused."""
    first = schemas[0]
    for file, schema in zip(files, schemas, strict=True):
        if sorted(schema.names) != sorted(first.names):
            raise RlaifError(f"table {file} has other columns than {files[0]}; the shards of one table must share "
                             "their columns")
    fields = []
    for name in first.names:
        kinds = [schema.field(name).type for schema in schemas]
        common = _common_type(kinds)
        if common is None:
            file, kind = next((file, kind) for file, kind in zip(files, kinds, strict=True) if kind != kinds[0])
            raise RlaifError(f"table {file}: column {name!r} holds {kind} where {files[0]} holds {kinds[0]}; the "
                             "shards of one table must share a schema (they may differ in the width of numbers, or "
                             "in how text or binary is stored); write them with one")
        fields.append(first.field(name).with_type(common).with_nullable(
            any(schema.field(name).nullable for schema in schemas)))
    metadata = dict(first.metadata or {})
    if any(field.type != first.field(field.name).type for field in fields):  # their types are the first shard's
        metadata = {key: value for key, value in metadata.items() if key not in TYPED_METADATA}
    return pa.schema(fields, metadata=metadata)


def _common_type(kinds: list[pa.DataType]) -> pa.DataType | None:
    """The type every value of all of ``kinds`` casts to exactly: the widest of one family (floats, signed or unsigned
    integers); a signed integer twice as wide as unsigned ones of under 64 bits; float64 for floats with integers
    of up to 32 bits; large_string for text, large_binary for binary. None for kinds no type holds exactly (64-bit
    integers beside floats, or uint64 beside signed ones), which are refused before any scoring."""
    types = pa.types
    if all(kind == kinds[0] for kind in kinds):
        return kinds[0]
    if all(is_text(kind) for kind in kinds):
        return pa.large_string()
    if all(types.is_binary(kind) or types.is_large_binary(kind) or str(kind) == "binary_view" for kind in kinds):
        return pa.large_binary()
    for family in (types.is_floating, types.is_signed_integer, types.is_unsigned_integer):
        if all(family(kind) for kind in kinds):
            return max(kinds, key=lambda kind: kind.bit_width)
    if not all(types.is_integer(kind) or types.is_floating(kind) for kind in kinds):
        return None
    integers = [kind.bit_width * (1 if types.is_signed_integer(kind) else 2)  # the signed width that holds it
                for kind in kinds if types.is_integer(kind)]
    if any(types.is_floating(kind) for kind in kinds):
        return pa.float64() if max(integers) <= 32 else None
    return pa.int64() if max(integers) <= 64 else None  # signed and unsigned: a signed type that holds both


def check_output_folder(out: Path) -> None:
    """Refuse, before any scoring, an output whose folder cannot be made or written in (found only when writing,
    after hours of scoring): a file is made and removed in its nearest existing folder."""
    folder = next(path for path in out.parents if path.exists())
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise RlaifError(f"-o {out}: cannot write in {folder} ({exc.strerror}); give -o a file in a folder you "
                         "can write") from exc


def check_output_space(out: Path, table_bytes: int) -> None:
    """Refuse, before any scoring, an output its disk cannot hold: it holds the table's images again, about the
    ``table_bytes`` of the source (found only when writing, it would come after hours of scoring). The temporary of
    a write that was killed counts as free: it is removed before writing."""
    free = free_bytes(out.parent) + sum(stale.stat().st_size for stale in _stale_outputs(out))
    if free < table_bytes:
        raise RlaifError(f"{out} will hold the table's images again, about {table_bytes / 2**30:.1f} GiB, but only "
                         f"{free / 2**30:.1f} GiB is free on its disk; give -o a folder on a disk with room")


def _stale_outputs(out: Path) -> list[Path]:
    """The temporaries of ``out`` left by runs killed while writing it."""
    return list(out.parent.glob(f".{out.name}{TMP_MARK}*"))


def chunks(files: list[str], rows: int) -> list[Chunk]:
    """The table's rows in chunks of at most ``rows``, each within one row group (a row group's last chunk may be
    shorter)."""
    found = []
    for number, file in enumerate(files):
        meta = open_parquet(file).metadata
        first = 0
        for group in range(meta.num_row_groups):
            size = meta.row_group(group).num_rows
            found += [Chunk(number, file, group, first + offset, offset, min(rows, size - offset))
                      for offset in range(0, size, rows)]
            first += size
    return found


def read_chunks(wanted: list[Chunk], rows: int, columns: list[str] | None = None) -> Iterator[tuple[Chunk, pa.Table]]:
    """The rows of each wanted chunk (only ``columns``, if given), in order, one chunk in memory at a time; row
    groups holding no wanted chunk are not read. A consumer must not open other parquet files between chunks:
    ``open_parquet`` may close the file this reads (it keeps the MAX_OPEN_FILES used last)."""
    groups: dict[tuple[str, int], dict[int, Chunk]] = {}
    for chunk in wanted:
        groups.setdefault((chunk.file, chunk.group), {})[chunk.offset] = chunk
    for (file, group), by_offset in groups.items():
        offset, last = 0, max(by_offset)
        for batch in open_parquet(file).iter_batches(batch_size=rows, row_groups=[group], columns=columns):
            if offset in by_offset:
                if batch.num_rows != by_offset[offset].count:
                    raise RlaifError(f"table {file} changed while it was read (row group {group})")
                yield by_offset[offset], pa.Table.from_batches([batch])
            offset += batch.num_rows
            if offset > last:
                break


def process_shares(wanted: list[Chunk], processes: int) -> list[list[Chunk]]:
    """Each process's chunks of ``wanted``, in table order: whole row groups, so that no row group is read by two
    processes, except a row group of more than a process's share of the rows (a table of fewer row groups than
    processes), which is cut into runs of consecutive chunks so that every process scores (a reader stops after its
    run); each unit, largest first, goes to the process with the fewest rows so far."""
    groups: dict[tuple[str, int], list[Chunk]] = {}
    for chunk in wanted:
        groups.setdefault((chunk.file, chunk.group), []).append(chunk)
    share = sum(chunk.count for chunk in wanted) / processes
    units = [unit for group in groups.values() for unit in _runs(group, share)]
    shares: list[list[Chunk]] = [[] for _ in range(processes)]
    loads = [0] * processes
    for unit in sorted(units, key=lambda unit: -sum(chunk.count for chunk in unit)):  # stable: table order in ties
        least = loads.index(min(loads))
        shares[least] += unit
        loads[least] += sum(chunk.count for chunk in unit)
    return [sorted(chunks, key=lambda chunk: (chunk.number, chunk.first)) for chunks in shares]


def _runs(group: list[Chunk], share: float) -> list[list[Chunk]]:
    """A row group's chunks whole, or, past ``share`` rows, in runs of consecutive chunks: those starting within
    the same ``share`` rows of the group form a run."""
    if sum(chunk.count for chunk in group) <= share:
        return [group]
    runs: dict[int, list[Chunk]] = {}
    start = 0
    for chunk in group:
        runs.setdefault(int(start // share), []).append(chunk)
        start += chunk.count
    return list(runs.values())


def _score_chunk(scorer, chunk: Chunk, rows: pa.Table, batch_size: int,
                 progress: Progress | None) -> tuple[str, list[float], list[float]]:
    """The chunk's score file name and the scores of both images of each of its pairs, scored in this process."""
    root = Path(chunk.file).parent  # as `rlaif train` reads them: paths relative to the table's folder
    names = [f"{chunk.file} row {chunk.first + i} jpg_{side}" for side in (0, 1) for i in range(rows.num_rows)]
    cells = rows.column("jpg_0").to_pylist() + rows.column("jpg_1").to_pylist()
    images = [image_cell(cell, root, name) for cell, name in zip(cells, names, strict=True)]
    captions = [c or "" for c in rows.column("caption").to_pylist()]
    values = score_here(scorer, images, names, captions * 2, batch_size, progress)
    return chunk.name, values[: rows.num_rows], values[rows.num_rows:]


def _save_scores(folder: Path, scored: list[tuple[str, list[float], list[float]]]) -> None:
    """Write each scored chunk's score file (atomically: a kill leaves a chunk saved whole or not at all)."""
    for name, score_0, score_1 in scored:
        with atomic_path(folder / name) as tmp:
            pl.DataFrame({"score_0": score_0, "score_1": score_1},
                         schema={"score_0": pl.Float64, "score_1": pl.Float64}).write_parquet(tmp)


AI_COLUMNS = ("ai_score_0", "ai_score_1", "ai_label_0", "ai_scorer")


def _ai_columns(chunk: Chunk, labels: pa.ChunkedArray, folders: dict[str, Path], weights: dict[str, float],
                combine: str) -> pl.DataFrame:
    """A chunk's AI columns (ai_score_0, ai_score_1, ai_label_0, ai_scorer) beside its human ``labels``: each
    scorer's two scores combined per pair (``preference``). The image columns are never needed."""
    ids = [str(i) for i in range(chunk.count)]
    parts = []
    for spec, folder in folders.items():
        scores = pl.read_parquet(folder / chunk.name)
        for side in (0, 1):
            parts.append(pl.DataFrame({"prompt_id": ids, "sample_id": [f"{i}:{side}" for i in ids], "scorer": spec,
                                       "score": scores[f"score_{side}"]}))
    value = dict(preference(pl.concat(parts), weights, combine).select("sample_id", "value").iter_rows())
    score_0 = pl.Series([value[f"{i}:0"] for i in ids], dtype=pl.Float64)
    score_1 = pl.Series([value[f"{i}:1"] for i in ids], dtype=pl.Float64)
    return pl.DataFrame({"ai_score_0": score_0, "ai_score_1": score_1}).with_columns(
        ai_label_0=pl.when(score_0 > score_1).then(1.0).when(score_0 < score_1).then(0.0).otherwise(0.5),
        ai_scorer=pl.lit("+".join(weighted_names(weights))),
        label_0=pl.from_arrow(labels).cast(pl.Float64))


def _agreement(labelled: pl.DataFrame, different: np.ndarray) -> Agreement:
    """The agreement of a chunk's AI labels with its human ones, on its pairs of ``different`` images
    (``different_images``)."""
    decided = pl.col("label_0").is_in([0.0, 1.0])
    labelled = labelled.with_columns(different=pl.Series(different, dtype=pl.Boolean))
    human = labelled.filter(decided & pl.col("different"))
    return Agreement(pairs=labelled.height, compared=human.height,
                     agree=human.filter(pl.col("ai_label_0") == pl.col("label_0")).height,
                     ai_ties=labelled.filter(pl.col("ai_label_0") == 0.5).height,
                     ai_ties_compared=human.filter(pl.col("ai_label_0") == 0.5).height,
                     same_images=labelled.filter(decided & ~pl.col("different")).height)


def _plus(a: Agreement, b: Agreement) -> Agreement:
    return Agreement(*(x + y for x, y in zip(astuple(a), astuple(b), strict=True)))


def run_relabel(config: LabelConfig, progress: Progress | None = None) -> tuple[Path, Agreement | None]:
    """Score both images of every pair of a Pick-a-Pic style table, write AI labels beside the human ones
    (``ai_score_0``, ``ai_score_1``, ``ai_label_0``, ``ai_scorer``; earlier AI columns are replaced) and measure
    agreement: the main process writes and measures, the others return None for it (the scores are saved in the
    main process's cache, which on a cluster may be on another machine).

    Several scorers vote per pair: each scorer's two scores become z-scores within the pair (+1 / -1, or
    0 for a tie), weighted and averaged, so ``ai_label_0`` is the weighted majority.
    """
    config.validate()
    weights = parse_weights(config.scorers)
    source = Path(config.relabel)
    files, schema = table_files(source)
    out = pairs_out(config)
    check_output_folder(out)
    labelling = labelling_settings(config)
    check_same_labelling(out, labelling)
    check_output_space(out, sum(os.path.getsize(file) for file in files))
    rows = max(1, config.chunk_size // 2)
    table_chunks = chunks(files, rows)
    total = 2 * sum(chunk.count for chunk in table_chunks)
    if not total:
        raise RlaifError(f"table {source} has no rows")
    identity = local_identity(files)
    state = process_state()
    folders: dict[str, Path] = {}
    keys: dict[str, str] = {}
    for scorer in load_scorers(config):
        keys[scorer.spec] = scorer.key
        key = hashlib.sha256(f"{identity}\0{scorer.key}\0{rows}".encode()).hexdigest()[:24]
        folder = folders[scorer.spec] = cache_dir() / "relabel" / key
        # the main process decides what is missing, so that every process deals out the same chunks
        todo = [[chunk for chunk in table_chunks if not (folder / chunk.name).exists()]]
        if state.num_processes > 1:
            todo = broadcast_object_list(todo)
        shares = process_shares(todo[0], state.num_processes)
        mine = read_chunks(shares[state.process_index], rows, ["caption", "jpg_0", "jpg_1"])
        done = total - 2 * sum(chunk.count for chunk in todo[0])
        for step in range(max(map(len, shares))):  # in step: each process scores one chunk, the main one saves all
            now = [share[step] for share in shares if step < len(share)]
            # the main process's chunk, when it holds one, stands for all of this step's
            shown = progress and (lambda spec, n, _, done=done, now=now: progress(
                spec, done + min(n * len(now), 2 * sum(c.count for c in now)), total))
            scored = []
            if step < len(shares[state.process_index]):
                chunk, values = next(mine, (None, None))
                if chunk != shares[state.process_index][step]:  # the others would wait for this process for ever
                    wanted = shares[state.process_index][step]
                    raise RlaifError(f"table {wanted.file} changed while it was read (row group {wanted.group})")
                scored = [_score_chunk(scorer, chunk, values, config.batch_size, shown)]
            if state.num_processes > 1:
                scored = gather_object(scored)
            if state.is_main_process:
                _save_scores(folder, scored)
            state.wait_for_everyone()
            done += 2 * sum(chunk.count for chunk in now)
            if progress:
                progress(scorer.spec, done, total)
        del scorer  # freed before the next scorer loads
    if not state.is_main_process:  # no collective here: writing a large table outlasts any collective's timeout
        return out, None
    for stale in _stale_outputs(out):
        stale.unlink()
    return out, _write_labelled(table_chunks, rows, schema, folders, weights, config.combine_rule, out,
                                {**labelling, SCORER_KEYS: keys})


def _write_labelled(table_chunks: list[Chunk], rows: int, schema: pa.Schema, folders: dict[str, Path],
                    weights: dict[str, float], combine: str, out: Path, labelling: dict) -> Agreement:
    """Write the labelled table chunk by chunk (one row group each) to ``out`` atomically, its shards' columns cast to
    ``schema``, with the settings that labelled it in its metadata; return the agreement."""
    agreement = Agreement(0, 0, 0, 0, 0, 0)
    with atomic_path(out) as tmp:
        writer = None
        try:
            for chunk, table in read_chunks(table_chunks, rows):
                table = table.select(schema.names).cast(schema)
                ai = _ai_columns(chunk, table["label_0"], folders, weights, combine)
                agreement = _plus(agreement, _agreement(ai, different_images(table, chunk.file)))
                table = table.drop_columns([c for c in AI_COLUMNS if c in table.column_names])  # relabelled again
                for name in AI_COLUMNS:
                    table = table.append_column(name, ai[name].to_arrow())
                writer = writer or pq.ParquetWriter(tmp, table.schema.with_metadata(
                    {**(table.schema.metadata or {}), LABELLING_METADATA.encode(): json.dumps(labelling).encode()}))
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
    return agreement
