"""Does memory or start-up time grow with the table? `rlaif train` and `rlaif label --relabel` on synthetic
Pick-a-Pic v2 tables of 1k, 10k and 100k pairs (256x256 JPEGs, distinct in every row, data/train-*.parquet
shards of 500-row row groups), each command in a fresh process with an empty cache:

- train (tiny, LoRA, batch 4, --steps optimizer steps, default DataLoader workers): peak PSS of the process
  tree (workers included, shared pages counted once) and peak RSS of the training process alone, time from
  launch to the first optimizer step, steady pairs/s (median step after the fifth, from the optimizer-step
  clock of bench/step_timer.py); the held-out pairs (5% of the prompts) are measured once, at the last step;
- label --relabel with compressibility (a cheap scorer): peak PSS and images/s;
- with --official DIR (a checkout of SalesforceAIResearch/DiffusionDPO): the official train.py on the largest
  table, same model, batch and steps, with the same meters.

Every figure is a ratio to the smallest table, measured in one run: train runs alternate between sizes
(--repeats rounds; median times, largest memory).

    python bench/scale.py [--sizes 1000 10000 100000] [--steps 20] [--repeats 2] [--official DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import pick_a_pic_table  # noqa: E402
from train import official_script  # noqa: E402

TIMER = Path(__file__).parent / "step_timer.py"


def metered(command: list[str], env: dict[str, str], times: Path | None = None) -> dict:
    """Run ``command`` and meter it: peak PSS of the process tree (proportional set size: pages that forked
    DataLoader workers share with their parent counted once, not once per process; sampled every 0.5 s, as
    reading it costs CPU), peak RSS of the process itself (the kernel's high-water mark), wall seconds, and
    seconds from launch to the first optimizer step (when ``times`` is given, the command runs under
    bench/step_timer.py writing there)."""
    if times is not None:
        command = [sys.executable, str(TIMER), str(times), *command[1:]]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    status = Path(f"/proc/{process.pid}/status")
    tree = alone = 0
    tick = 0
    while process.poll() is None:
        try:
            alone = max(alone, next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                                    if line.startswith("VmHWM:")))
            if tick % 10 == 0:
                tree = max(tree, sum(p.memory_full_info().pss for p in (root, *root.children(recursive=True))))
        except (psutil.Error, OSError, StopIteration):
            pass
        tick += 1
        time.sleep(0.05)
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    result = {"seconds": time.perf_counter() - started, "tree_mib": tree / 2**20, "alone_mib": alone / 2**20}
    if times is not None:
        steps = [float(line) for line in times.read_text().split()]
        result["first_step_s"] = steps[0] - started
        result["steps"] = steps
    return result


def tables(work: Path, sizes: list[int]) -> dict[int, Path]:
    """One table per size; smaller tables hold the first rows of the largest (its first shards, or a prefix)."""
    largest = max(sizes)
    made = {largest: pick_a_pic_table(work / f"pickapic-{largest}", largest)}
    for size in sizes:
        if size == largest:
            continue
        folder = work / f"pickapic-{size}"
        if size % 5000 == 0:  # whole shards of the largest table
            (folder / "data").mkdir(parents=True, exist_ok=True)
            for shard in range(size // 5000):
                name = f"train-{shard:05d}-of-{size // 5000:05d}.parquet"
                source = made[largest] / "data" / f"train-{shard:05d}-of-{-(-largest // 5000):05d}.parquet"
                if not (folder / "data" / name).exists():
                    os.symlink(source, folder / "data" / name)
            made[size] = folder
        else:
            made[size] = pick_a_pic_table(folder, size)
    return made


def steady_pairs_per_s(steps: list[float], batch: int = 4) -> float:
    """Pairs per second from the optimizer-step clock (the same meter for every trainer), after 5 steps."""
    return batch / statistics.median(b - a for a, b in zip(steps[5:], steps[6:], strict=False))


def summary(runs: list[dict]) -> dict:
    """Several runs of one command: the largest memory figures, the median times."""
    return {**{k: max(r[k] for r in runs) for k in ("tree_mib", "alone_mib")},
            **{k: statistics.median(r[k] for r in runs) for k in ("first_step_s", "pairs_per_s")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--official", type=Path, help="checkout of SalesforceAIResearch/DiffusionDPO")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rlaif-scale",
                        help="where the tables are made (kept for reruns)")
    parser.add_argument("--skip-relabel", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="train runs per size (median time, largest memory)")
    args = parser.parse_args()
    made = tables(args.work, sorted(args.sizes))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results: dict[str, dict[int, dict]] = {"train": {}, "relabel": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, "-m", "rlaif", "tiny", "--out", str(folder / "tiny")], env=env, check=True,
                       capture_output=True)
        for repeat in range(args.repeats):  # sizes alternate, so that the machine's drift hits each alike
            for size, table in made.items():
                run_env = {**env, "RLAIF_CACHE": str(folder / f"cache-{size}")}
                out = folder / f"train-{size}"
                run = metered([sys.executable, "-m", "rlaif", "train", str(table), "--model", str(folder / "tiny"),
                               "--out", str(out), "--batch-size", "4", "--max-steps", str(args.steps),
                               "--checkpoint-every", "0", "--val-every", str(args.steps), "--overwrite"], run_env,
                              folder / f"times-{size}-{repeat}")
                run["pairs_per_s"] = steady_pairs_per_s(run["steps"])
                results["train"].setdefault(size, []).append(run)
                shutil.rmtree(folder / f"cache-{size}", ignore_errors=True)  # every run starts with an empty cache
        if not args.skip_relabel:
            for size, table in made.items():
                run = metered([sys.executable, "-m", "rlaif", "label", "--relabel", str(table), "--scorer",
                               "compressibility", "-o", str(folder / f"relabel-{size}.parquet")],
                              {**env, "RLAIF_CACHE": str(folder / f"cache-{size}")})
                run["images_per_s"] = 2 * size / run["seconds"]
                results["relabel"][size] = run
                (folder / f"relabel-{size}.parquet").unlink()
                shutil.rmtree(folder / f"cache-{size}", ignore_errors=True)
        results["train"] = {size: summary(runs) for size, runs in results["train"].items()}
        if args.official:
            largest = max(made)
            script = official_script(args.official, folder / "official")
            official = metered(
                [sys.executable, str(script), "--pretrained_model_name_or_path", str(folder / "tiny"),
                 "--dataset_name", str(made[largest]), "--train_batch_size", "4", "--max_train_steps", str(args.steps),
                 "--mixed_precision", "no", "--output_dir", str(folder / "official-out"), "--resolution", "64",
                 "--no_hflip", "--checkpointing_steps", "1000000", "--cache_dir", str(folder / "official-cache")],
                env, folder / "times-official")
            official["pairs_per_s"] = steady_pairs_per_s(official["steps"])
    report(results, args, official if args.official else None)


def report(results: dict, args: argparse.Namespace, official: dict | None) -> None:
    sizes = sorted(results["train"])
    small, large = sizes[0], sizes[-1]
    print(f"tiny (64 px), LoRA, batch 4, {args.steps} steps; synthetic Pick-a-Pic tables, 256x256 JPEGs; "
          f"{os.cpu_count()} CPUs")
    print("train:   pairs | peak PSS tree / RSS alone (MiB) | first step (s) | pairs/s")
    for size in sizes:
        r = results["train"][size]
        print(f"  {size:>9,d} | {r['tree_mib']:8.0f} / {r['alone_mib']:6.0f} | {r['first_step_s']:14.1f} | "
              f"{r['pairs_per_s']:7.2f}")
    t = results["train"]
    print(f"  {large:,d} vs {small:,d}: peak PSS x{t[large]['tree_mib'] / t[small]['tree_mib']:.3f} (tree), RSS, "
          f"x{t[large]['alone_mib'] / t[small]['alone_mib']:.3f} (alone); first step "
          f"x{t[large]['first_step_s'] / t[small]['first_step_s']:.3f}; pairs/s "
          f"x{t[large]['pairs_per_s'] / t[small]['pairs_per_s']:.3f}")
    if results["relabel"]:
        print("relabel: pairs | peak PSS tree (MiB) | images/s")
        for size in sizes:
            r = results["relabel"][size]
            print(f"  {size:>9,d} | {r['tree_mib']:8.0f} | {r['images_per_s']:8.1f}")
        r = results["relabel"]
        print(f"  {large:,d} vs {small:,d}: peak PSS x{r[large]['tree_mib'] / r[small]['tree_mib']:.3f}; images/s "
              f"x{r[large]['images_per_s'] / r[small]['images_per_s']:.3f}")
    if official:
        print(f"official train.py on {large:,d} pairs: peak PSS tree {official['tree_mib']:.0f} MiB / RSS alone "
              f"{official['alone_mib']:.0f} MiB (x{official['tree_mib'] / t[large]['tree_mib']:.2f} rlaif's); "
              f"first step {official['first_step_s']:.1f} s (x{official['first_step_s'] / t[large]['first_step_s']:.2f}"
              f" rlaif's); {official['pairs_per_s']:.2f} pairs/s (full fine-tuning: not comparable with the LoRA runs "
              "above; bench/train.py --official compares speed like for like)")


if __name__ == "__main__":
    main()
