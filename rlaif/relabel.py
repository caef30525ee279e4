"""``rlaif label --relabel``: AI labels beside the human ones of a Pick-a-Pic style table of any size.

The table (a parquet file or a folder of shards) is read a chunk of rows at a time. Each scorer's scores of a
chunk are saved as they are made, keyed by the table's files, the scorer's key and the chunk size, so a killed
run loses at most one chunk and its rerun scores only what is missing. The output is then written chunk by
chunk as row groups of one parquet file: no stage holds the table, its images or its scores whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from accelerate.utils import broadcast_object_list

from rlaif.cache import cache_dir
from rlaif.config import LabelConfig
from rlaif.distributed import process_state
from rlaif.errors import RlaifError
from rlaif.files import atomic_path, file_identity
from rlaif.images import image_bytes
from rlaif.label import Progress, load_scorers, offset, score_images
from rlaif.pairing import preference
from rlaif.scoring import parse_weights

RELABEL_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


@dataclass(frozen=True)
class Agreement:
    """How often the AI labels agree with the human ones, on pairs the humans did not call a tie."""

    pairs: int
    compared: int
    agree: int
    ai_ties: int

    @property
    def accuracy(self) -> float:
        return self.agree / self.compared if self.compared else float("nan")


@dataclass(frozen=True)
class Chunk:
    """Rows ``first`` .. ``first + len(rows) - 1`` of one file of the table."""

    name: str  # file number and chunk number, for the score files
    file: str
    first: int
    rows: pa.RecordBatch


def table_files(source: Path) -> list[str]:
    """The parquet files of a relabel source (a file, or a folder of shards), each checked for the columns."""
    from rlaif.train.pair_table import parquet_shards

    if source.is_dir():
        files = parquet_shards(sorted(map(str, source.rglob("*.parquet"))), str(source))
    elif source.is_file():
        files = [str(source)]
    else:
        raise RlaifError(f"table {source} does not exist")
    for file in files:
        try:
            columns = pq.ParquetFile(file).schema_arrow.names
        except (pa.ArrowException, OSError) as exc:
            raise RlaifError(f"table {file} is not a readable Parquet file: {str(exc).splitlines()[0]}") from exc
        missing = [c for c in RELABEL_COLUMNS if c not in columns]
        if missing:
            raise RlaifError(f"table {file} lacks column(s) {', '.join(missing)}")
    return files


def chunks(files: list[str], rows: int, columns: list[str] | None = None) -> Iterator[Chunk]:
    """The table's rows in chunks of ``rows`` (a file's last chunk may be shorter), read one at a time."""
    for number, file in enumerate(files):
        first = 0
        reader = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)  # pre-buffering reads the whole file
        for part, batch in enumerate(reader.iter_batches(batch_size=rows, columns=columns)):
            yield Chunk(f"{number:05d}-{part:07d}", file, first, batch)
            first += batch.num_rows


def _score_chunk(scorer, chunk: Chunk, batch_size: int, progress: Progress | None) -> pl.DataFrame:
    frame = pl.from_arrow(chunk.rows)
    images = image_bytes(frame["jpg_0"]) + image_bytes(frame["jpg_1"])
    names = [f"{chunk.file} row {chunk.first + i} jpg_{side}" for side in (0, 1) for i in range(frame.height)]
    captions = [c or "" for c in frame["caption"].to_list()]
    values = score_images(scorer, images, names, captions * 2, batch_size, progress)
    return pl.DataFrame({"score_0": values[: frame.height], "score_1": values[frame.height:]},
                        schema={"score_0": pl.Float64, "score_1": pl.Float64})


def _ai_columns(chunk: Chunk, folders: dict[str, Path], weights: dict[str, float], combine: str) -> pl.DataFrame:
    """A chunk's AI columns (ai_score_0, ai_score_1, ai_label_0, ai_scorer) and its human label_0: each scorer's
    two scores combined per pair (``preference``). The image columns are never copied."""
    rows = chunk.rows.num_rows
    ids = [str(i) for i in range(rows)]
    parts = []
    for spec, folder in folders.items():
        scores = pl.read_parquet(folder / f"chunk-{chunk.name}.parquet")
        for side in (0, 1):
            parts.append(pl.DataFrame({"prompt_id": ids, "sample_id": [f"{i}:{side}" for i in ids], "scorer": spec,
                                       "score": scores[f"score_{side}"]}))
    value = dict(preference(pl.concat(parts), weights, combine).select("sample_id", "value").iter_rows())
    score_0 = pl.Series([value[f"{i}:0"] for i in ids], dtype=pl.Float64)
    score_1 = pl.Series([value[f"{i}:1"] for i in ids], dtype=pl.Float64)
    label = pl.from_arrow(chunk.rows.column("label_0")).cast(pl.Float64)
    return pl.DataFrame({"ai_score_0": score_0, "ai_score_1": score_1}).with_columns(
        ai_label_0=pl.when(score_0 > score_1).then(1.0).when(score_0 < score_1).then(0.0).otherwise(0.5),
        ai_scorer=pl.lit("+".join(f"{n}:{w:g}" for n, w in weights.items())), label_0=label)


def _agreement(labelled: pl.DataFrame) -> Agreement:
    human = labelled.filter(pl.col("label_0").is_in([0.0, 1.0]))
    return Agreement(pairs=labelled.height, compared=human.height,
                     agree=human.filter(pl.col("ai_label_0") == pl.col("label_0")).height,
                     ai_ties=labelled.filter(pl.col("ai_label_0") == 0.5).height)


def run_relabel(config: LabelConfig, progress: Progress | None = None) -> tuple[Path, Agreement]:
    """Score both images of every pair of a Pick-a-Pic style table, write AI labels beside the human ones
    (``ai_score_0``, ``ai_score_1``, ``ai_label_0``, ``ai_scorer``) and measure agreement.

    Several scorers vote per pair: each scorer's two scores become z-scores within the pair (+1 / -1, or
    0 for a tie), weighted and averaged, so ``ai_label_0`` is the weighted majority.
    """
    config.validate()
    weights = parse_weights(config.scorers)
    source = Path(config.relabel)
    files = table_files(source)
    rows = max(1, config.chunk_size // 2)
    total = 2 * sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if not total:
        raise RlaifError(f"table {source} has no rows")
    identity = ";".join(file_identity(f) for f in files)
    state = process_state()
    folders: dict[str, Path] = {}
    for scorer in load_scorers(config):
        key = hashlib.sha256(f"{identity}\0{scorer.key}\0{rows}".encode()).hexdigest()[:24]
        folder = folders[scorer.spec] = cache_dir() / "relabel" / key
        done = 0
        for chunk in chunks(files, rows, ["caption", "jpg_0", "jpg_1"]):
            path = folder / f"chunk-{chunk.name}.parquet"
            if not path.exists():
                scores = _score_chunk(scorer, chunk, config.batch_size, progress and offset(progress, done, total))
                if state.is_main_process:
                    with atomic_path(path) as tmp:
                        scores.write_parquet(tmp)
                state.wait_for_everyone()
            done += 2 * chunk.rows.num_rows
            if progress:
                progress(scorer.spec, done, total)
        del scorer  # freed before the next scorer loads
    out = config.out or source.with_name(f"{source.stem}.ai-labels.parquet")
    found = [None]
    if state.is_main_process:
        found = [_write_labelled(files, rows, folders, weights, config.combine, out)]
    found = broadcast_object_list(found) if state.num_processes > 1 else found
    return out, found[0]


def _write_labelled(files: list[str], rows: int, folders: dict[str, Path], weights: dict[str, float], combine: str,
                    out: Path) -> Agreement:
    """Write the labelled table chunk by chunk (one row group each) to ``out`` atomically; return the agreement."""
    totals = Agreement(0, 0, 0, 0)
    with atomic_path(out) as tmp:
        writer = None
        try:
            for chunk in chunks(files, rows):
                ai = _ai_columns(chunk, folders, weights, combine)
                part = _agreement(ai)
                totals = Agreement(*(a + b for a, b in zip(vars(totals).values(), vars(part).values(), strict=True)))
                table = pa.Table.from_batches([chunk.rows])
                for name in ("ai_score_0", "ai_score_1", "ai_label_0", "ai_scorer"):
                    table = table.append_column(name, ai[name].to_arrow())
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
    return totals
