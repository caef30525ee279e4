"""The reward suite: does `rlaif train` raise rewards nobody tuned it for? One command, one table.

For each reward of the suite (``bench/suite_rewards.py`` plugins and the built-in ``incompressibility``) and
each training recipe in ``RECIPES``:

1. the tiny model samples 40 training prompts (``--train-prompts``; circles and squares of the shapes world, each
   leaving out size, colour and background with ``--omit-probability``, 0.5 by default) x 8 candidates
   (``--candidates``) once;
2. ``rlaif label`` makes best-worst pairs with the reward (or the recipe's pairing strategy);
3. ``rlaif train`` trains with the recipe's options (``defaults``: no option at all, so the row measures what
   a user gets); a recipe of several rounds then samples the training prompts from the last round's model and
   repeats 2-3 from and against it, as ``rlaif loop`` does;
4. ``rlaif eval`` compares base and tuned on new seeds (eval seed 1, training seed 0) of the 40 training
   prompts (``seen prompts``) and of 24 triangle prompts, a shape never trained on (``held-out family``),
   with the reward and, held out, ``follows_prompt`` (does the model still draw what it is asked?).

Each cell is the mean delta relative to the base mean with its 95% CI from a bootstrap over prompts, and the
win rate; beside it the reward's best-of-N headroom (``headroom``, N the candidates) and the change of
``follows_prompt``. Run:
``python bench/reward_suite.py [--recipes defaults,...] [--rewards ...]``; ``--work`` keeps every run (samples,
pairs, weights, eval tables); a rerun reuses what is done (a cell whose recipe or `rlaif train` defaults
changed is refused), so after changing a reward give a new ``--work``. Prints a markdown table and writes
WORK/suite.parquet.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import polars as pl

from rlaif.config import OFFICIAL_LOSS as OFFICIAL
from rlaif.config import official_loss

REWARDS = {
    "brightness": "suite_rewards:brightness",
    "saturation": "suite_rewards:saturation",
    "warmth": "suite_rewards:warmth",
    "edges": "suite_rewards:edges",
    "asked_colour": "suite_rewards:asked_colour",
    "incompressibility": "incompressibility",
    "size": "suite_rewards:size",
    "centred": "suite_rewards:centred",
    "high": "suite_rewards:high",
}
# Rewards added after the defaults were chosen on REWARDS, to check them off that path: by name only, not in the
# default run (bench/suite_rewards.py)
CHECK_REWARDS = {"contrast": "suite_rewards:contrast", "colourfulness": "suite_rewards:colourfulness"}
SCORERS = {**REWARDS, **CHECK_REWARDS}
CHECK = "suite_rewards:follows_prompt"  # held out in every evaluation: does the model still draw what is asked?
# OFFICIAL, the official loss (beta 5000, no DPO-Positive penalty, no unconditional anchor), was `rlaif train`'s
# default until 2026-11-27: the recipes measured before then pin it, so they still mean what bench/RESULTS.md
# recorded under their names.
# The unconditional prediction free, as before --keep-unconditional (2026-11-28): the recipes measured before pin it
UNANCHORED = {"keep_unconditional": 0.0, "caption_dropout": 0.2}  # the values then
# name -> (what it is, pairing strategy, `rlaif train` options)
RECIPES: dict[str, tuple[str, str, dict]] = {
    "defaults": ("`rlaif train` with no options", "best-worst", {}),
    "official-loss": ("`rlaif train --beta 5000 --dpo-positive 0 --keep-unconditional 0`: the official "
                      "Diffusion-DPO loss (the defaults until 2026-11-27)", "best-worst", OFFICIAL),
    "former-defaults": ("the defaults of 2026-11-27 (beta 1000, DPO-Positive 1), the unconditional prediction free "
                        "(`--keep-unconditional 0 --caption-dropout 0.2`)", "best-worst", UNANCHORED),
    "dpo-positive-0.3": ("`--dpo-positive 0.3`: a third of the default penalty, the unconditional prediction free",
                         "best-worst", {**UNANCHORED, "dpo_positive": 0.3}),
    "dpo-positive-beta5000": ("`--beta 5000`: DPO-Positive at the official beta, the unconditional prediction free",
                              "best-worst", {**UNANCHORED, "beta": 5000.0}),
    "two-rounds": ("the former defaults, two rounds as `rlaif loop` runs them (see defaults-2-rounds)",
                   "best-worst", {**UNANCHORED, "rounds": 2}),
    "anchor-with-caption-dropout": ("`--caption-dropout 0.2`: the anchor, with DPO also on empty captions",
                                    "best-worst", {"caption_dropout": 0.2}),
    "anchor-10-with-caption-dropout": ("`--keep-unconditional 10 --caption-dropout 0.2`", "best-worst",
                                       {"keep_unconditional": 10.0, "caption_dropout": 0.2}),
    "high-noise": ("`--min-noise 0.75`: pairs noised in the noisiest quarter of the schedule only", "best-worst",
                   {"min_noise": 0.75}),
    "anchored-beta500": ("`--beta 500`", "best-worst", {"beta": 500.0}),
    "anchored-beta2500": ("`--beta 2500`", "best-worst", {"beta": 2500.0}),
    "anchored-beta5000": ("`--beta 5000`", "best-worst", {"beta": 5000.0}),
    "anchored-no-dpo-positive": ("`--dpo-positive 0`", "best-worst", {"dpo_positive": 0.0}),
    "anchored-dpo-positive-3": ("`--dpo-positive 3`", "best-worst", {"dpo_positive": 3.0}),
    "anchored-1200-steps": ("`--max-steps 1200`", "best-worst", {"max_steps": 1200}),
    "anchored-lr6e-4": ("`--learning-rate 6e-4`", "best-worst", {"learning_rate": 6e-4}),
    "anchored-lr1e-4": ("`--learning-rate 1e-4`", "best-worst", {"learning_rate": 1e-4}),
    "anchor-0.3": ("`--keep-unconditional 0.3`", "best-worst", {"keep_unconditional": 0.3}),
    "anchored-top-vs-bottom": ("the defaults on each of the 2 best against each of the 2 worst candidates (4 pairs "
                               "per prompt)", "top-vs-bottom", {}),
    "old-defaults": ("LoRA r8, lr 1e-5, batch 1, 100 steps (the defaults before the sweep)", "best-worst",
                     {**OFFICIAL, "lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-5, "batch_size": 1,
                      "max_steps": 100}),
    "lora-r8-lr1e-4": ("LoRA r8, lr 1e-4, batch 4, 300 steps", "best-worst",
                       {**OFFICIAL, "lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-4, "batch_size": 4,
                        "max_steps": 300}),
    "lora-r32-lr3e-4": ("LoRA r32, lr 3e-4, batch 4, 300 steps", "best-worst",
                        {**OFFICIAL, "lora_rank": 32, "lora_alpha": 32, "learning_rate": 3e-4, "batch_size": 4,
                         "max_steps": 300}),
    "lora-r32-lr3e-4-beta1000": ("LoRA r32, lr 3e-4, batch 4, 300 steps, beta 1000", "best-worst",
                                 {**OFFICIAL, "lora_rank": 32, "lora_alpha": 32, "learning_rate": 3e-4,
                                  "batch_size": 4, "max_steps": 300, "beta": 1000.0}),
    "lora-r32-lr3e-4-1000-steps": ("LoRA r32, lr 3e-4, batch 4, 1000 steps", "best-worst",
                                   {**OFFICIAL, "lora_rank": 32, "lora_alpha": 32, "learning_rate": 3e-4,
                                    "batch_size": 4, "max_steps": 1000}),
    "lora-r32-lr3e-4-600-steps": ("LoRA r32, lr 3e-4, batch 4, 600 steps", "best-worst",
                                  {**OFFICIAL, "lora_rank": 32, "lora_alpha": 32, "learning_rate": 3e-4,
                                   "batch_size": 4, "max_steps": 600}),
    "full-lr1e-5": ("full UNet, lr 1e-5, batch 4, 300 steps", "best-worst",
                    {**OFFICIAL, "full": True, "learning_rate": 1e-5, "batch_size": 4, "max_steps": 300}),
    "full-lr1e-5-600-steps": ("full UNet, lr 1e-5, batch 4, 600 steps", "best-worst",
                              {**OFFICIAL, "full": True, "learning_rate": 1e-5}),
    "defaults-2-rounds": ("the official loss, two rounds as `rlaif loop` runs them: round 2 samples the training "
                          "prompts from round 1's model (new noise), labels them and trains from and against it",
                          "best-worst", {**OFFICIAL, "rounds": 2}),
    "sft": ("`rlaif train --loss sft` (fine-tuning on the winners alone)", "best-worst",
            {**official_loss("sft"), "loss": "sft"}),
    "defaults-top-vs-bottom": ("the official loss, on each of the 2 best against each of the 2 worst candidates (4 "
                               "pairs per prompt)", "top-vs-bottom", OFFICIAL),
    "defaults-beta2500": ("the official loss at beta 2500", "best-worst", {**OFFICIAL, "beta": 2500.0}),
    "defaults-beta1000": ("the official loss at beta 1000 (`--beta 1000 --dpo-positive 0`)", "best-worst",
                          {**OFFICIAL, "beta": 1000.0}),
    "defaults-2400-steps": ("the official loss, 2400 steps (as many passes over 160 prompts' pairs as 600 steps "
                            "over 40 prompts')", "best-worst", {**OFFICIAL, "max_steps": 2400}),
    "defaults-no-caption-dropout": ("the official loss, `--caption-dropout 0`", "best-worst",
                                    {**OFFICIAL, "caption_dropout": 0.0}),
    "defaults-all-pairs": ("the official loss, on every pair of each prompt's 8 candidates (28)", "all-pairs",
                           OFFICIAL),
    "full-lr1e-5-all-pairs": ("full UNet, lr 1e-5, batch 4, 300 steps, on every pair (28 per prompt)", "all-pairs",
                              {**OFFICIAL, "full": True, "learning_rate": 1e-5, "batch_size": 4, "max_steps": 300}),
}
RECIPE_KEYS = ("full", "lora_rank", "lora_alpha", "learning_rate", "batch_size", "max_steps", "beta", "dpo_positive",
               "keep_unconditional", "loss", "caption_dropout", "val_fraction", "seed")
STEPS = 20  # denoising steps of training samples and evaluation alike
TRAIN_PROMPTS, FAMILY_PROMPTS, CANDIDATES, EVAL_SEEDS = 40, 24, 8, 2
# Half the prompts leave out each of size, colour and background, as users' prompts leave things to the model:
# a reward can then move what a prompt does not fix (a prompt that names its colours fixes the colour rewards).
OMIT_PROBABILITY = 0.5


def prompt_sets(omit_probability: float, train_count: int = TRAIN_PROMPTS) -> tuple[list[str], list[str]]:
    """``train_count`` distinct circle/square captions for training and 24 distinct triangle captions (the held-out
    family), each leaving out size, colour and background with ``omit_probability``. The first 40 training and
    the family captions are the same whatever ``train_count``: one stream of scenes fills both lists."""
    from rlaif.shapes import random_scene, shorter_caption

    rng = random.Random(2026)
    train: list[str] = []
    family: list[str] = []
    while len(train) < train_count or len(family) < FAMILY_PROMPTS:
        scene = random_scene(rng)
        caption = shorter_caption(scene, rng, omit_probability)
        group, limit = (family, FAMILY_PROMPTS) if scene.shape == "triangle" else (train, train_count)
        if len(group) < limit and caption not in group:
            group.append(caption)
    return train, family


def run_cell(work: Path, recipe: str, reward: str, samples: Path, eval_prompts: Path, candidates: int = CANDIDATES
             ) -> pl.DataFrame:
    """Label, train and evaluate one (recipe, reward); return its eval_by_category rows."""
    from rlaif.config import EvalConfig, LabelConfig, SampleConfig, TrainConfig
    from rlaif.eval import run_eval
    from rlaif.label import run_label
    from rlaif.loop import round_seed
    from rlaif.sample import run_sample
    from rlaif.train.trainer import run_train

    _, strategy, options = RECIPES[recipe]
    options = dict(options)
    rounds = options.pop("rounds", 1)
    scorer = SCORERS[reward]
    cell = work / recipe / reward
    recorded = cell / "recipe.json"
    settings = {**train_defaults(), **options}  # the defaults too: a cell made under other defaults is not reused
    if settings.get("loss") == "sft":  # no beta: recorded as the official recipe's, as before --beta was refused
        settings["beta"] = OFFICIAL["beta"]
    recipe_text = json.dumps({"strategy": strategy, "options": settings, "scorer": scorer}
                             | ({"rounds": rounds} if rounds > 1 else {}), sort_keys=True)
    if recorded.exists() and recorded.read_text() != recipe_text:
        raise SystemExit(f"{cell} was made by another recipe: use another --work")
    result = cell / "eval" / "eval_by_category.parquet"
    if result.exists():
        table = pl.read_parquet(result)
        if CHECK in set(table["scorer"]):  # made before the suite checked prompt following: evaluate again
            return table
    cell.mkdir(parents=True, exist_ok=True)
    recorded.write_text(recipe_text)
    previous: Path | None = None
    for number in range(1, rounds + 1):  # later rounds as `rlaif loop` runs them: from and against the last model
        if number == 1:  # round 1 labels the shared samples, as every one-round recipe does
            folder, labelled, pairs = cell, samples, work / "pairs" / f"{reward}-{strategy}.parquet"
        else:
            folder = cell / f"round_{number}"
            labelled, pairs = folder / "samples", folder / "pairs.parquet"
            run_sample(SampleConfig(model="tiny", prompts=str(work / "train.txt"), out=labelled, tuned=previous,
                                    per_prompt=candidates, steps=STEPS, seed=round_seed(0, number), batch_size=32))
        if not pairs.exists():
            pairs.parent.mkdir(parents=True, exist_ok=True)
            run_label(LabelConfig(samples_dir=labelled, scorers=[scorer], out=pairs, strategy=strategy))
        train_dir = folder / "train"
        if not (train_dir / "train.json").exists():
            run_train(TrainConfig(pairs=str(pairs), model="tiny", out=train_dir, init=previous, resume="latest",
                                  overwrite=True, **options))
        previous = train_dir
    run_eval(EvalConfig(base="tiny", tuned=train_dir, prompts=str(eval_prompts), out=cell / "eval",
                        scorers=[scorer], held_out=[CHECK], per_prompt=EVAL_SEEDS, seed=1, steps=STEPS, batch_size=32),
             base_dir=work / "eval_base")
    return pl.read_parquet(result)


def train_defaults() -> dict:
    """`rlaif train`'s current defaults on `tiny` for what the recipes vary and what shapes their result, the
    model family's (beta, DPO-Positive) resolved: a cell made under other defaults is not reused."""
    from rlaif.config import TrainConfig
    from rlaif.train.trainer import with_family_defaults

    config = with_family_defaults(TrainConfig(pairs="pairs.parquet", model="tiny", out=Path("train")))
    return {name: getattr(config, name) for name in RECIPE_KEYS}


