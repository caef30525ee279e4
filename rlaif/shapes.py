"""The tiny world: captioned images of one coloured shape on a coloured background.

The tiny pretrained model is trained on these pictures (``scripts/pretrain_tiny.py``), so its images
depend on the prompt; the demo prompts and the tiny tokenizer's vocabulary come from here too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
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
READ_ORDER: tuple[str, ...] = tuple(sorted(COLORS))
_PALETTE = np.array([COLORS[name] for name in READ_ORDER], dtype=np.float32)
_CORNER = 6
_MIN_FOREGROUND = 0.02


@dataclass(frozen=True)
class Scene:
    """One picture of the tiny world: a shape of a colour and size on a background colour."""

    shape: str
    color: str
    background: str
    size: str

    @property
    def caption(self) -> str:
        return self.describe()

    def describe(self, omit: frozenset[str] = frozenset()) -> str:
        """The caption, leaving out the attributes named in ``omit`` ("size", "color", "background"): a
        caption that says less leaves those to chance, as real prompts do."""
        words = ["a"] + [getattr(self, key) for key in ("size", "color") if key not in omit] + [self.shape]
        if "background" not in omit:
            words += ["on", "a", self.background, "background"]
        return " ".join(words)


OPTIONAL: tuple[str, ...] = ("size", "color", "background")  # what a caption may leave out (never the shape)
READ_KEYS: tuple[str, ...] = ("background", "color", "shape")  # what read_scene returns, in its order


def random_omission(rng: random.Random, probability: float) -> frozenset[str]:
    """Each of OPTIONAL left out of a caption independently with ``probability``."""
    return frozenset(key for key in OPTIONAL if rng.random() < probability)


def shorter_caption(scene: Scene, rng: random.Random, probability: float) -> str:
    """``scene``'s caption with each of OPTIONAL left out with ``probability``; at 0 the full caption without
    drawing from ``rng``, so a run made before captions could be shorter replays exactly."""
    return scene.describe(random_omission(rng, probability)) if probability else scene.caption


def asked(caption: str) -> dict[str, str]:
    """What a caption of ``Scene.describe`` asks for: a subset of {"size", "color", "shape", "background"}.

    The one parser of the caption format, so rewards and checks read prompts the way the world writes them
    (case, a final full stop and "an" for "a" are forgiven).
    """
    words = ["a" if word == "an" else word for word in caption.lower().rstrip(".").split()]
    if words[-1:] == ["background"] and len(words) >= 4 and words[-2] in COLORS and words[-4:-2] == ["on", "a"]:
        found, words = {"background": words[-2]}, words[:-4]
    else:
        found = {}
    if not words or words[0] != "a" or words[-1] not in SHAPES:
        raise ValueError(f"not a caption of the shapes world: {caption!r}")
    found["shape"] = words[-1]
    middle = words[1:-1]
    if middle and middle[0] in SIZES:
        found["size"] = middle.pop(0)
    if middle and middle[0] in COLORS:
        found["color"] = middle.pop(0)
    if middle:
        raise ValueError(f"not a caption of the shapes world: {caption!r}")
    return found


def agreement(caption: str, read: tuple[str, str | None, str | None]) -> list[bool]:
    """For each of background, shape colour and shape that ``caption`` asks for, whether ``read`` (what
    ``read_scene`` found) shows it; what the caption leaves out is not checked."""
    wanted = asked(caption)
    return [wanted[key] == found for key, found in zip(READ_KEYS, read, strict=True) if key in wanted]


def random_scene(rng: random.Random) -> Scene:
    """Draw a scene whose shape colour differs from its background."""
    color, background = rng.sample(sorted(COLORS), 2)
    return Scene(rng.choice(SHAPES), color, background, rng.choice(SIZES))


def shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """``colour`` with its chroma scaled by ``factor`` about its own grey (its luma; PIL ImageEnhance.Color's
    rule), clipped to 0..255: above 1 purer, below 1 greyer. White and black have no chroma and stay as they are."""
    grey = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return tuple(int(round(min(255.0, max(0.0, grey + factor * (c - grey))))) for c in colour)


def draw(scene: Scene, rng: random.Random, size: int = 64, shades: float = 0.0) -> Image.Image:
    """Render ``scene`` at ``size`` px with a random position (and so a random composition).

    With ``shades`` > 0 the background and the shape each take their own shade of their colour (``shade`` with a
    factor drawn from [1 - shades, 1 + shades]), as "red" in real pictures spans many reds; at 0 the world's one
    shade per colour, without drawing from ``rng``, so runs made before shades existed replay exactly.
    """
    background, colour = COLORS[scene.background], COLORS[scene.color]
    if shades:
        background, colour = (shade(c, rng.uniform(1 - shades, 1 + shades)) for c in (background, colour))
    image = Image.new("RGB", (size, size), background)
    radius = size * (0.30 if scene.size == "large" else 0.15) * rng.uniform(0.85, 1.15)
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    paint(ImageDraw.Draw(image), scene.shape, box, colour)
    return image


def paint(pen: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Fill ``shape`` into ``box`` (x0, y0, x1, y1): the inscribed circle, the box, or the apex-up triangle."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def nearest_colours(image: Image.Image) -> np.ndarray:
    """Index into READ_ORDER of each pixel's nearest world colour (RGB distance), shape (H, W)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1).argmin(-1)


def background_label(labels: np.ndarray) -> int:
    """The background's index into READ_ORDER in a ``nearest_colours`` map: the commonest colour over the four
    6 x 6 corner patches (the world never draws its shape over all four corners)."""
    c = _CORNER
    corners = np.concatenate([labels[:c, :c].ravel(), labels[:c, -c:].ravel(),
                              labels[-c:, :c].ravel(), labels[-c:, -c:].ravel()])
    return int(np.bincount(corners, minlength=len(READ_ORDER)).argmax())


def foreground_mask(image: Image.Image) -> np.ndarray:
    """Boolean (H, W) map of the pixels whose nearest world colour is not the background's: the drawn subject."""
    labels = nearest_colours(image)
    return labels != background_label(labels)


def read_scene(image: Image.Image) -> tuple[str, str | None, str | None]:
    """(background, shape colour, shape) as drawn in ``image``, by rule (no learned parts); None where no
    shape is found.

    Each pixel takes its nearest world colour. The background is the most common one over the four 6 x 6
    corner patches; the shape's colour the most common among the other pixels (none when under 2% of the
    image differs from the background). The shape is the template (``paint``) that, filled into the shape
    pixels' bounding box (1st-99th percentile of their rows and columns), has the highest IoU with them.
    """
    labels = nearest_colours(image)
    height, width = labels.shape
    background = background_label(labels)
    others = labels[labels != background]
    if others.size < _MIN_FOREGROUND * labels.size:
        return READ_ORDER[background], None, None
    foreground = int(np.bincount(others, minlength=len(READ_ORDER)).argmax())
    mask = labels == foreground
    rows, cols = np.nonzero(mask)
    box = (float(np.percentile(cols, 1)), float(np.percentile(rows, 1)),
           float(np.percentile(cols, 99)), float(np.percentile(rows, 99)))

    def iou(shape: str) -> float:
        canvas = Image.new("L", (width, height), 0)
        paint(ImageDraw.Draw(canvas), shape, box, 1)
        template = np.asarray(canvas, dtype=bool)
        return (template & mask).sum() / max((template | mask).sum(), 1)

    return READ_ORDER[background], READ_ORDER[foreground], max(SHAPES, key=iou)
