"""Every stage's settings as one dataclass (TRL style): field help texts are the CLI's help texts, and each
config validates itself in one place. Importing this module is cheap (no torch, polars or diffusers), so the
CLI parses arguments and prints help at once; checks that need those libraries import them when they run.

``check_values`` rejects impossible settings; ``validate`` also checks the paths (``rlaif loop`` checks every
stage's values before the files of later stages exist).
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rlaif.errors import RlaifError
from rlaif.files import check_in_dir, check_out_dir, held_output
from rlaif.scoring import check_scorers

# The choices of settings, named here so that help texts need no heavy import; the modules that implement
# them (rlaif.pairing, rlaif.train.loss, rlaif.train.trainer, rlaif.models) use these names.
STRATEGIES = ("best-worst", "all-pairs", "top-vs-bottom")
COMBINE_RULES = ("zscore", "rank")
LOSS_TYPES = ("sigmoid", "hinge", "ipo")  # the DPO losses; "sft" is the baseline without a reference
POSITIVE_LOSS_TYPES = ("sigmoid", "hinge")  # those DPO-Positive's penalty applies to
OPTIMIZERS = ("adamw", "adafactor", "sgd")
DTYPES = ("fp32", "fp16", "bf16")
PRECISIONS = ("no", "fp16", "bf16")
CACHE_DTYPES = ("fp32", "bf16", "fp16")
FLOW_WEIGHTINGS = ("logit_normal", "mode", "uniform")  # rlaif.train.flow
# Per model family (UNet + DDPM noise: SD1.5 / SD2 / SDXL; rectified-flow transformer: SD3 / SD3.5 / FLUX.1):
# DPO beta and DPO-Positive's lambda: for UNets, beta 1000 with the penalty cleared more of bench/reward_suite.py than
# the official loss (beta 5000, no penalty), for a little more loss of prompt following (bench/RESULTS.md); flow
# transformers keep Flow-DPO as released (flow_grpo: beta 100, no penalty), which no suite has measured against
DEFAULT_BETA = {"unet": 1000.0, "transformer": 100.0}
DEFAULT_DPO_POSITIVE = {"unet": 1.0, "transformer": 0.0}
# How strongly the unconditional (empty-caption) prediction is held at the reference's (``--keep-unconditional``): on
# UNets sampled with classifier-free guidance it let bench/reward_suite.py's colour and texture rewards through, which
# guidance had cancelled, for more loss of prompt following (bench/RESULTS.md); flow transformers keep Flow-DPO as
# released (FLUX.1 samples without guidance)
DEFAULT_KEEP_UNCONDITIONAL = {"unet": 1.0, "transformer": 0.0}
# the default share of empty captions on a UNet whose unconditional prediction is not held; flow transformers keep
# Flow-DPO as released (flow_grpo trains every pair with its caption): 0
CAPTION_DROPOUT = 0.2
# The official Diffusion-DPO loss as `rlaif train` settings: what examples/*.toml pin and the benchmarks compare with
OFFICIAL_LOSS = {"beta": 5000.0, "dpo_positive": 0.0, "keep_unconditional": 0.0, "caption_dropout": CAPTION_DROPOUT}
# Weight decay of adamw and adafactor: the official DiffusionDPO train.py's 1e-2 (both optimizers), flow_grpo's 1e-4
DEFAULT_WEIGHT_DECAY = {"unet": 1e-2, "transformer": 1e-4}
# Peak learning rate, by what is trained: LoRA's, the best LoRA recipe of bench/reward_suite.py; the whole network's,
# the demo's (full fine-tuning at LoRA's rate diverges within a few steps)
DEFAULT_LEARNING_RATE = {"lora": 3e-4, "full": 1e-5}
DEFAULT_LORA_TARGETS = {  # the attention projections, joint attention included (diffusers' SD3 LoRA script and
    # flow_grpo's Flow-DPO; diffusers' FLUX LoRA script also adapts the feed-forward layers)
    "unet": "to_q,to_k,to_v,to_out.0",
    "transformer": "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out",
}
# ORG/NAME, or ORG/NAME@REVISION pinned to a commit, tag or branch (not a mistyped DIR/FILE.parquet)
HUB_DATASET = re.compile(r"^(?!.*\.parquet$)[\w.-]+/[\w.-]+(@[\w.-]+)?$")


def hub_dataset_id(source: str) -> bool:
    """Whether a pairs source that is no local path names a hub dataset (ORG/NAME[@REVISION]): not when its first
    folder exists here, which makes it a mistyped local path (run/pairs.parqet), not a dataset to fetch."""
    return bool(HUB_DATASET.match(source)) and not Path(source.split("/")[0]).is_dir()


def missing_pairs(source: str) -> str:
    """The refusal of a pairs source that names nothing rlaif can read."""
    here = (f"; a folder {source.split('/')[0]} is here, so it is read as a local path (for the hub dataset, give "
            f"hf://datasets/{source})") if HUB_DATASET.match(source) and not hub_dataset_id(source) else ""
    return (f"pairs table {source} does not exist (expected a parquet file, a folder of parquet shards, a "
            f"datasets.save_to_disk folder, a hub dataset id or an fsspec URL){here}")


MAX_SEQUENCE_LENGTH_HELP = ("SD3 / FLUX.1 only: T5 prompt length in tokens, at most 512 (longer prompts are cut). "
                             "Default: 256 for SD3 and FLUX.1-schnell (its model card's), 512 for FLUX.1-dev, at "
                             "most the T5 tokenizer's limit; sample, train and eval a model at the same length "
                             "(eval defaults to the length the model was trained at).")

MAX_PROMPTS_HELP = ("Use only N of the prompts: those whose text hashes lowest, a spread over the file (not its first "
                    "N) that is the same for every model, seed and run; e.g. 200 of parti's 1632 on a small machine. "
                    "Subsets of one file nest (100 lie inside 200): hold out prompts from another file.")
GUIDANCE_HELP = ("Classifier-free guidance scale (FLUX.1-dev: its distilled guidance input). Default: what the model's "
                 "diffusers pipeline uses when called without one: 7.5 for SD1.5 / SD2, 5.0 for SDXL, 7.0 for SD3 / "
                 "SD3.5, 3.5 for FLUX.1-dev, 0 for FLUX.1-schnell (it has no guidance input).")


def official_loss(loss: str = "sigmoid") -> dict:
    """OFFICIAL_LOSS's settings as ``--loss loss`` takes them: sft, which has no beta, without it."""
    return {name: value for name, value in OFFICIAL_LOSS.items() if not (loss == "sft" and name == "beta")}


