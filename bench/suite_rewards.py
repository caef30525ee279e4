"""The reward suite's plugins: rewards the project was never tuned on, each a plain ``module:attr`` scorer.

``python bench/reward_suite.py`` (bench/ is then on sys.path) labels with ``suite_rewards:NAME``, the way
a user's own reward plugs in. Every reward reads pixels only (no model), so its value is exact and cheap:

- ``brightness``: mean luma (ITU-R 601), 0..1;
- ``saturation``: mean HSV saturation, 0..1;
- ``warmth``: 0.5 + mean (red - blue) / 510, 0..1 (a hue preference: orange and red over blue and purple);
- ``edges``: mean Sobel gradient magnitude of the luma / 255 (busier pictures score higher);
- ``asked_colour``: share of pixels whose nearest world colour is the colour the prompt asks for (the shape's,
  else the background's), 0..1: the one reward that depends on the prompt. A prompt that names no colour ("a
  circle") scores 0 for every picture: its candidates tie, and make no pairs;
- ``size``: share of pixels not in the background's colour (``rlaif.shapes.foreground_mask``), 0..1: a
  bigger subject scores higher;
- ``centred``: 1 - distance of the subject's centroid from the picture's centre / half the diagonal, 0..1;
- ``high``: 1 - the subject centroid's row / (height - 1), 0..1: a subject high in the frame scores higher.

``follows_prompt`` is no training reward but the suite's held-out check: the share of what the prompt asks of
background colour, shape colour and shape that ``rlaif.shapes.read_scene`` reads in the picture, 0..1. A reward
gained by drawing what was not asked shows as a fall in it.

Prompts are read with ``rlaif.shapes.asked``, so a prompt may leave out size, colour or background. The first
three rewards are colour statistics, which a prompt that names its colours fixes and one that does not leaves
to chance; the last three are composition, which every prompt leaves free (the world draws each shape at a
random place and at a size within +-15%).

``incompressibility`` (built in) completes the suite.

Two more rewards were added on 2026-11-28, after `rlaif train`'s defaults had been chosen on the nine above, to
check those defaults off the path they were chosen on (``python bench/reward_suite.py --rewards contrast,...``;
not in the suite's default run):

- ``contrast``: RMS contrast, the standard deviation of the luma / 127.5, 0..1;
- ``colourfulness``: Hasler and Suesstrunk's (2003) colourfulness, ``sqrt(var(rg) + var(yb)) + 0.3 *
  sqrt(mean(rg)^2 + mean(yb)^2)`` with ``rg = R - G`` and ``yb = (R + G) / 2 - B``, / 255: colour, as HSV
  saturation is, but measured in opponent channels, where near-black pixels of any hue count for little.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from rlaif.shapes import READ_ORDER, agreement, asked, foreground_mask, nearest_colours, read_scene


class PixelReward:
    """A scorer from a per-image function of (pixels as float32 H x W x 3 in 0..255, prompt)."""

    def __init__(self, name: str, function) -> None:
        self.name, self.function = name, function

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        return [float(self.function(image, prompt)) for image, prompt in zip(images, prompts, strict=True)]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _luma(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)


def brightness(device: str = "cpu") -> PixelReward:
    """Mean luma, 0..1: brighter pictures score higher."""
    return PixelReward("brightness", lambda image, prompt: _luma(image).mean() / 255.0)


def saturation(device: str = "cpu") -> PixelReward:
    """Mean HSV saturation, 0..1: more colourful pictures score higher."""
    return PixelReward("saturation", lambda image, prompt: np.asarray(image.convert("HSV"))[..., 1].mean() / 255.0)


def warmth(device: str = "cpu") -> PixelReward:
    """0.5 + mean (red - blue) / 510, 0..1: warm hues score higher than cold ones."""
    def value(image: Image.Image, prompt: str) -> float:
        pixels = _pixels(image)
        return 0.5 + (pixels[..., 0] - pixels[..., 2]).mean() / 510.0
    return PixelReward("warmth", value)


SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)


def edges(device: str = "cpu") -> PixelReward:
    """Mean Sobel gradient magnitude of the luma / 255: pictures with more edges score higher."""
    def value(image: Image.Image, prompt: str) -> float:
        luma = np.pad(_luma(image), 1, mode="edge")
        height, width = luma.shape[0] - 2, luma.shape[1] - 2
        window = [[luma[i : i + height, j : j + width] for j in range(3)] for i in range(3)]
        gx = sum(SOBEL_X[i, j] * window[i][j] for i in range(3) for j in range(3))
        gy = sum(SOBEL_X.T[i, j] * window[i][j] for i in range(3) for j in range(3))
        return np.hypot(gx, gy).mean() / 255.0
    return PixelReward("edges", value)


def asked_colour(device: str = "cpu") -> PixelReward:
    """Share of pixels in the colour the prompt asks for (the shape's, else the background's); 0 when it names
    none."""
    def value(image: Image.Image, prompt: str) -> float:
        wanted = asked(prompt)
        colour = wanted.get("color", wanted.get("background"))
        if colour is None:
            return 0.0
        return (nearest_colours(image) == READ_ORDER.index(colour)).mean()
    return PixelReward("asked_colour", value)


def size(device: str = "cpu") -> PixelReward:
    """Share of the picture that is not background, 0..1: bigger subjects score higher."""
    return PixelReward("size", lambda image, prompt: foreground_mask(image).mean())


def _centroid(image: Image.Image) -> tuple[float, float, int, int] | None:
    """(row, column) of the subject's centroid and the picture's (height, width); None when nothing is drawn."""
    mask = foreground_mask(image)
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    return float(rows.mean()), float(cols.mean()), *mask.shape


def centred(device: str = "cpu") -> PixelReward:
    """1 - the subject centroid's distance from the centre / half the diagonal, 0..1 (0 when nothing is drawn)."""
    def value(image: Image.Image, prompt: str) -> float:
        found = _centroid(image)
        if found is None:
            return 0.0
        row, col, height, width = found
        return 1.0 - np.hypot(row - (height - 1) / 2, col - (width - 1) / 2) / np.hypot(height / 2, width / 2)
    return PixelReward("centred", value)


def high(device: str = "cpu") -> PixelReward:
    """1 - the subject centroid's row / (height - 1), 0..1 (0 when nothing is drawn): higher subjects score higher."""
    def value(image: Image.Image, prompt: str) -> float:
        found = _centroid(image)
        return 0.0 if found is None else 1.0 - found[0] / (found[2] - 1)
    return PixelReward("high", value)


def follows_prompt(device: str = "cpu") -> PixelReward:
    """Share of what the prompt asks of (background colour, shape colour, shape) that the picture shows, read by
    rule; 0..1. What a prompt leaves out is not checked."""
    def value(image: Image.Image, prompt: str) -> float:
        checks = agreement(prompt, read_scene(image))
        return sum(checks) / len(checks)
    return PixelReward("follows_prompt", value)


def contrast(device: str = "cpu") -> PixelReward:
    """RMS contrast: the standard deviation of the luma / 127.5, 0..1."""
    return PixelReward("contrast", lambda image, prompt: _luma(image).std() / 127.5)


def colourfulness(device: str = "cpu") -> PixelReward:
    """Hasler and Suesstrunk's colourfulness / 255: the spread and the mean of the opponent channels."""
    def value(image: Image.Image, prompt: str) -> float:
        red, green, blue = np.moveaxis(_pixels(image).astype(np.float64), -1, 0)
        rg, yb = red - green, 0.5 * (red + green) - blue
        return (np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())) / 255.0
    return PixelReward("colourfulness", value)
