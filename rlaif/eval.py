"""``rlaif eval``: base vs tuned model on held-out prompts, same seeds, scored by the same scorers.

Each (prompt, seed) gives one comparison per scorer: 1 if the tuned image scores higher, 0.5 on a tie, 0
otherwise. The win rate is their mean; beside it the size of the effect, the mean delta (absolute and relative
to the base mean), and a signed-rank p-value; every interval is a bootstrap over prompts (``rlaif.stats``).
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
from collections.abc import Callable, Collection
from dataclasses import asdict
from pathlib import Path

import polars as pl

from rlaif.config import EvalConfig, LabelConfig, SampleConfig
from rlaif.distributed import process_state
from rlaif.errors import RlaifError
from rlaif.files import read_json
from rlaif.label import labelled_by, labelled_with, update_scores
from rlaif.prompts import load_prompt_table
from rlaif.report import write_report
from rlaif.sample import run_sample
from rlaif.scoring import parse_options, parse_weights
from rlaif.stats import interval_text, paired_effect, significance, wins
from rlaif.tables import EVAL_METADATA, SAMPLES_SCHEMA, prompt_id, read_table, write_table
from rlaif.train.outputs import check_trained_from, train_info, trained_config, trained_tables
from rlaif.train.pair_table import (
    AI_LABEL,
    caption_hashes,
    held_out_hashes,
    parquet_files,
    recorded_sampling,
    table_changed,
)

OPTIMISED, HELD_OUT = "optimised", "held-out"  # trained on, or not
EFFECT_SCHEMA = {"n": pl.Int64, "prompts": pl.Int64, "win_rate": pl.Float64, "ci_low": pl.Float64,
                 "ci_high": pl.Float64, "mean_base": pl.Float64, "mean_tuned": pl.Float64, "delta": pl.Float64,
                 "delta_low": pl.Float64, "delta_high": pl.Float64, "relative": pl.Float64,
                 "relative_low": pl.Float64, "relative_high": pl.Float64, "p_value": pl.Float64}  # rlaif.stats.Effect
EVAL_SCHEMA = {"scorer": pl.String, "role": pl.String, **EFFECT_SCHEMA}
BY_PROMPT_SCHEMA = {"scorer": pl.String, "prompt_id": pl.String, "prompt": pl.String, "n": pl.Int64,
                    "win_rate": pl.Float64, "mean_base": pl.Float64, "mean_tuned": pl.Float64, "delta": pl.Float64}
CATEGORY_SCHEMA = {"column": pl.String, "category": pl.String, "scorer": pl.String, **EFFECT_SCHEMA}
Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``."""


def compare(paired: pl.DataFrame, resamples: int, by: list[str]) -> pl.DataFrame:
    """One row of effects per scorer (and per value of each column in ``by``) from paired scores (columns
    scorer, prompt_id, score_base, score_tuned, and the ``by`` columns)."""
    rows = []
    for column in by or [None]:
        keys = ["scorer"] + ([column] if column else [])
        for key, group in paired.group_by(keys, maintain_order=True):
            result = paired_effect(group["score_base"].to_numpy(), group["score_tuned"].to_numpy(),
                                   group["prompt_id"].to_numpy(), resamples)
            row = {"scorer": key[0], **asdict(result)}
            if column:
                row.update(column=column, category=str(key[1]))
            rows.append(row)
    schema = CATEGORY_SCHEMA if by else {"scorer": pl.String, **EFFECT_SCHEMA}
    return pl.DataFrame(rows, schema=schema).sort([c for c in ("scorer", "column", "category") if c in schema])


def reward_hacking(summary: pl.DataFrame) -> list[str]:
    """Warnings for each held-out scorer that fell significantly (delta interval below 0 and p < ALPHA) while a
    scorer the model was trained on rose significantly: the model may be exploiting the trained scorer."""
    def moved(row: dict) -> int:
        return significance(row["delta_low"], row["delta_high"], row["p_value"])

    rose = [row["scorer"] for row in summary.iter_rows(named=True) if row["role"] == OPTIMISED and moved(row) > 0]
    fell = [row for row in summary.iter_rows(named=True) if row["role"] == HELD_OUT and moved(row) < 0]
    if not rose:
        return []
    return [f"reward hacking? {', '.join(rose)} rose while held-out {row['scorer']} fell significantly: "
            f"{interval_text(row['delta'], row['delta_low'], row['delta_high'])} ("
            f"{interval_text(row['relative'], row['relative_low'], row['relative_high'], percent=True)} of the base "
            f"mean; 95% CIs), p = {row['p_value']:.2g}" for row in fell]


