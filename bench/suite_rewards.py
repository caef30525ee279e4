"""The reward suite's plugins: rewards the project was never tuned on, each a plain ``module:attr`` scorer.

``python bench/reward_suite.py`` (bench/ is then on sys.path) labels with ``suite_rewards:NAME``, the way
a user's own reward plugs in. Every reward reads pixels only (no model), so its value is exact and cheap:

- ``brightness``: mean luma (ITU-R 601), 0..1;
- ``saturation``: mean HSV saturation, 0..1;
- ``warmth``: 0.5 + mean (red - blue) / 510, 0..1 (a hue preference: orange and red over blue and purple);
- ``edges``: mean Sobel gradient magnitude of the luma / 255 (busier pictures score higher);
- ``asked_colour``: share of pixels whose nearest world colour is the colour the prompt asks for (the first
  colour word), 0..1: the one reward that depends on the prompt.

``incompressibility`` (built in) completes the suite.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from rlaif.shapes import COLORS, READ_ORDER, nearest_colours


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
    """Share of pixels in the colour the prompt asks for (its first colour word); 0 when it names none."""
    def value(image: Image.Image, prompt: str) -> float:
        asked = next((word for word in prompt.split() if word in COLORS), None)
        if asked is None:
            return 0.0
        return (nearest_colours(image) == READ_ORDER.index(asked)).mean()
    return PixelReward("asked_colour", value)
