"""``rlaif sample``: prompts -> candidate images + samples table.

Work is a fixed list of batches (prompt-major, ``batch_size`` images each, candidates of several prompts
packed together). Each rank of a distributed run takes every ``world``-th batch; a batch whose images all
exist is skipped, so a killed run resumes where it stopped. Every image's noise comes from its own seed
(``rlaif.seeding``), and a batch always holds the same images, so resumed and sharded runs reproduce an
uninterrupted single-process run.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rlaif.config import SampleConfig
from rlaif.distributed import process_state
from rlaif.errors import RlaifError
from rlaif.files import changed_settings, loaded_files_identity, read_json, remove_stale_temporaries, write_json
from rlaif.images import ImageWriter
from rlaif.models import (
    check_negative_prompt,
    check_size,
    default_guidance,
    default_size,
    load_pipeline,
    model_identity,
    prompt_length,
)
from rlaif.prompts import load_prompts
from rlaif.scoring import library_versions
from rlaif.seeding import generator, image_seed
from rlaif.tables import SAMPLES_SCHEMA, prompt_id, write_table
from rlaif.train.outputs import weights_identity

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` with this process's image counts."""

# Settings that change the pixels: a rerun into the same folder must repeat them.
GENERATION_KEYS = ("model", "tuned", "scheduler", "steps", "guidance", "width", "height", "negative_prompt", "seed",
                   "dtype", "max_sequence_length")


@dataclass(frozen=True)
class Job:
    """One image to make."""

    sample_id: str
    prompt_id: str
    prompt: str
    candidate: int
    seed: int

    @property
    def image(self) -> str:
        """Path of the PNG, relative to the output folder."""
        return f"images/{self.prompt_id}/{self.candidate:04d}.png"


def plan_jobs(prompts: list[str], per_prompt: int, run_seed: int) -> list[Job]:
    """Every image of the run, prompt-major, each with its own seed."""
    jobs = []
    for prompt in prompts:
        pid = prompt_id(prompt)
        for candidate in range(per_prompt):
            seed = image_seed(run_seed, prompt, candidate)
            jobs.append(Job(f"{pid}-{candidate:04d}", pid, prompt, candidate, seed))
    return jobs


def plan_batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Cut the job list into fixed consecutive batches; their composition never depends on rank or resume."""
    return [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the images, for run.json."""
    return {"python": platform.python_version(),
            **library_versions(("rlaif", "torch", "diffusers", "transformers", "accelerate"))}


def _recorded_generation(run_file: Path, unrecorded: dict | None) -> dict | None:
    """The generation settings a run folder's run.json records (None: no run.json), with ``unrecorded``'s values
    for settings an older run.json lacks; a run.json of something else is refused."""
    record = read_json(run_file, "use an empty --out folder")
    if record is None:
        return None
    if not isinstance(record.get("generation"), dict):
        raise RlaifError(f"{run_file} records no generation settings: not a run of `rlaif sample`; use an empty "
                         "--out folder")
    generation = {**(unrecorded or {}), **record["generation"]}
    if isinstance(generation.get("model_weights"), str):  # an older rlaif counted every file of a model folder
        generation["model_weights"] = loaded_files_identity(generation["model_weights"])
    return generation


def check_resumable(run_file: Path, generation: dict, unrecorded: dict | None = None,
                    guidance_unset: bool = False) -> None:
    """Refuse to add images made with other generation settings to an existing run folder; ``unrecorded``
    holds the values that settings missing from an older run.json had then. ``guidance_unset``: --guidance was
    left to the model's default, so a folder that differs in guidance alone is told which --guidance resumes it."""
    previous = _recorded_generation(run_file, unrecorded)
    if previous is None:
        return
    changed = changed_settings(previous, generation, generation)
    before = previous.get("guidance")
    if guidance_unset and before not in (None, generation["guidance"]) and \
            changed == changed_settings(previous, generation, ["guidance"]):  # guidance alone differs
        former = " (rlaif before 2026-11-28 sampled every model at 7.5)" if before == 7.5 else ""
        raise RlaifError(f"{run_file.parent} was sampled at guidance {before}, and --guidance unset means this model's "
                         f"pipeline default, {generation['guidance']}{former}; pass --guidance {before} to go on "
                         "with it, or choose another --out")
    if changed:
        raise RlaifError(
            f"{run_file.parent} holds images made with other settings ({'; '.join(changed)}); "
            "rerun with the same settings to resume, or choose another --out"
        )


def _versions_record(run_file: Path, lacking: bool, note: Callable[[str], None] | None) -> dict:
    """run.json's record of the library versions: those the folder was begun under, and when images it is still
    ``lacking`` are made under other versions of the libraries that
    shape them (rlaif aside), these appended to ``resumed_under``, the list of every other set some images were
    made under (kept by later runs that make none); ``note`` is told, as those images may differ from an
    uninterrupted run's."""
    now = versions()
    record = read_json(run_file, "use an empty --out folder") or {}
    then = record.get("versions") or now
    earlier = record.get("resumed_under") or []
    earlier = [earlier] if isinstance(earlier, dict) else earlier  # one set, as rlaif recorded it before
    kept = {"versions": then, **({"resumed_under": earlier} if earlier else {})}
    changed = [f"{name} {then.get(name)} -> {now[name]}" for name in now
               if name != "rlaif" and then.get(name) != now[name]]
    if not (changed and lacking):
        return kept
    if note:
        note(f"{run_file.parent} was begun under other library versions ({'; '.join(changed)}); the images it still "
             "lacks are made under these, and may differ from those an uninterrupted run would have made")
    return {"versions": then, "resumed_under": earlier + [now] if now not in earlier else earlier}