FEW_PROMPTS = 20  # README "Reading the numbers": fewer prompts, and a bootstrap over them says little


def few_prompts(summary: pl.DataFrame) -> str | None:
    """What to say when the fewest prompts behind a row of ``summary`` are under FEW_PROMPTS."""
    fewest = summary["prompts"].min()
    if fewest is None or fewest >= FEW_PROMPTS:
        return None
    return (f"{fewest} prompt{'s are' if fewest > 1 else ' is'} too few for these intervals to mean much "
            f"(under {FEW_PROMPTS}: see README, Reading the numbers)")


UNSTEADY = 2.0  # a relative interval this many times as wide as the delta's over the base mean is not read


def unsteady_relative(summary: pl.DataFrame) -> list[str]:
    """What to say of each row of ``summary`` whose relative interval is over UNSTEADY times as wide as its delta's
    divided by the base mean: the base mean itself swings between resampled prompts (near 0 on some, for a
    score that can be near 0 or negative), so the ratio's interval says more of the denominator than of the
    change (README, Reading the numbers)."""
    said = []
    for row in summary.iter_rows(named=True):
        scaled = (row["delta_high"] - row["delta_low"]) / abs(row["mean_base"]) if row["mean_base"] else math.nan
        width = row["relative_high"] - row["relative_low"]
        if math.isfinite(width) and scaled > 0 and width > UNSTEADY * scaled:
            said.append(f"{row['scorer']}: the relative interval is {width / scaled:.0f} times as wide as the "
                        "delta's over the base mean, as the base mean swings between resampled prompts (near 0 "
                        "on some): read the delta's interval")
    return said


def by_prompt(paired: pl.DataFrame) -> pl.DataFrame:
    """One row per scorer and prompt (``paired``: one row per scorer and comparison): its comparisons, win
    rate, means and mean delta, for eval_by_prompt.parquet."""
    won = wins(paired["score_base"].to_numpy(), paired["score_tuned"].to_numpy()).astype(float)
    return (paired.with_columns(won=pl.Series(won)).group_by("scorer", "prompt_id", maintain_order=True)
            .agg(prompt=pl.col("prompt").first(), n=pl.len(), win_rate=pl.col("won").mean(),
                 mean_base=pl.col("score_base").mean(), mean_tuned=pl.col("score_tuned").mean())
            .with_columns(delta=pl.col("mean_tuned") - pl.col("mean_base")).sort("scorer", "prompt"))


def check_images_held_out(tuned: Path, prompts: list[str], seed: int) -> str | None:
    """Refuse to evaluate ``tuned`` on the very images it was trained on: an image's seed is a function of the run
    seed, prompt and candidate, so prompts among the captions of a pairs table it learnt from (its own, or one
    of its --init chain's), at the run seed that table's samples were drawn with, make base images identical to
    those training samples. train.json records those tables and their seeds (`rlaif label` records them; other
    tables have none); a table changed since cannot tell which prompts were trained on, so that seed is refused
    outright. Returns a note when the prompts are among the captions of a table it learnt from at other seeds
    (held-out seeds, not held-out prompts), or of one that records no seeds (rebuilt with pandas, say), where
    nothing can be checked."""
    notes = [_check_table(tuned, table, prompts, seed) for table in trained_tables(train_info(tuned))]
    return next((note for note in notes if note), None)


