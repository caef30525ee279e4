"""What `rlaif label --relabel` reads under several processes. Until 2026-11-29 every process read every chunk's
image bytes and scored 1/P of them; now each process reads and scores whole row groups of its own.

A synthetic Pick-a-Pic table (bench/synthetic.py; made once in --work) is relabelled with a scorer plugin that
does no work but record what its process has read since the plugin loaded (``/proc/self/io`` rchar: bytes
returned by read calls, page-cache hits included), at each call. Each tree (this checkout, and --baseline, e.g.
a ``git worktree`` of 8cce400) relabels it in 1 process and under ``torchrun --nproc_per_node 2``, with an empty
cache each time. Prints the bytes each run's processes read while scoring, as a multiple of the table's size on
disk, the wall clock, and the ratios baseline / this checkout. Linux only (``/proc``).

    git worktree add /tmp/rlaif-8cce400 8cce400
    python bench/relabel_io.py --baseline /tmp/rlaif-8cce400 [--rows 4000] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from synthetic import pick_a_pic_table  # noqa: E402

PLUGIN = '''
import os

import rlaif


def _read_so_far():
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


class _Reading:
    def __init__(self):
        self.start = _read_so_far()
        with open(os.environ["RELABEL_IO_LOG"], "a") as log:
            log.write(f"tree {os.environ.get('RANK', '0')} {os.path.dirname(os.path.dirname(rlaif.__file__))}\\n")

    def score(self, images, prompts):
        with open(os.environ["RELABEL_IO_LOG"], "a") as log:
            log.write(f"read {os.environ.get('RANK', '0')} {_read_so_far() - self.start}\\n")
        return [float(len(prompt)) for prompt in prompts]


def reading(device="cpu"):
    """Scores nothing of the images; logs the bytes its process has read since it loaded."""
    return _Reading()
'''


def relabel(tree: Path, table: Path, processes: int, work: Path, name: str) -> tuple[dict[str, int], float]:
    """Relabel ``table`` with ``tree``'s rlaif in ``processes`` processes: the bytes each read while scoring, by
    rank, and the wall clock."""
    log = work / f"{name}.log"
    log.unlink(missing_ok=True)
    shutil.rmtree(work / f"{name}-cache", ignore_errors=True)  # scores saved by an earlier run would be reused
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{work / 'plugin'}", "RELABEL_IO_LOG": str(log),
           "RLAIF_CACHE": str(work / f"{name}-cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(29700 + processes)] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "rlaif", "label", "--relabel", str(table), "--scorer", "relabel_io_plugin:reading",
               "-o", str(work / f"{name}.parquet"), "--batch-size", "64"]
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=work, check=True, capture_output=True, text=True)  # not a tree's folder
    wall = time.perf_counter() - started
    read: dict[str, int] = {}
    for line in log.read_text().splitlines():
        kind, rank, value = line.split(" ", 2)
        if kind == "tree" and Path(value).resolve() != tree.resolve():
            raise SystemExit(f"run {name} imported rlaif from {value}, not {tree}")
        if kind == "read":
            read[rank] = int(value)  # the last call's: all of this process's scoring
    return read, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the rlaif to compare with")
    parser.add_argument("--rows", type=int, default=4000, help="pairs in the synthetic table (row groups of 500)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rlaif-bench-relabel-io")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "plugin").mkdir(exist_ok=True)
    (args.work / "plugin" / "relabel_io_plugin.py").write_text(PLUGIN)
    folder = pick_a_pic_table(args.work / f"table-{args.rows}", args.rows)
    table = folder / "data"
    size = sum(path.stat().st_size for path in table.glob("*.parquet"))
    print(f"table: {args.rows} pairs, {size / 2**20:.1f} MiB on disk; scorer: none (the plugin only logs reads)")
    print(f"{'tree':<10} {'processes':>9} {'MiB read per process':>24} {'all processes / table':>22} {'wall s':>7}")
    totals = {}
    for label, tree in (("this", ROOT.parent), ("baseline", args.baseline)):
        for processes in (1, 2):
            read, wall = relabel(tree, table, processes, args.work, f"{label}-{processes}")
            totals[label, processes] = sum(read.values())
            each = ", ".join(f"{read[rank] / 2**20:.1f}" for rank in sorted(read))
            print(f"{label:<10} {processes:>9} {each:>24} {totals[label, processes] / size:>21.2f}x {wall:>7.1f}")
    for processes in (1, 2):
        print(f"{processes} process{'es' if processes > 1 else ''}: baseline / this, bytes read = "
              f"{totals['baseline', processes] / totals['this', processes]:.2f}x")


if __name__ == "__main__":
    main()
