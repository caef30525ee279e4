"""Images/s of `rlaif sample` against a naive diffusers loop, same model, settings and seeds, one run.

The naive loop is what a first script does: one ``pipe(prompt, num_images_per_prompt=N)`` call per prompt,
then ``image.save`` for each image in turn. rlaif packs candidates of several prompts into each batch and
writes PNGs on worker threads. Both include loading the model once. Prints both rates and the ratio.

    python bench/sample.py [--model tiny] [--steps 20] [--per-prompt 4] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rlaif.cli import quiet_libraries
from rlaif.config import SampleConfig
from rlaif.models import load_pipeline
from rlaif.prompts import load_prompts
from rlaif.sample import plan_jobs, run_sample
from rlaif.seeding import generator

PROMPTS = "shapes"  # the bundled 8-scene prompt set, data/shapes.txt (rlaif.prompts.PROMPT_SETS)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def naive(model: str, prompts: list[str], per_prompt: int, steps: int, out: Path) -> None:
    pipe = load_pipeline(model)
    jobs = plan_jobs(prompts, per_prompt, run_seed=0)
    for start in range(0, len(jobs), per_prompt):
        mine = jobs[start : start + per_prompt]
        images = pipe(mine[0].prompt, num_images_per_prompt=per_prompt, num_inference_steps=steps,
                      generator=[generator(job.seed) for job in mine]).images
        for job, image in zip(mine, images, strict=True):
            (out / job.image).parent.mkdir(parents=True, exist_ok=True)
            image.save(out / job.image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_libraries()
    prompts = load_prompts(PROMPTS)
    count = len(prompts) * args.per_prompt
    times: dict[str, list[float]] = {"naive": [], "rlaif": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in ("naive", "rlaif"):
                out = Path(tmp) / f"{name}-{repeat}"
                start = time.perf_counter()
                if name == "naive":
                    naive(args.model, prompts, args.per_prompt, args.steps, out)
                else:
                    run_sample(SampleConfig(model=args.model, prompts=PROMPTS, out=out, steps=args.steps,
                                            per_prompt=args.per_prompt, batch_size=args.batch_size))
                times[name].append(time.perf_counter() - start)
        a, b = Path(tmp) / "naive-0", Path(tmp) / "rlaif-0"
        diffs = [np.abs(pixels(p) - pixels(b / p.relative_to(a))).max() for p in sorted(a.rglob("*.png"))]
        shutil.rmtree(tmp, ignore_errors=True)
    rates = {name: count / statistics.median(t) for name, t in times.items()}
    print(f"model={args.model} images={count} steps={args.steps} per_prompt={args.per_prompt} "
          f"batch_size={args.batch_size} repeats={args.repeats}")
    print(f"naive loop : {rates['naive']:.2f} images/s")
    print(f"rlaif      : {rates['rlaif']:.2f} images/s")
    print(f"ratio      : {rates['rlaif'] / rates['naive']:.2f}x  (same seeds; max pixel difference {max(diffs)})")


if __name__ == "__main__":
    main()
