"""Does the tiny model draw what it is asked? Colour and shape accuracy over the whole world.

Prompts: every ordered pair of different world colours (8 x 7 = 56) x every shape x ``--seeds`` seeds, as
"a large {colour} {shape} on a {background} background", sampled on the CPU through ``rlaif.models.load_pipeline``
(the model's own scheduler, ``--steps`` steps, guidance ``--guidance``), image k of a prompt from
``rlaif.seeding.generator(k)``.

How an image is read: ``rlaif.shapes.read_scene`` (nearest world colour per pixel; corners give the
background, the commonest other colour the shape's, the best-fitting template by IoU the shape).
The same reader run on the world's own pictures (``rlaif.shapes.draw``) is printed first as its ceiling.
Run: ``python bench/tiny_world.py [--model tiny]``.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys

from PIL import Image

from rlaif.shapes import READ_ORDER, SHAPES, Scene, draw, read_scene


def scenes(seeds: int) -> list[tuple[Scene, int]]:
    """Every (colour != background) x shape scene, large, with seeds 0 .. seeds-1."""
    return [(Scene(shape, colour, background, "large"), seed)
            for colour, background in itertools.permutations(READ_ORDER, 2)
            for shape in SHAPES for seed in range(seeds)]


def accuracy(asked: list[Scene], images: list[Image.Image]) -> dict[str, float]:
    """Shares of images whose background, foreground colour and shape are the ones asked for."""
    read = [read_scene(image) for image in images]
    n = len(asked)
    return {
        "background": sum(r[0] == s.background for s, r in zip(asked, read, strict=True)) / n,
        "foreground": sum(r[1] == s.color for s, r in zip(asked, read, strict=True)) / n,
        "shape": sum(r[2] == s.shape for s, r in zip(asked, read, strict=True)) / n,
        "all three": sum(r == (s.background, s.color, s.shape) for s, r in zip(asked, read, strict=True)) / n,
    }


def sample_scenes(model: str, jobs: list[tuple[Scene, int]], steps: int, guidance: float,
                  batch_size: int = 48) -> list[Image.Image]:
    """Generate each job's caption with its seed, as ``rlaif sample`` would."""
    from tqdm import tqdm

    from rlaif.models import default_size, load_pipeline, prompt_length
    from rlaif.seeding import generator

    pipe = load_pipeline(model)
    size = default_size(pipe)  # FLUX's pipeline would default to 128 latent pixels a side whatever its VAE
    images: list[Image.Image] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", file=sys.stderr):
        batch = jobs[start : start + batch_size]
        images += pipe(prompt=[scene.caption for scene, _ in batch], num_inference_steps=steps,
                       guidance_scale=guidance, generator=[generator(seed) for _, seed in batch], height=size,
                       width=size, **prompt_length(pipe)).images
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--save", help="write a contact sheet of the samples to this PNG")
    args = parser.parse_args()
    jobs = scenes(args.seeds)
    asked = [scene for scene, _ in jobs]
    rng = random.Random(0)
    drawn = accuracy(asked, [draw(scene, rng) for scene in asked])
    print("reader on the world's own pictures: " + ", ".join(f"{k} {v:.1%}" for k, v in drawn.items()))
    images = sample_scenes(args.model, jobs, args.steps, args.guidance)
    measured = accuracy(asked, images)
    print(f"{args.model} ({len(jobs)} samples, {args.steps} steps, guidance {args.guidance}): "
          + ", ".join(f"{k} {v:.1%}" for k, v in measured.items()))
    if args.save:
        columns = 24
        sheet = Image.new("RGB", (64 * columns, 64 * -(-len(images) // columns)))
        for index, image in enumerate(images):
            sheet.paste(image.resize((64, 64)), (64 * (index % columns), 64 * (index // columns)))
        sheet.save(args.save)


if __name__ == "__main__":
    main()
