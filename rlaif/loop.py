"""``rlaif loop``: sample -> label -> train -> eval for one or more rounds (round r+1 samples from, starts from
and is referenced to round r's model: iterative Diffusion-DPO), every stage's output under one run folder.

A config file has a ``[loop]`` table (model, prompts, eval_prompts, out, rounds) and one table per stage
(``[sample]``, ``[label]``, ``[train]``, ``[eval]``) holding that command's settings. Relative prompt paths are
relative to the config file. Finished stages are recorded in OUT/loop.json, so a rerun continues with the
first unfinished one (each stage is itself resumable).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from rlaif.cli_options import read_settings, read_toml
from rlaif.config import FLOW_WEIGHTINGS, EvalConfig, LabelConfig, SampleConfig, TrainConfig
from rlaif.distributed import process_state
from rlaif.errors import RlaifError
from rlaif.eval import EVAL_SCHEMA, miscast_scorers, run_eval
from rlaif.files import atomic_path, check_out_dir, loaded_files_identity, read_json, write_json
from rlaif.label import run_label
from rlaif.models import check_generation, check_negative_prompt, model_identity, resolve_model
from rlaif.prompts import load_prompt_table, resolve_prompt_source
from rlaif.sample import run_sample
from rlaif.scoring import parse_options, parse_weights
from rlaif.tables import write_table
from rlaif.train.outputs import trained_config
from rlaif.train.trainer import (
    ANCHOR_CLASH,
    DEFAULTED,
    check_defaults_as_before,
    finished_before,
    run_train,
    settings_then,
    with_family_defaults,
)

ROUNDS_SCHEMA = {"round": pl.Int64, **EVAL_SCHEMA}
class Progress(Protocol):
    """Called with each stage's progress, and in training with the step's logs too."""

    def __call__(self, description: str, done: int, total: int, logs: dict[str, float] | None = None) -> None: ...
STAGES = {"sample": SampleConfig, "label": LabelConfig, "train": TrainConfig, "eval": EvalConfig}
SET_BY_LOOP = {"sample": {"model", "prompts", "out", "tuned"}, "label": {"samples_dir", "out", "relabel"},
               "train": {"pairs", "model", "out", "init", "resume", "overwrite"},
               "eval": {"base", "tuned", "prompts", "out", "train_log"}}  # each round's report: its own log
# Settings a loop may go on under other values of: they change no number (scoring batches, checkpoints, loggers, the
# report's grid), or as little as `rlaif sample` lets a sampling batch size or device change (float round-off);
# [loop] out is where the run lies
RESUMABLE = {"sample": {"batch_size", "device"}, "label": {"batch_size", "chunk_size", "device"},
             "eval": {"batch_size", "device", "grid"},
             "train": {"checkpoint_every", "keep_checkpoints", "report_to", "no_cache", "gradient_checkpointing",
                       "workers", "val_every"}, "loop": {"out"}}
PROMPT_FILES = "prompt files (sha256)"  # loop.json's table of what the prompt files held
MODEL_WEIGHTS = "model files (identity)"  # and of the base model (a hub revision, the files its pipeline loads)
OLDER_MODEL_WEIGHTS = "model weights (identity)"  # an older rlaif's record of it, which counted every file
DEFAULTS = "defaults (as the loop began)"  # and of the stages' fixed defaults then
PINNED_STAGES = ("sample", "label", "eval")  # [train]'s defaults are checked by check_defaults_as_before


@dataclass
class LoopConfig:
    """The ``[loop]`` table of a loop config file."""

    model: str = field(metadata={"help": "Base model: hub id, local diffusers folder, or tiny / tiny-xl / tiny-sd3 "
                                         "/ tiny-flux."})
    prompts: str = field(metadata={"help": "Training prompts (sampled every round)."})
    eval_prompts: str = field(metadata={"help": "Held-out prompts for the evaluation after every round."})
    out: Path = field(metadata={"help": "Run folder: round_N/{samples,train,eval}, eval_base/, report.html."})
    rounds: int = field(default=1, metadata={"help": "Rounds of sample -> label -> train -> eval."})


@dataclass
class LoopPlan:
    """A loop config file, read and checked: the loop settings and each stage's own settings."""

    loop: LoopConfig
    stages: dict[str, dict[str, Any]]
    source: dict[str, Any]  # everything as read (JSON values), recorded in loop.json


