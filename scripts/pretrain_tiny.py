"""Pretrain the tiny SD1.5-style model on the shapes world and save it to rlaif/assets/tiny-sd.

Deterministic (fixed seeds, fixed step counts); a few CPU minutes on 2 cores. Stage 1 trains the VAE to
reconstruct shapes pictures; stage 2 freezes it and trains the UNet and text encoder with the standard
epsilon-prediction objective (10% caption dropout, for classifier-free guidance).

The committed weights are what ``python scripts/pretrain_tiny.py`` (the defaults) writes, ~15 CPU minutes.
``--init DIR --vae-steps 0`` continues training an existing tiny folder's UNet and text encoder.
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

from rlaif.shapes import draw, random_scene
from rlaif.tiny import NOISE_SCHEDULE, RESOLUTION, TINY_SD_DIR, build_sd_components


def batch(rng: random.Random, size: int) -> tuple[torch.Tensor, list[str]]:
    """``size`` random scenes as a [-1, 1] image tensor and their captions."""
    scenes = [random_scene(rng) for _ in range(size)]
    pixels = np.stack([np.asarray(draw(s, rng, RESOLUTION), dtype=np.float32) for s in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    return images, [s.caption for s in scenes]


def train_vae(vae, steps: int, rng: random.Random) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        images, _ = batch(rng, 16)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step} loss {loss.item():.4f}", flush=True)


def encode_dataset(vae, rng: random.Random, size: int) -> tuple[torch.Tensor, list[str]]:
    """Encode ``size`` random scenes once (scaled latents), so the UNet stage never runs the VAE."""
    latents, captions = [], []
    with torch.no_grad():
        for _ in range(size // 128):
            images, texts = batch(rng, 128)
            latents.append(vae.encode(images).latent_dist.sample() * vae.config.scaling_factor)
            captions += texts
    return torch.cat(latents), captions


def train_unet(unet, text_encoder, tokenizer, data: tuple[torch.Tensor, list[str]], steps: int,
               rng: random.Random, lr: float) -> None:
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    all_latents, all_captions = data
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        index = rng.sample(range(len(all_captions)), 48)
        latents = all_latents[index]
        captions = ["" if rng.random() < 0.1 else all_captions[i] for i in index]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        hidden = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=hidden).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"unet step {step} loss {loss.item():.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=900)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet stage")
    parser.add_argument("--dataset-size", type=int, default=6400, help="scenes encoded once for the UNet stage")
    parser.add_argument("--init", type=Path, help="continue from this tiny folder (its VAE is kept if --vae-steps 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TINY_SD_DIR)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.init:
        parts = {**build_sd_components(seed=args.seed), **StableDiffusionPipeline.from_pretrained(args.init).components}
    else:
        parts = build_sd_components(seed=args.seed)
    start = time.time()
    if args.vae_steps:
        train_vae(parts["vae"], args.vae_steps, rng)
        with torch.no_grad():
            latents = parts["vae"].encode(batch(rng, 256)[0]).latent_dist.sample()
        parts["vae"].register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    parts["vae"].requires_grad_(False).eval()
    print(f"vae done in {time.time() - start:.0f}s, scaling_factor {parts['vae'].config.scaling_factor}", flush=True)
    data = encode_dataset(parts["vae"], rng, args.dataset_size)
    train_unet(parts["unet"], parts["text_encoder"], parts["tokenizer"], data, args.unet_steps, rng, args.lr)
    print(f"all done in {time.time() - start:.0f}s", flush=True)
    StableDiffusionPipeline(**parts).save_pretrained(args.out, safe_serialization=True)


if __name__ == "__main__":
    main()
