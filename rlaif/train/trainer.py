"""Diffusion-DPO training loop (accelerate): one readable function, losses from ``rlaif.train.loss``.

Determinism across process counts: the global order of pairs, each pair's augmentation, noise, timestep and
caption-dropout decision are drawn from generators seeded by (seed, pair position), never from a process's or
a DataLoader worker's RNG state (``rlaif.train.batches``), so N processes with a global batch B compute the
gradient of one process with batch B, with or without workers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shlex
import shutil
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from accelerate.utils import extract_model_from_parallel as unwrap
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from rlaif.cache import CACHE_PARTS, cache_dir
from rlaif.config import (
    CAPTION_DROPOUT,
    DEFAULT_BETA,
    DEFAULT_DPO_POSITIVE,
    DEFAULT_KEEP_UNCONDITIONAL,
    DEFAULT_LEARNING_RATE,
    DEFAULT_LORA_TARGETS,
    DEFAULT_WEIGHT_DECAY,
    FLOW_WEIGHTINGS,
    POSITIVE_LOSS_TYPES,
    TrainConfig,
)
from rlaif.distributed import cpu_only, same_on_every_process
from rlaif.errors import RlaifError, first_line
from rlaif.files import atomic_path, changed_settings, free_bytes, publish, read_json, write_json
from rlaif.models import (
    FROZEN_PARTS,
    check_size,
    component_fingerprint,
    default_size,
    denoiser,
    denoiser_fingerprint,
    denoiser_name,
    guided,
    load_pipeline,
    model_family,
    model_identity,
    prompt_length,
)
from rlaif.train import block_cache
from rlaif.train.batches import BATCH_RULES, BatchSettings, MicroBatch, MicroBatches, micro_batches
from rlaif.train.encoding import Encoder, latent_bytes, latent_shape
from rlaif.train.loss import sft_loss, unconditional_anchor
from rlaif.train.objective import (
    FLUX_TRAIN_GUIDANCE,
    FlowMatching,
    Inputs,
    NoisePrediction,
    append_rows,
    distilled_guidance,
    objective_for,
)
from rlaif.train.outputs import (
    TRAIN_FILE,
    is_full,
    remove_outputs,
    save_outputs,
    train_info,
    trained_config,
    trained_tables,
    weights_identity,
)
from rlaif.train.pair_table import MIN_HELD_OUT_CAPTIONS, PairTable, sampled_by, table_changed

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HALF_STORED = (torch.nn.Linear, torch.nn.Conv2d)  # layers whose weights autocast only reads in half precision
Progress = Callable[[int, int, dict[str, float]], None]
"""Called as ``progress(step, max_steps, logs)`` after every optimizer step."""


def run_train(config: TrainConfig, progress: Progress | None = None, note: Callable[[str], None] | None = None) -> Path:
    """Train with Diffusion-DPO / Flow-DPO (or SFT) and write the LoRA, UNet or transformer to ``config.out``;
    return it. ``note`` is told (on the main process) what looks unintended but may be meant."""
    config.validate()
    anchor_defaulted = config.keep_unconditional is None
    left_default = [name for name in DEFAULTED if getattr(config, name) is None]
    config = with_family_defaults(config)
    pairs = PairTable(config.pairs, config.label_column, config.streaming, config.val_fraction,
                      share_blocks=cache_dir() / CACHE_PARTS["blocks"][0] if block_cache.AVAILABLE else None)
    held_out_pairs = pairs.held_out_pairs()  # left out of training, with --loss sft too
    held_out = None if config.loss == "sft" else held_out_pairs.spread(VAL_MAX_PAIRS).kept_whole(
        f"held out: {config.val_fraction} of the captions, {VAL_MAX_PAIRS} pairs")
    kept = [table.shared_blocks for table in (pairs, held_out) if table is not None and table.shared_blocks]
    accelerator = Accelerator(
        cpu=cpu_only(), gradient_accumulation_steps=config.accumulation, mixed_precision=config.mixed_precision,
        log_with=config.report_to,
        project_config=ProjectConfiguration(project_dir=str(config.out), logging_dir=str(config.out / "logs")),
    )
    if not same_on_every_process((pairs.identity, len(pairs))):  # each resolved it (a hub commit, a listing)
        raise RlaifError(f"pairs {pairs.source}: the {accelerator.num_processes} processes read different versions "
                         "of it (it changed while they started); pin one (a hub dataset as ORG/NAME@COMMIT) or "
                         "start again")
    identities = _identities(config, pairs, accelerator.num_processes)  # hashes the --init weights once per run
    # position.json's record, else {}
    resume_from, position, complete = _resume_point(config, identities, left_default)
    step, recorded = position.get("step", 0), position.get("identities", {})  # the checkpoint's, else 0 and none
    identities["batch_rules"] = BATCH_RULES
    set_seed(config.seed)  # the LoRA initialisation is the only draw from the global generators
    frozen = frozen_dtypes(config)
    pipe = load_pipeline(config.model, "fp32", accelerator.device, tuned=config.init, component_dtypes=frozen)
    # known once loaded (a hub id's first download); base_weights is also eval's check that it compares with this model
    weights = {"base_weights": denoiser_fingerprint(config.model),
               "frozen_parts": component_fingerprint(config.model, FROZEN_PARTS)}
    if resume_from is not None:
        _check_same_base(resume_from, config.model, weights, recorded)
    identities = {**identities, **weights}
    base_weights = weights["base_weights"]
    own = sampled_by(pairs.sampling, config.model, lambda: model_identity(config.model))
    check_sampling(pairs.sampling, own, config, anchor_defaulted,
                   prompt_length(pipe, config.max_sequence_length).get("max_sequence_length"))
    resolution = config.resolution or default_size(pipe)
    # FLUX.1-dev's distilled guidance: the pairs' (a resumed run: the one it trained at; before rlaif recorded it, 3.5)
    guidance = (recorded.get("distilled_guidance", FLUX_TRAIN_GUIDANCE) if resume_from
                else distilled_guidance(own))
    objective = objective_for(pipe, config.flow_weighting, guidance)
    identities["distilled_guidance"] = objective.distilled_guidance
    check_size(pipe, "--resolution", resolution)
    unet, reference, params = trainable_network(pipe, config)
    global_batch = config.batch_size * config.accumulation * accelerator.num_processes
    lr = config.learning_rate * (global_batch if config.scale_lr else 1)
    optimizer = make_optimizer(config.optimizer, params, lr, config.weight_decay)
    # The schedule stays out of accelerator.prepare: accelerate's wrapper steps it once per process per
    # optimizer step, which would end a warm-up N times too early on N processes. It is stepped below, once
    # per optimizer step, so it is a function of optimizer steps whatever the process count and accumulation.
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    encoder = Encoder(pipe, None if config.no_cache else cache_dir() / "train", config.cache_dtype,
                      config.max_sequence_length)
    latents = texts = 0
    if not config.no_cache:
        latents = _cache_estimate(config, pipe, resolution, len(pairs), global_batch)
        texts = _text_estimate(config.max_steps * global_batch, len(pairs), len(held_out_pairs),
                               pairs.distinct_captions, encoder.text_entry_bytes(accelerator.device))
    # every process checks (and stops alike): they all write to the cache; a remote table's row groups too
    check_cache_space(cache_dir() / "train", latents, texts,
                      pairs.shared_bytes + (held_out.shared_bytes if held_out else 0))
    _clear_outputs(config, accelerator, complete)  # nothing refused: only now is anything of an old run removed
    if note and accelerator.is_main_process:
        for text in (resumed_at(resume_from, step, config.max_steps), sampled_by_another(config, pairs, own),
                     sampled_elsewhere(config, pairs, identities["init_weights"]),
                     nothing_held_out(config, len(held_out_pairs)),
                     resumed_under_other_rules(resume_from, recorded, pairs, config), within_warmup(config)):
            if text:
                note(text)
    settings = BatchSettings(
        config.seed, config.batch_size, accelerator.num_processes, accelerator.process_index, resolution,
        config.random_crop, config.hflip, config.caption_dropout, latent_shape(pipe, resolution),
        objective.timesteps, weighting=objective.weighting, noise_range=(config.min_noise, config.max_noise))

    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        with warnings.catch_warnings():  # torch warns that no optimizer step came first: none is meant to
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for _ in range(step):  # the schedule is a pure function of the optimizer steps taken
                schedule.step()
    log_path = config.out / "train_log.jsonl"
    if accelerator.is_main_process:
        _keep_log_until(log_path, step)
    if config.report_to:
        accelerator.init_trackers("rlaif-train", config={k: v if isinstance(v, int | float | str | bool) else str(v)
                                                         for k, v in asdict(config).items()})
    batches = iter(micro_batches(MicroBatches(pairs, settings, encoder.latents), step * config.accumulation,
                                 config.max_steps * config.accumulation,
                                 default_workers(accelerator) if config.workers is None else config.workers))
    checkpoint_every = config.checkpoint_every
    val_every = config.val_every or max(1, config.max_steps // 10)
    # held-out pairs fewer than a batch (a small table's 5%) are measured in smaller batches, not skipped
    validation = held_out and MicroBatches(held_out, replace(
        settings, batch_size=max(1, min(settings.batch_size, len(held_out) // settings.processes)),
        caption_dropout=0.0, random_crop=False, hflip=False, shuffle=False), encoder.latents)
    first_step, loop_started = step, time.perf_counter()
    probe_at = first_step + min(AUTO_CHECKPOINT_PROBE, config.max_steps - first_step)  # also after a resume
    while step < config.max_steps:
        logs: dict[str, float] = {"lr": optimizer.param_groups[0]["lr"]}  # the rate this step's update uses
        started = time.perf_counter()
        for _ in range(config.accumulation):
            batch = checked_batch(next(batches), config.out, accelerator)
            with accelerator.accumulate(unet):
                loss, metrics = _dpo_micro_step(config, batch, encoder, unet, reference, objective,
                                                resolution, accelerator.device, config.keep_unconditional)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            for name, mean in process_means(accelerator, {"loss": loss.detach(), **metrics}).items():
                logs[name] = logs.get(name, 0.0) + mean / config.accumulation
        schedule.step()
        if not math.isfinite(logs["loss"]):
            raise RlaifError(f"loss became {logs['loss']} at step {step + 1}; the last good checkpoint is kept "
                             "(lower --learning-rate or --beta, or use --mixed-precision bf16)")
        step += 1
        logs["pairs_per_s"] = global_batch / (time.perf_counter() - started)
        if validation and (step % val_every == 0 or step == config.max_steps):
            logs.update(held_out_metrics(config, validation, encoder, unet, reference, objective, resolution,
                                         accelerator, roll_back=config.out))
        if accelerator.is_main_process:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                log.write(json.dumps({"step": step, **logs}) + "\n")
        if config.report_to:
            accelerator.log(logs, step=step)
        if progress:
            progress(step, config.max_steps, logs)
        if checkpoint_every is None and step == probe_at:
            checkpoint_every = auto_checkpoint_every(accelerator, time.perf_counter() - loop_started,
                                                     step - first_step, config.max_steps - step)
        if checkpoint_every and step % checkpoint_every == 0:
            _save_checkpoint(accelerator, config, step, identities)
    del batches  # the DataLoader workers and what they hold end here
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:  # each machine's row groups (a killed run's are resumed with)
        for blocks in kept:
            blocks.clear()
    if accelerator.is_main_process:
        info = {"config": _settings(config), "steps": step, "frozen_weights": frozen.get(denoiser_name(pipe), "fp32"),
                "label_column": pairs.label, "pairs_trained": len(pairs), "ties_dropped": pairs.ties,
                "unlabelled_dropped": pairs.unlabelled, "same_images_dropped": pairs.same_images,
                # which table, and the run seeds of its samples: eval's check that its images are held out
                # (a local table's: eval cannot read a hub dataset again)
                "pairs_file": pairs.identity,
                "sampled_seeds": sorted({record["seed"] for record in pairs.sampling if "seed" in record})
                if Path(config.pairs).exists() else [],
                "pairs_held_out": len(held_out_pairs),
                # those of --init's chain too: eval keeps their images out as well
                "earlier_tables": trained_tables(train_info(Path(config.init))) if config.init else [],
                # what a launcher decided: a CPU `accelerate launch --num_processes 2` may run one process
                "processes": accelerator.num_processes, "pairs_per_step": global_batch,
                "base_weights": base_weights,
                **({"distilled_guidance": objective.distilled_guidance}  # FLUX.1-dev's, for eval --pairs
                   if objective.distilled_guidance is not None else {}),
                **({"pinned_pairs": pairs.pinned} if pairs.pinned else {})}  # --pairs to read the same again
        save_outputs(accelerator.unwrap_model(unet), pipe, config.out, config.full, config.init and Path(config.init),
                     info)
        for tracker in accelerator.trackers:  # not end_training(): it ends the process group a loop still needs
            tracker.finish()
    accelerator.wait_for_everyone()  # the weights are on disk before any process goes on to use them
    return config.out


FROZEN_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def frozen_dtypes(config: TrainConfig) -> dict[str, str]:
    """The pipeline components kept in half precision, and in which: with LoRA under ``--mixed-precision fp16 /
    bf16`` the frozen denoiser and text encoders are stored in that precision, as diffusers' training scripts
    do (FLUX.1-dev's transformer then takes 24 GB instead of 48), while the LoRA factors train in fp32. Nothing
    otherwise: the VAE (SDXL's overflows in fp16), full fine-tuning (its trained weights; ``frozen_reference``
    stores its reference's linear and convolution layers in half precision) and a LoRA on a full ``--init``
    (saved fused into that network)."""
    if config.full or config.mixed_precision == "no" or (config.init and is_full(Path(config.init))):
        return {}
    return dict.fromkeys(FROZEN_COMPONENTS, config.mixed_precision)


def trainable_network(pipe, config: TrainConfig) -> tuple[torch.nn.Module, torch.nn.Module | None,
                                                             list[torch.nn.Parameter]]:
    """``pipe``'s UNet or transformer set up for training (LoRA adapters added unless ``--full``; gradient
    checkpointing if asked), its frozen reference (``frozen_reference``) and the parameters trained, in fp32."""
    unet = denoiser(pipe)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    if config.full:
        unet.requires_grad_(True)
    reference = frozen_reference(unet, config)  # copied as the policy is set: see frozen_reference
    if not config.full:
        from peft import LoraConfig

        targets = lora_targets(unet, config.lora_targets)
        try:
            unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                        init_lora_weights="gaussian", target_modules=targets))
        except ValueError as exc:  # peft: no module matches a target name
            raise RlaifError(f"--lora-targets {config.lora_targets}: {first_line(exc)}") from exc
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    cast_training_params(unet, torch.float32)  # LoRA factors made beside half-precision weights train in fp32
    return unet, reference, [p for p in unet.parameters() if p.requires_grad]


def frozen_reference(unet: torch.nn.Module, config: TrainConfig) -> torch.nn.Module | None:
    """The reference model of full DPO fine-tuning: a copy of the starting UNet, frozen by use (outside the
    optimizer, run under no_grad). None for LoRA (the reference is the same UNet with adapters off) and for SFT
    (which has no reference term). Its parameters keep requires_grad as the policy's: CPU fp16 autocast casts
    weights that do not require grad differently, and the copy would then differ from the policy at step 0.
    Under mixed precision its linear and convolution layers are stored in the autocast dtype, which is what
    autocast would cast them to at every call: the same function, in less memory (about half the UNet) and
    without casting the reference's weights again at every step (a kernel per weight, on a GPU)."""
    if not config.full or config.loss == "sft":
        return None
    reference = copy.deepcopy(unet).eval()
    if config.mixed_precision != "no":
        for module in reference.modules():
            if type(module) in HALF_STORED:
                module.to(PRECISIONS[config.mixed_precision])
    return reference


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
                   ) -> torch.optim.Optimizer:
    """``name`` (one of OPTIMIZERS) over ``params``, as the official DiffusionDPO train.py builds AdamW and
    Adafactor (fixed learning rate, update clipping at 1); plain SGD has no state and no weight decay, so its
    updates are exactly ``-lr * gradient`` (what the multi-process tests compare)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, weight_decay=weight_decay, clip_threshold=1.0, relative_step=False,
                     scale_parameter=False)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` with its LoRA adapters off (the reference of LoRA training), switched back on whatever
    happens inside, so an exception never leaves the policy running as the reference."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def with_family_defaults(config: TrainConfig) -> TrainConfig:
    """``config`` with the settings left to the model family filled in (beta, DPO-Positive's lambda, the
    unconditional anchor and with it caption dropout, LoRA targets, weight decay), the learning rate left to
    LoRA or full fine-tuning and LoRA alpha to the rank, before anything records them: a
    run's checkpoints and train.json hold the values it trained with. Refuses the anchor for FLUX.1 here, before
    any work (or an --overwrite) starts."""
    family = model_family(config.model)
    if family == "unet" and config.flow_weighting != FLOW_WEIGHTINGS[0]:  # it would be recorded, never used
        raise RlaifError(f"--flow-weighting {config.flow_weighting}: only SD3 / FLUX.1 models train on a noise path "
                         "it weighs; for this model leave it out (--min-noise / --max-noise choose the timesteps)")
    if config.keep_unconditional and not guided(config.model):
        raise RlaifError("FLUX.1 samples without classifier-free guidance, so --keep-unconditional has no "
                         "unconditional prediction to hold; pass --keep-unconditional 0")
    # the anchor's weight was measured against the sigmoid loss (hinge shares its scale); IPO's loss is not
    # scaled by beta, so there the same weight would swamp it
    keep = config.keep_unconditional if config.keep_unconditional is not None \
        else DEFAULT_KEEP_UNCONDITIONAL[family] if config.loss in POSITIVE_LOSS_TYPES else 0.0
    beta = None if config.loss == "sft" else DEFAULT_BETA[family] if config.beta is None else config.beta
    return replace(config, beta=beta,
                   learning_rate=config.learning_rate if config.learning_rate is not None
                   else DEFAULT_LEARNING_RATE["full" if config.full else "lora"],
                   keep_unconditional=keep,
                   caption_dropout=config.caption_dropout if config.caption_dropout is not None
                   else 0.0 if keep or family == "transformer" else CAPTION_DROPOUT,
                   dpo_positive=config.dpo_positive if config.dpo_positive is not None
                   else DEFAULT_DPO_POSITIVE[family] if config.loss in POSITIVE_LOSS_TYPES else 0.0,
                   lora_targets=None if config.full else config.lora_targets or DEFAULT_LORA_TARGETS[family],
                   lora_alpha=config.lora_rank if config.lora_alpha is None else config.lora_alpha,
                   weight_decay=config.weight_decay if config.weight_decay is not None
                   else 0.0 if config.optimizer == "sgd" else DEFAULT_WEIGHT_DECAY[family])


# Why a negative prompt and the unconditional anchor (left on by default) do not go together, as `rlaif train` and
# `rlaif loop` refuse them
ANCHOR_CLASH = ("replaces the empty caption in guidance, but the unconditional anchor (on by default) holds the empty "
                "caption's prediction")


def check_sampling(samplings: list[dict], own: list[dict], config: TrainConfig, anchor_defaulted: bool,
                   length: int | None) -> None:
    """Refuse to train otherwise than the pairs' samples were drawn, where `rlaif label` recorded how
    (``samplings``, run.json's generation settings, one per file of the table; ``own``, those of this model's
    samples, ``sampled_by``): at another T5 prompt length ``length`` than this model drew them at (captions
    encoded unlike the prompts its pictures were made from; another model's length says nothing of this one's),
    or with the unconditional anchor left on by default though they were sampled with a negative prompt (guidance
    subtracts that prompt's prediction, not the empty caption's that the anchor holds). ``config`` has the family
    defaults resolved; ``anchor_defaulted``: --keep-unconditional unset."""
    for sampling in own:
        recorded = sampling.get("max_sequence_length")
        if recorded is not None and length is not None and recorded != length:
            raise RlaifError(f"{config.pairs} was sampled at T5 prompt length {recorded}, and training would "
                             f"encode its captions at {length}; pass --max-sequence-length {recorded}")
    for sampling in samplings:
        if sampling.get("negative_prompt") and anchor_defaulted and config.keep_unconditional:
            raise RlaifError(f"{config.pairs} was sampled with negative prompt {sampling['negative_prompt']!r}, which "
                             f"{ANCHOR_CLASH}; pass --keep-unconditional 0 to train without it, "
                             "or a weight to keep it anyway")


def _dpo_micro_step(config: TrainConfig, batch: MicroBatch, encoder: Encoder, unet, reference,
                    objective: NoisePrediction | FlowMatching, resolution: int, device: torch.device,
                    keep_unconditional: float = 0.0):
    """Loss and metrics of one micro-batch: winners and losers share augmentation, noise, timestep (or noise
    level) and (dropped) caption. Policy and reference run under the same autocast, so at step 0 they compute
    the same function and the loss is ln 2 in every precision (the official script's bf16 reference gives
    1.59). ``keep_unconditional`` > 0 adds ``unconditional_anchor`` on the winners, noised alike, under the
    sampler's unconditional conditioning (training only: held-out metrics are the DPO classifier's)."""
    posterior = encoder.latent_distribution(batch.images, device)
    sample = posterior.mean + posterior.std * batch.vae_draws.to(device)
    embeds, pooled = encoder.text(batch.captions, device)
    # SDXL micro-conditioning: each image's own original size, crop and target size ([winners; losers])
    micro = torch.tensor([[*a.original_size, *a.crop_top_left, resolution, resolution] for a in batch.augmentations],
                         dtype=embeds.dtype, device=device)
    noise, draws = batch.noise.to(device), batch.timesteps.to(device)
    inputs = objective.inputs(sample, noise, draws, embeds, pooled, micro)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[config.mixed_precision],
                              enabled=config.mixed_precision != "no")
    winners = slice(0, len(batch.positions))

    def predict(model, given: Inputs, rows: slice) -> torch.Tensor:
        with autocast:
            return objective.predict(model, given, rows)

    if config.loss == "sft":  # winners only, no reference
        return sft_loss(predict(unet, inputs, winners), inputs.target[winners]), {}
    dpo_rows, every = 2 * len(batch.positions), slice(None)  # [winners; losers], then the anchor's
    run = inputs
    if keep_unconditional:  # the winners again under the unconditional conditioning, in the same two calls
        blank = objective.inputs(sample, noise, draws, *encoder.unconditional(len(batch.positions), device), micro)
        run = append_rows(inputs, blank, winners)
    model_pred = predict(unet, run, every)
    with torch.no_grad():
        if reference is not None:
            ref_pred = predict(reference, run, every)
        else:
            with adapters_disabled(unwrap(unet)) as inner:
                ref_pred = predict(inner, run, every)
    loss, metrics = objective.loss(model_pred[:dpo_rows], ref_pred[:dpo_rows], inputs, config.beta, config.loss,
                                   config.dpo_positive)
    if keep_unconditional:
        anchor, drift = unconditional_anchor(model_pred[dpo_rows:], ref_pred[dpo_rows:], config.beta,
                                             keep_unconditional)
        loss, metrics = loss + anchor, {**metrics, "uncond_drift": drift}
    return loss, metrics


VAL_MAX_PAIRS = 256  # held-out pairs measured each time (spread over the held-out pairs: PairTable.spread)


@torch.no_grad()
def held_out_metrics(config: TrainConfig, validation: MicroBatches, encoder: Encoder, unet, reference,
                     objective: NoisePrediction | FlowMatching, resolution: int, accelerator: Accelerator,
                     max_pairs: int = VAL_MAX_PAIRS, roll_back: Path | None = None) -> dict[str, float]:
    """The DPO loss, implicit accuracy and reward margin on held-out pairs (``val_*``): the model as a preference
    classifier on prompts it never trained on. The same pairs (the first ``max_pairs`` in ``validation``'s
    order: training's and eval's are a ``PairTable.spread``), noise and timesteps every time (centre crop, no
    caption dropout), so the numbers move only with the model;
    ``val_pairs`` says how many: whole batches of batch size x processes, the remainder unmeasured (a few
    pairs' accuracy is noise). Empty when there are fewer held-out pairs than one such batch. ``roll_back``: the
    training run whose log bad input rolls back (``checked_batch``)."""
    per_batch = validation.settings.batch_size * validation.settings.processes
    batches = min(len(validation.table), max_pairs) // per_batch
    totals: dict[str, float] = {}
    for k in range(batches):
        batch = checked_batch(validation[k], roll_back, accelerator)
        loss, metrics = _dpo_micro_step(config, batch, encoder, unet, reference, objective, resolution,
                                        accelerator.device)
        for name, mean in process_means(accelerator, {"loss": loss, **metrics}).items():
            totals[f"val_{name}"] = totals.get(f"val_{name}", 0.0) + mean
    if not batches:
        return {}
    return {**{name: value / batches for name, value in totals.items()}, "val_pairs": float(batches * per_batch)}


def process_means(accelerator: Accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each scalar's mean over the processes, in one collective and one wait for the device (not one per metric)."""
    means = accelerator.reduce(torch.stack([value.float() for value in values.values()]), "mean").tolist()
    return dict(zip(values, means, strict=True))


def default_workers(accelerator: Accelerator) -> int:
    """DataLoader workers when --workers is not given: on an accelerator, the CPU cores per process less one (at
    most 4) decode ahead of the step; on CPU only, none (the model's own threads use every core)."""
    if accelerator.device.type == "cpu":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // accelerator.num_processes - 1))


AUTO_CHECKPOINT_PROBE = 5  # steps timed before deciding on automatic checkpoints
AUTO_CHECKPOINT_SECONDS = 30 * 60


def auto_checkpoint_every(accelerator: Accelerator, elapsed: float, steps: int, remaining: int) -> int:
    """Checkpoint spacing of a run without --checkpoint-every: every ~30 minutes if what remains is estimated to
    take longer than that (from the slowest process's first steps, so every process decides the same), else 0."""
    slowest = torch.tensor(elapsed, dtype=torch.float64, device=accelerator.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(slowest, torch.distributed.ReduceOp.MAX)
    per_step = float(slowest) / max(steps, 1)
    if per_step * remaining <= AUTO_CHECKPOINT_SECONDS:
        return 0
    return max(1, round(AUTO_CHECKPOINT_SECONDS / per_step))


def _cache_estimate(config: TrainConfig, pipe, resolution: int, pairs: int, global_batch: int) -> int:
    """Bytes the latent cache may grow by in this run (at most; what earlier runs cached is not subtracted): every
    image trained on once per augmentation variant (a random crop makes each position its own variant, a flip at
    most two per pair)."""
    trained = config.max_steps * global_batch  # pairs; the global batch counts accumulation and processes
    variants = trained if config.random_crop else min(trained, pairs * (2 if config.hflip else 1))
    return 2 * variants * latent_bytes(pipe, resolution, config.cache_dtype)


def _text_estimate(trained: int, pairs: int, held_out: int, captions: int | None, entry: int) -> int:
    """Bytes the text cache may grow by in this run: ``entry`` for each caption of the ``trained`` pairs (the steps'
    pairs, repeats included) and the ``held_out`` ones, each once: at most the table's distinct ``captions`` (as
    ``PairTable.distinct_captions`` counts them), or one per pair where its captions were not read. For SD3 /
    FLUX.1 an entry (T5 at 256-512 tokens) outweighs an image's latents."""
    distinct = pairs + held_out if captions is None else captions
    return min(trained + held_out, distinct) * entry


def check_cache_space(folder: Path, latents: int, texts: int, blocks: int = 0) -> None:
    """Refuse to start when the cache's filesystem has less free space than the run may write to it (``latents``,
    ``texts`` and a remote table's kept row groups, ``blocks``, in bytes)."""
    free = free_bytes(folder)
    needed = latents + texts + blocks
    if free < needed:
        parts = ", ".join(f"{name} {size / 2**30:.1f}" for name, size in
                          (("latents", latents), ("text embeddings", texts), ("remote row groups", blocks)) if size)
        advice = ("use --cache-dtype bf16 (half of both) or --no-cache"
                  if latents + texts else "or train on a downloaded copy of the table")
        raise RlaifError(f"the training cache ({folder}) may need {needed / 2**30:.1f} GiB ({parts}) but only "
                         f"{free / 2**30:.1f} GiB is free there; free space, point RLAIF_CACHE elsewhere, {advice}")


def checked_batch(batch: MicroBatch | str, out: Path | None, accelerator: Accelerator) -> MicroBatch:
    """``batch``, or, when any process's micro-batch is a user error's message (an image that cannot be read),
    the run stopped on every process together with the log of training run ``out`` (if any) rolled back
    (``_roll_back_log``). Together: a process that stopped alone would leave the others waiting in the step, and
    the launcher kills them all as soon as one exits, so the main process rolls back first and the others wait."""
    bad = isinstance(batch, str)
    if accelerator.num_processes > 1:
        bad_anywhere = accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), "sum").item() > 0
    else:
        bad_anywhere = bad
    if not bad_anywhere:
        return batch
    if out is not None and accelerator.is_main_process:
        _roll_back_log(out)
    accelerator.wait_for_everyone()
    raise RlaifError(batch if bad else "stopped: another process met bad input (its error names the row)")