def headroom(samples: Path, scorer: str) -> float:
    """How far the base model's own best candidate of each training prompt lies above that prompt's mean, averaged
    over prompts and relative to the overall mean: what best-of-N sampling gains. A reward that a prompt fixes
    has little; a tuned model that beats this by far draws what no sample of its prompt did."""
    from rlaif.label import read_score_cache

    scores = read_score_cache(samples).filter(pl.col("scorer") == scorer)
    per_prompt = scores.group_by("prompt").agg(gain=pl.col("score").max() - pl.col("score").mean())
    return float(per_prompt["gain"].mean() / scores["score"].mean())


def describe(recipe: str) -> str:
    """The recipe's settings; for ``defaults``, read from `rlaif train`'s current defaults."""
    if recipe != "defaults":
        return RECIPES[recipe][0]

    settings = train_defaults()
    model = "full UNet" if settings["full"] else f"LoRA r{settings['lora_rank']}"
    return (f"no options ({model}, lr {settings['learning_rate']:g}, batch {settings['batch_size']}, "
            f"{settings['max_steps']} steps, beta {settings['beta']:g}, DPO-Positive {settings['dpo_positive']:g}, "
            f"unconditional anchor {settings['keep_unconditional']:g}, "
            f"caption dropout {settings['caption_dropout']:g})")


