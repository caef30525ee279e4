"""How high can each suite reward go while the picture still draws its prompt the way the tiny world does?

For every evaluation prompt of a ``bench/reward_suite.py`` work folder, this renders each scene the prompt allows
(every colour, background and size it leaves free, the shape it names) with ``rlaif.shapes.draw`` at ``--draws``
random placements, and scores them with the suite's rewards. Per prompt it keeps two numbers:

- the **world mean**: the average over those pictures, what the world's own pictures of the prompt score;
- the **ceiling**: the best of them, what a model that always drew the most rewarded picture the world could draw
  for the prompt would score (a sample maximum: it grows a little with ``--draws``, most for the rewards of
  position and size).

The base model does not draw exactly as the world does, and on some prompts it already scores above the ceiling.
So the script also counts, per prompt set, the prompts where the base and the tuned model score above it, and
gives the mean of max(base, ceiling) per prompt: what a model would score that kept the base model's pictures
where they beat the world's best and drew the world's best elsewhere.

Beside them it prints the base and the tuned model's means from a recipe's evaluation cells, all relative to
the base model's mean over the same prompts (the suite's relative delta). A rise above the ceiling cannot come
from choosing among the world's pictures: the tuned model draws something the world never drew (other shades,
shapes or sizes), which ``follows_prompt`` may or may not catch. Run after the suite, on its work folder:

    python bench/world_ceiling.py --work runs/reward-suite [--recipe defaults] [--rewards saturation,...]
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # suite_rewards, as the suite's labelling finds it

from reward_suite import REWARDS, SCORERS  # noqa: E402

from rlaif.scoring import LoadedScorer  # noqa: E402
from rlaif.shapes import COLORS, SIZES, Scene, asked, draw  # noqa: E402


def allowed_scenes(prompt: str) -> list[Scene]:
    """Every scene the world would draw for ``prompt``: what it names fixed, the rest over all its values (the
    shape's colour never the background's, as the world draws)."""
    wanted = asked(prompt)
    return [Scene(wanted["shape"], colour, background, size)
            for colour, background, size in itertools.product(COLORS, COLORS, SIZES)
            if colour != background and wanted.get("color", colour) == colour
            and wanted.get("background", background) == background and wanted.get("size", size) == size]


def world_scores(prompt: str, scorer: LoadedScorer, draws: int, seed: int) -> np.ndarray:
    """The reward of each allowed scene at ``draws`` placements: shape (scenes, draws)."""
    rng = random.Random(seed)
    scenes = allowed_scenes(prompt)
    images = [draw(scene, rng) for scene in scenes for _ in range(draws)]
    return np.asarray(scorer(images, [prompt] * len(images))).reshape(len(scenes), draws)


def model_means(work: Path, recipe: str, reward: str, scorer: str) -> pl.DataFrame:
    """Per prompt, the base and tuned model's mean reward in the recipe's evaluation of ``reward``."""
    table = pl.read_parquet(work / recipe / reward / "eval" / "eval_by_prompt.parquet")
    return table.filter(pl.col("scorer") == scorer).select("prompt", base="mean_base", tuned="mean_tuned")


def relative(values: pl.Series, base: pl.Series) -> str:
    """The mean of ``values`` relative to the mean of ``base`` (the suite's relative delta), as a signed percent."""
    return f"{values.mean() / base.mean() - 1:+.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/reward-suite"), help="the suite's work folder")
    parser.add_argument("--recipe", default="defaults", help="whose evaluation cells give the tuned means")
    parser.add_argument("--rewards", default=",".join(REWARDS), help="comma-separated suite reward names")
    parser.add_argument("--draws", type=int, default=16, help="random placements rendered per allowed scene")
    args = parser.parse_args()
    prompts = pl.read_csv(args.work / "eval.csv")
    print(f"| reward | prompts | base mean | world mean | ceiling (best world picture) | max(base, ceiling) | "
          f"tuned ({args.recipe}) | prompts with base / tuned above the ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for reward in args.rewards.split(","):
        scorer = LoadedScorer(SCORERS[reward])
        rows = []
        for index, (prompt, category) in enumerate(prompts.iter_rows()):
            scores = world_scores(prompt, scorer, args.draws, seed=index)
            rows.append({"prompt": prompt, "category": category, "world": scores.mean(), "ceiling": scores.max()})
        table = pl.DataFrame(rows).join(model_means(args.work, args.recipe, reward, SCORERS[reward]), on="prompt")
        for category in ("seen prompts", "held-out family"):
            part = table.filter(pl.col("category") == category)
            base = part["base"]
            better = part.select(pl.max_horizontal("base", "ceiling"))[:, 0]
            above = f"{(part['base'] > part['ceiling']).sum()} / {(part['tuned'] > part['ceiling']).sum()}"
            print(f"| {reward} | {category} ({part.height}) | {base.mean():.3f} | {relative(part['world'], base)} "
                  f"| {relative(part['ceiling'], base)} | {relative(better, base)} | {relative(part['tuned'], base)} "
                  f"| {above} |")


if __name__ == "__main__":
    main()
