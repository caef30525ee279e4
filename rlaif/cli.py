"""The ``rlaif`` command line: parse, validate, call the library, print. No logic lives here."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from rlaif.cli_options import PATH_OPTION, argument, config_from_cli, default, nonempty_text, option
from rlaif.config import EvalConfig, LabelConfig, SampleConfig, TrainConfig
from rlaif.errors import RlaifError, exception_text
from rlaif.files import check_out_dir

app = typer.Typer(
    help="Align text-to-image diffusion models to AI feedback: sample -> label -> train -> eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"rlaif {version('rlaif')}")
        except PackageNotFoundError:  # a checkout imported without installing it
            print("rlaif (not installed: no version)")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print rlaif's version and exit.")] = False) -> None:
    """Align text-to-image diffusion models to AI feedback: sample -> label -> train -> eval."""


def say(message: str) -> None:
    """One line on stderr (what a command did; errors go through ``main``)."""
    print(message, file=sys.stderr, flush=True)


def start(unit: str):
    """What every command does before its work: quiet the libraries' own bars and logs, and return whether this
    is the main process (the one that reports) and its progress reporter (bars or log lines)."""
    from rlaif.cli_progress import progress_output
    from rlaif.distributed import process_state

    quiet_libraries()
    show = process_state().is_main_process
    return show, progress_output(unit, visible=show)


S = SampleConfig


@app.command()
def sample(
    model: Annotated[str, option(S, "model", "--model", "-m")],
    prompts: Annotated[str, option(S, "prompts", "--prompts", "-p")],
    out: Annotated[Path, option(S, "out", "--out", "-o")],
    tuned: Annotated[Path | None, option(S, "tuned")] = default(S, "tuned"),
    max_prompts: Annotated[int | None, option(S, "max_prompts")] = default(S, "max_prompts"),
    per_prompt: Annotated[int, option(S, "per_prompt", "--per-prompt", "-n")] = default(S, "per_prompt"),
    steps: Annotated[int, option(S, "steps")] = default(S, "steps"),
    guidance: Annotated[float | None, option(S, "guidance")] = default(S, "guidance"),
    width: Annotated[int | None, option(S, "width")] = default(S, "width"),
    height: Annotated[int | None, option(S, "height")] = default(S, "height"),
    negative_prompt: Annotated[str, option(S, "negative_prompt")] = default(S, "negative_prompt"),
    max_sequence_length: Annotated[int | None, option(S, "max_sequence_length")] = default(S, "max_sequence_length"),
    seed: Annotated[int, option(S, "seed")] = default(S, "seed"),
    batch_size: Annotated[int, option(S, "batch_size")] = default(S, "batch_size"),
    dtype: Annotated[str, option(S, "dtype")] = default(S, "dtype"),
    device: Annotated[str | None, option(S, "device")] = default(S, "device"),
    scheduler: Annotated[str | None, option(S, "scheduler")] = default(S, "scheduler"),
    prompt_column: Annotated[str | None, option(S, "prompt_column")] = default(S, "prompt_column"),
) -> None:
    """Generate PER_PROMPT candidate images for every prompt (resumable; shards under accelerate/torchrun)."""
    config = SampleConfig(**locals())
    config.validate()  # before the heavy imports: a mistyped path is told at once, not after seconds
    from rlaif.out_lock import writing
    from rlaif.sample import run_sample

    show, output = start("images")
    with writing(config.out, "sample"), output as report:
        table = run_sample(config, progress=lambda done, total: report("sampling", done, total),
                           note=(lambda message: say(f"note: {message}")) if show else None)
    if show:
        import polars as pl

        made = pl.read_parquet(table, columns=["prompt_id"])
        say(f"wrote {table}: {made.height} images, {made['prompt_id'].n_unique()} prompts x {config.per_prompt}")


L = LabelConfig


@app.command()
def label(
    scorers: Annotated[list[str], option(L, "scorers", "--scorer", "-s")],
    samples_dir: Annotated[Path | None, argument(L, "samples_dir")] = None,
    relabel: Annotated[Path | None, option(L, "relabel")] = default(L, "relabel"),
    out: Annotated[Path | None, option(L, "out", "--out", "-o")] = default(L, "out"),
    strategy: Annotated[str, option(L, "strategy")] = default(L, "strategy"),
    top_k: Annotated[int, option(L, "top_k")] = default(L, "top_k"),
    min_margin: Annotated[float, option(L, "min_margin")] = default(L, "min_margin"),
    keep_ties: Annotated[bool, option(L, "keep_ties")] = default(L, "keep_ties"),
    invert: Annotated[bool, option(L, "invert")] = default(L, "invert"),
    combine: Annotated[str | None, option(L, "combine")] = default(L, "combine"),
    scorer_options: Annotated[list[str], option(L, "scorer_options", "--scorer-option")] = [],  # noqa: B006
    batch_size: Annotated[int, option(L, "batch_size")] = default(L, "batch_size"),
    chunk_size: Annotated[int, option(L, "chunk_size")] = default(L, "chunk_size"),
    device: Annotated[str | None, option(L, "device")] = default(L, "device"),
) -> None:
    """Score every sample with AI scorers and write winner/loser pairs (scores are cached per scorer).

    With --relabel TABLE, label a Pick-a-Pic style pair table instead and print the agreement with its
    human labels.
    """
    config = LabelConfig(**locals())
    config.validate()  # before the heavy imports
    from rlaif.label import pairs_out, run_label, scorer_keys
    from rlaif.out_lock import writing
    from rlaif.relabel import run_relabel

    table = pairs_out(config)
    keys_before = scorer_keys(table)
    show, output = start("images")
    # the samples folder too (its scores.parts/, scores.parquet): a sample into it, or another label of it, would
    # write there at the same time
    within = writing(config.samples_dir, "label") if config.samples_dir is not None else contextlib.nullcontext()
    with within, writing(table, "label"), output as report:
        def progress(scorer: str, done: int, total: int) -> None:
            report(f"scoring {scorer}", done, total)

        if config.relabel is None:
            made = run_label(config, progress)
        else:
            written, agreement = run_relabel(config, progress)
    if not show:
        return
    if config.relabel is None:
        say(f"wrote {made.path}: {made.pairs} pairs from {made.prompts} prompts ({made.ties} tied pairs dropped, "
            f"{made.below_margin} under --min-margin)")
        if made.narrowed:
            some = f"{made.narrowed} prompts have" if made.narrowed > 1 else "1 prompt has"
            say(f"note: {some} fewer than {2 * config.top_k} candidates (--top-k {config.top_k}): each paired its "
                "best half against its worst half instead")
    else:
        say(f"wrote {written}")
        print(f"agreement with human labels: {agreement.accuracy:.3f} ({agreement.agree} agree and "
              f"{agreement.ai_ties_compared} AI ties counted half, of {agreement.compared} non-tied pairs; "
              f"{agreement.pairs} pairs, {agreement.ai_ties} AI ties"
              + (f", {agreement.same_images} pairs of one picture twice (are_different false) left out"
                 if agreement.same_images else "") + ")")
    keys = scorer_keys(table)
    other = sorted(name for name in keys if keys_before.get(name, keys[name]) != keys[name])
    if other:  # the same settings, other labels: a training run that read the table before saw the old ones
        say(f"note: {table} was labelled before by another version of {', '.join(other)} (its code, "
            "options or weights, or where they are, changed); it now holds the new labels, not those a training "
            "run may have read")


T = TrainConfig


@app.command()
def train(
    ctx: typer.Context,
    pairs: Annotated[str | None, argument(T, "pairs")] = None,
    model: Annotated[str | None, option(T, "model", "--model", "-m")] = None,
    out: Annotated[Path | None, option(T, "out", "--out", "-o")] = None,
    streaming: Annotated[bool, option(T, "streaming")] = default(T, "streaming"),
    init: Annotated[Path | None, option(T, "init")] = default(T, "init"),
    label_column: Annotated[str | None, option(T, "label_column")] = default(T, "label_column"),
    full: Annotated[bool, option(T, "full")] = default(T, "full"),
    lora_rank: Annotated[int, option(T, "lora_rank")] = default(T, "lora_rank"),
    lora_alpha: Annotated[int | None, option(T, "lora_alpha")] = default(T, "lora_alpha"),
    lora_targets: Annotated[str | None, option(T, "lora_targets")] = default(T, "lora_targets"),
    loss: Annotated[str, option(T, "loss")] = default(T, "loss"),
    beta: Annotated[float | None, option(T, "beta")] = default(T, "beta"),
    dpo_positive: Annotated[float | None, option(T, "dpo_positive")] = default(T, "dpo_positive"),
    keep_unconditional: Annotated[float | None, option(T, "keep_unconditional")] = default(T, "keep_unconditional"),
    flow_weighting: Annotated[str, option(T, "flow_weighting")] = default(T, "flow_weighting"),
    min_noise: Annotated[float, option(T, "min_noise")] = default(T, "min_noise"),
    max_noise: Annotated[float, option(T, "max_noise")] = default(T, "max_noise"),
    learning_rate: Annotated[float, option(T, "learning_rate")] = default(T, "learning_rate"),
    scale_lr: Annotated[bool, option(T, "scale_lr")] = default(T, "scale_lr"),
    warmup_steps: Annotated[int, option(T, "warmup_steps")] = default(T, "warmup_steps"),
    max_steps: Annotated[int, option(T, "max_steps")] = default(T, "max_steps"),
    batch_size: Annotated[int, option(T, "batch_size")] = default(T, "batch_size"),
    accumulation: Annotated[int, option(T, "accumulation")] = default(T, "accumulation"),
    max_grad_norm: Annotated[float, option(T, "max_grad_norm")] = default(T, "max_grad_norm"),
    optimizer: Annotated[str, option(T, "optimizer")] = default(T, "optimizer"),
    weight_decay: Annotated[float | None, option(T, "weight_decay")] = default(T, "weight_decay"),
    mixed_precision: Annotated[str, option(T, "mixed_precision")] = default(T, "mixed_precision"),
    gradient_checkpointing: Annotated[bool, option(T, "gradient_checkpointing")] = default(T, "gradient_checkpointing"),
    resolution: Annotated[int | None, option(T, "resolution")] = default(T, "resolution"),
    random_crop: Annotated[bool, option(T, "random_crop")] = default(T, "random_crop"),
    hflip: Annotated[bool, option(T, "hflip")] = default(T, "hflip"),
    caption_dropout: Annotated[float | None, option(T, "caption_dropout")] = default(T, "caption_dropout"),
    max_sequence_length: Annotated[int | None, option(T, "max_sequence_length")] = default(T, "max_sequence_length"),
    no_cache: Annotated[bool, option(T, "no_cache")] = default(T, "no_cache"),
    cache_dtype: Annotated[str, option(T, "cache_dtype")] = default(T, "cache_dtype"),
    workers: Annotated[int | None, option(T, "workers")] = default(T, "workers"),
    report_to: Annotated[str | None, option(T, "report_to")] = default(T, "report_to"),
    val_fraction: Annotated[float, option(T, "val_fraction")] = default(T, "val_fraction"),
    val_every: Annotated[int | None, option(T, "val_every")] = default(T, "val_every"),
    checkpoint_every: Annotated[int | None, option(T, "checkpoint_every")] = default(T, "checkpoint_every"),
    keep_checkpoints: Annotated[int, option(T, "keep_checkpoints")] = default(T, "keep_checkpoints"),
    resume: Annotated[str | None, option(T, "resume")] = default(T, "resume"),
    seed: Annotated[int, option(T, "seed")] = default(T, "seed"),
    overwrite: Annotated[bool, option(T, "overwrite")] = default(T, "overwrite"),
    config_file: Annotated[Path | None, typer.Option(
        "--config", help="TOML file of these settings (names as the options, with _ for -); flags given on the "
                         "command line win. See examples/*.toml for the paper's recipes.", **PATH_OPTION)] = None,
) -> None:
    """Fine-tune a model on winner/loser pairs with Diffusion-DPO, or Flow-DPO for SD3 / FLUX.1 (LoRA by default;
    --full for all weights).

    PAIRS, --model and --out are required, on the command line or in --config.
    """
    config = config_from_cli(TrainConfig, ctx, locals(), config_file)
    config.validate()  # before the heavy imports
    from rlaif.out_lock import writing
    from rlaif.train.trainer import complete_checkpoints, run_train

    show, output = start("steps")
    last: dict[str, float] = {}
    with writing(config.out, "train"), output as report:
        def progress(step: int, total: int, logs: dict[str, float]) -> None:
            last.update(logs)
            report("training", step, total, training_info(logs))

        before = set(complete_checkpoints(config.out))
        try:
            written = run_train(config, progress=progress,
                                note=(lambda message: say(f"note: {message}")) if show else None)
        except (Interrupted, KeyboardInterrupt) as exc:  # what to do depends on whether this run checkpointed
            raise Interrupted(train_interrupted(config, set(complete_checkpoints(config.out)) - before)) from exc
    if show:
        from rlaif.train.outputs import weights_path

        info = json.loads((written / "train.json").read_text())
        final = f"final {training_info(last)}" if last else "no step left after the checkpoint"
        dropped = f"{info['unlabelled_dropped']} unlabelled dropped, " if info["unlabelled_dropped"] else ""
        if info.get("same_images_dropped"):
            dropped += f"{info['same_images_dropped']} pairs of one picture twice dropped, "
        each = f"{info['pairs_per_step']} pair{'s' if info['pairs_per_step'] > 1 else ''} each"
        trained = f"{info['pairs_trained']} pair{'s' if info['pairs_trained'] != 1 else ''}"
        processes = f" over {info['processes']} processes" if info["processes"] > 1 else ""
        say(f"trained {info['steps']} steps of {each}{processes} on {trained} ({info['ties_dropped']} ties dropped, "
            f"{dropped}{info['pairs_held_out']} held out; labels: {info['label_column']}): {final}; "
            f"weights in {weights_path(written)}")


def train_interrupted(config: TrainConfig, written: set[Path]) -> str:
    """How to go on with a training run stopped by Ctrl-C: from the checkpoint it ``written`` last, from where it
    resumed, or from step 0."""
    if written:
        return ("interrupted: rerun the same command with --resume latest to go on from the last checkpoint "
                "(--checkpoint-every); the steps after it are done again")
    if config.resume is not None:
        return ("interrupted before this run's first checkpoint (--checkpoint-every): rerun the same command to go on "
                "from where it resumed")
    return "interrupted before the first checkpoint (--checkpoint-every): rerun the same command to start again"


def training_info(logs: dict[str, float]) -> str:
    """The short live summary of a training step: loss, the implicit accuracy for DPO, and the held-out accuracy
    with how many pairs it was measured on when it was measured."""
    accuracy = f" acc {logs['implicit_acc']:.2f}" if "implicit_acc" in logs else ""
    held_out = f" held-out acc {logs['val_implicit_acc']:.2f} ({logs['val_pairs']:.0f} pairs)" \
        if "val_implicit_acc" in logs else ""
    return f"loss {logs['loss']:.4f}{accuracy}{held_out}"


E = EvalConfig
PAIRS_EVAL_SETTINGS = {"base", "tuned", "scorers", "scorer_options"}  # what `rlaif eval --pairs` uses


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    base: Annotated[str, option(E, "base", "--model", "-m", "--base")],
    tuned: Annotated[Path, option(E, "tuned", "--tuned")],
    prompts: Annotated[str | None, option(E, "prompts", "--prompts", "-p")] = None,
    out: Annotated[Path | None, option(E, "out", "--out", "-o")] = None,
    scorers: Annotated[list[str], option(E, "scorers", "--scorer", "-s")] = [],  # noqa: B006
    pairs: Annotated[str | None, typer.Option(
        "--pairs", parser=nonempty_text,
        help="Instead of generating: judge the pairs of this table (any form `rlaif train` reads) with "
             "the tuned model as a DPO preference classifier (against --model as its reference) and "
             "with each --scorer; prints each one's accuracy on the labels.")] = None,
    max_pairs: Annotated[int, typer.Option("--max-pairs", help="Pairs judged with --pairs: 16 stretches of "
                                           "consecutive pairs spread over the table.")] = 512,
    label_column: Annotated[str | None, typer.Option(
        "--label-column", help="With --pairs: the labels judged against; default: ai_label_0 when the table has "
                               "it (`rlaif label --relabel`), else label_0 (a Pick-a-Pic table's human "
                               "labels).")] = None,
    held_out: Annotated[list[str], option(E, "held_out", "--held-out")] = [],  # noqa: B006
    max_prompts: Annotated[int | None, option(E, "max_prompts")] = default(E, "max_prompts"),
    per_prompt: Annotated[int, option(E, "per_prompt", "--per-prompt", "-n")] = default(E, "per_prompt"),
    seed: Annotated[int, option(E, "seed")] = default(E, "seed"),
    steps: Annotated[int, option(E, "steps")] = default(E, "steps"),
    guidance: Annotated[float | None, option(E, "guidance")] = default(E, "guidance"),
    batch_size: Annotated[int, option(E, "batch_size")] = default(E, "batch_size"),
    dtype: Annotated[str, option(E, "dtype")] = default(E, "dtype"),
    scheduler: Annotated[str | None, option(E, "scheduler")] = default(E, "scheduler"),
    width: Annotated[int | None, option(E, "width")] = default(E, "width"),
    height: Annotated[int | None, option(E, "height")] = default(E, "height"),
    negative_prompt: Annotated[str, option(E, "negative_prompt")] = default(E, "negative_prompt"),
    max_sequence_length: Annotated[int | None, option(E, "max_sequence_length")] = default(E, "max_sequence_length"),
    device: Annotated[str | None, option(E, "device")] = default(E, "device"),
    prompt_column: Annotated[str | None, option(E, "prompt_column")] = default(E, "prompt_column"),
    scorer_options: Annotated[list[str], option(E, "scorer_options", "--scorer-option")] = [],  # noqa: B006
    train_log: Annotated[Path | None, option(E, "train_log")] = default(E, "train_log"),
    resamples: Annotated[int, option(E, "resamples")] = default(E, "resamples"),
    grid: Annotated[int, option(E, "grid")] = default(E, "grid"),
) -> None:
    """Compare a tuned model with its base on held-out prompts: same seeds, same scorers; win rates with 95%
    bootstrap intervals in OUT/eval.parquet and a self-contained OUT/report.html. Needs --model, --tuned,
    --prompts, --out and at least one --scorer.

    With --pairs TABLE instead of --prompts and --out: how often the tuned model and each scorer prefer the
    table's labelled winners.
    """
    settings = dict(locals())  # before any other local name exists
    del settings["ctx"], settings["pairs"], settings["max_pairs"], settings["label_column"]
    if pairs is not None:
        ignored = [name for name in settings if name not in PAIRS_EVAL_SETTINGS
                   and getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
        if ignored:
            raise RlaifError(f"--{ignored[0].replace('_', '-')} does not apply with --pairs, which judges the table "
                             "with --model, --tuned, --scorer, --scorer-option, --max-pairs and --label-column only")
        _judge_pairs(base, tuned, pairs, scorers, scorer_options, max_pairs, label_column)
        return
    if label_column is not None:
        raise RlaifError("--label-column applies with --pairs only")
    if getattr(ctx.get_parameter_source("max_pairs"), "name", None) == "COMMANDLINE":
        raise RlaifError("--max-pairs applies with --pairs only")
    for value, flag in ((prompts, "--prompts"), (out, "--out"), (scorers, "--scorer")):
        if not value:
            raise RlaifError(f"missing {flag} (or give --pairs TABLE to judge a pairs table)")
    config = EvalConfig(**settings)
    config.validate()  # before the heavy imports
    from rlaif.eval import run_eval
    from rlaif.out_lock import writing

    show, output = start("images")
    with writing(config.out, "eval"), output as report:
        table = run_eval(config, progress=report, note=(lambda message: say(f"note: {message}")) if show else None)
    if show:
        print_win_rates(table)
        say(f"wrote {table} and {config.out / 'report.html'}")


def _judge_pairs(base: str, tuned: Path, pairs: str, scorers: list[str], scorer_options: list[str],
                 max_pairs: int, label_column: str | None) -> None:
    from rlaif.distributed import process_state
    from rlaif.pair_eval import judged_batches, run_pairs_eval, trained_table_remarks
    from rlaif.scoring import check_scorers

    if max_pairs < 1:
        raise RlaifError(f"--max-pairs must be at least 1, got {max_pairs}")
    check_scorers(scorers, scorer_options, weighted=False)
    show, _ = start("pairs")
    judged = run_pairs_eval(base, tuned, pairs, scorers, scorer_options, max_pairs, label=label_column)
    if not show:  # the numbers of all the processes' pairs: the main one reports
        return
    for row in judged:
        margin = "" if row.margin is None else f", reward margin {row.margin:+.4g}"
        measured = f": accuracy {row.accuracy:.3f} on {row.pairs} pairs{margin}"
        print(row.judge + ("" if math.isnan(row.accuracy) and row.pairs else measured))  # sft: says why not
    left_out = [f"{n} pair{'s' * (n != 1)} {what}" for n, what in
                ((judged[0].ties, "labelled 0.5"), (judged[0].unlabelled, "without a label"),
                 (judged[0].same_images, "of one picture twice (are_different false)")) if n]
    say(f"judged against the labels of column {judged[0].labels} (--label-column chooses another)"
        + ("; of the table's rows, these are not judged, as none states a preference between two different "
           f"pictures: {', '.join(left_out)}" if left_out else ""))
    for remark in trained_table_remarks(tuned, pairs, judged[0].labels):  # accuracy on pairs it learnt
        say(remark)
    processes, count = process_state().num_processes, judged[0].pairs
    if processes > 1 and judged_batches(count, count, 1, processes)[2] == 1:
        say(f"note: {count} pairs do not divide among {processes} processes, so each judged all of them (no faster "
            f"than one); a --max-pairs that {processes} divides splits them")


def print_win_rates(table: Path) -> None:
    """Print an eval.parquet (or a loop's rounds.parquet, with its round column) as a table on stdout."""
    import polars as pl
    from rich.console import Console
    from rich.table import Table

    from rlaif.eval import few_prompts, reward_hacking, unsteady_relative
    from rlaif.stats import bounds_text, interval_decimals, interval_text

    rows = pl.read_parquet(table)
    extra = ["round"] if "round" in rows.columns else []
    view = Table(*extra, "scorer", "role", "prompts", "win (95% CI)", "base", "tuned", "delta (95% CI)",
                 "relative (95% CI)", "p", box=None)
    for row in rows.iter_rows(named=True):
        means = interval_decimals(row["delta_low"], row["delta_high"])  # to the digits the delta shows
        view.add_row(*(str(row[c]) for c in extra), row["scorer"], row["role"], str(row["prompts"]),
                     f"{row['win_rate']:.3f} ({bounds_text(row['ci_low'], row['ci_high'])})",
                     f"{row['mean_base']:.{means}f}", f"{row['mean_tuned']:.{means}f}",
                     interval_text(row["delta"], row["delta_low"], row["delta_high"]),
                     interval_text(row["relative"], row["relative_low"], row["relative_high"], percent=True),
                     f"{row['p_value']:.2g}")
    Console(width=None if sys.stdout.isatty() else 170).print(view)  # a log gets whole lines, not wrapped cells
    last = rows.filter(pl.col("round") == rows["round"].max()) if extra else rows
    for warning in reward_hacking(last):
        say(f"warning: {warning}")
    for text in [*filter(None, [few_prompts(last)]), *unsteady_relative(last)]:
        say(f"note: {text}")


DEMO_CONFIGS = {"tiny": Path(__file__).parent / "assets" / "demo.toml",
                "tiny-sd3": Path(__file__).parent / "assets" / "demo-sd3.toml"}


def _run_loop(config: Path, out: Path | None, control: bool) -> None:
    from rlaif.loop import read_loop, run_loop
    from rlaif.out_lock import writing

    plan = read_loop(config, out, control)
    show, output = start("images")  # sampled and scored; training reports steps
    with writing(plan.loop.out, "loop"), output as report:
        def progress(description: str, done: int, total: int, logs: dict[str, float] | None = None) -> None:
            report(description, done, total, training_info(logs) if logs else "", "steps" if logs else None)

        table = run_loop(plan, progress=progress, note=(lambda message: say(f"note: {message}")) if show else None)
    if show:
        print_win_rates(table)
        say(f"wrote {plan.loop.out} (open {plan.loop.out / 'report.html'})")


@app.command()
def loop(
    config: Annotated[Path, typer.Option("--config", help="Loop config (TOML): a [loop] table (model, prompts, "
                                          "eval_prompts, out, rounds) and [sample] [label] [train] [eval] tables of "
                                          "each command's settings. See rlaif/assets/demo.toml.", **PATH_OPTION)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder; default: [loop] out (with --control: "
                                                                 "[loop] out-control).", **PATH_OPTION)] = None,
    control: Annotated[bool, typer.Option("--control", help="Swap winners and losers (a control run: the reward "
                                                             "should go down).")] = False,
) -> None:
    """Sample, label, train and evaluate for one or more rounds (round r+1 starts from round r's model);
    resumable stage by stage: rerun the same command to continue."""
    _run_loop(config, out, control)


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder; default: runs/demo (runs/demo-sd3 "
                                                                 "with --model tiny-sd3; -control added with "
                                                                 "--control).", **PATH_OPTION)] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="tiny (SD1.5-style, Diffusion-DPO) or tiny-sd3 "
                                                            "(SD3-style, Flow-DPO).")] = "tiny",
    control: Annotated[bool, typer.Option("--control", help="Swap winners and losers: the compressibility win "
                                                             "rate should fall below 0.5.")] = False,
) -> None:
    """The whole loop on a tiny model, offline, in a few CPU minutes: DPO on JPEG compressibility (the DDPO
    reward), evaluated on held-out prompts and seeds; leaves OUT/report.html."""
    if model not in DEMO_CONFIGS:
        raise RlaifError(f"--model {model!r}: the demo runs on {' or '.join(DEMO_CONFIGS)}")
    _run_loop(DEMO_CONFIGS[model], out, control)


