"""``rlaif label``: samples -> scores table (cached per scorer) -> winner/loser pairs table."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from PIL import Image

from rlaif.errors import RlaifError
from rlaif.pairing import COMBINE_RULES, STRATEGIES, make_pairs, preference
from rlaif.scoring import LoadedScorer
from rlaif.tables import PAIRS_SCHEMA, SAMPLES_SCHEMA, SCORES_SCHEMA, read_table, write_table

WEIGHTED = re.compile(r"(?P<name>.*):(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
Progress = Callable[[str, int, int], None]
"""Called as ``progress(scorer, done, total)`` while images are scored."""


@dataclass
class LabelConfig:
    """Settings of ``rlaif label``; field help texts are the CLI's help texts."""

    samples_dir: Path = field(metadata={"help": "Folder written by `rlaif sample` (holds samples.parquet)."})
    scorers: list[str] = field(metadata={"help": "Scorer NAME[:WEIGHT] (repeat for an ensemble); a name from "
                                         "`rlaif scorers list` or module:attr."})
    out: Path | None = field(default=None, metadata={"help": "Pairs table; default SAMPLES_DIR/pairs.parquet."})
    strategy: str = field(default="best-worst", metadata={"help": f"Pairing: {' | '.join(STRATEGIES)}."})
    top_k: int = field(default=2, metadata={"help": "K of --strategy top-vs-bottom."})
    min_margin: float = field(default=0.0, metadata={"help": "Drop pairs whose preference gap is smaller."})
    keep_ties: bool = field(default=False, metadata={"help": "Keep exact ties, labelled 0.5 (default: drop)."})
    combine: str = field(default="zscore", metadata={"help": "How several scorers combine: zscore | rank "
                                                     "(per prompt, then weighted mean)."})
    batch_size: int = field(default=32, metadata={"help": "Images per scorer call."})
    device: str | None = field(default=None, metadata={"help": "Device for model-based scorers; default: "
                                                       "this process's accelerator."})

    def validate(self) -> None:
        """Reject impossible settings before anything is loaded or written."""
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
        parse_weights(self.scorers)


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


def read_images(paths: list[Path], pool: ThreadPoolExecutor) -> list[Image.Image]:
    """Decode ``paths`` as RGB on the pool's threads; an unreadable file is a user error naming it."""
    def load(path: Path) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise RlaifError(f"image {path} cannot be read: {exc}") from exc
    return list(pool.map(load, paths))


def batched_images(
    paths: list[Path], batch_size: int, pool: ThreadPoolExecutor
) -> Iterator[tuple[int, list[Image.Image]]]:
    """Yield (start, images) batches, decoding the next batch on the pool while the caller scores this one."""
    starts = range(0, len(paths), batch_size)
    upcoming = pool.submit(read_images, paths[0:batch_size], pool) if paths else None
    for start in starts:
        current = upcoming.result()
        following = start + batch_size
        upcoming = pool.submit(read_images, paths[following : following + batch_size], pool)
        yield start, current


def score_missing(
    samples: pl.DataFrame, root: Path, cached: pl.DataFrame, spec: str, config: LabelConfig,
    progress: Progress | None,
) -> pl.DataFrame:
    """Score the samples that ``cached`` lacks for scorer ``spec``; return only the new rows."""
    done = set(cached.filter(pl.col("scorer") == spec)["sample_id"].to_list())
    todo = samples.filter(~pl.col("sample_id").is_in(list(done)))
    if todo.is_empty():
        return cached.clear()
    scorer = LoadedScorer(spec, device=config.device or "cpu")
    prompts = todo["prompt"].to_list()
    paths = [root / image for image in todo["image"].to_list()]
    values: list[float] = []
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) + 2)) as pool:
        for start, images in batched_images(paths, config.batch_size, pool):
            values += scorer(images, prompts[start : start + len(images)])
            if progress:
                progress(spec, len(values), len(paths))
    return pl.DataFrame({"sample_id": todo["sample_id"], "scorer": spec, "score": values, "prompt": prompts},
                        schema=SCORES_SCHEMA)


def run_label(config: LabelConfig, progress: Progress | None = None) -> Path:
    """Score every sample with every scorer (reusing cached scores) and write the pairs table."""
    config.validate()
    weights = parse_weights(config.scorers)
    root = config.samples_dir
    samples = read_table(root / "samples.parquet", SAMPLES_SCHEMA)
    scores_path = root / "scores.parquet"
    scores = read_table(scores_path, SCORES_SCHEMA) if scores_path.exists() else pl.DataFrame(schema=SCORES_SCHEMA)
    for spec in weights:
        new = score_missing(samples, root, scores, spec, config, progress)
        if not new.is_empty():
            scores = write_table(pl.concat([scores.select(list(SCORES_SCHEMA)), new]), scores_path, SCORES_SCHEMA)

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
    pairs = pairs.with_columns(
        caption=pl.col("prompt_id").replace_strict(captions),
        image_0=pl.col("sample_id_0").replace_strict(images),
        image_1=pl.col("sample_id_1").replace_strict(images),
        scorer=pl.lit("+".join(f"{name}:{weight:g}" for name, weight in weights.items())),
    )
    write_table(pairs, out, PAIRS_SCHEMA)
    return out