def _roll_back_log(out: Path) -> None:
    """After bad input stops a run: its log as a resume will find it (up to the last complete checkpoint), and no
    log, nor the folder when this left it empty, if there is none (an image that cannot be read, met at step 30 of
    a new run, leaves nothing behind)."""
    complete = complete_checkpoints(out)
    log = out / "train_log.jsonl"
    if complete:
        _keep_log_until(log, checkpoint_step(complete[-1]))
        return
    log.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only when empty
        out.rmdir()


def _keep_log_until(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (a resumed run rewrites them) and a line cut short by a kill. A new run's
    log is made by its first step, so a run that fails before it leaves no file."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= step:
                kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders whose writing finished, oldest first."""
    found = [p for p in (out / "checkpoints").glob("step_*") if p.is_dir() and p.suffix != ".partial"
             and (p / "position.json").exists()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    """The step of checkpoint folder ``folder`` (``step_00000100``: 100)."""
    return int(folder.name.removeprefix("step_"))


# Settings that may change between a run and its resumption: they do not change what a step computes.
# Settings that older checkpoints do not record, and what they were then: weight decay was torch's AdamW default
# (none for Adafactor) before --weight-decay existed, the loss had no DPO-Positive term before --dpo-positive and
# no unconditional anchor before --keep-unconditional (caption dropout was always recorded).
UNRECORDED = {"weight_decay": lambda saved: 1e-2 if saved.get("optimizer", "adamw") == "adamw" else 0.0,
              "dpo_positive": lambda saved: 0.0, "keep_unconditional": lambda saved: 0.0}
RESUMABLE_CHANGES = ("resume", "max_steps", "checkpoint_every", "report_to", "no_cache", "overwrite", "out",
                     "gradient_checkpointing", "workers", "val_every", "keep_checkpoints")


def _settings(config: TrainConfig) -> dict:
    """The run's settings as JSON values, paths made absolute (for train.json and checkpoints); the pairs too
    when they are a local file or folder (not a hub id or URL)."""
    settings = {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    if Path(config.pairs).exists():
        settings["pairs"] = str(Path(config.pairs).resolve())
    return settings


def lora_targets(network: torch.nn.Module, targets: str) -> list[str]:
    """The module names of ``--lora-targets`` (comma-separated, spaces allowed), each checked to name a module of
    ``network`` as peft matches them (the whole name or its last dotted parts): peft drops a name that matches
    nothing when another matches, so "to_q,to_vv" would train to_q alone."""
    names = [name.strip() for name in targets.split(",") if name.strip()]
    modules = [name for name, _ in network.named_modules()]
    for target in names:
        if not any(module == target or module.endswith(f".{target}") for module in modules):
            raise RlaifError(f"--lora-targets {targets}: {target!r} names no module of the model")
    return names


def nothing_held_out(config: TrainConfig, held_out: int) -> str | None:
    """What to say when --val-every asks for held-out measurements and the table held out no pairs (``held_out``)."""
    if config.val_every is None or held_out:
        return None
    return (f"no pairs are held out: captions are held out by their hash, a --val-fraction {config.val_fraction} "
            f"share of them, and none of {config.pairs}'s fell there (a table of under {MIN_HELD_OUT_CAPTIONS} "
            "captions holds none out); no held-out accuracy will be measured")


def within_warmup(config: TrainConfig) -> str | None:
    """What to say when the run ends inside its learning-rate warm-up (a recipe's --warmup-steps 500 kept for a
    short run): its last step trains at a small share of --learning-rate, and the weights barely move."""
    if config.warmup_steps < config.max_steps:
        return None
    share = (config.max_steps - 1) / config.warmup_steps  # the linear warm-up's factor at the last step
    return (f"--warmup-steps {config.warmup_steps} is not below --max-steps {config.max_steps}: the run ends inside "
            f"its warm-up, its last step at {share:.1%} of the learning rate, so the weights will barely move; lower "
            "--warmup-steps")


def resumed_at(folder: Path | None, step: int, max_steps: int) -> str | None:
    """Where a resumed run goes on from (a new user's trial: only the first progress line told)."""
    if folder is None:
        return None
    return f"resuming from {folder}: step {step} of {max_steps} done, {max_steps - step} to go"


def sampled_by_another(config: TrainConfig, pairs: PairTable, own: list[dict]) -> str | None:
    """What to say when every sample of an rlaif table was drawn by another model than --model (``own``: those
    this model drew, ``sampled_by``): off-policy DPO, as on Pick-a-Pic, but easily a mix-up of runs."""
    if not pairs.sampling or own:
        return None
    models = sorted({str(record.get("model")) for record in pairs.sampling})
    return (f"pairs table {config.pairs} was sampled by {', '.join(models)}, not by --model {config.model}: training "
            "one model on another's pictures is off-policy DPO (legitimate, as on Pick-a-Pic), and their sampling "
            "settings (guidance, T5 length) say nothing of this model's")


def sampled_elsewhere(config: TrainConfig, pairs: PairTable, init_weights: str | None) -> str | None:
    """What to say when the table's images came from a tuned model (`rlaif sample --tuned`, as its record says)
    that this run does not start from: forgetting --init in round 2 of iterative DPO trains the base on another
    model's samples instead, which is off-policy DPO (legitimate, but rarely what was meant)."""
    sampled = {record.get("tuned") for record in pairs.sampling} - {None}
    if not sampled or init_weights in sampled:
        return None
    start = f"--init {config.init}" if config.init else f"{config.model} itself"
    return (f"pairs table {config.pairs} was sampled from a tuned model, and this run starts from {start}; for the "
            "next round of iterative DPO, pass --init the model that sampled it")


def _identities(config: TrainConfig, pairs: PairTable, processes: int) -> dict:
    """What else a step depends on, beyond the settings: the pairs table's files (paths, sizes, times: a table
    rewritten in place is another table; a hub dataset's fingerprint), the content of the --init weights, and
    the process count (with the per-process batch, the global batch)."""
    return {"pairs_file": pairs.identity, "processes": processes,
            "init_weights": config.init and weights_identity(config.init)}


def _resume_point(config: TrainConfig, identities: dict,
                  left_default: Collection[str] = ()) -> tuple[Path | None, dict, list[Path]]:
    """The checkpoint to resume from (None: start at step 0), its position.json ({} for none), and the folder's
    complete checkpoints.
    Refuses to overwrite a finished run without --overwrite, a run with checkpoints without --resume or
    --overwrite, and to resume a run made with other settings or past --max-steps; removes nothing
    (``_clear_outputs`` does, once nothing is refused)."""
    complete = complete_checkpoints(config.out)
    if (config.out / TRAIN_FILE).exists() and not config.overwrite:
        go_on = (f"; to train it on from {complete[-1].name} instead, pass --overwrite --resume latest and a higher "
                 "--max-steps" if complete else "")
        raise RlaifError(f"{config.out} holds a finished training run; pass --overwrite to replace it, or choose "
                         f"another --out{go_on}")
    folder = None
    if config.resume is None and complete and not config.overwrite:
        raise RlaifError(f"{config.out} already holds checkpoints (last: {complete[-1].name}); pass --resume "
                         "latest to continue that run, or choose another --out")
    if config.resume == "latest":
        folder = complete[-1] if complete else None  # none: killed before its first checkpoint, start again
    elif config.resume is not None:
        folder = Path(config.resume)
        listed = config.out / "checkpoints" / config.resume
        if (listed / "position.json").exists() and not (folder / "position.json").exists():  # a name OUT lists
            folder = listed
        if not folder.exists():
            raise RlaifError(f"--resume {config.resume}: no such checkpoint folder (give 'latest', a path, or the "
                             f"name of one in {config.out / 'checkpoints'})")
        if not (folder / "position.json").exists():
            raise RlaifError(f"--resume {config.resume}: {folder} is not a complete rlaif checkpoint")
    position = {} if folder is None else _check_same_run(folder, config, identities, left_default)
    step = position.get("step", 0)
    if step > config.max_steps:  # its weights have trained longer than asked: nothing could undo that
        raise RlaifError(f"--resume {config.resume}: {folder.name} is at step {step}, past --max-steps "
                         f"{config.max_steps}; give --max-steps {step} or more, or resume an earlier checkpoint")
    return folder, position, complete


def _clear_outputs(config: TrainConfig, accelerator: Accelerator, complete: list[Path]) -> None:
    """Remove checkpoints cut short by a kill (``*.partial``) and, with --overwrite, the old run's outputs."""
    accelerator.wait_for_everyone()  # every process has checked before any removes
    if accelerator.is_main_process:
        for partial in (config.out / "checkpoints").glob("step_*.partial"):
            shutil.rmtree(partial)
        if config.overwrite:  # asked for: the old run's outputs go before the new one starts (its checkpoints too
            remove_outputs(config.out)  # unless resuming), so a failed run never leaves them looking current
            for checkpoint in complete if config.resume is None else []:
                shutil.rmtree(checkpoint)
            with contextlib.suppress(OSError):  # only when empty: an old run's folder of checkpoints, all removed
                (config.out / "checkpoints").rmdir()
    accelerator.wait_for_everyone()


def settings_then(saved: dict) -> dict:
    """Settings recorded by a checkpoint or train.json, completed with those added since: each had its default
    value then, or the value ``UNRECORDED`` says it stood for."""
    then = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    settings = then | {key: value(saved) for key, value in UNRECORDED.items()} | saved
    unused = {"beta": settings.get("loss") == "sft", "lora_targets": settings.get("full")}  # recorded before 11-28
    return settings | {name: None for name, is_unused in unused.items() if is_unused}


# Settings that a run left out resolves from rlaif's defaults (with_family_defaults): a loop's later round must
# resolve them as its earlier rounds did, or an upgrade of rlaif between rounds would change the loss silently
DEFAULTED = ("beta", "dpo_positive", "keep_unconditional", "caption_dropout", "weight_decay", "lora_targets",
             "learning_rate", "lora_alpha")


def finished_before(config: TrainConfig) -> bool:
    """Whether ``config.out`` holds this run finished: a train.json of ``config.max_steps`` steps, with the same
    settings (``--init`` among them), on the pairs table as it is now (a loop killed after a round's training,
    before it recorded it, goes on without training again)."""
    info = train_info(config.out)
    if (info.get("steps") != config.max_steps or info.get("pairs_file") is None
            or table_changed(str(config.pairs), info["pairs_file"])):
        return False
    now = _settings(with_family_defaults(config))
    return not changed_settings(settings_then(info.get("config", {})), now,
                                [key for key in now if key not in RESUMABLE_CHANGES])


def check_defaults_as_before(previous: Path, config: TrainConfig) -> None:
    """Refuse to train ``config`` on from ``previous`` (a loop's earlier round) when settings it leaves to the
    defaults now resolve otherwise than they did for ``previous``."""
    now, then = asdict(with_family_defaults(config)), settings_then(trained_config(previous))
    changed = changed_settings(then, now, DEFAULTED)
    if changed:
        keep = "; ".join(f"{key} = {then[key]!r}" for key in DEFAULTED
                         if then.get(key) != now.get(key) and then.get(key) is not None)
        raise RlaifError(f"{previous} was trained under other defaults than this rlaif's ({'; '.join(changed)}), so "
                         "the next round would train another loss; finish the loop with the rlaif that started it"
                         + (f", set them in the config's [train] table as they were ({keep})" if keep else "")
                         + ", or start it again in a new --out")


# Changes of BATCH_RULES that touch only some runs, and whether they touch one of ``pairs`` under ``config``: 4 left
# out Pick-a-Pic's pairs of one picture twice, 5 rounded text embeddings to a half-precision --cache-dtype
NARROW_RULES: dict[int, Callable[[PairTable, TrainConfig], bool]] = {
    4: lambda pairs, config: pairs.same_images > 0, 5: lambda pairs, config: config.cache_dtype != "fp32"}


def resumed_under_other_rules(folder: Path | None, recorded: dict, pairs: PairTable, config: TrainConfig
                              ) -> str | None:
    """What to say when checkpoint ``folder`` (``recorded``: its identities) was written by an rlaif that built
    micro-batches of ``pairs`` under ``config`` otherwise (other held-out captions, VAE draws, crops, SDXL
    conditioning, pairs left out or text embeddings rounded; ``BATCH_RULES``): the run goes on, a valid training
    run, but not the one an uninterrupted run would have been."""
    if folder is None:
        return None
    then = recorded.get("batch_rules", 1)  # before the rules were recorded: the first
    if all(rule in NARROW_RULES and not NARROW_RULES[rule](pairs, config)
           for rule in range(then + 1, BATCH_RULES + 1)):
        return None
    return (f"{folder} was written by an rlaif that built its batches otherwise (rules {then}, now {BATCH_RULES}: "
            "other held-out captions, VAE draws, crops, SDXL conditioning, pairs left out or text embeddings "
            "rounded); the remaining steps and held-out measurements use these, so the result will differ from an "
            "uninterrupted run's")


def _check_same_run(folder: Path, config: TrainConfig, identities: dict, left_default: Collection[str] = ()) -> dict:
    """Refuse to resume checkpoint ``folder`` with settings that change what a step computes; return its
    position.json (its step, settings and identities). When every difference is a setting of ``left_default``
    (unset, so rlaif's default, which changed since that run began), the refusal names the options that resume it."""
    position = read_json(folder / "position.json", "start a new run in another --out") or {}
    if "settings" not in position:
        raise RlaifError(f"--resume {folder}: written by an older rlaif that did not record its settings; start a "
                         "new run in another --out")
    saved = {**settings_then(position["settings"]), **position.get("identities", {})}
    now = _unstamped_as_then(saved, _moved_alike(saved, {**_settings(config), **identities}))
    compared = [key for key in now if key not in RESUMABLE_CHANGES]
    changed = changed_settings(saved, now, compared)
    if changed:
        differ = [key for key in compared if saved.get(key) != now.get(key)]
        # only when every difference is a default that resolves otherwise now, to a value an option can give
        moved = set(differ) <= set(left_default) and all(saved.get(key) is not None for key in differ)
        advice = ("left to rlaif's defaults, these resolve otherwise than when that run began: pass "
                  + " ".join(f"--{key.replace('_', '-')} {shlex.quote(str(saved[key]))}" for key in sorted(differ))
                  + " to resume it") if moved else "resume with the same settings"
        raise RlaifError(f"--resume {folder}: that run was made with other settings ({'; '.join(changed)}); {advice}, "
                         "or start a new run in another --out")
    return position


LOCATED = ("pairs", "init", "pairs_file")  # settings and identities that hold absolute paths


def _moved_alike(saved: dict, now: dict) -> dict:
    """``now`` with each path setting that names, relative to its --out, what ``saved`` named relative to its own
    taken as unchanged: a run folder moved together with its pairs and --init (a loop's rounds; ``mv``, ``cp -a``
    and ``rsync -a`` keep the files' times, which the pairs' identity holds) resumes as the same run."""
    def relative(settings: dict, key: str) -> str | None:
        value, root = settings.get(key), settings.get("out")
        if not isinstance(value, str) or not root:
            return None
        return ";".join(_relative_entry(entry, root) for entry in value.split(";"))

    return now | {key: saved[key] for key in LOCATED
                  if relative(saved, key) is not None and relative(saved, key) == relative(now, key)}


def _unstamped_as_then(saved: dict, now: dict) -> dict:
    """``now`` with a remote table's identity taken as ``saved``'s when that names the same shards without their
    ``remote_stamp`` (``URL#STAMP``; an rlaif before the stamps), so that such a checkpoint resumes as it did."""
    then, current = saved.get("pairs_file"), now.get("pairs_file")
    if not (isinstance(then, str) and isinstance(current, str) and "://" in then and "#" not in then):
        return now
    named = ";".join(entry.split("#", 1)[0] for entry in current.split(";"))
    return now | {"pairs_file": then} if named == then else now


def _relative_entry(entry: str, root: str) -> str:
    """A path, or a ``file_identity`` entry (``PATH:SIZE:MTIME``), with an absolute path made relative to ``root``."""
    path, *stamp = entry.rsplit(":", 2) if re.fullmatch(r".*:\d+:\d+", entry) else (entry,)
    try:
        return ":".join([os.path.relpath(path, root) if os.path.isabs(path) else path, *stamp])
    except ValueError:  # Windows: another drive than --out's, no relative path to it
        return entry


def _check_same_base(folder: Path, model: str, weights: dict[str, str | None], then: dict) -> None:
    """Refuse to resume checkpoint ``folder`` (``then``: the identities it recorded) over other weights of
    ``model`` than it trained on (``weights``: the UNet / transformer's and the VAE and text encoders'; a model
    folder rewritten, a VAE swapped in, a new hub revision): training would go on over another model or other
    latents, and train.json name only the new one. What a checkpoint did not record (older rlaif) is not checked."""
    parts = {"base_weights": "its UNet / transformer", "frozen_parts": "its VAE or text encoders"}
    changed = [part for key, part in parts.items()
               if None not in (then.get(key), weights.get(key)) and then[key] != weights[key]]
    if changed:
        raise RlaifError(f"--resume {folder}: that run trained on other weights of {model} than it holds now "
                         f"({' and '.join(changed)} changed: a folder rewritten, a component swapped, or a new hub "
                         "revision); resume with the weights it trained on, or start a new run in another --out")


def _save_checkpoint(accelerator: Accelerator, config: TrainConfig, step: int, identities: dict) -> None:
    """Weights, optimizer and RNG states (the schedule follows from the step) under checkpoints/step_N, written
    as step_N.partial and renamed once every process has written its part (position.json marks it complete)."""
    final = config.out / "checkpoints" / f"step_{step:08d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json({"step": step, "settings": _settings(config),
                    "identities": identities}, partial / "position.json")
        shutil.rmtree(final, ignore_errors=True)  # a resumed run passing a step it had saved before
        publish(partial)
        os.replace(partial, final)
        if config.keep_checkpoints:
            _prune_checkpoints(config.out, step, config.keep_checkpoints)
    accelerator.wait_for_everyone()


def _prune_checkpoints(out: Path, step: int, keep: int) -> None:
    """Keep step ``step``'s checkpoint (just completed) and the newest ``keep`` - 1 before it; later ones (of a run
    this one resumed before) stay. Each goes by renaming it step_N.partial first: a kill mid-removal leaves what
    the next start clears, never a checkpoint that looks complete and is not."""
    earlier = [c for c in complete_checkpoints(out) if checkpoint_step(c) < step]
    for old in earlier[:max(0, len(earlier) - (keep - 1))]:
        doomed = old.with_name(old.name + ".partial")
        os.replace(old, doomed)
        shutil.rmtree(doomed)