def read_loop(path: Path, out: Path | None = None, control: bool = False) -> LoopPlan:
    """Read loop config ``path``; ``out`` replaces its output folder; ``control`` swaps winners and losers, by
    default into ``[loop] out`` + ``-control``, so that a control run never meets the run it controls."""
    path = Path(path)
    unknown = sorted(set(read_toml(path)) - {"loop", *STAGES})
    if unknown:  # a misspelt table would otherwise leave its stage at the defaults without a word
        raise RlaifError(f"{path}: unknown table {unknown[0]!r}; settings go in "
                         f"{', '.join(f'[{name}]' for name in ('loop', *STAGES))}")
    loop = read_settings(path, LoopConfig, "loop")
    if out is not None:
        loop["out"] = Path(out)
    elif control and "out" in loop and not _control_run_in(Path(loop["out"]), Path(f"{loop['out']}-control")):
        loop["out"] = Path(f"{loop['out']}-control")
    for name in ("prompts", "eval_prompts"):
        if name in loop:  # a relative path is relative to the config file; a bundled set's name stays a name
            loop[name] = resolve_prompt_source(loop[name], path.parent)
    missing = [f.name for f in dataclasses.fields(LoopConfig)
               if f.default is dataclasses.MISSING and f.name not in loop]
    if missing:
        raise RlaifError(f"{path} [loop]: missing {', '.join(missing)}")
    stages = {}
    for stage, config in STAGES.items():
        settings = read_settings(path, config, stage, unlisted=SET_BY_LOOP[stage])
        fixed = sorted(set(settings) & SET_BY_LOOP[stage])
        if fixed:
            raise RlaifError(f"{path} [{stage}]: {fixed[0]!r} is set by the loop, not per stage")
        stages[stage] = settings
    if "scorers" not in stages["label"]:
        raise RlaifError(f"{path} [label]: missing scorers")
    if control:
        if stages["label"].get("invert"):  # the control would be the run itself, its numbers reported as the control's
            raise RlaifError(f"{path} [label]: invert = true already swaps winners and losers, so --control would "
                             "run the same experiment; drop one of them")
        stages["label"]["invert"] = True
    stages["eval"].setdefault("scorers", list(parse_weights(stages["label"]["scorers"])))
    options = eval_scorer_options(path, stages["label"], stages["eval"])
    if options:
        stages["eval"]["scorer_options"] = options
    config = LoopConfig(**loop)
    if config.rounds < 1:
        raise RlaifError(f"{path} [loop]: rounds must be at least 1")
    try:  # a misspelt tiny alias, told as the config's (its stages would name it as an option's)
        resolve_model(config.model)
    except RlaifError as exc:
        raise RlaifError(f"{path} [loop] model: {exc}") from exc
    check_out_dir(config.out, "--out" if out is not None else f"{path} [loop] out", "loop")
    check_stages(path, config, stages)
    source = json.loads(json.dumps({"loop": dataclasses.asdict(config), **stages, PROMPT_FILES: _prompt_files(config),
                                    **_model_weights(config), DEFAULTS: stage_defaults()}, default=str))
    return LoopPlan(config, stages, source)


def stage_defaults() -> dict[str, dict[str, Any]]:
    """The fixed defaults of [sample], [label] and [eval] (those a model does not resolve, and that change a
    number): recorded when a loop begins, so that an rlaif upgraded between rounds goes on with them."""
    return {stage: {f.name: f.default for f in dataclasses.fields(STAGES[stage])
                    if f.default not in (dataclasses.MISSING, None)
                    and f.name not in SET_BY_LOOP[stage] | RESUMABLE[stage]} for stage in PINNED_STAGES}