scorers_app = typer.Typer(help="Inspect the available scorers.", no_args_is_help=True)
app.add_typer(scorers_app, name="scorers")


@scorers_app.command("list")
def scorers_list() -> None:
    """Print every available scorer: name, where it comes from, what it measures."""
    from rich.console import Console
    from rich.table import Table

    from rlaif.scoring import available_scorers

    table = Table("name", "from", "measures", box=None)
    for entry in available_scorers().values():
        table.add_row(entry.name, entry.source, entry.description)
    Console().print(table)


cache_app = typer.Typer(help="Show or clear what rlaif caches ($RLAIF_CACHE, default ~/.cache/rlaif).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info() -> None:
    """Print the cache's location and the size of each part."""
    from rlaif.cache import CACHE_PARTS, cache_dir, folder_size

    print(f"cache: {cache_dir()}")
    for name, (folder, about) in CACHE_PARTS.items():
        files, size = folder_size(cache_dir() / folder)
        print(f"  {name:10s} {size / 2**20:10.1f} MiB  {files:7d} files  {about}")
    print(f"  {'total':10s} {folder_size(cache_dir())[1] / 2**20:10.1f} MiB")


@cache_app.command("clear")
def cache_clear(
    part: Annotated[str | None, typer.Argument(help="latents | text | blocks | relabel | models | downloads; "
                                                    "default: everything.")] = None,
) -> None:
    """Remove a part of the cache, or all of it (everything in it is rebuilt when needed)."""
    from rlaif.cache import clear_cache

    say(f"freed {clear_cache(part) / 2**20:.1f} MiB")


@app.command()
def tiny(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the diffusers pipeline into.",
                                      **PATH_OPTION)],
    kind: Annotated[str, typer.Option("--kind", help="tiny (SD1.5-style), tiny-xl (SDXL), tiny-sd3 (SD3) or "
                                                     "tiny-flux (FLUX.1-dev).")] = "tiny",
    xl: Annotated[bool, typer.Option("--xl", help="Same as --kind tiny-xl.")] = False,
) -> None:
    """Write a tiny offline model (also reachable as --model tiny / tiny-xl / tiny-sd3 / tiny-flux) as a
    diffusers folder."""
    from rlaif.models import TINY_ALIASES
    from rlaif.tiny import write_tiny

    kind = "tiny-xl" if xl else kind
    if kind not in TINY_ALIASES:
        raise RlaifError(f"--kind {kind!r} is not one of {', '.join(TINY_ALIASES)}")
    check_out_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()):  # never over a user's files, or a real model's weights
        raise RlaifError(f"--out {out} is not empty; give a new or empty folder")
    say(f"wrote {write_tiny(out, kind)}")


