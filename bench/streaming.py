"""What `rlaif train --streaming ORG/NAME` fetches over the network: a synthetic Pick-a-Pic v2 table
(bench/synthetic.py: 256x256 JPEGs, 500-row row groups) served by a Hugging Face Hub on localhost
(tests/local_hub.py: the endpoints the unchanged huggingface_hub client calls), read two ways in one run:

- rlaif: ``PairTable(..., streaming=True)`` (shards opened without read-ahead), then the images of a few row
  groups as training reads them;
- baseline: the same reads through fsspec's default buffered file (5 MB read-ahead), how rlaif opened remote
  shards until 2026-11-27.

Prints bytes and requests served for building the index (before step 1; with --val-fraction > 0 it reads the
captions too, to hold out whole prompts) and for reading the row groups, and the ratios baseline / rlaif.
Localhost has no latency: on a real network each request costs a round trip more.

    python bench/streaming.py [--rows 10000] [--groups 4] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from local_hub import LocalHub  # noqa: E402
from synthetic import pick_a_pic_table  # noqa: E402

COMMIT = "b" * 40


def served(hub: LocalHub, since: int) -> tuple[int, int]:
    """(bytes, requests) of file reads served since read number ``since``."""
    reads = hub.reads[since:]
    return sum(read.end - read.start for read in reads), len(reads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=4, help="row groups read as training reads them")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rlaif-bench-streaming")
    args = parser.parse_args()
    table = pick_a_pic_table(args.work / f"pap-{args.rows}", args.rows)
    size = sum(file.stat().st_size for file in table.rglob("*.parquet"))
    with LocalHub() as hub:
        hub.commit("bench/pairs", COMMIT, table)
        os.environ.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0",
                          HF_HOME=str(args.work / "hf-home"))  # read once, when huggingface_hub is imported
        import fsspec
        import pyarrow.parquet as pq

        from rlaif.train import pair_table
        from rlaif.train.pair_table import PairTable, read_row_group

        ours_index, base_index = {}, {}
        for hold_out, columns in ((0.0, ["label_0"]), (0.05, ["label_0", "caption"])):  # --val-fraction 0, default
            pair_table._OPENED.clear()  # each build opens its shards afresh, footers included
            mark = len(hub.reads)
            pairs = PairTable("bench/pairs", streaming=True, hold_out=hold_out)
            ours_index[hold_out] = served(hub, mark)
            mark = len(hub.reads)
            files = {file: pq.ParquetFile(fsspec.open(file, "rb").open()) for file in pairs.files}
            for parquet in files.values():
                for group in range(parquet.metadata.num_row_groups):
                    parquet.read_row_group(group, columns=columns)
            base_index[hold_out] = served(hub, mark)
        picked = random.Random(0).sample(pairs.blocks, args.groups)
        mark = len(hub.reads)
        for block in picked:
            read_row_group(block.file, block.group, ["caption", "jpg_0", "jpg_1"])
        ours_groups = served(hub, mark)
        mark = len(hub.reads)
        for block in picked:
            files[block.file].read_row_group(block.group, columns=["caption", "jpg_0", "jpg_1"])
        base_groups = served(hub, mark)

    groups = len(pairs.blocks)
    print(f"table: {args.rows} pairs, {len(pairs.files)} shards, {groups} row groups, {size / 1e6:.1f} MB")
    print("| read | rlaif: MB, requests | fsspec read-ahead: MB, requests | baseline / rlaif, bytes |")
    print("|---|---|---|---|")
    for hold_out, what in ((0.0, "labels (--val-fraction 0)"), (0.05, "labels and captions (--val-fraction 0.05)")):
        ours, base = ours_index[hold_out], base_index[hold_out]
        print(f"| index before step 1: footers, {what} | {ours[0] / 1e6:.2f}, {ours[1]} | {base[0] / 1e6:.2f}, "
              f"{base[1]} | {base[0] / ours[0]:.0f}x |")
    print(f"| images of {args.groups} row groups | {ours_groups[0] / 1e6:.2f}, {ours_groups[1]} | "
          f"{base_groups[0] / 1e6:.2f}, {base_groups[1]} | {base_groups[0] / ours_groups[0]:.2f}x |")
    print(f"index share of the table at the default --val-fraction: rlaif {ours_index[0.05][0] / size:.2%}, "
          f"baseline {base_index[0.05][0] / size:.1%}")


if __name__ == "__main__":
    main()
