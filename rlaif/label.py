"""``rlaif label``: samples -> scores table (cached per scorer) -> winner/loser pairs table."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from accelerate.utils import gather_object
from PIL import Image

from rlaif.config import LabelConfig
from rlaif.distributed import process_state
from rlaif.errors import RlaifError, first_line
from rlaif.files import changed_settings, read_json
from rlaif.images import ImageSource, open_rgb
from rlaif.pairing import make_pairs, preference
from rlaif.scoring import LoadedScorer, parse_options, parse_weights, weighted_names
from rlaif.tables import (
    LABELLING_METADATA,
    PAIRS_SCHEMA,
    SAMPLES_SCHEMA,
    SAMPLING_METADATA,
    SCORES_SCHEMA,
    read_table,
    write_table,
)
from rlaif.train.pair_table import RELABELLED_SUFFIX

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


IO_THREADS = min(8, (os.cpu_count() or 2) + 2)  # images read (and decoded or hashed) at once: they release the GIL


def score_images(
    scorer: LoadedScorer, sources: list[ImageSource], names: list[str], prompts: list[str], batch_size: int,
    progress: Progress | None,
) -> list[float]:
    """Score every image with ``scorer``. Under accelerate/torchrun each process scores every N-th image and
    all processes get the full list back, in order."""
    state = process_state()
    mine = list(range(state.process_index, len(sources), state.num_processes))
    # this process's share stands for all of them (the first holds the most: it ends at 100%)
    shown = progress and (lambda spec, done, _: progress(spec, min(done * state.num_processes, len(sources)),
                                                         len(sources)))
    values = score_here(scorer, [sources[i] for i in mine], [names[i] for i in mine], [prompts[i] for i in mine],
                        batch_size, shown)
    return in_index_order(mine, values, len(sources))


def score_here(scorer: LoadedScorer, sources: list[ImageSource], names: list[str], prompts: list[str],
               batch_size: int, progress: Progress | None) -> list[float]:
    """Score every image with ``scorer`` in this process alone, the next batch read on threads meanwhile."""
    values: list[float] = []
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        for start, images in batched_images(sources, names, batch_size, pool):
            stop = start + len(images)
            values += scorer(images, prompts[start:stop], names[start:stop])
            if progress:
                progress(scorer.spec, len(values), len(sources))
    return values


def in_index_order(mine: list[int], values: list, total: int) -> list:
    """Every process's ``values`` (each process's for its indices ``mine``) as one list of ``total`` in index
    order, on every process."""
    if process_state().num_processes == 1:
        return values
    ordered = [None] * total
    for index, value in gather_object(list(zip(mine, values, strict=True))):
        ordered[index] = value
    return ordered


def offset(progress: Progress, done_before: int, total: int) -> Progress:
    """``progress`` for one chunk of a longer job: counts continue from ``done_before`` towards ``total``."""
    return lambda scorer, done, _: progress(scorer, done_before + done, total)


def load_scorers(config: LabelConfig) -> Iterator[LoadedScorer]:
    """Each scorer of ``config`` in turn, loaded with its options on ``config.device`` or this process's
    device; one at a time (the caller drops each before asking for the next), never all in memory at once."""
    options = parse_options(config.scorer_options)
    device = config.device or process_state().device
    for spec in parse_weights(config.scorers):
        yield LoadedScorer(spec, device=device, **options.get(spec, {}))


def file_hashes(root: Path, images: list[str]) -> list[str]:
    """SHA-256 of each image file's bytes (a rewritten image is a new image to score), on every process: under
    accelerate/torchrun each hashes every N-th image, several files at once (hashing releases the GIL)."""
    state = process_state()
    mine = list(range(state.process_index, len(images), state.num_processes))

    def digest(index: int) -> str | tuple[bool, str]:
        try:
            return hashlib.sha256((root / images[index]).read_bytes()).hexdigest()
        except Exception as exc:  # noqa: BLE001 - raised below on every process, once all have hashed their share
            return isinstance(exc, FileNotFoundError), first_line(exc)  # (missing, why)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        values = in_index_order(mine, list(pool.map(digest, mine)), len(images))
    failed = [i for i, value in enumerate(values) if isinstance(value, tuple)]
    missing = [i for i in failed if values[i][0]]
    if missing:
        raise RlaifError(f"{len(missing)} images that {root / 'samples.parquet'} lists are missing (first: "
                         f"{root / images[missing[0]]}); rerun the `rlaif sample` command that made {root}: it makes "
                         "them again")
    if failed:
        raise RlaifError(f"image {root / images[failed[0]]}: cannot read it ({values[failed[0]][1]})")
    return values


PARTS = "scores.parts"  # a samples folder's scores made since scores.parquet was last written, one file per chunk


def _keyed(frame: pl.DataFrame) -> pl.DataFrame | None:
    """``frame`` as SCORES_SCHEMA, or None for a file from before the keyed columns (it counts as empty)."""
    if any(name not in frame.columns for name in SCORES_SCHEMA):
        return None
    return frame.select([pl.col(name).cast(dtype) for name, dtype in SCORES_SCHEMA.items()])


def read_score_cache(root: Path) -> pl.DataFrame:
    """The cached scores of a samples folder: scores.parquet, then the chunks saved after it (later wins)."""
    files = [root / "scores.parquet"] if (root / "scores.parquet").exists() else []
    files += sorted((root / PARTS).glob("part-*.parquet"))
    frames = [f for f in (_keyed(read_table(path, {})) for path in files) if f is not None]
    if not frames:
        return pl.DataFrame(schema=SCORES_SCHEMA)
    return pl.concat(frames).unique(["sample_id", "scorer"], keep="last", maintain_order=True)


def update_scores(samples: pl.DataFrame, config: LabelConfig, progress: Progress | None = None) -> pl.DataFrame:
    """The scores table of ``config.samples_dir`` for every scorer of ``config``. A cached score is reused only
    if it was made by the same scorer key (name, options, version, weights) from the same image bytes; every
    other one is recomputed, a chunk of --chunk-size images at a time, each chunk saved as it is made (a kill
    loses at most one). scores.parquet is rewritten, and the chunks removed, once every scorer is done."""
    root = config.samples_dir
    state = process_state()
    scores = read_score_cache(root)
    current = samples.select("sample_id", "prompt", "image").with_columns(
        image_sha256=pl.Series(file_hashes(root, samples["image"].to_list()), dtype=pl.String))
    for scorer in load_scorers(config):
        valid = scores.filter((pl.col("scorer") == scorer.spec) & (pl.col("scorer_key") == scorer.key))
        todo = current.join(valid.select("sample_id", "image_sha256"), on=["sample_id", "image_sha256"], how="anti")
        made = []
        for start in range(0, todo.height, config.chunk_size):
            chunk = todo.slice(start, config.chunk_size)
            paths = [root / image for image in chunk["image"].to_list()]
            values = score_images(scorer, paths, [str(p) for p in paths], chunk["prompt"].to_list(),
                                  config.batch_size, progress and offset(progress, start, todo.height))
            made.append(chunk.select("sample_id", "prompt", "image_sha256").with_columns(
                scorer=pl.lit(scorer.spec), score=pl.Series(values, dtype=pl.Float64), scorer_key=pl.lit(scorer.key)))
            if state.is_main_process:
                write_table(made[-1], root / PARTS / f"part-{time.time_ns():020d}.parquet", SCORES_SCHEMA)
        if made:
            stale = (pl.col("scorer") == scorer.spec) & pl.col("sample_id").is_in(todo["sample_id"].implode())
            scores = pl.concat([scores.filter(~stale), *(m.select(list(SCORES_SCHEMA)) for m in made)])
        del scorer  # freed before the next scorer loads
    if state.is_main_process:
        write_table(scores, root / "scores.parquet", SCORES_SCHEMA)
        shutil.rmtree(root / PARTS, ignore_errors=True)
    state.wait_for_everyone()
    return scores


@dataclass(frozen=True)
class Labelled:
    """What ``run_label`` made: the pairs table and how many pairs, from how many prompts, how many compared
    pairs were dropped as exact ties or as closer than --min-margin, and how many prompts had too few candidates
    for --top-k (top-vs-bottom then pairs their best half against their worst)."""

    path: Path
    pairs: int
    prompts: int
    ties: int
    below_margin: int
    narrowed: int = 0


def labelling_settings(config: LabelConfig) -> dict:
    """What decides a pairs table's labels, written in one way so that spellings of the same settings compare equal:
    the scorers with their weights and their options (sorted), how several scorers combine, and for a samples
    folder the pairing settings that apply (``top_k`` with top-vs-bottom only)."""
    weights = parse_weights(config.scorers)
    settings = {"scorers": sorted(weighted_names(weights)),
                "scorer_options": sorted(config.scorer_options)}
    if len(weights) > 1:
        settings["combine"] = config.combine_rule
    if config.relabel is None:
        settings |= {"strategy": config.strategy, "min_margin": config.min_margin, "keep_ties": config.keep_ties,
                     "invert": config.invert}
        if config.strategy == "top-vs-bottom":
            settings["top_k"] = config.top_k
    return settings


def check_same_labelling(out: Path, labelling: dict) -> None:
    """Refuse to replace pairs table ``out`` when `rlaif label` wrote it with other settings (``labelling_settings``):
    a finished training run may have trained on it. A rerun with the same settings may replace it (new samples,
    the same rules)."""
    before = _recorded_labelling(out) or labelling  # none recorded (or no table): as before
    changed = changed_settings({k: v for k, v in before.items() if k != SCORER_KEYS}, labelling)
    if changed:
        raise RlaifError(f"{out} holds pairs labelled with other settings ({'; '.join(changed)}), which a training "
                         "run may have used; give another --out, or delete it to label anew")


SCORER_KEYS = "scorer_keys"  # in the labelling record: each scorer's key (code version, options, weights) used


def scorer_keys(out: Path) -> dict[str, str]:
    """The key of each scorer (its code version, options, weights) that labelled pairs table ``out``, as recorded
    since 2026-11-28: none for no table or an older one. Compared before and after a rerun, it tells the user that
    the same settings gave other labels (rlaif was upgraded, a plugin or its weights changed, a cache moved)."""
    return (_recorded_labelling(out) or {}).get(SCORER_KEYS) or {}


def pairs_out(config: LabelConfig) -> Path:
    """The pairs table ``config`` writes: --out, else SAMPLES_DIR/pairs.parquet, else (--relabel TABLE)
    TABLE.ai-labels.parquet beside it."""
    if config.out is not None:
        return config.out
    if config.relabel is not None:
        return config.relabel.with_name(f"{config.relabel.stem}{RELABELLED_SUFFIX}")
    return config.samples_dir / "pairs.parquet"


def labelled_by(table: Path) -> list[str]:
    """The scorers whose scores labelled pairs table ``table``, from its labelling record; none when it records
    none (human labels, a table from elsewhere)."""
    return list(parse_weights((_recorded_labelling(table) or {}).get("scorers", [])))


def labelled_with(table: Path) -> dict[str, dict[str, str]]:
    """The scorer options pairs table ``table`` was labelled with, by scorer (``parse_options``'s form)."""
    return parse_options((_recorded_labelling(table) or {}).get("scorer_options", []), repeats=True)


def _recorded_labelling(out: Path) -> dict | None:
    """The labelling record of pairs table ``out``: None when there is no table or it records none."""
    if not out.is_file():
        return None
    recorded = (pq.read_schema(out).metadata or {}).get(LABELLING_METADATA.encode())
    return json.loads(recorded) if recorded else None


def run_label(config: LabelConfig, progress: Progress | None = None) -> Labelled:
    """Score every sample with every scorer (reusing cached scores) and write the pairs table."""
    config.validate()
    weights = parse_weights(config.scorers)
    root = config.samples_dir
    samples = read_table(root / "samples.parquet", SAMPLES_SCHEMA)
    # the samples' settings, recorded for `rlaif train`'s checks; none for a folder `rlaif sample` did not make
    generation = (read_json(root / "run.json", "sample the folder again") or {}).get("generation")
    if samples.is_empty():
        raise RlaifError(f"{root / 'samples.parquet'} holds no samples; sample the folder again")
    if samples["prompt_id"].n_unique() == samples.height:  # checked before any scoring: nothing could pair
        raise RlaifError(f"{root}: every prompt has one candidate, and a pair needs two; sample with --per-prompt 2 "
                         "or more")
    out = pairs_out(config)
    labelling = labelling_settings(config)
    check_same_labelling(out, labelling)
    scores = update_scores(samples, config, progress)
    keyed = samples.select("sample_id", "prompt_id", "prompt", "image")
    long = scores.join(keyed.select("sample_id", "prompt_id"), on="sample_id")
    keys = dict(long.filter(pl.col("scorer").is_in(list(weights))).select("scorer", "scorer_key").unique().iter_rows())
    values = preference(long, weights, config.combine_rule)
    pairs = make_pairs(values, config.strategy, config.top_k, config.min_margin, config.keep_ties)
    compared = make_pairs(values, config.strategy, config.top_k, 0.0, keep_ties=True)  # before any dropping
    ties = 0 if config.keep_ties else compared.filter(pl.col("label_0") == 0.5).height
    if pairs.is_empty():
        raise RlaifError(f"no pairs: under {', '.join(weights)} every prompt's candidates tie or differ by less "
                         "than --min-margin; sample more candidates, lower --min-margin or use --keep-ties")
    relative = Path(os.path.relpath(root.resolve(), out.resolve().parent))
    images = {sid: str(relative / image) for sid, image in zip(keyed["sample_id"], keyed["image"], strict=True)}
    captions = dict(zip(keyed["prompt_id"], keyed["prompt"], strict=True))
    if config.invert:
        pairs = pairs.with_columns(label_0=1.0 - pl.col("label_0"))
    pairs = pairs.with_columns(
        caption=pl.col("prompt_id").replace_strict(captions),
        image_0=pl.col("sample_id_0").replace_strict(images),
        image_1=pl.col("sample_id_1").replace_strict(images),
        scorer=pl.lit("+".join(weighted_names(weights))),
    )
    if process_state().is_main_process:
        metadata = {LABELLING_METADATA: json.dumps({**labelling, SCORER_KEYS: keys}),
                    **({SAMPLING_METADATA: json.dumps(generation)} if generation else {})}
        write_table(pairs, out, PAIRS_SCHEMA, metadata)
    process_state().wait_for_everyone()  # the table is on disk before any process goes on to train on it
    narrowed = 0
    if config.strategy == "top-vs-bottom":  # candidate_pairs takes at most half of a prompt's candidates a side
        narrowed = int((values.group_by("prompt_id").len()["len"] // 2 < config.top_k).sum())
    return Labelled(out, pairs.height, pairs["prompt_id"].n_unique(), ties, compared.height - ties - pairs.height,
                    narrowed)
