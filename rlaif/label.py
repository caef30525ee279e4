"""``rlaif label``: samples -> scores table (cached per scorer) -> winner/loser pairs table."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from accelerate.utils import gather_object
from PIL import Image

from rlaif.config import LabelConfig
from rlaif.distributed import process_state
from rlaif.errors import RlaifError
from rlaif.files import atomic_path
from rlaif.images import ImageSource, image_bytes, open_rgb
from rlaif.pairing import make_pairs, preference
from rlaif.scoring import LoadedScorer, parse_options, parse_weights
from rlaif.tables import PAIRS_SCHEMA, SAMPLES_SCHEMA, SCORES_SCHEMA, read_table, write_table

RELABEL_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
Progress = Callable[[str, int, int], None]
"""Called as ``progress(scorer, done, total)`` while images are scored."""


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


def load_scorers(config: LabelConfig) -> Iterator[LoadedScorer]:
    """Each scorer of ``config`` in turn, loaded with its options on ``config.device`` or this process's
    device; one at a time (the caller drops each before asking for the next), never all in memory at once."""
    options = parse_options(config.scorer_options)
    device = config.device or process_state().device
    for spec in parse_weights(config.scorers):
        yield LoadedScorer(spec, device=device, **options.get(spec, {}))


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
    for scorer in load_scorers(config):
        valid = scores.filter((pl.col("scorer") == scorer.spec) & (pl.col("scorer_key") == scorer.key))
        todo = current.join(valid.select("sample_id", "image_sha256"), on=["sample_id", "image_sha256"], how="anti")
        if not todo.is_empty():
            paths = [root / image for image in todo["image"].to_list()]
            values = score_images(scorer, paths, [str(p) for p in paths], todo["prompt"].to_list(),
                                  config.batch_size, progress)
            new = todo.select("sample_id", "prompt", "image_sha256").with_columns(
                scorer=pl.lit(scorer.spec), score=pl.Series(values, dtype=pl.Float64), scorer_key=pl.lit(scorer.key))
            stale = (pl.col("scorer") == scorer.spec) & pl.col("sample_id").is_in(todo["sample_id"].implode())
            scores = pl.concat([scores.filter(~stale), new.select(list(SCORES_SCHEMA))])
            if process_state().is_main_process:
                write_table(scores, scores_path, SCORES_SCHEMA)
        del scorer  # freed before the next scorer loads
    return scores


@dataclass(frozen=True)
class Labelled:
    """What ``run_label`` made: the pairs table and how many pairs, from how many prompts, and how many
    compared pairs were dropped as exact ties or as closer than --min-margin."""

    path: Path
    pairs: int
    prompts: int
    ties: int
    below_margin: int


def run_label(config: LabelConfig, progress: Progress | None = None) -> Labelled:
    """Score every sample with every scorer (reusing cached scores) and write the pairs table."""
    config.validate()
    weights = parse_weights(config.scorers)
    root = config.samples_dir
    samples = read_table(root / "samples.parquet", SAMPLES_SCHEMA)
    scores = update_scores(samples, config, progress)
    keyed = samples.select("sample_id", "prompt_id", "prompt", "image")
    long = scores.join(keyed.select("sample_id", "prompt_id"), on="sample_id")
    values = preference(long, weights, config.combine)
    pairs = make_pairs(values, config.strategy, config.top_k, config.min_margin, config.keep_ties)
    compared = make_pairs(values, config.strategy, config.top_k, 0.0, keep_ties=True)  # before any dropping
    ties = 0 if config.keep_ties else compared.filter(pl.col("label_0") == 0.5).height
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
    process_state().wait_for_everyone()  # the table is on disk before any process goes on to train on it
    return Labelled(out, pairs.height, pairs["prompt_id"].n_unique(), ties, compared.height - ties - pairs.height)


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
    parts = []
    for scorer in load_scorers(config):
        parts.append(pl.DataFrame({"prompt_id": [i.split(":")[0] for i in ids], "sample_id": ids,
                                   "scorer": scorer.spec, "score": score_images(scorer, images, names, captions * 2,
                                                                                config.batch_size, progress)}))
        del scorer
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
    process_state().wait_for_everyone()
    return out, agreement
