"""``rlaif label``: samples -> scores table (cached per scorer) -> winner/loser pairs table."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from accelerate.utils import gather_object
from PIL import Image

from rlaif.distributed import process_state
from rlaif.errors import RlaifError
from rlaif.files import atomic_path, check_out_dir
from rlaif.images import ImageSource, image_bytes, open_rgb
from rlaif.pairing import COMBINE_RULES, STRATEGIES, make_pairs, preference
from rlaif.scoring import LoadedScorer, check_options, resolve_factory
from rlaif.tables import PAIRS_SCHEMA, SAMPLES_SCHEMA, SCORES_SCHEMA, read_table, write_table

WEIGHTED = re.compile(r"(?P<name>.*):(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
RELABEL_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
Progress = Callable[[str, int, int], None]
"""Called as ``progress(scorer, done, total)`` while images are scored."""


@dataclass
class LabelConfig:
    """Settings of ``rlaif label``; field help texts are the CLI's help texts."""

    samples_dir: Path | None = field(metadata={"help": "Folder written by `rlaif sample` (holds samples.parquet)."})
    scorers: list[str] = field(metadata={"help": "Scorer NAME[:WEIGHT] (repeat for an ensemble); a name from "
                                         "`rlaif scorers list` or module:attr."})
    out: Path | None = field(default=None, metadata={"help": "Pairs table; default SAMPLES_DIR/pairs.parquet "
                                                     "(with --relabel: TABLE.ai-labels.parquet)."})
    relabel: Path | None = field(default=None, metadata={"help": "Instead of SAMPLES_DIR: a Pick-a-Pic style "
                                                         "pair table (caption, jpg_0, jpg_1, label_0) to label "
                                                         "with AI feedback beside its human labels."})
    strategy: str = field(default="best-worst", metadata={"help": f"Pairing: {' | '.join(STRATEGIES)}."})
    top_k: int = field(default=2, metadata={"help": "K of --strategy top-vs-bottom."})
    min_margin: float = field(default=0.0, metadata={"help": "Drop pairs whose preference gap is smaller."})
    invert: bool = field(default=False, metadata={
        "help": "Swap winners and losers: a control experiment (training on it should lower the reward)."})
    keep_ties: bool = field(default=False, metadata={"help": "Keep exact ties, labelled 0.5 (default: drop)."})
    combine: str = field(default="zscore", metadata={"help": "How several scorers combine: zscore | rank "
                                                     "(per prompt, then weighted mean)."})
    scorer_options: list[str] = field(default_factory=list, metadata={
        "help": "NAME.KEY=VALUE passed to scorer NAME's factory, e.g. clip.arch=ViT-H-14 (repeatable)."})
    batch_size: int = field(default=32, metadata={"help": "Images per scorer call."})
    device: str | None = field(default=None, metadata={"help": "Device for model-based scorers; default: "
                                                       "this process's accelerator."})

    def validate(self) -> None:
        """Reject impossible settings, unknown scorers and unusable paths before anything is loaded or written."""
        if (self.samples_dir is None) == (self.relabel is None):
            raise RlaifError("give either SAMPLES_DIR or --relabel TABLE")
        self.check_values()
        if self.out is not None:
            check_out_dir(self.out.parent, "--out")
            if self.out.is_dir():
                raise RlaifError(f"--out {self.out} is a folder; give the pairs table's file name")

    def check_values(self) -> None:
        """Reject impossible settings and unknown scorers or options (paths aside)."""
        if not self.scorers:
            raise RlaifError("give at least one --scorer")
        if self.strategy not in STRATEGIES:
            raise RlaifError(f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.combine not in COMBINE_RULES:
            raise RlaifError(f"--combine {self.combine!r} is not one of {', '.join(COMBINE_RULES)}")
        for name in ("top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise RlaifError(f"--{name.replace('_', '-')} must be at least 1")
        if self.min_margin < 0:
            raise RlaifError("--min-margin must not be negative")
        check_scorers(self.scorers, self.scorer_options)


def check_scorers(scorers: list[str], scorer_options: list[str]) -> None:
    """Every scorer exists and takes the options given to it: checked before any work."""
    weights = parse_weights(scorers)
    for spec in weights:
        resolve_factory(spec)
    for spec, options in parse_options(scorer_options).items():
        if spec not in weights:
            raise RlaifError(f"--scorer-option {spec}.{next(iter(options))}: {spec!r} is not one of the scorers "
                             f"({', '.join(weights)})")
        check_options(spec, options)


def parse_options(specs: list[str]) -> dict[str, dict[str, str]]:
    """``["clip.arch=ViT-H-14"]`` -> ``{"clip": {"arch": "ViT-H-14"}}`` (the scorer name may contain dots)."""
    options: dict[str, dict[str, str]] = {}
    for spec in specs:
        target, equals, value = spec.partition("=")
        name, dot, key = target.rpartition(".")
        if not (equals and dot and name and key.isidentifier()):
            raise RlaifError(f"--scorer-option {spec!r}: expected NAME.KEY=VALUE")
        options.setdefault(name, {})[key] = value
    return options


def parse_weights(specs: list[str]) -> dict[str, float]:
    """``["pickscore:2", "pkg.mod:factory"]`` -> ``{"pickscore": 2.0, "pkg.mod:factory": 1.0}``.

    A trailing ``:NUMBER`` is a weight; anything else after a colon belongs to a ``module:attr`` name.
    """
    weights: dict[str, float] = {}
    for spec in specs:
        name, weight = spec, 1.0
        match = WEIGHTED.fullmatch(spec)
        if match:
            name, weight = match["name"], float(match["weight"])
        if not name or weight <= 0:
            raise RlaifError(f"--scorer {spec!r}: expected NAME or NAME:WEIGHT with a positive weight")
        if name in weights:
            raise RlaifError(f"--scorer {name!r} is given twice")
        weights[name] = weight
    return weights


def batched_images(
    sources: list[ImageSource], names: list[str], batch_size: int, pool: ThreadPoolExecutor
) -> Iterator[tuple[int, list[Image.Image]]]:
    """Yield (start, images) batches, decoding on the pool's threads one batch ahead of the caller."""
    def load(start: int) -> list[Image.Image]:
        stop = start + batch_size
        return list(pool.map(open_rgb, sources[start:stop], names[start:stop]))

    upcoming = pool.submit(load, 0)
    for start in range(0, len(sources), batch_size):
        current = upcoming.result()
        upcoming = pool.submit(load, start + batch_size)
        yield start, current


def score_images(
    scorer: LoadedScorer, sources: list[ImageSource], names: list[str], prompts: list[str], batch_size: int,
    progress: Progress | None,
) -> list[float]:
    """Score every image with ``scorer``. Under accelerate/torchrun each process scores every N-th image and
    all processes get the full list back, in order."""
    state = process_state()
    mine = list(range(state.process_index, len(sources), state.num_processes))
    values: list[float] = []
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) + 2)) as pool:
        batches = batched_images([sources[i] for i in mine], [names[i] for i in mine], batch_size, pool)
        for start, images in batches:
            values += scorer(images, [prompts[i] for i in mine[start : start + len(images)]])
            if progress:
                progress(scorer.spec, len(values), len(mine))
    if state.num_processes == 1:
        return values
    ordered = [0.0] * len(sources)
    for index, value in gather_object(list(zip(mine, values, strict=True))):
        ordered[index] = value
    return ordered


