"""Pretrain the tiny SD3-style model (``tiny-sd3``) or FLUX-style model (``--kind flux``) on the shapes world.

Deterministic (fixed seeds, fixed step counts). The VAE is the pretrained tiny one (``rlaif/assets/tiny-sd``),
frozen; the transformer and the text encoders (SD3: two CLIP and a T5; FLUX: a CLIP and a T5) learn together
from scratch with the rectified-flow objective (velocity MSE at x_s = (1 - s) x0 + s e, s from a logit-normal
density, shifted by the scheduler's shift 3 for SD3 and unshifted for FLUX, as diffusers' scripts draw it;
``rlaif.train.flow``), 10% caption dropout for classifier-free guidance. FLUX's guidance input gets a random
scale in [1, 8] per sample (the tiny model is not guidance-distilled: any scale a user passes is seen in
training). Text goes through the pipeline's own ``encode_prompt``, so training conditions as sampling does.

    python scripts/pretrain_tiny_flow.py                # rlaif/assets/tiny-sd3 (3000 steps, 17 CPU minutes)
    python scripts/pretrain_tiny_flow.py --kind flux    # rlaif/assets/tiny-flux (3000 steps, 17 CPU minutes)

``python bench/tiny_world.py --model tiny-sd3`` measures how well it follows the prompt.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from pretrain_tiny import encode_dataset, update  # scripts/ is this script's own folder on sys.path

from rlaif.tiny import TINY_SD3_DIR, build_flux_pipeline, build_sd3_pipeline
from rlaif.train.encoding import encode_captions
from rlaif.train.flow import draw_u, flow_inputs, shifted_sigma

KINDS = {"sd3": (StableDiffusion3Pipeline, build_sd3_pipeline), "flux": (FluxPipeline, build_flux_pipeline)}


def train(pipe: StableDiffusion3Pipeline | FluxPipeline, data: tuple[torch.Tensor, list[str]], steps: int,
          batch_size: int, lr: float, rng: random.Random, seed: int) -> None:
    """The transformer and the text encoders, jointly, on encoded scenes."""
    all_latents, all_captions = data
    flux = isinstance(pipe, FluxPipeline)
    networks = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, *([] if flux else [pipe.text_encoder_3])]
    params = [p for network in networks for p in network.parameters()]
    for network in networks:
        network.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    draws = torch.Generator().manual_seed(seed)
    timesteps = pipe.scheduler.config.num_train_timesteps
    shift = 1.0 if pipe.scheduler.config.use_dynamic_shifting else pipe.scheduler.config.shift
    for step in range(steps):
        index = rng.sample(range(len(all_captions)), batch_size)
        latents = all_latents[index]
        captions = ["" if rng.random() < 0.1 else all_captions[i] for i in index]
        u = torch.tensor([draw_u("logit_normal", draws) for _ in index])
        sigma = shifted_sigma(u, timesteps, shift)
        noisy, target = flow_inputs(latents, torch.randn(latents.shape, generator=draws), sigma)
        embeds, pooled = encode_captions(pipe, captions, "cpu")
        if flux:
            b, c, h, w = latents.shape
            noisy, target = (FluxPipeline._pack_latents(x, b, c, h, w) for x in (noisy, target))
            prediction = pipe.transformer(
                hidden_states=noisy, timestep=sigma, guidance=1 + 7 * torch.rand(b, generator=draws),
                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", latents.dtype)).sample
        else:
            prediction = pipe.transformer(hidden_states=noisy, timestep=sigma * timesteps,
                                          encoder_hidden_states=embeds, pooled_projections=pooled).sample
        loss = (prediction - target).pow(2).mean()
        update(loss, optimizer, schedule, params, f"step {step}", step % 100 == 0 or step == steps - 1)
    for network in networks:
        network.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--dataset-size", type=int, default=16000, help="scenes encoded once")
    parser.add_argument("--kind", choices=["sd3", "flux"], default="sd3")
    parser.add_argument("--init", type=Path, help="continue from this tiny folder of the same kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: rlaif/assets/tiny-sd3 or rlaif/assets/tiny-flux")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    pipeline_class, build = KINDS[args.kind]
    pipe = pipeline_class.from_pretrained(args.init) if args.init else build(seed=args.seed)
    pipe.vae.requires_grad_(False).eval()
    start = time.time()
    data = encode_dataset(pipe.vae, rng, args.dataset_size)
    print(f"encoded {len(data[1])} scenes in {time.time() - start:.0f}s", flush=True)
    train(pipe, data, args.steps, args.batch_size, args.lr, rng, args.seed)
    print(f"all done in {time.time() - start:.0f}s", flush=True)
    pipe.save_pretrained(args.out or TINY_SD3_DIR.with_name(f"tiny-{args.kind}"), safe_serialization=True)


if __name__ == "__main__":
    main()