def check_roles(config: EvalConfig) -> list[str]:
    """Refuse a --held-out scorer that labelled a pairs table ``config.tuned`` learnt from (its own or its --init
    chain's): a scorer trained on, reported as held out, would hide reward hacking or flag it the wrong way round.
    Returns notes naming a --scorer given other options than its own table was labelled with (the score reported as
    optimised may be another than the one trained on; a model path may differ between machines alone), and
    --scorer scorers that labelled none of them (reported as optimised all the same)."""
    trained: dict[str, str] = {}  # scorer -> a table it labelled
    options: dict[str, list[dict[str, str]]] = {}  # scorer -> the options of each table it labelled
    for table in trained_tables(train_info(config.tuned)):
        path = Path(table["pairs"])
        with contextlib.suppress(RlaifError):  # a table gone or changed since: nothing to read roles from
            for file in parquet_files(path) if path.exists() else []:
                # a relabelled table's scorers labelled its AI column: trained on its human labels, they are not
                if table.get("label_column") in (None, _scored_column(Path(file))):
                    given = labelled_with(Path(file))
                    for name in labelled_by(Path(file)):  # the model's own table first, then its --init chain's
                        trained.setdefault(name, table["pairs"])
                        options.setdefault(name, []).append(given.get(name, {}))
    if not trained:
        return []
    clash, untrained = miscast_scorers(trained, config.scorers, config.held_out)
    if clash is not None:
        raise RlaifError(f"--held-out {clash}: {config.tuned} was trained on pairs labelled by {clash} "
                         f"({trained[clash]}), so it is not held out; pass it as --scorer")
    now, notes = parse_options(config.scorer_options), []
    for name in parse_weights(config.scorers):
        if name in options and now.get(name, {}) not in options[name]:
            then = options[name][0]
            labelled = ", ".join(f"{key}={value}" for key, value in sorted(then.items())) or "no options"
            advice = ("give it exactly " + " ".join(f"--scorer-option {shlex.quote(f'{name}.{key}={value}')}"
                                                    for key, value in sorted(then.items()))) if then \
                else "drop its --scorer-option"
            notes.append(f"--scorer {name}: {config.tuned} was trained on pairs it labelled with {labelled} "
                         f"({trained[name]}); scored otherwise here, it is reported as optimised though it may not be "
                         f"the score trained on: to score it as trained, {advice}")
    if untrained:
        notes.append(f"--scorer {', '.join(untrained)}: {config.tuned} was trained on pairs labelled by "
                     f"{', '.join(trained)}, not by {'this scorer' if len(untrained) == 1 else 'these'}; it is "
                     "reported as optimised all the same (pass it as --held-out to have it watched for reward "
                     "hacking)")
    return notes


def miscast_scorers(trained: Collection[str], scorers: list[str], held_out: list[str]) -> tuple[str | None, list[str]]:
    """The scorers an evaluation would report in the wrong role, given those that labelled what the model learnt
    from (``trained``): the first held-out one among them, and the optimised ones (``scorers``, NAME[:WEIGHT])
    not among them."""
    return (next((name for name in held_out if name in trained), None),
            [name for name in parse_weights(scorers) if name not in trained])


def _scored_column(table: Path) -> str:
    """The label column a pairs table's labelling scorers wrote: `rlaif label --relabel`'s AI column beside the
    human labels, else label_0."""
    import pyarrow.parquet as pq

    return AI_LABEL if AI_LABEL in pq.read_schema(table).names else "label_0"


def _check_table(tuned: Path, table: dict, prompts: list[str], seed: int) -> str | None:
    """``check_images_held_out`` for one table that ``tuned`` learnt from (a ``trained_tables`` entry)."""
    pairs = table["pairs"]
    try:
        files = parquet_files(Path(pairs)) if Path(pairs).exists() else []
        seeds = table["sampled_seeds"]
        if seeds is None:  # an output of an rlaif that did not record them: the table's record, as it is now
            seeds = [record.get("seed") for record in recorded_sampling(files)]
    except RlaifError:  # not a table any more
        files, seeds = [], table["sampled_seeds"] or []
    changed = table_changed(pairs, table["pairs_file"])
    if not seeds and files and not changed:
        seen = _trained_prompts(files, prompts, table.get("held_out"))
        if not seen:
            return None
        return (f"{len(seen)} of the {len(prompts)} prompts are captions of {tuned}'s pairs table {pairs}, which "
                "records no run seed of its images (not paired by `rlaif label` from `rlaif sample` runs: Pick-a-Pic, "
                "or a table `label --relabel` wrote), so whether these are its training "
                f"images cannot be checked: --seed {seed} must differ from the seed they were sampled with")
    if seed not in seeds:
        seen = _trained_prompts(files, prompts, table.get("held_out")) if files and not changed else []
        if not seen:
            return None
        return (f"{len(seen)} of the {len(prompts)} prompts are captions of {tuned}'s pairs table {pairs} (e.g. "
                f"{seen[0]!r}): at --seed {seed} they are new images of prompts it trained on, which says less than "
                "prompts it never saw would about how it generalises")
    if changed:
        now = "changed" if Path(pairs).exists() else "gone"
        raise RlaifError(f"--seed {seed}: {tuned} was trained on images sampled at run seed {seed}, and its pairs "
                         f"table {pairs} is {now} since, so which prompts it saw cannot be checked; pass another "
                         "--seed (its images are then held out)")
    if not files:  # gone, and an older output recorded nothing to tell
        return None
    seen = _trained_prompts(files, prompts, table.get("held_out"))
    if seen:
        raise RlaifError(f"--seed {seed} with {len(seen)} of {len(prompts)} prompts that {tuned} was trained on (its "
                         f"pairs table {pairs} was sampled at run seed {seed}, e.g. {seen[0]!r}): the base images "
                         "would be its training samples; pass another --seed (new seeds of those prompts) or "
                         "held-out prompts")
    return None


