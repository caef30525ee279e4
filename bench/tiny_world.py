"""Does the tiny model draw what it is asked? Colour and shape accuracy over the whole world.

Prompts: every ordered pair of different world colours (8 x 7 = 56) x every shape x ``--seeds`` seeds, as
"a large {colour} {shape} on a {background} background", sampled on the CPU through ``rlaif.models.load_pipeline``
(the model's own scheduler, ``--steps`` steps, guidance ``--guidance``), image k of a prompt from
``rlaif.seeding.image_seed(0, prompt, k)``, as `rlaif sample` seeds it: each prompt its own noise (until
2026-11-28 every prompt's image k started from one noise, k's, so the 336 samples held 2 noise draws).

How an image is read: ``rlaif.shapes.read_scene`` (nearest world colour per pixel; corners give the
background, the commonest other colour the shape's, the best-fitting template by IoU the shape).
The same reader run on the world's own pictures (``rlaif.shapes.draw``) is printed first as its ceiling.

Then shorter captions (``--free-seeds`` seeds each): "a {size} {shape}" (both colours left out), "a {size}
{colour} {shape}" (background left out) and "a {size} {shape} on a {background} background" (shape colour left
out), for every shape, size and colour. What a caption leaves out the world leaves to chance, so a model that
learned the world draws it differently from seed to seed. Printed per kind: the share of what the caption asks
that is drawn, and the mean number of distinct colours among each caption's seeds where a colour is left out
(an image without a readable shape adds none),
beside what the world's own pictures of those captions show on average (a left-out colour is uniform over
the colours it may take).
Run: ``python bench/tiny_world.py [--model tiny]``.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys

from PIL import Image

from rlaif.shapes import READ_KEYS, READ_ORDER, SHAPES, SIZES, Scene, agreement, draw, read_scene

KINDS = {"colours left out": frozenset({"color", "background"}), "background left out": frozenset({"background"}),
         "shape colour left out": frozenset({"color"})}


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


def shorter_captions() -> dict[str, list[str]]:
    """Every caption of each kind in KINDS, over shapes, sizes and the colour a caption still names."""
    every = [Scene(shape, colour, background, size) for shape in SHAPES for size in SIZES
             for colour in READ_ORDER for background in READ_ORDER if colour != background]
    return {kind: list(dict.fromkeys(scene.describe(omit) for scene in every)) for kind, omit in KINDS.items()}


def expected_distinct(choices: int, draws: int) -> float:
    """Expected number of distinct values among ``draws`` uniform draws from ``choices`` values: what the
    world's own pictures of a caption show (a left-out colour is uniform over the colours it may take)."""
    return choices * (1 - (1 - 1 / choices) ** draws)


def variety(captions: list[str], images: list[Image.Image], seeds: int, omit: frozenset[str]) -> dict[str, float]:
    """Share of asked attributes drawn, and the mean count of distinct left-out colours among each caption's
    ``seeds`` images (``images`` holds them caption by caption)."""
    found = [read_scene(image) for image in images]
    checks = [check for index, scene in enumerate(found) for check in agreement(captions[index // seeds], scene)]
    result = {"asked drawn": sum(checks) / len(checks)}
    read = [dict(zip(READ_KEYS, scene, strict=True)) for scene in found]
    for key in sorted(omit):
        groups = [read[i : i + seeds] for i in range(0, len(read), seeds)]
        result[f"distinct {key}s"] = sum(len({drawn[key] for drawn in group} - {None})
                                         for group in groups) / len(groups)
    return result


def sample_scenes(model: str, jobs: list[tuple[str, int]], steps: int, guidance: float,
                  batch_size: int = 48) -> list[Image.Image]:
    """Generate image k of each job's caption (job: caption, k) from its own seed, as ``rlaif sample`` would."""
    from tqdm import tqdm

    from rlaif.models import default_size, load_pipeline, prompt_length
    from rlaif.seeding import generator, image_seed

    pipe = load_pipeline(model)
    size = default_size(pipe)  # FLUX's pipeline would default to 128 latent pixels a side whatever its VAE
    images: list[Image.Image] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", file=sys.stderr):
        batch = jobs[start : start + batch_size]
        seeds = [generator(image_seed(0, caption, k)) for caption, k in batch]
        images += pipe(prompt=[caption for caption, _ in batch], num_inference_steps=steps, guidance_scale=guidance,
                       generator=seeds, height=size, width=size, **prompt_length(pipe)).images
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--free-seeds", type=int, default=8, help="seeds of each shorter caption (0: none)")
    parser.add_argument("--save", help="write a contact sheet of the samples to this PNG")
    args = parser.parse_args()
    jobs = scenes(args.seeds)
    wanted = [scene for scene, _ in jobs]
    rng = random.Random(0)
    drawn = accuracy(wanted, [draw(scene, rng) for scene in wanted])
    print("reader on the world's own pictures: " + ", ".join(f"{k} {v:.1%}" for k, v in drawn.items()))
    images = sample_scenes(args.model, [(scene.caption, seed) for scene, seed in jobs], args.steps, args.guidance)
    measured = accuracy(wanted, images)
    print(f"{args.model} ({len(jobs)} samples, {args.steps} steps, guidance {args.guidance}): "
          + ", ".join(f"{k} {v:.1%}" for k, v in measured.items()))
    if args.save:
        columns = 24
        sheet = Image.new("RGB", (64 * columns, 64 * -(-len(images) // columns)))
        for index, image in enumerate(images):
            sheet.paste(image.resize((64, 64)), (64 * (index % columns), 64 * (index // columns)))
        sheet.save(args.save)
    for kind, captions in shorter_captions().items() if args.free_seeds else ():
        omit = KINDS[kind]
        choices = len(READ_ORDER) - (len(omit) == 1)  # one colour named: the other is any of the rest
        world = expected_distinct(choices, args.free_seeds)
        jobs = [(caption, seed) for caption in captions for seed in range(args.free_seeds)]
        measured = variety(captions, sample_scenes(args.model, jobs, args.steps, args.guidance), args.free_seeds, omit)
        print(f"{kind} ({len(captions)} captions x {args.free_seeds} seeds): " + ", ".join(
            f"{k} {v:.1%}" if k == "asked drawn" else f"{k} {v:.2f} (world {world:.2f})"
            for k, v in measured.items()))


if __name__ == "__main__":
    main()