def run_sample(config: SampleConfig, progress: Progress | None = None, replace_stale: str | None = None,
               note: Callable[[str], None] | None = None) -> Path:
    """Generate every missing image of ``config`` and write the samples table; return its path. A folder
    made with other generation settings is refused; with ``replace_stale`` (the name of the caller that owns
    the folder, recorded in run.json) a folder that caller made is emptied and made again instead, and ``note``
    told why (hours of sampling may go)."""
    config.validate()
    if config.negative_prompt:
        check_negative_prompt(config.model, "--negative-prompt")
    prompts = load_prompts(config.prompts, config.prompt_column, config.max_prompts)
    state = process_state()
    pipe = load_pipeline(config.model, config.dtype, config.device or state.device, config.scheduler, config.tuned)
    width = config.width or default_size(pipe)
    height = config.height or default_size(pipe)
    check_size(pipe, "--width", width)
    check_size(pipe, "--height", height)
    length = prompt_length(pipe, config.max_sequence_length)
    guidance = default_guidance(pipe) if config.guidance is None else config.guidance
    settings = {**asdict(config), "out": str(config.out), "tuned": config.tuned and str(config.tuned.resolve()),
                "width": width, "height": height, "max_sequence_length": length.get("max_sequence_length"),
                "guidance": guidance,
                "scheduler": type(pipe.scheduler).__name__}
    # the models are identified by their weights, not their names: retraining into the same folder, a new hub
    # revision or a changed model folder makes other images
    generation = {**{key: settings[key] for key in GENERATION_KEYS},
                  "tuned": config.tuned and weights_identity(config.tuned),
                  "model_weights": model_identity(config.model)}
    run_file = config.out / "run.json"
    unrecorded = {"max_sequence_length": prompt_length(pipe).get("max_sequence_length")}  # before rlaif recorded it
    if replace_stale and state.is_main_process and \
            (read_json(run_file, "use an empty --out folder") or {}).get("made_by") == replace_stale:
        previous = _recorded_generation(run_file, unrecorded)
        changed = previous and changed_settings(previous, generation, generation)
        if changed:  # made by other settings or another model: none of it may be reused
            if note:
                note(f"{config.out} holds images of other settings or another model ({'; '.join(changed)}); "
                     "removing them and sampling again")
            for name in ("images", "samples.parquet", "scores.parquet", "run.json"):
                target = config.out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    state.wait_for_everyone()
    check_resumable(run_file, generation, unrecorded, guidance_unset=config.guidance is None)
    jobs = plan_jobs(prompts, config.per_prompt, config.seed)
    if state.is_main_process:
        if config.out.exists():
            remove_stale_temporaries(config.out)
        lacking = any(not (config.out / job.image).exists() for job in jobs)  # a stat of every image, once
        if lacking:  # a table of an earlier, smaller run would pass for this one's until it is rewritten at the end
            (config.out / "samples.parquet").unlink(missing_ok=True)
        write_json({"generation": generation, "settings": settings, **_versions_record(run_file, lacking, note),
                    "prompts": len(prompts), "processes": state.num_processes, "made_by": replace_stale or "sample"},
                   run_file)
    state.wait_for_everyone()

    mine = plan_batches(jobs, config.batch_size)[state.process_index :: state.num_processes]
    total = sum(len(batch) for batch in mine)
    # each batch with the images it lacks (a batch is made whole, so its images are those of an uninterrupted run)
    pending = [(batch, [job for job in batch if not (config.out / job.image).exists()]) for batch in mine]
    todo = [(batch, missing) for batch, missing in pending if missing]
    done = total - sum(len(batch) for batch, _ in todo)  # made by an earlier run: counted at once, not as speed
    kept = total - sum(len(missing) for _, missing in todo)
    if note and state.num_processes == 1 and 0 < kept < total:
        note(f"{kept} of the {total} images are in {config.out} already: kept; making the other {total - kept}")
    if progress:
        progress(done, total)
    with ImageWriter() as writer:
        for batch, missing in todo:
            images = pipe(
                prompt=[job.prompt for job in batch],
                negative_prompt=[config.negative_prompt] * len(batch) if config.negative_prompt else None,
                num_inference_steps=config.steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=[generator(job.seed) for job in batch],
                **length,
            ).images
            for job, image in zip(batch, images, strict=True):
                if job in missing:
                    writer.submit(image, config.out / job.image)
            done += len(batch)
            if progress:
                progress(done, total)
    state.wait_for_everyone()

    table = config.out / "samples.parquet"
    if state.is_main_process:
        absent = [job.image for job in jobs if not (config.out / job.image).exists()]
        if absent:
            raise RlaifError(f"{len(absent)} images are missing under {config.out} (first: {absent[0]}); rerun")
        # Run-wide columns come from the generation settings; the job's own fields (its seed) take precedence.
        shared = {key: value for key, value in generation.items() if key in SAMPLES_SCHEMA}
        write_table([{**shared, **asdict(job), "image": job.image} for job in jobs], table, SAMPLES_SCHEMA)
    state.wait_for_everyone()
    return table