def _only_critical(record: logging.LogRecord) -> bool:
    """The root logger's filter while a command runs: only critical records pass."""
    return record.levelno >= logging.CRITICAL


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' loading bars and info logs off the terminal, rlaif draws its own; and
    the root logger's records (open_clip reports there "Model initialized randomly" before rlaif loads the
    HPSv2 weights into it, and a failed download that rlaif reports as one line). RLAIF_DEBUG=1 keeps them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    root = logging.getLogger()
    if os.environ.get("RLAIF_DEBUG") != "1" and _only_critical not in root.filters:
        root.addFilter(_only_critical)  # a filter on the root logger: named loggers' records pass
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers passes it to hf_hub


class Interrupted(BaseException):
    """Ctrl-C. Raised by rlaif's own SIGINT handler because typer turns a KeyboardInterrupt into a silent exit."""


USAGE_ERROR, CLICK_ERROR = typer.BadParameter.__mro__[1:3]  # click's UsageError and ClickException (newer typer
# versions vendor click)


ON_INTERRUPT = {  # what a command stopped by Ctrl-C keeps (training, once begun, says it itself: train_interrupted)
    "sample": "the images written so far are kept; rerun the same command to make the rest",
    "label": "the scores saved so far are kept (each --chunk-size of them); rerun the same command to score the rest",
    "train": "training had not begun; rerun the same command",
    "eval": "rerun the same command to go on (an evaluation keeps the images and scores it made)",
    "loop": "its finished stages and what the current one saved are kept; rerun the same command to go on",
    "demo": "its finished stages and what the current one saved are kept; rerun the same command to go on",
}


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2; Ctrl-C says how to go on."""
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        code = app(standalone_mode=False)  # click's own errors come here too, to be one line like ours
    except USAGE_ERROR as exc:  # a bad option or value: what click found, and where to read more
        if type(exc).__name__ == "NoArgsIsHelpError":  # `rlaif` or `rlaif scorers` alone: the help, as click has it
            say(exc.format_message())
            sys.exit(2)
        say(f"error: {error_line(RlaifError(familiar_option(exc) or exc.format_message()))} "
            f"(see {command_name(exc.ctx)} --help)")
        sys.exit(2)
    except CLICK_ERROR as exc:  # click's other errors (a file option it could not open): one line as well
        say(f"error: {error_line(RlaifError(exc.format_message()))}")
        sys.exit(exc.exit_code)
    except (RlaifError, OSError) as exc:  # OSError: a file-system fault (read-only folder, disk full, ...)
        if os.environ.get("RLAIF_DEBUG") == "1":
            raise
        say(f"error: {error_line(exc)}")
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt, typer.Abort) as exc:
        command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
        say(exc.args[0] if isinstance(exc, Interrupted) and exc.args else
            f"interrupted: {ON_INTERRUPT.get(command, 'rerun the same command to go on')}")
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
    if code:  # typer.Exit(code) from a command
        sys.exit(code)


# Other tools' names for rlaif's options (diffusers' and TRL's training scripts, common abbreviations), which
# click's spelling suggestions do not reach (--lr: "Possible options: --full, --help, --loss")
FAMILIAR_OPTIONS = {
    "--lr": "--learning-rate", "--bs": "--batch-size", "--train-batch-size": "--batch-size",
    "--per-device-train-batch-size": "--batch-size", "--max-train-steps": "--max-steps",
    "--gradient-accumulation-steps": "--accumulation", "--rank": "--lora-rank", "--beta-dpo": "--beta",
    "--output-dir": "--out", "--pretrained-model-name-or-path": "--model", "--model-name-or-path": "--model",
    "--checkpointing-steps": "--checkpoint-every", "--lr-warmup-steps": "--warmup-steps",
    "--num-images": "--per-prompt", "--num-images-per-prompt": "--per-prompt", "--n-samples": "--per-prompt",
    "--num-inference-steps": "--steps", "--guidance-scale": "--guidance", "--resume-from-checkpoint": "--resume",
}


def familiar_option(exc: Exception) -> str | None:
    """For an unknown option that another tool spells so (``FAMILIAR_OPTIONS``), what rlaif's command calls it."""
    given = getattr(exc, "option_name", None)
    ours = given and FAMILIAR_OPTIONS.get(given.replace("_", "-").lower())
    if not ours or exc.ctx is None or not any(ours in param.opts for param in exc.ctx.command.params):
        return None
    return f"No such option: {given}; {command_name(exc.ctx)} calls it {ours}"


def command_name(ctx: object | None) -> str:
    """``rlaif SUBCOMMAND ...`` of a click context, however the program was started (``python -m rlaif``)."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    return " ".join(["rlaif", *names])


def error_line(exc: BaseException) -> str:
    """The one line a user sees for an error: its message, or for an OSError what failed on which file."""
    if isinstance(exc, OSError) and exc.filename is not None:
        from rlaif.cache import cache_dir

        files = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
        cache, failed = cache_dir().resolve(), Path(os.fsdecode(exc.filename)).resolve()
        inside = cache == failed or cache in failed.parents
        return (f"{exc.strerror or type(exc).__name__}: {files}"
                + (f" (rlaif's cache, {cache}: set RLAIF_CACHE to a folder you can write)" if inside else ""))
    return " ".join(exception_text(exc).split())