def pin_defaults(stages: dict[str, dict[str, Any]], recorded: dict[str, dict[str, Any]]
                 ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``stages`` with every setting they leave unset at the default ``recorded`` when the loop began, where this
    rlaif's default differs (later rounds would sample, pair or be evaluated otherwise than round 1); and the
    settings so kept, as ``[stage] key value``."""
    pinned = []
    stages = {name: dict(settings) for name, settings in stages.items()}
    for stage in PINNED_STAGES:
        now = {f.name: f.default for f in dataclasses.fields(STAGES[stage])}  # a default may since be None (resolved)
        for key, value in recorded.get(stage, {}).items():
            if key not in stages.get(stage, {}) and key in now and now[key] != value:
                stages[stage][key] = value
                pinned.append(f"[{stage}] {key} {value!r} (now {now[key]!r})")
    return stages, pinned


def _prompt_files(config: LoopConfig) -> dict[str, str]:
    """What each prompt source holds: a file's content hash (a file edited between rounds would give the rounds
    other prompts, and their numbers other meanings), a bundled set's name (its content comes with rlaif)."""
    return {name: hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16] if Path(source).is_file() else source
            for name, source in (("prompts", config.prompts), ("eval_prompts", config.eval_prompts))}


def _model_weights(config: LoopConfig) -> dict[str, dict[str, str]]:
    """``{MODEL_WEIGHTS: {"model": digest}}`` of the base model's weights (``model_identity``): every round samples,
    trains on and is evaluated against that model, so another hub revision or a rewritten folder between rounds
    would mix two bases in one run; nothing where they are not known yet (a hub id not downloaded)."""
    identity = model_identity(config.model)
    if identity == config.model:  # a hub id not in the cache: known once round 1 has sampled (``_same_base``)
        return {}
    return {MODEL_WEIGHTS: {"model": _digest(identity)}}


def _digest(identity: str) -> str:
    """A model identity, short enough to record (a folder's lists every file its pipeline loads)."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _same_base(state: dict, samples: Path, loop: LoopConfig) -> None:
    """Check that a round's ``samples`` were drawn from the base model the loop recorded (its weights, as that
    sampling loaded them: a hub id resolves afresh in every stage), recording it if none was known yet."""
    drawn = ((read_json(samples / "run.json", UNREADABLE_STATE) or {}).get("generation") or {}).get("model_weights")
    if drawn is None:
        return
    drawn = loaded_files_identity(drawn)  # as an older rlaif recorded it too
    recorded = state["settings"].setdefault(MODEL_WEIGHTS, {"model": _digest(drawn)})
    if recorded["model"] != _digest(drawn):
        raise RlaifError(_other_base(loop))


def _other_base(loop: LoopConfig) -> str:
    """The refusal of a loop whose base model's weights changed."""
    return (f"{loop.out} holds a loop run whose base model {loop.model} had other weights (another hub revision, or "
            "its folder's files changed); its next rounds would sample, train and be evaluated on another base: "
            "restore the model as it was, or start again in another --out")