def load_scorers(config: LabelConfig) -> dict[str, LoadedScorer]:
    """Every scorer of ``config`` loaded with its options, on ``config.device`` or this process's device."""
    options = parse_options(config.scorer_options)
    device = config.device or process_state().device
    return {spec: LoadedScorer(spec, device=device, **options.get(spec, {})) for spec in parse_weights(config.scorers)}


def file_hashes(root: Path, images: list[str]) -> list[str]:
    """SHA-256 of each image file's bytes: a rewritten image is a new image to score."""
    return [hashlib.sha256((root / image).read_bytes()).hexdigest() for image in images]


def read_score_cache(path: Path) -> pl.DataFrame:
    """The cached scores of a samples folder; a cache from before the keyed columns counts as empty."""
    if not path.exists():
        return pl.DataFrame(schema=SCORES_SCHEMA)
    cached = read_table(path, {})
    if any(name not in cached.columns for name in SCORES_SCHEMA):
        return pl.DataFrame(schema=SCORES_SCHEMA)
    return cached.select([pl.col(name).cast(dtype) for name, dtype in SCORES_SCHEMA.items()])


def update_scores(samples: pl.DataFrame, config: LabelConfig, progress: Progress | None = None) -> pl.DataFrame:
    """The scores table of ``config.samples_dir`` for every scorer of ``config``. A cached score is reused only
    if it was made by the same scorer key (name, options, version, weights) from the same image bytes; every
    other one is recomputed, and the table rewritten after each scorer."""
    root = config.samples_dir
    scores_path = root / "scores.parquet"
    scores = read_score_cache(scores_path)
    current = samples.select("sample_id", "prompt", "image").with_columns(
        image_sha256=pl.Series(file_hashes(root, samples["image"].to_list()), dtype=pl.String))
    for spec, scorer in load_scorers(config).items():
        valid = scores.filter((pl.col("scorer") == spec) & (pl.col("scorer_key") == scorer.key))
        todo = current.join(valid.select("sample_id", "image_sha256"), on=["sample_id", "image_sha256"], how="anti")
        if todo.is_empty():
            continue
        paths = [root / image for image in todo["image"].to_list()]
        values = score_images(scorer, paths, [str(p) for p in paths], todo["prompt"].to_list(), config.batch_size,
                              progress)
        new = todo.select("sample_id", "prompt", "image_sha256").with_columns(
            scorer=pl.lit(spec), score=pl.Series(values, dtype=pl.Float64), scorer_key=pl.lit(scorer.key))
        stale = (pl.col("scorer") == spec) & pl.col("sample_id").is_in(todo["sample_id"].implode())
        scores = pl.concat([scores.filter(~stale), new.select(list(SCORES_SCHEMA))])
        if process_state().is_main_process:
            write_table(scores, scores_path, SCORES_SCHEMA)
    return scores


