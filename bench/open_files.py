"""What keeping at most MAX_OPEN_FILES parquet files open costs: a Pick-a-Pic v2 layout has 645 shards, and a
process that kept one open file per shard passed a common limit of 1024 open files.

Synthetic Pick-a-Pic shards (``data/train-*.parquet``, 64x64 JPEGs; made once in --work), indexed by
``PairTable`` and read in training order (``pair_index``, blocks shuffled, pairs within windows) for one epoch,
in one process, first with the cap and then without it (the cap raised past the shard count). Prints pairs/s
of each pass, their ratio, and the files each held open at the end.

    python bench/open_files.py [--shards 700] [--rows 96] [--group 32] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import pick_a_pic_table  # noqa: E402

from rlaif.train import pair_table  # noqa: E402
from rlaif.train.pair_table import PairTable, pair_index  # noqa: E402


def one_pass(folder: Path, cap: int) -> tuple[float, int, int]:
    """(pairs/s, pairs, files open at the end) of a training-order epoch over ``folder`` under ``cap``."""
    for parquet in pair_table._OPENED.values():
        parquet.close(force=True)
    pair_table._OPENED = OrderedDict()
    pair_table.MAX_OPEN_FILES = cap
    table = PairTable(folder)
    start = time.perf_counter()
    for position in range(len(table)):
        table[pair_index(position, table, seed=0)]
    seconds = time.perf_counter() - start
    return len(table) / seconds, len(table), len(os.listdir("/proc/self/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=700)
    parser.add_argument("--rows", type=int, default=96, help="rows per shard")
    parser.add_argument("--group", type=int, default=32, help="rows per row group")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rlaif-open-files")
    args = parser.parse_args()
    folder = args.work / f"{args.shards}x{args.rows}"
    pick_a_pic_table(folder, args.shards * args.rows, size=64, shard_rows=args.rows, row_group_rows=args.group)
    capped = one_pass(folder, pair_table.MAX_OPEN_FILES)
    uncapped = one_pass(folder, args.shards + 1)
    print(f"{args.shards} shards x {args.rows} rows ({args.group}-row groups), {capped[1]} pairs, one epoch in "
          "training order, one process")
    for name, (rate, _, files) in (("capped at 64 files", capped), ("no cap", uncapped)):
        print(f"  {name:>18}: {rate:8.0f} pairs/s, {files} file descriptors open at the end")
    print(f"  capped / no cap: {capped[0] / uncapped[0]:.2f}x the pairs/s")


if __name__ == "__main__":
    main()