def eval_scorer_options(path: Path, label: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    """[eval]'s scorer options: its own, and [label]'s for every scorer the two share, so that the score reported
    as optimised is the one trained on (a `clip.arch` given to [label] alone was evaluated at clip's default).
    [eval] giving one of those another value is refused."""
    given = list(evaluation.get("scorer_options", []))
    trained, own = parse_options(label.get("scorer_options", [])), parse_options(given)
    for name in parse_weights(label["scorers"]):
        if name not in evaluation["scorers"]:
            continue
        for key, value in trained.get(name, {}).items():
            if key not in own.get(name, {}):
                given.append(f"{name}.{key}={value}")
            elif own[name][key] != value:
                raise RlaifError(f"{path} [eval]: scorer_options {name}.{key}={own[name][key]}, but [label] trains on "
                                 f"{name}.{key}={value}; the optimised score must be the one trained on (drop it from "
                                 "[eval], which takes [label]'s)")
    return given


def round_seed(seed: int, number: int) -> int:
    """The sampling seed of round ``number``: the [sample] seed in round 1, then one derived from it, far from
    any small seed (the evaluation's included), so later rounds sample new noise and never the held-out one."""
    if number == 1:
        return seed
    digest = hashlib.sha256(f"rlaif-round:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little") | 1 << 31


def check_stages(path: Path, loop: LoopConfig, stages: dict[str, dict[str, Any]]) -> None:
    """Every stage's settings, scorers and scorer options checked before the first stage starts, and the
    rounds' sampling seeds kept apart from the evaluation's (held-out seeds)."""
    placeholders = {"sample": {"model": loop.model, "prompts": loop.prompts, "out": loop.out},
                    "label": {"samples_dir": loop.out}, "train": {"pairs": loop.out, "model": loop.model,
                                                                  "out": loop.out},
                    "eval": {"base": loop.model, "tuned": loop.out, "prompts": loop.eval_prompts, "out": loop.out}}
    for stage, config in STAGES.items():
        try:
            config(**placeholders[stage], **stages[stage]).check_values()
        except RlaifError as exc:
            raise RlaifError(f"{path} [{stage}]: {exc}") from exc
    done = (read_json(loop.out / "loop.json", UNREADABLE_STATE) or {}).get("done", [])
    if not evaluated(done):  # a loop begun before these checks goes on as it was begun, once it evaluated
        _check_roles(path, stages)
    negative = [stage for stage in ("sample", "eval") if stages[stage].get("negative_prompt")]
    if negative:  # [eval]'s would otherwise be refused only after the rounds' sampling and training
        check_negative_prompt(loop.model, f"{path} [{negative[0]}] negative_prompt")
    for stage in ("sample", "eval"):  # [eval]'s scheduler and image sides, too, were refused only after round 1 trained
        scheduler = stages[stage].get("scheduler")
        sizes = {f"--{side}": stages[stage][side] for side in ("width", "height") if stages[stage].get(side)}
        if scheduler is not None or sizes:  # else nothing to refuse: skip reading the model's files
            try:
                check_generation(loop.model, scheduler, sizes)
            except RlaifError as exc:
                raise RlaifError(f"{path} [{stage}]: {exc}") from exc
    _check_anchor(path, TrainConfig(**placeholders["train"], **stages["train"]), negative,
                  (loop.out / "loop.json").exists())
    lengths = {stage: stages[stage].get("max_sequence_length") for stage in ("sample", "train", "eval")}
    if lengths["eval"] is None:  # eval takes the length the model was trained at
        del lengths["eval"]
    if len(set(lengths.values())) > 1:
        found = ", ".join(f"[{stage}] {'unset' if length is None else length}" for stage, length in lengths.items())
        raise RlaifError(f"{path}: max_sequence_length differs between stages ({found}); give [sample] and [train] "
                         "the same T5 prompt length (set both, even to the model's default)")
    sample_seed = stages["sample"].get("seed", SampleConfig.seed)
    eval_seed = stages["eval"].get("seed", EvalConfig.seed)
    clash = [n for n in range(1, loop.rounds + 1) if round_seed(sample_seed, n) == eval_seed]
    if clash:
        raise RlaifError(f"{path}: round {clash[0]} would sample with seed {eval_seed}, the [eval] seed; keep "
                         "[sample] seed and [eval] seed apart so the evaluation's seeds stay held out")
    # last, the prompt files as their stages will read them: a wrong eval_prompts found after a round's training would
    # cost that round, and the config that mends it would be another loop's
    for option, source, stage in (("prompts", loop.prompts, "sample"), ("eval_prompts", loop.eval_prompts, "eval")):
        try:
            load_prompt_table(source, stages[stage].get("prompt_column"))
        except RlaifError as exc:  # the column is the stage's setting here, not an option
            told = str(exc).replace("--prompt-column", f"[{stage}] prompt_column")
            raise RlaifError(f"{path} [loop] {option}: {told}") from exc


def _check_anchor(path: Path, train: TrainConfig, negative: list[str], started: bool) -> None:
    """``with_family_defaults``' refusals (--flow-weighting for a UNet model, the anchor for FLUX.1) and the
    unconditional anchor's, before round 1 samples: FLUX.1 (no unconditional branch to hold), and
    the anchor left on by default while a stage samples with a negative prompt (guidance then subtracts the
    negative prompt's prediction, not the empty caption's that the anchor holds): the user chooses, in a new loop
    (``started``: OUT holds a loop, begun by an rlaif without the anchor, whose settings cannot change)."""
    if not train.keep_unconditional and not negative and train.flow_weighting == FLOW_WEIGHTINGS[0]:
        return  # nothing to refuse: skip reading the model's files
    try:
        resolved = with_family_defaults(train)
    except RlaifError as exc:
        raise RlaifError(f"{path} [train]: {exc}") from exc
    if negative and resolved.keep_unconditional and train.keep_unconditional is None:
        if started:
            raise RlaifError(
                f"{path}: this loop was started by an rlaif without the unconditional anchor, which is now on by "
                f"default but does not serve [{negative[0]}] negative_prompt; finish the loop with the rlaif that "
                "started it, or start it again in a new out with [train] keep_unconditional set")
        raise RlaifError(f"{path}: [{negative[0]}] negative_prompt {ANCHOR_CLASH}; set [train] keep_unconditional = 0 "
                         "to train without it, or a weight to keep it anyway")


UNREADABLE_STATE = "restore it, or choose another --out"  # what to do about a loop.json rlaif did not write


def _control_run_in(out: Path, control_out: Path) -> bool:
    """Whether ``out`` holds a control run that an rlaif before the ``-control`` default started there (and none
    was started in ``control_out`` since): ``--control`` then goes on in it rather than start again."""
    if (control_out / "loop.json").exists():
        return False
    state = read_json(out / "loop.json", UNREADABLE_STATE) or {}
    return bool((state.get("settings") or {}).get("label", {}).get("invert"))


def _state(plan: LoopPlan) -> dict:
    """OUT/loop.json: the settings it was started with (and what its prompt files held) and the stages done; other
    settings are refused, but for more ``rounds``, which go on from the last finished round, those in
    ``RESUMABLE``, and the evaluation's until a round has been evaluated (the settings recorded are then the new
    ones). The stages' defaults recorded when the loop began are kept."""
    path = plan.loop.out / "loop.json"
    state = read_json(path, UNREADABLE_STATE)
    if state is None:
        return {"settings": plan.source, "done": [], "rounds": {}}
    before, now = _as_now(state.get("settings") or {}), plan.source
    # records an earlier rlaif did not keep (or weights not known then, or now) are not compared
    unknown = {record for record in (PROMPT_FILES, MODEL_WEIGHTS) if record not in before or record not in now}
    unknown.add(DEFAULTS)  # not compared: those the loop began with are kept (an older loop's: this rlaif's)
    now = {**now, DEFAULTS: before.get(DEFAULTS, now[DEFAULTS])}
    if MODEL_WEIGHTS not in unknown and before[MODEL_WEIGHTS] != now[MODEL_WEIGHTS]:
        raise RlaifError(_other_base(plan.loop))
    if MODEL_WEIGHTS in before:  # kept when not known now (a hub cache emptied): the rounds check it as they sample
        now = {**now, MODEL_WEIGHTS: before[MODEL_WEIGHTS]}
    tables = (set(before) | set(now)) - unknown
    # a prompt file whose content both record is known by it: another path to it (the config called from another
    # folder, an absolute path, the config moved with its prompts) names the same prompts; with the same extension,
    # which says how the bytes are read (a .csv's quotes are a .tsv's text)
    by_content = set() if PROMPT_FILES in unknown else {
        name for name in ("prompts", "eval_prompts")
        if Path(str(before.get("loop", {}).get(name))).suffix == Path(str(now["loop"].get(name))).suffix}
    resumable = {**RESUMABLE, "loop": RESUMABLE["loop"] | by_content}
    values = [(table, key, before.get(table, {}).get(key, "(unset)"), now.get(table, {}).get(key, "(unset)"))
              for table in sorted(tables) for key in sorted(set(before.get(table, {})) | set(now.get(table, {})))]
    # before any round is evaluated, [eval] and its prompts may still be mended (eval remakes what it finds stale)
    mendable = not evaluated(state.get("done", []))
    trained = _trained_defaults(plan.loop.out, state.get("done", []))
    changed = [(table, key, old, new) for table, key, old, new in values
               if old != new and key not in resumable.get(table, ()) and not (mendable and _of_eval(table, key))
               and not (table == "train" and old == "(unset)" and key in trained and trained[key] == new)]
    more_rounds = [(t, k) for t, k, _, _ in changed] == [("loop", "rounds")] and changed[0][3] > changed[0][2]
    if not changed or more_rounds:  # more rounds: the finished ones stand
        return {**state, "settings": now}
    changed = [f"[{table}] {key} {old!r} -> {new!r}" for table, key, old, new in changed]
    raise RlaifError(f"{plan.loop.out} holds a loop run with other settings ({'; '.join(changed)}); rerun with "
                     "the same config and options to continue it, or choose another --out")


def _trained_defaults(out: Path, done: list[str]) -> dict[str, Any]:
    """The settings [train] left to rlaif's defaults as the loop's last finished training resolved them: set to
    those values in the config, they change nothing (how a loop goes on after an upgrade changed a default)."""
    rounds = [int(key.split("/")[0]) for key in done if key.endswith("/train")]
    if not rounds:
        return {}
    then = settings_then(trained_config(out / f"round_{max(rounds)}" / "train"))
    return {key: then[key] for key in DEFAULTED if then.get(key) is not None}


def evaluated(done: list[str]) -> bool:
    """Whether a loop whose finished stages are ``done`` has evaluated a round (its [eval] and eval prompts can no
    longer change)."""
    return any(key.endswith("/eval") for key in done)


def _of_eval(table: str, key: str) -> bool:
    """Whether loop.json's setting ``key`` of ``table`` is the evaluation's ([eval], or its prompts)."""
    return table == "eval" or table in ("loop", PROMPT_FILES) and key == "eval_prompts"


def _check_roles(path: Path, stages: dict[str, dict[str, Any]]) -> None:
    """Refuse an [eval] that reports a [label] scorer as held out, or a scorer the loop does not train on as
    optimised: the reward-hacking warning would watch the wrong scorer, or flag the wrong way round."""
    held, untrained = miscast_scorers(parse_weights(stages["label"]["scorers"]), stages["eval"]["scorers"],
                                      stages["eval"].get("held_out", []))
    if held is not None:
        raise RlaifError(f"{path} [eval]: held_out {held!r} is a [label] scorer, which the loop trains on: a held-out "
                         "scorer must be another one")
    if untrained:
        raise RlaifError(f"{path} [eval]: scorers {untrained[0]!r} is not a [label] scorer, so the loop does not train "
                         "on it: list it under held_out")


def _as_now(settings: dict) -> dict:
    """A loop.json's settings without those this rlaif refuses that changed nothing then (a combine rule for one
    scorer, a beta for --loss sft, an [eval] train_log, which the loop now sets per round), so that a loop begun
    with them goes on without them rather than being stuck between two refusals; and without an older rlaif's
    record of the base model, which counted every file of its folder (a README's edit refused the loop): the
    rounds' samples record the model (``_same_base`` checks it)."""
    label, train, evaluation = (dict(settings.get(table, {})) for table in ("label", "train", "eval"))
    if len(parse_weights(label.get("scorers", []))) == 1:
        label.pop("combine", None)
    if train.get("loss") == "sft":
        train.pop("beta", None)
    evaluation.pop("train_log", None)
    kept = {key: value for key, value in settings.items() if key != OLDER_MODEL_WEIGHTS}
    return kept | {"label": label, "train": train, "eval": evaluation}


def _guidance_then(folder: Path, stage: dict[str, Any]) -> dict[str, float]:
    """``{"guidance": value}`` that ``folder`` (a stage's samples of an earlier round) was sampled with, when
    ``stage`` leaves the guidance unset; else nothing."""
    if "guidance" in stage:
        return {}
    recorded = ((read_json(folder / "run.json", UNREADABLE_STATE) or {}).get("generation") or {}).get("guidance")
    return {} if recorded is None else {"guidance": recorded}


def run_loop(plan: LoopPlan, progress: Progress | None = None, note: Callable[[str], None] | None = None) -> Path:
    """Run every unfinished stage of every round; return OUT/rounds.parquet, every round's win rates. ``note`` is
    told what training and evaluation say beside their results (eval base samples remade, nothing held out)."""
    loop = plan.loop
    state = _state(plan)
    stages, pinned = pin_defaults(plan.stages, state["settings"][DEFAULTS])
    if pinned and note:
        note(f"{loop.out}: this loop began under other defaults of rlaif; it goes on with them: {'; '.join(pinned)}")
    main = process_state().is_main_process
    resumed = list(state["done"])  # said once the first stage left begins: a refused resume says one thing

    def begins(key: str) -> None:
        if resumed and note:
            note(f"{loop.out}: resuming the loop; {', '.join(resumed)} done before (kept as they are); going on "
                 f"from {key}")
        resumed.clear()

    def finished(key: str) -> None:
        state["done"].append(key)
        if main:  # OUT is made by the first stage's output, not before: a first stage refused leaves nothing
            loop.out.mkdir(parents=True, exist_ok=True)
            write_json(state, loop.out / "loop.json")

    def report(prefix: str) -> Callable[..., None] | None:
        return progress and (lambda description, done, total: progress(f"{prefix} {description}", done, total))

    # an unset guidance resolves once per loop: every round samples, and is evaluated, at its first round's (an
    # upgrade of rlaif that changed the default must not change it between rounds)
    stages = {**stages, "sample": {**stages["sample"], **_guidance_then(loop.out / "round_1" / "samples",
                                                                          stages["sample"])},
              "eval": {**stages["eval"], **_guidance_then(loop.out / "eval_base", stages["eval"])}}
    previous: Path | None = None
    for number in range(1, loop.rounds + 1):
        folder = loop.out / f"round_{number}"
        samples, train_out, eval_out = folder / "samples", folder / "train", folder / "eval"
        train = TrainConfig(pairs=samples / "pairs.parquet", model=loop.model, out=train_out, init=previous,
                            resume="latest", overwrite=True, **stages["train"])
        if previous is not None and f"{number}/train" not in state["done"]:  # before this round's sampling
            check_defaults_as_before(previous, train)
        if f"{number}/sample" not in state["done"]:
            begins(f"{number}/sample")
            sample = {**stages["sample"], "seed": round_seed(stages["sample"].get("seed", SampleConfig.seed), number)}
            run_sample(SampleConfig(model=loop.model, prompts=loop.prompts, out=samples, tuned=previous, **sample),
                       progress and (lambda done, total, n=number: progress(f"round {n} sampling", done, total)),
                       note=note)
            finished(f"{number}/sample")
        _same_base(state, samples, loop)
        if f"{number}/label" not in state["done"]:
            begins(f"{number}/label")
            run_label(LabelConfig(samples_dir=samples, **stages["label"]), report(f"round {number} scoring"))
            finished(f"{number}/label")
        if f"{number}/train" not in state["done"]:
            begins(f"{number}/train")
            if finished_before(train):  # the loop was stopped after the training, before it recorded it
                if note:
                    note(f"{train_out}: round {number}'s training had finished; kept as it is")
            else:
                run_train(train, progress and (lambda s, t, logs, n=number: progress(f"round {n} training", s, t,
                                                                                      logs=logs)), note=note)
            finished(f"{number}/train")
        if f"{number}/eval" not in state["done"]:
            begins(f"{number}/eval")
            table = run_eval(EvalConfig(base=loop.model, tuned=train_out, prompts=loop.eval_prompts, out=eval_out,
                                        **stages["eval"]), report(f"round {number} eval"),
                             base_dir=loop.out / "eval_base", note=note)
            state["rounds"][str(number)] = pl.read_parquet(table).to_dicts()
            finished(f"{number}/eval")
        previous = train_out
    if resumed and note:  # nothing left to run
        note(f"{loop.out}: every stage of the loop is done; writing rounds.parquet and report.html again")
    final = loop.out / f"round_{loop.rounds}" / "eval"
    rounds = loop.out / "rounds.parquet"
    if main:
        with atomic_path(loop.out / "report.html") as tmp:
            shutil.copyfile(final / "report.html", tmp)
        write_table([{"round": int(number), **row} for number, rows in state["rounds"].items() for row in rows],
                     rounds, ROUNDS_SCHEMA)
    process_state().wait_for_everyone()
    return rounds
