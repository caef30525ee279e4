"""Diffusion-DPO training loop (accelerate): one readable function, losses from ``rlaif.train.loss``.

Determinism across process counts: the global order of pairs, each pair's augmentation, noise, timestep and
caption-dropout decision are drawn from generators seeded by (seed, step, pair position), never from a
process's RNG state, so N processes with a global batch B compute the gradient of one process with batch B.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.optimization import get_scheduler
from diffusers.utils import convert_state_dict_to_diffusers

from rlaif.distributed import cpu_only
from rlaif.errors import RlaifError
from rlaif.files import write_json
from rlaif.images import open_rgb
from rlaif.models import default_size, load_pipeline
from rlaif.train.data import PreferencePair, augment_pair, load_pairs
from rlaif.train.loss import LOSS_TYPES, diffusion_dpo_loss, sft_loss

Progress = Callable[[int, int, dict[str, float]], None]
"""Called as ``progress(step, max_steps, logs)`` after every optimizer step."""


@dataclass
class TrainConfig:
    """Settings of ``rlaif train``; field help texts are the CLI's help texts."""

    pairs: Path = field(metadata={"help": "Pairs table: rlaif pairs.parquet or a Pick-a-Pic v2 style table."})
    model: str = field(metadata={"help": "Hub id, local diffusers folder, or tiny / tiny-xl."})
    out: Path = field(metadata={"help": "Output folder: LoRA or UNet weights, checkpoints/, train_log.jsonl."})
    full: bool = field(default=False, metadata={"help": "Full fine-tuning (frozen reference copy) instead of LoRA."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha."})
    lora_targets: str = field(default="to_q,to_k,to_v,to_out.0", metadata={"help": "LoRA target modules."})
    loss: str = field(default="sigmoid", metadata={"help": f"{' | '.join(LOSS_TYPES)} (DPO) or sft."})
    beta: float = field(default=5000.0, metadata={"help": "DPO beta (official: 5000 for SD1.5 and SDXL)."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (per sample if --scale-lr)."})
    scale_lr: bool = field(default=False, metadata={
        "help": "Multiply the learning rate by the global batch (pairs x accumulation x processes), as the "
                "official code does."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps of the constant schedule."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=1, metadata={"help": "Pairs per process per micro-step."})
    accumulation: int = field(default=1, metadata={"help": "Gradient accumulation micro-steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adafactor."})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute UNet activations."})
    resolution: int | None = field(default=None, metadata={"help": "Training resolution; default: the model's."})
    random_crop: bool = field(default=False, metadata={"help": "Random instead of centre crop."})
    hflip: bool = field(default=False, metadata={"help": "Random horizontal flip (same for both images)."})
    caption_dropout: float = field(default=0.2, metadata={"help": "Share of pairs trained with an empty caption."})
    checkpoint_every: int = field(default=0, metadata={"help": "Save a resumable checkpoint every N steps (0: off)."})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to resume from."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, augmentation, noise and timesteps."})

    def validate(self) -> None:
        if self.loss not in (*LOSS_TYPES, "sft"):
            raise RlaifError(f"--loss {self.loss!r} is not one of {', '.join((*LOSS_TYPES, 'sft'))}")
        if self.optimizer not in ("adamw", "adafactor"):
            raise RlaifError(f"--optimizer {self.optimizer!r} is not adamw or adafactor")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise RlaifError(f"--mixed-precision {self.mixed_precision!r} is not no, fp16 or bf16")
        for name in ("max_steps", "batch_size", "accumulation", "lora_rank"):
            if getattr(self, name) < 1:
                raise RlaifError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.caption_dropout <= 1:
            raise RlaifError("--caption-dropout must be between 0 and 1")


def _rng(*key: object) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


def _generator(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(_rng(*key).getrandbits(63))


@functools.lru_cache(maxsize=2)
def pair_order(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The pairs' order in ``epoch``: a permutation that depends only on (seed, epoch), computed once."""
    order = list(range(count))
    _rng("order", seed, epoch).shuffle(order)
    return tuple(order)


class Conditioning:
    """Text conditioning of SD1.x/2.x or SDXL pipelines (embeddings and, for SDXL, pooled + time ids)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.xl = isinstance(pipe, StableDiffusionXLPipeline)

    @torch.no_grad()
    def __call__(self, captions: list[str], sizes: list[tuple[int, int]], crops: list[tuple[int, int]],
                 resolution: int, device: torch.device) -> tuple[torch.Tensor, dict]:
        encoded = self.pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
        if not self.xl:
            return encoded[0], {}
        time_ids = torch.tensor([[*size, *crop, resolution, resolution] for size, crop in zip(sizes, crops,
                                                                                               strict=True)],
                                dtype=encoded[0].dtype, device=device)
        return encoded[0], {"text_embeds": encoded[2], "time_ids": time_ids}


def run_train(config: TrainConfig, progress: Progress | None = None) -> Path:
    """Train with Diffusion-DPO (or SFT) and write the LoRA or UNet to ``config.out``; return it."""
    config.validate()
    pairs = load_pairs(config.pairs)
    accelerator = Accelerator(
        cpu=cpu_only(), gradient_accumulation_steps=config.accumulation, mixed_precision=config.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(config.out), automatic_checkpoint_naming=True),
    )
    set_seed(config.seed)  # the LoRA initialisation is the only draw from the global generators
    pipe = load_pipeline(config.model, "fp32", accelerator.device)
    resolution = config.resolution or default_size(pipe)
    unet, vae = pipe.unet, pipe.vae
    for module in (vae, unet, *(m for m in (getattr(pipe, "text_encoder", None),
                                              getattr(pipe, "text_encoder_2", None)) if m is not None)):
        module.requires_grad_(False)
    reference = None
    if config.full:
        reference = copy.deepcopy(unet).eval()
        unet.requires_grad_(True)
    else:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=config.lora_targets.split(",")))
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    global_batch = config.batch_size * config.accumulation * accelerator.num_processes
    lr = config.learning_rate * (global_batch if config.scale_lr else 1)
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr)
    else:
        from transformers.optimization import Adafactor

        optimizer = Adafactor(params, lr=lr, relative_step=False, scale_parameter=False)
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps)
    unet, optimizer, schedule = accelerator.prepare(unet, optimizer, schedule)
    conditioning = Conditioning(pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule

    step = 0
    if config.resume:
        folder = _checkpoint_folder(config.out, config.resume)
        accelerator.load_state(str(folder))
        step = json.loads((folder / "position.json").read_text())["step"]
    log_path = config.out / "train_log.jsonl"
    if accelerator.is_main_process:
        _keep_log_until(log_path, step)
    micro_per_step = config.accumulation
    while step < config.max_steps:
        logs: dict[str, float] = {}
        started = time.perf_counter()
        for micro in range(micro_per_step):
            position = (step * micro_per_step + micro) * config.batch_size * accelerator.num_processes
            start = position + accelerator.process_index * config.batch_size
            indices = [_pair_index(start + i, len(pairs), config.seed) for i in range(config.batch_size)]
            with accelerator.accumulate(unet):
                loss, metrics = _dpo_micro_step(
                    config, [pairs[i] for i in indices], [start + i for i in range(config.batch_size)],
                    vae, unet, reference, conditioning, noise_scheduler, resolution, accelerator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
            for name, value in {"loss": loss.detach(), **metrics}.items():
                logs[name] = logs.get(name, 0.0) + float(accelerator.reduce(value.float(), "mean")) / micro_per_step
        if not math.isfinite(logs["loss"]):
            raise RlaifError(f"loss became {logs['loss']} at step {step + 1}; the last good checkpoint is kept "
                             "(lower --learning-rate or --beta, or use --mixed-precision bf16)")
        step += 1
        logs["lr"] = schedule.get_last_lr()[0]
        logs["pairs_per_s"] = global_batch / (time.perf_counter() - started)
        if accelerator.is_main_process:
            with open(log_path, "a") as log:
                log.write(json.dumps({"step": step, **logs}) + "\n")
        if progress:
            progress(step, config.max_steps, logs)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            _save_checkpoint(accelerator, config.out, step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_weights(accelerator.unwrap_model(unet), pipe, config)
        write_json({"config": {k: str(v) for k, v in asdict(config).items()}, "steps": step},
                   config.out / "train.json")
    accelerator.end_training()
    return config.out


def _pair_index(position: int, count: int, seed: int) -> int:
    epoch, offset = divmod(position, count)
    return pair_order(count, seed, epoch)[offset]


def _dpo_micro_step(config, batch: list[PreferencePair], positions: list[int], vae, unet, reference,
                    conditioning, noise_scheduler, resolution, accelerator):
    """Loss of one micro-batch: winners and losers share noise, timestep and (dropped) caption."""
    device = accelerator.device
    augmented = [augment_pair(open_rgb(p.chosen), open_rgb(p.rejected), resolution, config.random_crop,
                              config.hflip, _rng("augment", config.seed, pos)) for p, pos in zip(batch, positions,
                                                                                                 strict=True)]
    pixels = torch.stack([a.chosen for a in augmented] + [a.rejected for a in augmented]).to(device)
    with torch.no_grad():
        posterior = vae.encode(pixels.float()).latent_dist
        draws = [torch.randn(posterior.mean.shape[1:], generator=_generator("vae", config.seed, pos, side))
                 for side in ("chosen", "rejected") for pos in positions]  # per image, not per batch
        latents = posterior.mean + posterior.std * torch.stack(draws).to(device)
        latents = latents * vae.config.scaling_factor
    captions = ["" if _rng("drop", config.seed, pos).random() < config.caption_dropout else p.caption
                for p, pos in zip(batch, positions, strict=True)]
    embeds, added = conditioning(captions, [a.original_size for a in augmented],
                                 [a.crop_top_left for a in augmented], resolution, device)
    embeds = embeds.repeat(2, 1, 1)
    added = {k: v.repeat(2, *([1] * (v.ndim - 1))) for k, v in added.items()}
    noise = torch.cat([torch.randn(latents.shape[1:], generator=_generator("noise", config.seed, pos))[None]
                       for pos in positions]).to(device)
    timesteps = torch.tensor([_rng("t", config.seed, pos).randrange(noise_scheduler.config.num_train_timesteps)
                              for pos in positions], device=device)
    noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, timesteps)
    kwargs = {"added_cond_kwargs": added} if added else {}
    model_pred = unet(noisy, timesteps, embeds, **kwargs).sample
    if config.loss == "sft":
        return sft_loss(model_pred, target), {}
    # The reference runs under the same autocast as the policy: at step 0 both compute the same function,
    # so the loss is ln 2 in every precision (the official script's bf16 reference gives 1.59 instead).
    with torch.no_grad(), accelerator.autocast():
        if reference is not None:
            ref_pred = reference(noisy, timesteps, embeds, **kwargs).sample
        else:
            inner = accelerator.unwrap_model(unet)
            inner.disable_adapters()
            ref_pred = inner(noisy, timesteps, embeds, **kwargs).sample
            inner.enable_adapters()
    return diffusion_dpo_loss(model_pred, ref_pred, target, beta=config.beta, loss_type=config.loss)


def _keep_log_until(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (a resumed run rewrites them), creating the folder and file if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _checkpoint_folder(out: Path, resume: str) -> Path:
    if resume != "latest":
        folder = Path(resume)
    else:
        found = sorted((out / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
        if not found:
            raise RlaifError(f"--resume latest: no checkpoint under {out / 'checkpoints'}")
        folder = found[-1]
    if not (folder / "position.json").exists():
        raise RlaifError(f"--resume {resume}: {folder} is not a complete rlaif checkpoint")
    return folder


def _save_checkpoint(accelerator: Accelerator, out: Path, step: int) -> None:
    folder = Path(accelerator.save_state())
    if accelerator.is_main_process:
        write_json({"step": step}, folder / "position.json")  # written last: marks the checkpoint complete
    accelerator.wait_for_everyone()


def _save_weights(unet, pipe, config: TrainConfig) -> None:
    if config.full:
        unet.save_pretrained(config.out / "unet", safe_serialization=True)
        return
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(str(config.out), unet_lora_layers=layers, safe_serialization=True)
