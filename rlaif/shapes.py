"""The tiny world: captioned images of one coloured shape on a coloured background.

The tiny pretrained model is trained on these pictures (``scripts/pretrain_tiny.py``), so its images
depend on the prompt; the demo prompts and the tiny tokenizer's vocabulary come from here too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
FILLER_WORDS: tuple[str, ...] = ("a", "on", "background")
VOCABULARY: tuple[str, ...] = (*FILLER_WORDS, *COLORS, *SHAPES, *SIZES)


@dataclass(frozen=True)
class Scene:
    """One picture of the tiny world: a shape of a colour and size on a background colour."""

    shape: str
    color: str
    background: str
    size: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"


def random_scene(rng: random.Random) -> Scene:
    """Draw a scene whose shape colour differs from its background."""
    color, background = rng.sample(sorted(COLORS), 2)
    return Scene(rng.choice(SHAPES), color, background, rng.choice(SIZES))


def draw(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """Render ``scene`` at ``size`` px with a random position (and so a random composition)."""
    image = Image.new("RGB", (size, size), COLORS[scene.background])
    radius = size * (0.30 if scene.size == "large" else 0.15) * rng.uniform(0.85, 1.15)
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    pen = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif scene.shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image