def cell_text(row: dict) -> str:
    return (f"{row['relative']:+.1%} [{row['relative_low']:+.1%}, {row['relative_high']:+.1%}], "
            f"win {row['win_rate']:.2f}")


def follows_text(effects: dict) -> str:
    """The change of ``follows_prompt`` (share of asked attributes drawn) in percentage points, with its CI."""
    return (f"{effects['follows_delta']:+.1%} [{effects['follows_delta_low']:+.1%}, "
            f"{effects['follows_delta_high']:+.1%}]").replace("%", " pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/reward-suite"))
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    parser.add_argument("--rewards", default=",".join(REWARDS),
                        help="comma-separated names from REWARDS or CHECK_REWARDS")
    parser.add_argument("--omit-probability", type=float, default=OMIT_PROBABILITY,
                        help="leave each of size, colour and background out of a prompt with this probability "
                             "(0: every prompt names them all, the prompts of the sweeps before 2026-11-27 11:00; "
                             "their samples came from the tiny model before it learned shorter captions)")
    parser.add_argument("--train-prompts", type=int, default=TRAIN_PROMPTS,
                        help=f"training prompts (at least {TRAIN_PROMPTS}); the evaluation's seen prompts are the "
                             f"first {TRAIN_PROMPTS} of them whatever the number, so runs with more are comparable")
    parser.add_argument("--candidates", type=int, default=CANDIDATES,
                        help="candidates sampled per training prompt (each round), of which best-worst pairs are made")
    args = parser.parse_args()
    from rlaif.config import SampleConfig
    from rlaif.sample import run_sample

    recipes = [name for name in args.recipes.split(",") if name]
    rewards = [name for name in args.rewards.split(",") if name]
    unknown = [name for name in recipes if name not in RECIPES] + [name for name in rewards if name not in SCORERS]
    if unknown:
        parser.error(f"unknown recipe or reward: {', '.join(unknown)}")
    if args.train_prompts < TRAIN_PROMPTS:
        parser.error(f"--train-prompts must be at least {TRAIN_PROMPTS}, got {args.train_prompts}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_prompts, family_prompts = prompt_sets(args.omit_probability, args.train_prompts)
    listing = "\n".join(train_prompts) + "\n"
    if (work / "train.txt").exists() and (work / "train.txt").read_text() != listing:
        parser.error(f"{work} holds runs on other prompts: give another --work")
    (work / "train.txt").write_text(listing)
    eval_prompts = work / "eval.csv"
    seen = train_prompts[:TRAIN_PROMPTS]
    pl.DataFrame({"prompt": seen + family_prompts,
                  "category": ["seen prompts"] * len(seen) + ["held-out family"] * len(family_prompts)}
                 ).write_csv(eval_prompts)
    samples = work / "samples"
    run_sample(SampleConfig(model="tiny", prompts=str(work / "train.txt"), out=samples, per_prompt=args.candidates,
                            steps=STEPS, seed=0, batch_size=32))
    rows = []
    for recipe in recipes:
        for reward in rewards:
            start = time.time()
            table = run_cell(work, recipe, reward, samples, eval_prompts, args.candidates)
            row = {"recipe": recipe, "reward": reward}
            for effect in table.iter_rows(named=True):
                prefix = "seen" if effect["category"] == "seen prompts" else "family"
                if effect["scorer"] == CHECK:
                    row.update({f"{prefix}_follows_{key}": effect[key] for key in
                                ("mean_base", "delta", "delta_low", "delta_high")})
                    continue
                row.update({f"{prefix}_{key}": effect[key] for key in
                            ("relative", "relative_low", "relative_high", "win_rate", "ci_low", "ci_high",
                             "mean_base", "mean_tuned")})
            rows.append(row)
            print(f"{recipe} / {reward}: {time.time() - start:.0f}s", file=sys.stderr, flush=True)
    room = {reward: headroom(samples, SCORERS[reward]) for reward in rewards}  # a property of the samples alone
    suite = pl.DataFrame(rows).with_columns(headroom=pl.col("reward").replace_strict(room))
    suite.write_parquet(work / "suite.parquet")
    print(f"| recipe | reward | best-of-{args.candidates} headroom | held-out seeds of seen prompts: relative delta "
          "[95% CI], win | held-out family (triangles): relative delta [95% CI], win | follows the prompt, seen / "
          "family: change in points [95% CI] |")
    print("|---|---|---|---|---|---|")
    for row in suite.iter_rows(named=True):
        seen = {k[5:]: v for k, v in row.items() if k.startswith("seen_")}
        family = {k[7:]: v for k, v in row.items() if k.startswith("family_")}
        print(f"| {row['recipe']} | {row['reward']} | {row['headroom']:+.1%} | {cell_text(seen)} | "
              f"{cell_text(family)} | {follows_text(seen)} / {follows_text(family)} |")
    print()
    print("| recipe | worst reward's seen-prompt CI low | rewards >= +10% with CI low > 0 | "
          "family deltas with CI high < 0 (significant falls) | significant falls of following the prompt |")
    print("|---|---|---|---|---|")
    for recipe, cells in suite.group_by("recipe", maintain_order=True):
        good = ((cells["seen_relative"] >= 0.10) & (cells["seen_relative_low"] > 0)).sum()
        print(f"| {recipe[0]}: {describe(recipe[0])} | {cells['seen_relative_low'].min():+.1%} | {good}/{len(cells)} | "
              f"{(cells['family_relative_high'] < 0).sum()} | "
              f"{(cells['seen_follows_delta_high'] < 0).sum() + (cells['family_follows_delta_high'] < 0).sum()} |")


if __name__ == "__main__":
    main()
