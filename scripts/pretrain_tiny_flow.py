"""Pretrain the tiny SD3-style model (``tiny-sd3``) or FLUX-style model (``--kind flux``) on the shapes world.

Deterministic (fixed seeds, fixed step counts). The VAE is the pretrained tiny one (``rlaif/assets/tiny-sd``),
frozen; the transformer and the text encoders (SD3: two CLIP and a T5; FLUX: a CLIP and a T5) learn together
from scratch with the rectified-flow objective (velocity MSE at x_s = (1 - s) x0 + s e, s from a logit-normal
density, shifted by the scheduler's shift 3 for SD3 and unshifted for FLUX, as diffusers' scripts draw it;
``rlaif.train.flow``), 10% caption dropout for classifier-free guidance. FLUX's guidance input gets a random
scale in [1, 8] per sample (the tiny model is not guidance-distilled: any scale a user passes is seen in
training). Text goes through the pipeline's own ``encode_prompt``, so training conditions as sampling does.

The committed ``tiny-sd3`` comes from four runs (48 CPU minutes on 2 cores), each continuing the last; the later
ones train the text encoders at 3x the transformer's rate and, from the third, draw noise levels unshifted
(shift 1: more of the middle levels, where a shape's outline is decided; the scheduler keeps shift 3 for
sampling). Shapes followed, by ``bench/tiny_world.py``: 37% after run 1, 39% after run 2, 49% after run 3
(one seed), 64% after run 4.

    python scripts/pretrain_tiny_flow.py --out r1                 # run 1: 3000 steps, 17 CPU minutes
    python scripts/pretrain_tiny_flow.py --init r1 --steps 1500 --lr 5e-4 --text-lr-factor 3 --seed 1 --out r2
    python scripts/pretrain_tiny_flow.py --init r2 --steps 1500 --lr 5e-4 --text-lr-factor 3 --shift 1 --seed 2 --out r3
    python scripts/pretrain_tiny_flow.py --init r3 --steps 2000 --lr 3e-4 --text-lr-factor 3 --shift 1 --seed 3 --out r4

Run 4's transformer and text encoder weights are ``rlaif/assets/tiny-sd3``'s.

``tiny-flux`` comes from the same four runs with ``--kind flux`` (47 CPU minutes; FLUX trains unshifted from
the start, so ``--shift 1`` changes nothing for it): shapes 36% after run 1, 38% after run 2 (one seed), 42% after
run 4, colours 95% / 87% after run 1 and 99.7% / 97% after run 4.

``python bench/tiny_world.py --model tiny-sd3`` measures how well it follows the prompt.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from pretrain_tiny import caption, encode_dataset, update  # scripts/ is this script's own folder on sys.path

from rlaif.shapes import Scene
from rlaif.tiny import COMMITTED, build_flux_pipeline, build_sd3_pipeline
from rlaif.train.encoding import encode_captions
from rlaif.train.flow import draw_u, flow_inputs, flux_tokens, shifted_sigma, training_shift

KINDS = {"sd3": (StableDiffusion3Pipeline, build_sd3_pipeline), "flux": (FluxPipeline, build_flux_pipeline)}


def train(pipe: StableDiffusion3Pipeline | FluxPipeline, data: tuple[torch.Tensor, list[Scene]], steps: int,
          batch_size: int, lr: float, rng: random.Random, seed: int, text_lr_factor: float = 1.0,
          shift: float | None = None, omit_probability: float = 0.0) -> None:
    """The transformer and the text encoders, jointly, on encoded scenes (the encoders at ``text_lr_factor`` times
    the transformer's rate; noise levels shifted by ``shift``, default the scheduler's)."""
    all_latents, all_scenes = data
    flux = isinstance(pipe, FluxPipeline)
    encoders = [pipe.text_encoder, pipe.text_encoder_2, *([] if flux else [pipe.text_encoder_3])]
    groups = [{"params": list(pipe.transformer.parameters())},
              {"params": [p for encoder in encoders for p in encoder.parameters()]}]
    params = [p for group in groups for p in group["params"]]
    for network in [pipe.transformer, *encoders]:
        network.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr, text_lr_factor * lr], total_steps=steps,
                                                   pct_start=0.05)
    draws = torch.Generator().manual_seed(seed)
    timesteps = pipe.scheduler.config.num_train_timesteps
    shift = training_shift(pipe.scheduler.config) if shift is None else shift
    for step in range(steps):
        index = rng.sample(range(len(all_scenes)), batch_size)
        latents = all_latents[index]
        captions = [caption(all_scenes[i], rng, omit_probability) for i in index]
        u = torch.tensor([draw_u("logit_normal", draws) for _ in index])
        sigma = shifted_sigma(u, timesteps, shift)
        noisy, target = flow_inputs(latents, torch.randn(latents.shape, generator=draws), sigma)
        embeds, pooled = encode_captions(pipe, captions, "cpu")
        if flux:
            (noisy, target), ids = flux_tokens([noisy, target], embeds.shape[1])
            prediction = pipe.transformer(
                hidden_states=noisy, timestep=sigma, guidance=1 + 7 * torch.rand(len(index), generator=draws),
                pooled_projections=pooled, encoder_hidden_states=embeds, **ids).sample
        else:
            prediction = pipe.transformer(hidden_states=noisy, timestep=sigma * timesteps,
                                          encoder_hidden_states=embeds, pooled_projections=pooled).sample
        loss = (prediction - target).pow(2).mean()
        update(loss, optimizer, schedule, params, f"step {step}", step % 100 == 0 or step == steps - 1)
    for network in [pipe.transformer, *encoders]:
        network.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--dataset-size", type=int, default=16000, help="scenes encoded once")
    parser.add_argument("--text-lr-factor", type=float, default=1.0, help="text encoders' rate / transformer's")
    parser.add_argument("--shift", type=float, help="noise-level shift in training (default: the scheduler's)")
    parser.add_argument("--kind", choices=["sd3", "flux"], default="sd3")
    parser.add_argument("--omit-probability", type=float, default=0.0,
                        help="leave each of size, colour and background out of a training caption with this "
                             "probability (as scripts/pretrain_tiny.py)")
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
    train(pipe, data, args.steps, args.batch_size, args.lr, rng, args.seed, args.text_lr_factor, args.shift,
          args.omit_probability)
    print(f"all done in {time.time() - start:.0f}s", flush=True)
    pipe.save_pretrained(args.out or COMMITTED[f"tiny-{args.kind}"], safe_serialization=True)


if __name__ == "__main__":
    main()