def _trained_prompts(files: list[str], prompts: list[str], held_out: float | None) -> list[str]:
    """The ``prompts`` that are captions of the pairs table ``files``, less those its training held out (the
    ``held_out`` share of captions, --val-fraction; None: unrecorded, none taken out)."""
    captions = pl.scan_parquet(files).select("caption").unique().collect()["caption"]
    if held_out:
        captions = captions.filter(~held_out_hashes(caption_hashes(captions.to_arrow()), held_out))
    known = set(captions)
    return [prompt for prompt in prompts if prompt in known]


def measured_under(config: EvalConfig, prompts: int, run: dict) -> dict:
    """What an evaluation's numbers were measured under, for eval.parquet's metadata and the report: the prompts,
    the generation settings both sides were sampled with (``run``: the base side's run.json; the guidance as
    resolved, not as given) and the scorers' options."""
    generation = run.get("generation", {})
    return {"prompts": config.prompts, "prompt_count": prompts, "per_prompt": config.per_prompt,
            **{key: generation.get(key) for key in ("steps", "guidance", "seed", "width", "height", "dtype",
                                                     "scheduler", "negative_prompt", "max_sequence_length")},
            "scorer_options": config.scorer_options}


def other_guidance(tuned: Path, guidance: float | None) -> str | None:
    """What to say when a FLUX.1-dev model trained at one distilled guidance (train.json's, its pairs' sampling
    value) is evaluated at another (``guidance``: --guidance, or unset: FluxPipeline's): it learnt its
    preferences at the first."""
    from diffusers import FluxPipeline

    from rlaif.models import pipeline_guidance

    trained = train_info(tuned).get("distilled_guidance")  # recorded for FLUX.1-dev alone
    used = pipeline_guidance(FluxPipeline) if guidance is None else guidance
    if trained is None or float(used) == float(trained):
        return None
    return (f"{tuned} learnt its preferences at distilled guidance {trained:g} (FLUX.1-dev's guidance input, its "
            f"pairs' sampling value), and this evaluation sampled at {float(used):g}: pass --guidance {trained:g} to "
            "measure it where it learnt, or keep this value to measure it where you will use it")


