"""How fast the CLI answers: `rlaif --help`, every `rlaif CMD --help` and `rlaif scorers list`, beside
`hf --help` (the Hugging Face CLI, a yardstick every user has) measured in the same run, alternating.

Each command runs as a whole process (interpreter start included), ``--repeats`` times in turn with the
yardstick; prints the median wall time and the median peak RSS of each, and each one's ratio to `hf --help`.
The targets (issue 14): <= 0.5 s and <= 150 MiB.

    python bench/cli.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys

COMMANDS = [["--help"], *[[name, "--help"] for name in ("sample", "label", "train", "eval", "loop", "demo", "tiny",
                                                         "scorers")], ["scorers", "list"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    hf = shutil.which("hf")
    rlaif = [sys.executable, "-m", "rlaif"]
    print(f"{'command':<28} {'median s':>9} {'vs hf':>6} {'peak MiB':>9}")
    for command in COMMANDS:
        ours, theirs, peaks = [], [], []
        for _ in range(args.repeats):
            theirs.append(measure([hf, "--help"])[0] if hf else float("nan"))
            wall, peak = measure([*rlaif, *command])
            ours.append(wall)
            peaks.append(peak)
        ratio = statistics.median(ours) / statistics.median(theirs) if hf else float("nan")
        print(f"{'rlaif ' + ' '.join(command):<28} {statistics.median(ours):>9.3f} {ratio:>5.2f}x "
              f"{statistics.median(peaks):>9.0f}")
    if hf:
        print(f"{'hf --help':<28} {statistics.median(theirs):>9.3f}")


def measure(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one run of ``argv``, timed by a wrapper process whose only child it is
    (so the RSS is that command's alone, not a maximum over every child this script started)."""
    code = ("import resource, subprocess, sys, time; s = time.perf_counter(); "
            "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True); "
            "print(time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True).stdout
    wall, peak = out.split()
    return float(wall), float(peak)


if __name__ == "__main__":
    main()
