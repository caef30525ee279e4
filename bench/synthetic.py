"""Synthetic Pick-a-Pic v2 style tables for the benchmarks: caption, jpg_0, jpg_1 (JPEG bytes, distinct in every
row), label_0, label_1 (one pair in ten a tie), written as Pick-a-Pic v2 lays them out (data/train-*.parquet
shards of several row groups)."""

from __future__ import annotations

import io
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROW_GROUP = 500  # rows per row group


def _jpeg(row: int, side: int, size: int) -> bytes:
    """A smooth random picture (blocky colour field, bilinear-upsampled) unique to (row, side)."""
    rng = np.random.default_rng([row, side])
    small = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((size, size), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _rows(args: tuple[int, int, int]) -> pa.Table:
    start, stop, size = args
    rows = range(start, stop)
    labels = [0.5 if row % 10 == 9 else float(row % 2) for row in rows]
    return pa.table({"caption": [f"a synthetic picture number {row}" for row in rows],
                     "jpg_0": [_jpeg(row, 0, size) for row in rows], "jpg_1": [_jpeg(row, 1, size) for row in rows],
                     "label_0": labels, "label_1": [1.0 - label for label in labels]})


def pick_a_pic_table(folder: Path, rows: int, size: int = 256, shard_rows: int = 5000, workers: int = 2,
                     row_group_rows: int = ROW_GROUP) -> Path:
    """Write ``rows`` pairs as ``folder/data/train-*.parquet`` in row groups of ``row_group_rows`` (made once: an
    existing folder is reused)."""
    data = folder / "data"
    shards = range(0, rows, shard_rows)
    names = [data / f"train-{i:05d}-of-{len(shards):05d}.parquet" for i in range(len(shards))]
    if all(name.exists() for name in names):
        return folder
    data.mkdir(parents=True, exist_ok=True)
    with Pool(workers) as pool:
        for name, start in zip(names, shards, strict=True):
            stop = min(start + shard_rows, rows)
            parts = pool.map(_rows, [(s, min(s + row_group_rows, stop), size)
                                     for s in range(start, stop, row_group_rows)])
            partial = name.with_suffix(".partial")
            pq.write_table(pa.concat_tables(parts), partial, row_group_size=row_group_rows)
            partial.rename(name)
    return folder
