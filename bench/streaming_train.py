"""What `rlaif train --streaming ORG/NAME` fetches while it trains, in P processes of W DataLoader workers each.
Every micro-batch draws its pairs from all the row groups of its shuffle window, so until 2026-11-29 every worker
of every process fetched every row group it met; now a machine's readers share each row group through a copy
on local disk (rlaif/train/block_cache.py).

A synthetic Pick-a-Pic v2 table (bench/synthetic.py; 256x256 JPEGs, ``--group-rows`` rows per row group) is served
by a Hugging Face Hub on localhost (tests/local_hub.py), and each tree (this checkout, and ``--baseline``, e.g. a
``git worktree`` of an older commit) trains the tiny model on it, streamed, for ``--steps`` steps of 4 pairs
per process, in 1 process and under ``torchrun --nproc_per_node 2``, with ``--workers`` workers each. Prints the
bytes served while training (footers and label columns included) as a multiple of the bytes of the row groups
trained on (each counted once: what one reader per machine fetches), and the ratios baseline / this checkout.

    git worktree add /tmp/rlaif-a4fecb7 a4fecb7
    python bench/streaming_train.py --baseline /tmp/rlaif-a4fecb7 [--rows 4000] [--steps 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from local_hub import LocalHub  # noqa: E402
from synthetic import pick_a_pic_table  # noqa: E402

COMMIT = "c" * 40


def group_spans(folder: Path) -> dict[str, list[tuple[int, int]]]:
    """Per shard (its path in the dataset), the byte span of each row group's column chunks."""
    spans = {}
    for shard in sorted(folder.rglob("*.parquet")):
        meta = pq.ParquetFile(shard).metadata
        spans[shard.relative_to(folder).as_posix()] = []
        for group in range(meta.num_row_groups):
            chunks = [meta.row_group(group).column(c) for c in range(meta.num_columns)]
            starts = [c.dictionary_page_offset or c.data_page_offset for c in chunks]
            spans[shard.relative_to(folder).as_posix()].append(
                (min(starts), max(s + c.total_compressed_size for s, c in zip(starts, chunks, strict=True))))
    return spans


def train(tree: Path, hub: LocalHub, processes: int, args: argparse.Namespace, name: str) -> tuple[int, int]:
    """Train with ``tree``'s rlaif; (bytes served while it ran, bytes of the distinct row groups it read)."""
    work = args.work / name
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(work / "hf-home"), "RLAIF_CACHE": str(args.work / "rlaif-cache"), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(29720 + processes)] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "rlaif", "train", "bench/pairs", "--streaming", "--model", "tiny", "--out",
               str(work / "run"), "--overwrite", "--max-steps", str(args.steps), "--batch-size", "4", "--workers",
               str(args.workers), "--val-fraction", "0", "--no-cache", "--checkpoint-every", "0"]
    mark = len(hub.reads)
    check = subprocess.run(command, env=env, cwd=args.work, capture_output=True, text=True)  # not a tree's folder
    if check.returncode:
        raise SystemExit(f"{name}: {check.stderr[-2000:]}")
    imported = subprocess.run([sys.executable, "-c", "import rlaif; print(rlaif.__file__)"], env=env, cwd=args.work,
                              capture_output=True, text=True, check=True).stdout.strip()
    if not Path(imported).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{name} imported rlaif from {imported}, not {tree}")
    reads = hub.reads[mark:]
    groups = {(read.path, group) for read in reads for group, (start, end) in enumerate(args.spans[read.path])
              if start <= read.start and read.end <= end and read.end - read.start > 10_000}  # image reads
    return sum(read.end - read.start for read in reads), sum(
        args.spans[path][group][1] - args.spans[path][group][0] for path, group in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the rlaif to compare with")
    parser.add_argument("--rows", type=int, default=4000, help="pairs in the synthetic table")
    parser.add_argument("--group-rows", type=int, default=100, help="rows per row group")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rlaif-bench-streaming-train")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder = pick_a_pic_table(args.work / f"table-{args.rows}-{args.group_rows}", args.rows,
                              row_group_rows=args.group_rows)
    args.spans = group_spans(folder)
    size = sum(path.stat().st_size for path in folder.rglob("*.parquet"))
    print(f"table: {args.rows} pairs, {size / 2**20:.1f} MiB, row groups of {args.group_rows} rows; {args.steps} "
          f"steps of 4 pairs per process, {args.workers} workers per process")
    print(f"{'tree':<10} {'processes':>9} {'MiB served':>11} {'MiB of row groups read':>23} "
          f"{'served / row groups':>20}")
    served = {}
    with LocalHub() as hub:
        hub.commit("bench/pairs", COMMIT, folder)
        for label, tree in (("this", ROOT.parent), ("baseline", args.baseline)):
            for processes in (1, 2):
                total, groups = train(tree, hub, processes, args, f"{label}-{processes}")
                served[label, processes] = total
                print(f"{label:<10} {processes:>9} {total / 2**20:>11.1f} {groups / 2**20:>23.1f} "
                      f"{total / groups:>19.2f}x")
    for processes in (1, 2):
        print(f"{processes} process{'es' if processes > 1 else ''} x {args.workers} workers: baseline / this, bytes "
              f"served = {served['baseline', processes] / served['this', processes]:.2f}x")


if __name__ == "__main__":
    main()
