"""Table schemas (DESIGN.md), validation on read, and atomic Parquet writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from rlaif.errors import RlaifError, first_line
from rlaif.files import atomic_path

SAMPLES_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "prompt_id": pl.String(),
    "prompt": pl.String(),
    "candidate": pl.Int64(),
    "seed": pl.Int64(),
    "image": pl.String(),  # path relative to the table's folder
    "model": pl.String(),
    "scheduler": pl.String(),
    "steps": pl.Int64(),
    "guidance": pl.Float64(),
    "width": pl.Int64(),
    "height": pl.Int64(),
    "negative_prompt": pl.String(),
}

SCORES_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "scorer": pl.String(),
    "score": pl.Float64(),
    "prompt": pl.String(),
    "scorer_key": pl.String(),  # rlaif.scoring.LoadedScorer.key: name, options, versions, weights, decoding
    "image_sha256": pl.String(),  # of the image file the score was made from
}
PAIRS_SCHEMA: dict[str, pl.DataType] = {
    "prompt_id": pl.String(),
    "sample_id_0": pl.String(),
    "sample_id_1": pl.String(),
    "caption": pl.String(),
    "image_0": pl.String(),  # paths relative to the pairs table's folder
    "image_1": pl.String(),
    "label_0": pl.Float64(),  # 1: image_0 wins, 0: image_1 wins, 0.5: tie
    "score_0": pl.Float64(),  # the combined preference values the label came from
    "score_1": pl.Float64(),
    "scorer": pl.String(),  # NAME:WEIGHT[+NAME:WEIGHT...]
}


# pairs.parquet's key-value metadata: run.json's generation settings of the samples `rlaif label` paired, so that
# `rlaif train` can refuse to train otherwise than they were sampled (T5 prompt length, a negative prompt)
SAMPLING_METADATA = "rlaif.sampling"
# and the settings that labelled them, so that a rerun into the same table with others is refused: a finished
# `rlaif train` may have trained on it (its train.json names the table)
LABELLING_METADATA = "rlaif.labelling"
# eval.parquet's: what its numbers were measured under (prompts, steps, guidance, seed, scorer options), which
# the table's rows do not say and two evaluations of one model at two guidance scales differ by
EVAL_METADATA = "rlaif.eval"


def prompt_id(prompt: str) -> str:
    """A short stable id for a prompt text (the same text always gets the same id)."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def write_table(rows: list[dict] | pl.DataFrame, path: str | Path, schema: dict[str, pl.DataType],
                metadata: dict[str, str] | None = None) -> pl.DataFrame:
    """Build a table with ``schema`` (columns in schema order) and write it to ``path`` atomically, with
    ``metadata`` as the Parquet file's key-value metadata."""
    frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(rows, schema=schema)
    frame = frame.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])
    with atomic_path(path) as tmp:
        if metadata:  # through pyarrow: polars' write_parquet takes metadata only since 2025
            pq.write_table(frame.to_arrow().replace_schema_metadata(metadata), tmp)
        else:
            frame.write_parquet(tmp)
    return frame


def read_table(path: str | Path, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Read a Parquet table and check that it has ``schema``'s columns, with one clear error if not."""
    path = Path(path)
    if not path.is_file():
        raise RlaifError(f"table {path} does not exist")
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:
        raise RlaifError(f"table {path} is not a readable Parquet file: {first_line(exc)}") from exc
    missing = [name for name in schema if name not in frame.columns]
    if missing:
        raise RlaifError(f"table {path} lacks column(s) {', '.join(missing)}")
    return frame