def check_sequence_length(value: int | None) -> None:
    """--max-sequence-length: 1 to 512 tokens (the T5 limit of the SD3 and FLUX pipelines), or unset."""
    if value is not None and not 1 <= value <= 512:
        raise RlaifError(f"--max-sequence-length must be between 1 and 512 tokens, got {value}")


def _check_finite(config: object) -> None:
    """Refuse a NaN or infinite number for any setting: every comparison with NaN is false, so range checks pass it
    (--guidance nan sampled, --max-grad-norm nan turned clipping off, --min-margin nan dropped nothing)."""
    for spec in fields(config):
        value = getattr(config, spec.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise RlaifError(f"--{spec.name.replace('_', '-')} must be a finite number, got {value}")


def _check_generation(config: SampleConfig | EvalConfig) -> None:
    """The image-generation settings that sample and eval share."""
    for name in ("width", "height"):
        value = getattr(config, name)
        if value is not None and (value < 8 or value % 8):
            raise RlaifError(f"--{name} must be a positive multiple of 8, got {value}")
    if config.guidance is not None and config.guidance < 0:
        raise RlaifError(f"--guidance must not be negative, got {config.guidance}")
    if config.negative_prompt and config.guidance is not None and config.guidance <= 1:  # as FLUX.1's, dropped
        raise RlaifError(f"--negative-prompt needs classifier-free guidance, and at --guidance {config.guidance} "
                         "(at most 1) the pipeline samples without it, ignoring the negative prompt")
    if config.dtype not in DTYPES:
        raise RlaifError(f"--dtype {config.dtype!r} is not one of {', '.join(DTYPES)}")
    check_sequence_length(config.max_sequence_length)
    check_device(config.device)


def check_device(device: str | None) -> None:
    """A --device that this machine has (None: the process's own accelerator)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device)
    except RuntimeError as exc:
        raise RlaifError(f"--device {device!r} is not a device (e.g. cpu, cuda, cuda:1, mps)") from exc
    if kind.type == "cpu":
        return
    if kind.type == "mps":  # torch.mps.is_available is torch >= 2.5; the backends flag is older
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, kind.type, None)
        available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
        count = backend.device_count() if available and hasattr(backend, "device_count") else 1
    if not available:
        raise RlaifError(f"--device {device}: this machine has no {kind.type} device (torch {torch.__version__})")
    if kind.index is not None and kind.index >= count:
        raise RlaifError(f"--device {device}: this machine has {count} {kind.type} device(s), numbered from 0")


def _is_pairs_table(path: Path) -> bool:
    """Whether ``path`` is a parquet table of pairs (rlaif's or Pick-a-Pic's columns), which label may replace."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException):
        return False
    return "label_0" in names and bool({"image_0", "jpg_0"} & names)


def _check_prompts(source: str, column: str | None) -> None:
    """A prompts file that can be read as given (it exists, its type, its column), before any model loads."""
    from rlaif.prompts import load_prompt_table

    load_prompt_table(source, column)


def _check_tuned(folder: Path, option: str) -> None:
    check_in_dir(folder, option)  # told before diffusers is imported, as the other path checks are
    from rlaif.train.outputs import check_output  # diffusers: imported only when a command runs

    check_output(folder, option)


@dataclass
class SampleConfig:
    """Settings of ``rlaif sample``; field help texts are the CLI's help texts."""

    model: str = field(metadata={"help": "SD1.5 / SDXL / SD3 / FLUX.1: hub id, local diffusers folder, or an "
                                         "offline alias (tiny, tiny-xl, tiny-sd3, tiny-flux)."})
    prompts: str = field(metadata={"help": "Prompt file (.txt, .csv, .tsv, .jsonl, .parquet) or a bundled set: "
                                           "parti, demo-train, demo-eval, shapes."})
    out: Path = field(metadata={"help": "Output folder: images/, samples.parquet, run.json."})
    max_prompts: int | None = field(default=None, metadata={"help": MAX_PROMPTS_HELP})
    tuned: Path | None = field(default=None, metadata={
        "help": "An `rlaif train` output folder to apply on --model (its LoRA fused, or its UNet)."})
    per_prompt: int = field(default=4, metadata={"help": "Candidate images per prompt."})
    steps: int = field(default=30, metadata={"help": "Denoising steps."})
    guidance: float | None = field(default=None, metadata={"help": GUIDANCE_HELP})
    width: int | None = field(
        default=None, metadata={"help": "Image width in pixels (multiple of 8); default: the model's."}
    )
    height: int | None = field(
        default=None, metadata={"help": "Image height in pixels (multiple of 8); default: the model's."}
    )
    negative_prompt: str = field(default="", metadata={
        "help": "Negative prompt for every image (not FLUX.1, which samples without classifier-free guidance, "
                "nor at --guidance 1 or below)."})
    max_sequence_length: int | None = field(default=None, metadata={"help": MAX_SEQUENCE_LENGTH_HELP})
    seed: int = field(
        default=0, metadata={"help": "Run seed; each image's seed derives from (seed, prompt, candidate)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Images per forward pass (may mix prompts)."})
    dtype: str = field(default="fp32", metadata={"help": "Model dtype: fp32, fp16 or bf16."})
    device: str | None = field(
        default=None, metadata={"help": "Device, e.g. cuda:0 or cpu; default: this process's accelerator."}
    )
    scheduler: str | None = field(
        default=None, metadata={"help": "Diffusers scheduler class, e.g. EulerDiscreteScheduler; default: the model's."}
    )
    prompt_column: str | None = field(
        default=None, metadata={"help": "Prompt column of a table file (default: prompt / Prompt / caption)."}
    )

    def validate(self) -> None:
        """Reject impossible settings and unusable paths before anything is loaded or written."""
        self.check_values()
        check_out_dir(self.out, "--out", "sample")
        if self.tuned is not None:
            _check_tuned(self.tuned, "--tuned")
        _check_prompts(self.prompts, self.prompt_column)

    def check_values(self) -> None:
        """Reject impossible settings (paths aside)."""
        _check_finite(self)
        for name in ("per_prompt", "steps", "batch_size", "max_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RlaifError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        _check_generation(self)


PAIRING_SETTINGS = ("strategy", "top_k", "min_margin", "keep_ties", "invert")  # how a samples folder is paired


@dataclass
class LabelConfig:
    """Settings of ``rlaif label``; field help texts are the CLI's help texts."""

    samples_dir: Path | None = field(metadata={"help": "Folder written by `rlaif sample` (holds samples.parquet)."})
    scorers: list[str] = field(metadata={"metavar": "NAME[:WEIGHT]", "help": "Scorer NAME[:WEIGHT]: a name from "
                                         "`rlaif scorers list` or module:attr; several make an ensemble."})
    out: Path | None = field(default=None, metadata={"help": "Pairs table; default SAMPLES_DIR/pairs.parquet "
                                                     "(with --relabel: TABLE.ai-labels.parquet)."})
    relabel: Path | None = field(default=None, metadata={"help": "Instead of SAMPLES_DIR: a Pick-a-Pic style "
                                                         "pair table (caption, jpg_0, jpg_1, label_0) to label "
                                                         "with AI feedback beside its human labels."})
    strategy: str = field(default="best-worst", metadata={"help": f"Pairing: {' | '.join(STRATEGIES)}."})
    top_k: int = field(default=2, metadata={"help": "K of --strategy top-vs-bottom; a prompt with fewer than 2K "
                                                     "candidates pairs its best half against its worst half."})
    min_margin: float = field(default=0.0, metadata={"help": "Drop pairs whose preference gap is smaller."})
    invert: bool = field(default=False, metadata={
        "help": "Swap winners and losers: a control experiment (training on it should lower the reward)."})
    keep_ties: bool = field(default=False, metadata={"help": "Keep exact ties, labelled 0.5 (dropped otherwise)."})
    combine: str | None = field(default=None, metadata={
        "help": "How several scorers combine: zscore (default) | rank (per prompt, then weighted mean). One "
                "scorer's pairs come from its own scores."})
    scorer_options: list[str] = field(default_factory=list, metadata={"metavar": "NAME.KEY=VALUE", 
        "help": "NAME.KEY=VALUE passed to scorer NAME's factory, e.g. clip.arch=ViT-H-14."})
    batch_size: int = field(default=32, metadata={"help": "Images per scorer call."})
    chunk_size: int = field(default=2048, metadata={
        "help": "Images scored between saves of the scores: a killed run loses at most one chunk, and its rerun "
                "scores only what is missing."})
    device: str | None = field(default=None, metadata={"help": "Device for model-based scorers; default: "
                                                       "this process's accelerator."})

    def validate(self) -> None:
        """Reject impossible settings, unknown scorers and unusable paths before anything is loaded or written."""
        if (self.samples_dir is None) == (self.relabel is None):
            raise RlaifError("give either SAMPLES_DIR or --relabel TABLE")
        if self.relabel is not None:  # a table's pairs are given: settings that make pairs must not look applied
            defaults = {f.name: f.default for f in fields(self)}
            given = [name for name in PAIRING_SETTINGS if getattr(self, name) != defaults[name]]
            if given:
                raise RlaifError(f"--{given[0].replace('_', '-')} does not apply with --relabel, which labels the "
                                 "table's own pairs (a tie labelled 0.5); it applies to pairs made from a samples "
                                 "folder")
        if self.samples_dir is not None and self.samples_dir.is_file():
            raise RlaifError(f"SAMPLES_DIR {self.samples_dir} is a file; give the folder `rlaif sample` wrote (it "
                             "holds samples.parquet), or --relabel TABLE for a Pick-a-Pic style pairs table")
        self.check_values()
        if self.out is not None:
            if self.out.parent.exists() and not self.out.parent.is_dir():
                raise RlaifError(f"--out {self.out}: {self.out.parent} is a file, not a folder")
            check_out_dir(self.out.parent, "--out")
            if self.out.is_dir():
                raise RlaifError(f"--out {self.out} is a folder; give the pairs table's file name")
            if self.relabel is not None and self.out.resolve().is_relative_to(self.relabel.resolve()):
                raise RlaifError(f"--out {self.out} is the table being relabelled (or inside it); the AI labels go "
                                 "into a new table beside it")
            if self.out.exists() and not _is_pairs_table(self.out):
                raise RlaifError(f"--out {self.out} exists and is not a pairs table; give a new file name (label "
                                 "replaces only a table of pairs, as a rerun does)")
        if self.samples_dir is not None and not (self.samples_dir / "samples.parquet").is_file():
            check_in_dir(self.samples_dir, "SAMPLES_DIR")
            if (self.samples_dir / "run.json").is_file():
                raise RlaifError(f"SAMPLES_DIR {self.samples_dir} holds an `rlaif sample` run that has not finished "
                                 "(no samples.parquet yet); rerun its `rlaif sample` command to finish it")
            held = held_output(self.samples_dir, "sample")
            raise RlaifError(f"SAMPLES_DIR {self.samples_dir} holds no samples.parquet"
                             + (f" but {held}" if held else "") + "; give the folder `rlaif sample` wrote")

    def check_values(self) -> None:
        """Reject impossible settings and unknown scorers or options (paths aside)."""
        _check_finite(self)
        if not self.scorers:
            raise RlaifError("give at least one --scorer")
        if self.strategy not in STRATEGIES:
            raise RlaifError(f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.combine is not None and self.combine not in COMBINE_RULES:
            raise RlaifError(f"--combine {self.combine!r} is not one of {', '.join(COMBINE_RULES)}")
        if self.combine is not None and len(set(self.scorers)) == 1:  # --min-margin is then on its own scale
            raise RlaifError(f"--combine {self.combine} combines several scorers; with one, pairs come from its own "
                             "scores: drop --combine")
        for name in ("top_k", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise RlaifError(f"--{name.replace('_', '-')} must be at least 1")
        if self.min_margin < 0:
            raise RlaifError("--min-margin must not be negative")
        if self.top_k != LabelConfig.top_k and self.strategy != "top-vs-bottom":  # it would pair nothing otherwise
            raise RlaifError(f"--top-k applies to --strategy top-vs-bottom, not {self.strategy}")
        check_device(self.device)
        check_scorers(self.scorers, self.scorer_options)

    @property
    def combine_rule(self) -> str:
        """How the scorers combine: --combine, zscore by default."""
        return self.combine or COMBINE_RULES[0]


@dataclass
class TrainConfig:
    """Settings of ``rlaif train``; field help texts are the CLI's help texts."""

    pairs: str = field(metadata={
        "help": "Pairs: rlaif pairs.parquet or a Pick-a-Pic v2 style table, as a parquet file, a folder of parquet "
                "shards (its train split when it holds several), a datasets.save_to_disk folder, a hub dataset id "
                "(e.g. yuvalkirstain/pickapic_v2, or pinned to a version: yuvalkirstain/pickapic_v2@COMMIT) or an "
                "fsspec URL (hf://..., s3://...). Read lazily: memory does not grow with the table."})
    model: str = field(metadata={"help": "Hub id, local diffusers folder, or tiny / tiny-xl / tiny-sd3 / tiny-flux."})
    out: Path = field(metadata={"help": "Output folder: LoRA or UNet weights, checkpoints/, train_log.jsonl."})
    streaming: bool = field(default=False, metadata={
        "help": "With a hub dataset id: read its parquet shards over the network (only the label columns and the "
                "row groups trained on, each once per machine: kept in $RLAIF_CACHE/train/blocks while trained on) "
                "instead of downloading them first."})
    init: Path | None = field(default=None, metadata={
        "help": "Start from an `rlaif train` output (LoRA fused, or its UNet) instead of the plain model; it is "
                "also the reference (iterative Diffusion-DPO)."})
    label_column: str | None = field(default=None, metadata={
        "help": "Column holding the preference (1: image 0 wins, 0: image 1 wins, 0.5: tie); default: ai_label_0 "
                "when the table has it (written by `rlaif label --relabel`), else label_0."})
    full: bool = field(default=False, metadata={"help": "Full fine-tuning (frozen reference copy) instead of LoRA."})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={
        "help": "LoRA alpha (the update is scaled by alpha / rank); default: the rank, scale 1, as in diffusers' LoRA "
                "training examples (so a lower --lora-rank does not scale the update up)."})
    lora_targets: str | None = field(default=None, metadata={
        "help": "LoRA target modules (comma-separated). Default: the attention projections, "
                f"{DEFAULT_LORA_TARGETS['unet']} of a UNet; of an SD3 / FLUX transformer also its joint attention's "
                "add_q_proj, add_k_proj, add_v_proj, to_add_out."})
    loss: str = field(default="sigmoid", metadata={"help": f"{' | '.join(LOSS_TYPES)} (DPO) or sft."})
    beta: float | None = field(default=None, metadata={
        "help": "DPO beta. Default: 1000 for SD1.5 / SDXL (official Diffusion-DPO: 5000, which moved fewer rewards "
                "of bench/reward_suite.py), 100 for SD3 / SD3.5 / FLUX.1 (Flow-DPO as released in flow_grpo). Lower "
                "moves the reward further and keeps less to the prompt."})
    dpo_positive: float | None = field(default=None, metadata={
        "help": "DPO-Positive's lambda (Pal et al. 2024): also penalise the policy for denoising a winner worse than "
                "the reference, so the margin cannot grow by making winners less likely too; 0 is the official "
                "loss. Default: 1 for SD1.5 / SDXL with --loss sigmoid or hinge (with beta 1000 it raised more "
                "rewards of bench/reward_suite.py than the official loss, for a little more loss of prompt "
                "following), else 0 (SD3 / FLUX.1: not measured there)."})
    keep_unconditional: float | None = field(default=None, metadata={
        "help": "Hold the unconditional (empty-caption) prediction at the reference's: the loss also pays this value "
                "x 0.5 x beta x its squared distance from the reference's on each pair's noised winner (a KL term on "
                "the unconditional model). Under classifier-free guidance a drifting unconditional prediction is "
                "subtracted, scaled by the guidance, from what the prompted one learned; held, guidance amplifies "
                "it. It holds the empty caption (SDXL: the zeros its pipeline samples with), so it serves sampling "
                "without a negative prompt, which replaces that branch. Adds half again a step's rows to its "
                "policy and reference calls (LoRA on 2 CPU cores: 1.3 times as long; bench/train.py). Default: 1 "
                "for UNet models (SD1.5 / SD2 / SDXL) with --loss sigmoid or hinge (on bench/reward_suite.py it "
                "raised more rewards, and the pictures kept less to the prompt; 0 keeps "
                "closer), 0 for SD3 / SD3.5 / FLUX.1 and --loss ipo or sft."})
    flow_weighting: str = field(default=FLOW_WEIGHTINGS[0], metadata={
        "help": f"SD3 / FLUX only (refused for others): where on the noise path pairs are trained, "
                f"{' | '.join(FLOW_WEIGHTINGS)} (SD3 paper; logit-normal(0, 1) as in diffusers' SD3 script and "
                "Flow-DPO; diffusers' FLUX script draws uniformly)."})
    min_noise: float = field(default=0.0, metadata={
        "help": "Train only from this noise level up, as a fraction of the noise schedule (0: the clean image, 1: "
                "pure noise), to --max-noise: UNet models draw timesteps uniformly from [min, max) x the schedule's "
                "length; SD3 / FLUX rescale the --flow-weighting draw into that part of the timesteps, before the "
                "shift (SD3's shift 3 makes 0.5 noise levels from 0.75 up). Colour and layout are set at "
                "high noise: on bench/reward_suite.py, 0.75 raised a colour reward the defaults did not "
                "(colourfulness), and lowered one that asks the prompt's colour (bench/RESULTS.md)."})
    max_noise: float = field(default=1.0, metadata={"help": "Train only up to this noise level (see --min-noise)."})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Peak learning rate (per sample if --scale-lr); default 3e-4 with LoRA (with rank 32, 4 pairs per "
                "step and 600 steps, the best LoRA recipe of bench/reward_suite.py), 1e-5 with --full."})
    scale_lr: bool = field(default=False, metadata={
        "help": "Multiply the learning rate by the global batch (pairs x accumulation x processes), as the "
                "official code does."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps of the constant schedule."})
    max_steps: int = field(default=600, metadata={
        "help": "Optimizer steps. 600 x 4 pairs is 63 passes over a 38-pair table (bench/reward_suite.py: longer "
                "runs on so few pairs make the model draw less of what it is asked) and 0.25% of Pick-a-Pic v2."})
    batch_size: int = field(default=4, metadata={
        "help": "Pairs per process per micro-step (SDXL on a 24 GB card: 1, with --accumulation and "
                "--gradient-checkpointing)."})
    accumulation: int = field(default=1, metadata={"help": "Gradient accumulation micro-steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adafactor | sgd (plain: no momentum, no "
                                                              "weight decay)."})
    weight_decay: float | None = field(default=None, metadata={
        "help": "Weight decay of adamw and adafactor. Default: the official recipe's, 1e-2 for SD1.5 / SDXL "
                "(DiffusionDPO), 1e-4 for SD3 / FLUX.1 (flow_grpo)."})
    mixed_precision: str = field(default="no", metadata={
        "help": "no | fp16 | bf16: autocast for policy and reference alike. With LoRA, the frozen UNet / "
                "transformer and text encoders are also stored in that precision (half the memory: what FLUX.1-dev "
                "needs on an 80 GB card) and the LoRA trains in fp32; full fine-tuning keeps fp32 weights. On CPU, "
                "fp16 runs without loss scaling; prefer bf16 there."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute UNet activations."})
    resolution: int | None = field(default=None, metadata={"help": "Training resolution; default: the model's."})
    random_crop: bool = field(default=False, metadata={"help": "Random instead of centre crop."})
    hflip: bool = field(default=False, metadata={"help": "Random horizontal flip (same for both images)."})
    max_sequence_length: int | None = field(default=None, metadata={"help": MAX_SEQUENCE_LENGTH_HELP})
    caption_dropout: float | None = field(default=None, metadata={
        "help": f"Share of pairs trained with an empty caption. Default: 0 while --keep-unconditional holds the "
                f"unconditional prediction (SD1.5 / SD2 sample with the empty caption, so DPO on it would move what "
                f"the anchor holds; the default is the same for SDXL, untested there) and for SD3 / FLUX.1 (Flow-DPO "
                f"as released), else {CAPTION_DROPOUT}."})
    no_cache: bool = field(default=False, metadata={
        "help": "Encode images and captions every step instead of caching VAE latents and text embeddings on disk "
                "($RLAIF_CACHE/train, keyed by content, model and augmentation; see `rlaif cache info`)."})
    cache_dtype: str = field(default="fp32", metadata={
        "help": "fp32 | bf16 | fp16: how cached latents and text embeddings are kept. fp32 trains exactly as without "
                "a cache; bf16 and fp16 halve the disk a large run's cache needs (fresh values are rounded the same "
                "way)."})
    workers: int | None = field(default=None, metadata={
        "help": "DataLoader worker processes per training process that read, decode and augment pairs ahead of the "
                "step (0: in the training process). Default: on a GPU, up to 4 (the CPU cores per process less "
                "one); on CPU only, 0 (the model already uses every core). Results do not depend on it."})
    report_to: str | None = field(default=None, metadata={"help": "Also log to tensorboard | wandb | all "
                                                                 "(accelerate trackers; logs under OUT/logs)."})
    val_fraction: float = field(default=0.05, metadata={
        "help": "Share of the table's prompts whose pairs are held out of training (when it has at least 20 "
                "prompts): the DPO model's implicit accuracy and reward margin on them are logged every --val-every "
                "steps (is it learning, or memorising?). 0: train on everything."})
    val_every: int | None = field(default=None, metadata={
        "help": "Steps between held-out measurements (default: a tenth of --max-steps); also at the last step."})
    checkpoint_every: int | None = field(default=None, metadata={
        "help": "Save a resumable checkpoint every N steps (0: never). Default: every ~30 minutes when the first "
                "steps show the run will take longer than that."})
    keep_checkpoints: int = field(default=3, metadata={
        "help": "Complete checkpoints kept: the newest N, older ones removed as new ones are written (each holds "
                "the trained weights and optimizer states: SDXL's whole UNet, some 30 GB). 0: keep all."})
    resume: str | None = field(default=None, metadata={
        "help": "'latest' (the last complete checkpoint in OUT; none yet: start at step 0), a checkpoint folder, or "
                "the name of one in OUT/checkpoints."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, augmentation, noise and timesteps."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace the finished run in OUT, and its checkpoints unless --resume is given (default: refuse)."})

    def validate(self) -> None:
        """Reject impossible settings and unusable paths before anything is loaded or written."""
        self.check_values()
        if not Path(self.pairs).exists() and not hub_dataset_id(self.pairs) and "://" not in self.pairs:
            raise RlaifError(missing_pairs(self.pairs))
        check_out_dir(self.out, "--out", "train")
        if self.init is not None:
            _check_tuned(self.init, "--init")

    def inapplicable(self) -> dict[str, Any]:
        """The settings that --loss sft or --full leave unused, each with the value that leaves it out: a --config
        recipe written for DPO with LoRA sets them, and is still the recipe to take to an SFT or full baseline."""
        unused: dict[str, Any] = {}
        if self.loss == "sft":
            unused |= {"beta": None, "val_every": None}
            unused |= {name: None for name in ("keep_unconditional", "dpo_positive") if getattr(self, name)}
        if self.full:
            unused |= {f.name: f.default for f in fields(self) if f.name.startswith("lora_")}
        return {name: value for name, value in unused.items() if getattr(self, name) != value}

    def check_values(self) -> None:
        """Reject impossible settings (paths aside: ``rlaif loop`` checks these before their files exist)."""
        _check_finite(self)
        if self.loss not in (*LOSS_TYPES, "sft"):
            raise RlaifError(f"--loss {self.loss!r} is not one of {', '.join((*LOSS_TYPES, 'sft'))}")
        if self.optimizer not in OPTIMIZERS:
            raise RlaifError(f"--optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.mixed_precision not in PRECISIONS:
            raise RlaifError(f"--mixed-precision {self.mixed_precision!r} is not no, fp16 or bf16")
        for name in ("max_steps", "batch_size", "accumulation", "lora_rank", "lora_alpha"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RlaifError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        lora_set = [f.name for f in fields(self) if f.name.startswith("lora_") and getattr(self, f.name) != f.default]
        if self.full and lora_set:  # they would be recorded in train.json and never used
            raise RlaifError(f"--{lora_set[0].replace('_', '-')} applies to LoRA training; --full trains every weight "
                             "of the UNet / transformer")
        if self.flow_weighting not in FLOW_WEIGHTINGS:
            raise RlaifError(f"--flow-weighting {self.flow_weighting!r} is not one of {', '.join(FLOW_WEIGHTINGS)}")
        if not 0 <= self.min_noise < self.max_noise <= 1:
            raise RlaifError(f"--min-noise {self.min_noise} and --max-noise {self.max_noise}: give 0 <= min < max <= 1 "
                             "(fractions of the noise schedule)")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise RlaifError(f"--weight-decay must not be negative, got {self.weight_decay}")
        if self.optimizer == "sgd" and self.weight_decay:
            raise RlaifError("--weight-decay applies to adamw and adafactor; --optimizer sgd is plain SGD")
        if self.dpo_positive is not None and not self.dpo_positive >= 0:
            raise RlaifError(f"--dpo-positive must not be negative, got {self.dpo_positive}")
        if self.keep_unconditional is not None and not self.keep_unconditional >= 0:
            raise RlaifError(f"--keep-unconditional must not be negative, got {self.keep_unconditional}")
        if self.keep_unconditional and self.loss == "sft":
            raise RlaifError("--keep-unconditional needs a reference model, which --loss sft has not; drop it or pass "
                             "--keep-unconditional 0")
        if self.keep_unconditional and self.loss not in (*POSITIVE_LOSS_TYPES, "sft"):  # its weight is beta-scaled
            raise RlaifError(f"--keep-unconditional applies to --loss {' and '.join(POSITIVE_LOSS_TYPES)}, whose loss "
                             f"beta scales as it scales the anchor; --loss {self.loss}'s is not, and the anchor would "
                             "swamp it: drop it or pass --keep-unconditional 0")
        if self.beta is not None and self.loss == "sft":  # it would be recorded, and never used
            raise RlaifError("--beta applies to the DPO losses; --loss sft fine-tunes on the winners alone, without a "
                             "reference or beta: drop --beta")
        if self.dpo_positive and self.loss not in POSITIVE_LOSS_TYPES:
            raise RlaifError(f"--dpo-positive applies to --loss {' and '.join(POSITIVE_LOSS_TYPES)}, not "
                             f"{self.loss}; drop it or pass --dpo-positive 0")
        for name in ("beta", "learning_rate"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise RlaifError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise RlaifError(f"--cache-dtype {self.cache_dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
        if not 0 <= self.val_fraction < 1:
            raise RlaifError(f"--val-fraction must be at least 0 and below 1, got {self.val_fraction}")
        if self.val_every is not None and self.val_every < 1:
            raise RlaifError(f"--val-every must be at least 1, got {self.val_every}")
        if self.val_every is not None and self.loss == "sft":  # held_out_metrics need a reference
            raise RlaifError("--val-every measures the held-out DPO implicit accuracy, which --loss sft (no reference) "
                             "has not; drop --val-every")
        if self.val_every is not None and not self.val_fraction:
            raise RlaifError("--val-every applies when pairs are held out; --val-fraction 0 holds out none")
        for name in ("warmup_steps", "checkpoint_every", "max_grad_norm", "workers", "keep_checkpoints"):
            if (getattr(self, name) or 0) < 0:
                raise RlaifError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise RlaifError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        check_sequence_length(self.max_sequence_length)
        if self.caption_dropout is not None and not 0 <= self.caption_dropout <= 1:
            raise RlaifError("--caption-dropout must be between 0 and 1")
        if self.report_to not in (None, "tensorboard", "wandb", "all"):
            raise RlaifError(f"--report-to {self.report_to!r} is not tensorboard, wandb or all")
        for tracker in ("tensorboard", "wandb"):
            if self.report_to in (tracker, "all") and importlib.util.find_spec(tracker) is None:
                raise RlaifError(f"--report-to {self.report_to} needs the {tracker} package: pip install {tracker}")


@dataclass
class EvalConfig:
    """Settings of ``rlaif eval``; field help texts are the CLI's help texts."""

    base: str = field(metadata={"help": "Base model: hub id, local diffusers folder, or tiny / tiny-xl / tiny-sd3 "
                                        "/ tiny-flux."})
    tuned: Path = field(metadata={"help": "`rlaif train` output folder (LoRA or UNet) applied on the base model."})
    prompts: str = field(metadata={"help": "Held-out prompt file, or a bundled set (parti, demo-eval, ...); "
                                           "category columns give a breakdown."})
    out: Path = field(metadata={"help": "Output folder: base/ and tuned/ samples, eval.parquet, report.html."})
    scorers: list[str] = field(metadata={"metavar": "NAME", "help": "Scorer the model was trained on (repeat for "
                                                                    "several; each gets its own row)."})
    held_out: list[str] = field(default_factory=list, metadata={
        "metavar": "NAME", "help": "Scorer the model was NOT trained on, reported apart: a rise in the trained "
                                   "scores with a significant fall here is flagged as reward hacking."})
    max_prompts: int | None = field(default=None, metadata={"help": MAX_PROMPTS_HELP})
    per_prompt: int = field(default=4, metadata={"help": "Seeds per prompt (one comparison each)."})
    seed: int = field(default=1, metadata={"help": "Run seed of the evaluation images; keep it different from "
                                                   "the training samples' seed so seeds are held out too."})
    steps: int = field(default=30, metadata={"help": "Denoising steps."})
    guidance: float | None = field(default=None, metadata={"help": GUIDANCE_HELP})
    batch_size: int = field(default=8, metadata={"help": "Images per forward pass and per scorer call."})
    dtype: str = field(default="fp32", metadata={"help": "Model dtype: fp32, fp16 or bf16."})
    scheduler: str | None = field(default=None, metadata={"help": "Diffusers scheduler class; default: the model's."})
    width: int | None = field(default=None, metadata={"help": "Image width in pixels (multiple of 8); default: the "
                                                              "model's."})
    height: int | None = field(default=None, metadata={"help": "Image height in pixels (multiple of 8); default: "
                                                               "the model's."})
    negative_prompt: str = field(default="", metadata={
        "help": "Negative prompt for every image, base and tuned (not FLUX.1, which samples without classifier-free "
                "guidance, nor at --guidance 1 or below)."})
    max_sequence_length: int | None = field(default=None, metadata={"help": MAX_SEQUENCE_LENGTH_HELP})
    device: str | None = field(default=None, metadata={"help": "Device for sampling and scoring, e.g. cuda:0; "
                                                               "default: this process's accelerator."})
    prompt_column: str | None = field(default=None, metadata={"help": "Prompt column of a table file."})
    scorer_options: list[str] = field(default_factory=list, metadata={"metavar": "NAME.KEY=VALUE",
                                                                      "help": "Option KEY=VALUE for scorer NAME."})
    train_log: Path | None = field(default=None, metadata={
        "help": "train_log.jsonl whose curves go into the report; default: TUNED/train_log.jsonl if present."})
    resamples: int = field(default=2000, metadata={"help": "Bootstrap resamples of the confidence interval."})
    grid: int = field(default=24, metadata={"help": "Base | tuned image pairs shown in the report."})

    def validate(self) -> None:
        """Reject impossible settings, unknown scorers and options, and a --tuned that is no train output,
        before anything is sampled."""
        self.check_values()
        check_in_dir(self.tuned, "--tuned")  # the cheap checks first: _check_tuned's whole one imports diffusers
        if self.train_log is not None and not self.train_log.is_file():
            raise RlaifError(f"--train-log {self.train_log} is not a file (give a train_log.jsonl, or leave it out "
                             "for --tuned's own)")
        check_out_dir(self.out, "--out", "eval")
        _check_prompts(self.prompts, self.prompt_column)
        _check_tuned(self.tuned, "--tuned")

    def check_values(self) -> None:
        """Reject impossible settings and unknown scorers or options (paths aside)."""
        _check_finite(self)
        if not self.scorers:
            raise RlaifError("give at least one --scorer")
        for name in ("per_prompt", "steps", "batch_size", "resamples", "max_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RlaifError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.grid < 0:
            raise RlaifError(f"--grid must not be negative, got {self.grid}")
        _check_generation(self)
        both = [*self.scorers, *self.held_out]
        twice = next((name for name in both if both.count(name) > 1), None)
        if twice is not None:
            raise RlaifError(f"scorer {twice!r} is given twice (--scorer and --held-out must differ; a loop's "
                             "[eval] scorers are [label]'s unless it names its own)")
        check_scorers(both, self.scorer_options, weighted=False)

