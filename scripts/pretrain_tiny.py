"""Pretrain the tiny SD1.5-style model on the shapes world and save it to rlaif/assets/tiny-sd.

Deterministic (fixed seeds, fixed step counts). Stage 1 trains the VAE to reconstruct shapes pictures (on 32 px
crops; it prints the share of round trips that still read as drawn), or with ``--decoder-steps`` its decoder alone
on whole pictures. Stage 2 freezes it and trains the UNet
and text encoder with the standard epsilon-prediction objective, 10% caption dropout (for classifier-free
guidance), offset noise (so colours come from the prompt, not from the noise's mean) and Min-SNR-5 weighting.

The committed weights come from six runs (~27 + ~17 + ~8 + ~9 + 2 + 2 CPU minutes on 2 cores):

    python scripts/pretrain_tiny.py --no-noisier-half --text-lr-factor 1 --out /tmp/tiny-stage1
    python scripts/pretrain_tiny.py --init /tmp/tiny-stage1 --vae-steps 0 --lr 5e-4 --out /tmp/tiny-stage2
    python scripts/pretrain_tiny.py --init /tmp/tiny-stage2 --vae-steps 0 --unet-steps 600 --lr 3e-4 \
        --omit-probability 0.25 --out /tmp/tiny-stage3
    python scripts/pretrain_tiny.py --init /tmp/tiny-stage3 --vae-steps 0 --unet-steps 800 --lr 3e-4 \
        --omit-probability 0.4 --seed 1 --out /tmp/tiny-stage4
    python scripts/pretrain_tiny.py --init /tmp/tiny-stage4 --vae-steps 0 --unet-steps 400 --lr 1e-4 \
        --omit-probability 0.2 --seed 3 --out /tmp/tiny-stage5
    python scripts/pretrain_tiny.py --init /tmp/tiny-stage5 --vae-steps 0 --unet-steps 400 --lr 1e-4 \
        --omit-probability 0.2 --seed 4

the second continuing the first's UNet and text encoder with every other timestep drawn from the noisier
half of the schedule and a 3x learning rate for the text encoder (what made it follow colours); the third and
fourth teaching it shorter captions ("a red circle", "a circle on a blue background"), so that what a caption leaves
out it draws differently from seed to seed, as the world does; the fifth and sixth (2026-11-28) at a lower rate and
fewer shortened captions, which took the shape's colour from 87.9% to 93.8% of full-caption samples (measured with
each prompt's own seeds, bench/RESULTS.md).

A further run from the fourth run's weights teaches shades (``--shades``: each colour's chroma scaled by a random
factor, so "red" spans many reds), first to the VAE's decoder alone (``--decoder-steps``: the committed decoder
snaps shades to the world's; training it alone keeps the encoder, and so the latents the UNet knows):

    python scripts/pretrain_tiny.py --init /tmp/tiny-stage4 --vae-steps 0 --decoder-steps 600 \
        --unet-steps 800 --lr 3e-4 --omit-probability 0.4 --shades 0.4 --seed 2 --out /tmp/tiny-shades

Its weights are not committed: on them `rlaif demo` fell below its bar (bench/RESULTS.md, 2026-11-28, the
section from 12:58 UTC).
``python bench/tiny_world.py`` measures how well a model follows the prompt.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from rlaif.shapes import Scene, draw, random_scene, read_scene, shorter_caption
from rlaif.tiny import NOISE_SCHEDULE, RESOLUTION, TINY_SD_DIR, build_sd_components

OFFSET_NOISE = 0.1
MIN_SNR_GAMMA = 5.0


def drawings(scenes: list[Scene], rng: random.Random, shades: float = 0.0) -> torch.Tensor:
    """``scenes`` drawn (random positions, and shades within ``shades``, from ``rng``) as a [-1, 1]
    N x 3 x H x W image tensor."""
    pixels = np.stack([np.asarray(draw(s, rng, RESOLUTION, shades), dtype=np.float32) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0


def batch(rng: random.Random, size: int, shades: float = 0.0) -> tuple[torch.Tensor, list[Scene]]:
    """``size`` random scenes as a [-1, 1] image tensor, and the scenes."""
    scenes = [random_scene(rng) for _ in range(size)]
    return drawings(scenes, rng, shades), scenes


def train_vae(vae, steps: int, rng: random.Random, shades: float, decoder_only: bool = False) -> None:
    """Reconstruction + a small KL, on random 32 px crops (the VAE is convolutional: 4x cheaper steps).

    ``decoder_only`` trains the decoder alone, on whole pictures (its attention then sees what sampling gives it),
    reconstruction only, at a quarter of the rate: the encoder, and so the latents a trained UNet knows, stay.
    """
    lr = 5e-4 if decoder_only else 2e-3
    trained = [part for name, part in vae.named_children()
               if not decoder_only or name in ("decoder", "post_quant_conv")]
    optimizer = torch.optim.AdamW([p for part in trained for p in part.parameters()], lr=lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    crop = RESOLUTION if decoder_only else RESOLUTION // 2
    for step in range(steps):
        images, _ = batch(rng, 32, shades)
        top, left = rng.randrange(0, RESOLUTION - crop + 1, 4), rng.randrange(0, RESOLUTION - crop + 1, 4)
        images = images[:, :, top : top + crop, left : left + crop]
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, images) + (0.0 if decoder_only else 1e-6 * posterior.kl().mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{'decoder' if decoder_only else 'vae'} step {step} loss {loss.item():.4f}", flush=True)


def reconstruction_accuracy(vae, rng: random.Random, shades: float, size: int = 256) -> float:
    """Share of VAE round trips whose background, shape colour and shape still read as drawn."""
    scenes = [random_scene(rng) for _ in range(size)]
    with torch.no_grad():
        latents = vae.encode(drawings(scenes, rng, shades)).latent_dist.mode()
        decoded = ((vae.decode(latents).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
    read = [read_scene(Image.fromarray(array)) for array in decoded.numpy()]
    return sum(r == (s.background, s.color, s.shape) for s, r in zip(scenes, read, strict=True)) / size


def encode_dataset(vae, rng: random.Random, size: int, shades: float = 0.0) -> tuple[torch.Tensor, list[Scene]]:
    """Encode ``size`` random scenes once (scaled latents), so the UNet stage never runs the VAE."""
    latents, scenes = [], []
    with torch.no_grad():
        for _ in range(size // 128):
            images, drawn = batch(rng, 128, shades)
            latents.append(vae.encode(images).latent_dist.sample() * vae.config.scaling_factor)
            scenes += drawn
    return torch.cat(latents), scenes


def caption(scene: Scene, rng: random.Random, omit_probability: float) -> str:
    """The training caption of ``scene``: empty 10% of the time (for classifier-free guidance), else its
    caption with each optional attribute left out with ``omit_probability``."""
    return "" if rng.random() < 0.1 else shorter_caption(scene, rng, omit_probability)


def train_unet(unet, text_encoder, tokenizer, data: tuple[torch.Tensor, list[Scene]], steps: int,
               rng: random.Random, lr: float, noisier_half: bool, text_lr_factor: float,
               omit_probability: float) -> None:
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    all_latents, all_scenes = data
    # the text encoder learns from scratch through the UNet's cross-attention: a higher rate speeds that up
    groups = [{"params": list(unet.parameters())}, {"params": list(text_encoder.parameters())}]
    params = [param for group in groups for param in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr, text_lr_factor * lr],
                                                      total_steps=steps, pct_start=0.05)
    for step in range(steps):
        index = rng.sample(range(len(all_scenes)), 48)
        latents = all_latents[index]
        captions = [caption(all_scenes[i], rng, omit_probability) for i in index]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        hidden = text_encoder(ids)[0]
        # Offset noise (a per-image, per-channel constant): without it the latents' mean leaks through the
        # last timestep's residual signal, and the model learns to take colours from the noise, not the text.
        noise = torch.randn_like(latents) + OFFSET_NOISE * torch.randn(*latents.shape[:2], 1, 1)
        # Every other timestep from the noisier half of the schedule: there the prompt decides the colours and
        # the layout, and an epsilon loss gives that decision little weight.
        steps_total = noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps_total, (latents.shape[0],))
        if noisier_half:
            t[::2] = torch.randint(steps_total // 2, steps_total, (len(t[::2]),))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        # Min-SNR-5 weighting of the epsilon loss (Hang et al., 2023): faster convergence at the same optimum.
        snr = noise_scheduler.alphas_cumprod[t] / (1 - noise_scheduler.alphas_cumprod[t])
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
        errors = (unet(noisy, t, encoder_hidden_states=hidden).sample - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (weight * errors).mean()
        update(loss, optimizer, lr_schedule, params, f"unet step {step}", step % 100 == 0 or step == steps - 1)


def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule, params: list[torch.nn.Parameter],
           name: str, show: bool) -> None:
    """One optimizer step on ``loss`` (gradients clipped to norm 1), printing it under ``name`` if ``show``."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    if show:
        print(f"{name} loss {loss.item():.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet stage")
    parser.add_argument("--dataset-size", type=int, default=16000, help="scenes encoded once for the UNet stage")
    parser.add_argument("--noisier-half", action=argparse.BooleanOptionalAction, default=True,
                        help="draw every other UNet sample's timestep from the noisier half of the schedule")
    parser.add_argument("--text-lr-factor", type=float, default=3.0,
                        help="the text encoder's learning rate over the UNet's")
    parser.add_argument("--omit-probability", type=float, default=0.0,
                        help="leave each of size, colour and background out of a training caption with this "
                             "probability, so a caption that says less leaves it to chance")
    parser.add_argument("--shades", type=float, default=0.0,
                        help="draw each colour in a random shade, chroma scaled by a factor from [1 - S, 1 + S] "
                             "(rlaif.shapes.shade); 0 draws the world's one shade per colour")
    parser.add_argument("--decoder-steps", type=int, default=0,
                        help="then train the VAE's decoder alone for this many steps, keeping the latents a trained "
                             "UNet knows")
    parser.add_argument("--init", type=Path,
                        help="continue from this tiny folder (its VAE is kept if --vae-steps 0 and --decoder-steps 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TINY_SD_DIR)
    args = parser.parse_args()
    if not 0 <= args.shades < 1:
        parser.error(f"--shades must be in [0, 1), got {args.shades}: a factor of 0 or below turns a colour grey "
                     "or inverts it")
    if args.decoder_steps and not args.vae_steps and not args.init:
        parser.error("--decoder-steps trains a decoder for an encoder: give --init (a trained VAE) or --vae-steps")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.init:
        parts = {**build_sd_components(seed=args.seed), **StableDiffusionPipeline.from_pretrained(args.init).components}
    else:
        parts = build_sd_components(seed=args.seed)
    start = time.time()
    if args.vae_steps:
        train_vae(parts["vae"], args.vae_steps, rng, args.shades)
        with torch.no_grad():
            latents = parts["vae"].encode(batch(rng, 256, args.shades)[0]).latent_dist.sample()
        parts["vae"].register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    if args.decoder_steps:
        train_vae(parts["vae"], args.decoder_steps, rng, args.shades, decoder_only=True)
    parts["vae"].requires_grad_(False).eval()
    print(f"vae done in {time.time() - start:.0f}s, scaling_factor {parts['vae'].config.scaling_factor}, "
          f"reconstructions read right: {reconstruction_accuracy(parts['vae'], rng, args.shades):.1%}", flush=True)
    if args.unet_steps:  # 0: the VAE alone (e.g. a new decoder under the UNet as it is)
        data = encode_dataset(parts["vae"], rng, args.dataset_size, args.shades)
        train_unet(parts["unet"], parts["text_encoder"], parts["tokenizer"], data, args.unet_steps, rng, args.lr,
                   args.noisier_half, args.text_lr_factor, args.omit_probability)
    print(f"all done in {time.time() - start:.0f}s", flush=True)
    StableDiffusionPipeline(**parts).save_pretrained(args.out, safe_serialization=True)


if __name__ == "__main__":
    main()