def run_eval(config: EvalConfig, progress: Progress | None = None, base_dir: Path | None = None,
             note: Callable[[str], None] | None = None) -> Path:
    """Sample base and tuned images with the same seeds, score both, write eval.parquet (and
    eval_by_category.parquet when the prompts have categories) and report.html; return the eval table.
    ``base_dir`` lets several evaluations of one base model share its samples (default OUT/base); ``note`` is
    told what could not be checked."""
    config.validate()
    prompt_table = load_prompt_table(config.prompts, config.prompt_column, config.max_prompts)
    prompts = prompt_table["prompt"].to_list()
    notes = [*check_roles(config), *(text for text in (check_images_held_out(config.tuned, prompts, config.seed),
                                                        other_guidance(config.tuned, config.guidance)) if text)]
    check_trained_from(config.tuned, config.base)
    # the tuned side first: a tuned model that does not fit the base fails before anything is sampled
    sides = {"tuned": (config.out / "tuned", config.tuned), "base": (base_dir or config.out / "base", None)}
    # both sides at the T5 prompt length the model was trained at
    trained_length = trained_config(config.tuned).get("max_sequence_length")
    if config.max_sequence_length and trained_length and config.max_sequence_length != trained_length:
        raise RlaifError(f"--max-sequence-length {config.max_sequence_length}: {config.tuned} was trained at T5 prompt "
                         f"length {trained_length}; evaluate it at that length (leave the option out)")
    length = config.max_sequence_length or trained_length
    for text in notes if note else []:  # once nothing is refused: a refused command says one thing
        note(text)
    scores = {}
    for side, (folder, tuned) in sides.items():
        run_sample(SampleConfig(model=config.base, tuned=tuned, prompts=config.prompts, out=folder,
                                max_prompts=config.max_prompts,
                                per_prompt=config.per_prompt, steps=config.steps, guidance=config.guidance,
                                seed=config.seed, batch_size=config.batch_size, dtype=config.dtype,
                                scheduler=config.scheduler, prompt_column=config.prompt_column, width=config.width,
                                height=config.height, negative_prompt=config.negative_prompt, device=config.device,
                                max_sequence_length=length),
                   progress=progress and (lambda done, total, side=side: progress(f"sampling {side}", done, total)),
                   replace_stale="eval", note=note)  # eval's own folders: another model's or setting's are remade
        samples = read_table(folder / "samples.parquet", SAMPLES_SCHEMA)
        label = LabelConfig(samples_dir=folder, scorers=[*config.scorers, *config.held_out],
                            scorer_options=config.scorer_options,
                            batch_size=config.batch_size, device=config.device)
        side_scores = update_scores(samples, label, progress and (
            lambda scorer, done, total, side=side: progress(f"scoring {side} {scorer}", done, total)))
        scores[side] = side_scores.join(samples.select("sample_id", "prompt_id", "candidate", "seed", "image"),
                                        on="sample_id").with_columns(image=pl.lit(str(folder)) + "/" + pl.col("image"))
    names = [*parse_weights(config.scorers), *config.held_out]
    keys = ["scorer", "prompt_id", "candidate"]
    paired = (scores["base"].filter(pl.col("scorer").is_in(names))
              .join(scores["tuned"].select(*keys, "score", "image"), on=keys, suffix="_tuned")
              .rename({"score": "score_base", "image": "image_base"}))  # same prompt and candidate: same seed
    categories = [c for c in prompt_table.columns if c != "prompt"]
    ids = prompt_table.with_columns(prompt_id=pl.col("prompt").map_elements(prompt_id, pl.String))
    paired = paired.join(ids.select("prompt_id", *categories), on="prompt_id", how="left")
    roles = pl.DataFrame({"scorer": names, "role": [OPTIMISED] * (len(names) - len(config.held_out))
                          + [HELD_OUT] * len(config.held_out)})
    summary = compare(paired, config.resamples, []).join(roles, on="scorer").select(list(EVAL_SCHEMA))
    by_category = compare(paired, config.resamples, categories) if categories else None
    out = config.out / "eval.parquet"
    if process_state().is_main_process:
        run = read_json(sides["base"][0] / "run.json", "evaluate into a new --out") or {}
        settings = measured_under(config, len(prompt_table), run)
        write_table(summary, out, EVAL_SCHEMA, {EVAL_METADATA: json.dumps(settings)})
        write_table(by_prompt(paired), config.out / "eval_by_prompt.parquet", BY_PROMPT_SCHEMA)
        if by_category is not None:
            write_table(by_category, config.out / "eval_by_category.parquet", CATEGORY_SCHEMA)
        else:  # an earlier evaluation's breakdown in this folder would contradict this one
            (config.out / "eval_by_category.parquet").unlink(missing_ok=True)
        log_path = config.train_log or config.tuned / "train_log.jsonl"
        train_log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
            if log_path.is_file() else []
        write_report(config.out / "report.html", summary, by_category, paired.sort("candidate", "prompt"), names,
                     train_log, title=f"{config.base} vs {config.tuned}", grid=config.grid,
                     warnings=[*reward_hacking(summary), *filter(None, [few_prompts(summary)]),
                               *unsteady_relative(summary), *notes],
                     settings=settings)
    process_state().wait_for_everyone()
    return out