def run_label(config: LabelConfig, progress: Progress | None = None) -> Path:
    """Score every sample with every scorer (reusing cached scores) and write the pairs table."""
    config.validate()
    weights = parse_weights(config.scorers)
    root = config.samples_dir
    samples = read_table(root / "samples.parquet", SAMPLES_SCHEMA)
    scores = update_scores(samples, config, progress)
    keyed = samples.select("sample_id", "prompt_id", "prompt", "image")
    long = scores.join(keyed.select("sample_id", "prompt_id"), on="sample_id")
    pairs = make_pairs(preference(long, weights, config.combine), config.strategy, config.top_k,
                       config.min_margin, config.keep_ties)
    if pairs.is_empty():
        raise RlaifError(f"no pairs: under {', '.join(weights)} every prompt's candidates tie or differ by less "
                         "than --min-margin; sample more candidates, lower --min-margin or use --keep-ties")
    out = config.out or root / "pairs.parquet"
    relative = Path(os.path.relpath(root.resolve(), out.resolve().parent))
    images = {sid: str(relative / image) for sid, image in zip(keyed["sample_id"], keyed["image"], strict=True)}
    captions = dict(zip(keyed["prompt_id"], keyed["prompt"], strict=True))
    if config.invert:
        pairs = pairs.with_columns(label_0=1.0 - pl.col("label_0"))
    pairs = pairs.with_columns(
        caption=pl.col("prompt_id").replace_strict(captions),
        image_0=pl.col("sample_id_0").replace_strict(images),
        image_1=pl.col("sample_id_1").replace_strict(images),
        scorer=pl.lit("+".join(f"{name}:{weight:g}" for name, weight in weights.items())),
    )
    if process_state().is_main_process:
        write_table(pairs, out, PAIRS_SCHEMA)
    return out


@dataclass(frozen=True)
class Agreement:
    """How often the AI labels agree with the human ones, on pairs the humans did not call a tie."""

    pairs: int
    compared: int
    agree: int
    ai_ties: int

    @property
    def accuracy(self) -> float:
        return self.agree / self.compared if self.compared else float("nan")


def run_relabel(config: LabelConfig, progress: Progress | None = None) -> tuple[Path, Agreement]:
    """Score both images of every pair of a Pick-a-Pic style table, write AI labels beside the human ones
    (``ai_score_0``, ``ai_score_1``, ``ai_label_0``, ``ai_scorer``) and measure agreement.

    Several scorers vote per pair: each scorer's two scores become z-scores within the pair (+1 / -1, or
    0 for a tie), weighted and averaged, so ``ai_label_0`` is the weighted majority.
    """
    config.validate()
    weights = parse_weights(config.scorers)
    source = Path(config.relabel)
    table = read_table(source, {name: pl.String() for name in RELABEL_COLUMNS})
    captions = table["caption"].to_list()
    images = image_bytes(table["jpg_0"]) + image_bytes(table["jpg_1"])
    names = [f"{source} row {i} jpg_{side}" for side in (0, 1) for i in range(table.height)]
    ids = [f"{i}:{side}" for side in (0, 1) for i in range(table.height)]
    parts = [pl.DataFrame({"prompt_id": [i.split(":")[0] for i in ids], "sample_id": ids, "scorer": spec,
                           "score": score_images(scorer, images, names, captions * 2, config.batch_size, progress)})
             for spec, scorer in load_scorers(config).items()]
    value = dict(preference(pl.concat(parts), weights, config.combine).select("sample_id", "value").iter_rows())
    score_0 = pl.Series([value[f"{i}:0"] for i in range(table.height)], dtype=pl.Float64)
    score_1 = pl.Series([value[f"{i}:1"] for i in range(table.height)], dtype=pl.Float64)
    ai_label = pl.when(score_0 > score_1).then(1.0).when(score_0 < score_1).then(0.0).otherwise(0.5)
    labelled = table.with_columns(ai_score_0=score_0, ai_score_1=score_1, ai_label_0=ai_label,
                                  ai_scorer=pl.lit("+".join(f"{n}:{w:g}" for n, w in weights.items())))
    human = labelled.filter(pl.col("label_0").cast(pl.Float64).is_in([0.0, 1.0]))
    agreement = Agreement(
        pairs=table.height,
        compared=human.height,
        agree=human.filter(pl.col("ai_label_0") == pl.col("label_0").cast(pl.Float64)).height,
        ai_ties=labelled.filter(pl.col("ai_label_0") == 0.5).height,
    )
    out = config.out or source.with_name(f"{source.stem}.ai-labels.parquet")
    if process_state().is_main_process:
        with atomic_path(out) as tmp:
            labelled.write_parquet(tmp)
    return out, agreement
