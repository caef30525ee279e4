"""Augmentation of training pairs: winner and loser get the same resize, crop and flip, as Diffusion-DPO
requires (a loser of another aspect ratio its own resize, never a stretch)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Augmentation:
    """One resize, crop and flip, decided once per pair and applied to both of its images. It fully describes
    the transform (whatever the image's own size), so it is also part of the latent cache's key."""

    resized: tuple[int, int]  # (width, height) both images are resized to
    top: int
    left: int
    flip: bool
    resolution: int  # side of the square crop
    original_size: tuple[int, int]  # (height, width) of the image it transforms, for SDXL micro-conditioning

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """SDXL's crop coordinates of the picture as trained: a flipped crop is the mirrored crop of the flipped
        picture, as diffusers' SDXL script (which flips, then crops) measures it."""
        return self.top, self.resized[0] - self.left - self.resolution if self.flip else self.left

    @property
    def key(self) -> str:
        """A file-name-safe description of the transform."""
        return f"{self.resized[0]}x{self.resized[1]}-{self.top}-{self.left}-{int(self.flip)}-{self.resolution}"


def plan_augmentation(size: tuple[int, int], resolution: int, random_crop: bool, hflip: bool,
                      rng: random.Random) -> Augmentation:
    """The transform of a pair whose chosen image is ``size`` (width, height): resize so the shortest side is
    ``resolution``, crop a square (centre, or random from ``rng``), flip with p = 0.5 when ``hflip``."""
    width, height = size
    resized = _resized(size, resolution)
    if random_crop:
        top, left = rng.randint(0, resized[1] - resolution), rng.randint(0, resized[0] - resolution)
    else:
        top, left = (resized[1] - resolution) // 2, (resized[0] - resolution) // 2
    flip = hflip and rng.random() < 0.5
    return Augmentation(resized, top, left, flip, resolution, (height, width))


def _resized(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) of an image of ``size`` resized so that its shortest side is ``resolution``."""
    scale = resolution / min(size)
    return max(resolution, round(size[0] * scale)), max(resolution, round(size[1] * scale))


def fit_augmentation(augmentation: Augmentation, size: tuple[int, int], random_crop: bool) -> Augmentation:
    """``augmentation`` (planned on a pair's chosen image) for its other image, of ``size``: the same transform when
    that image has the chosen one's aspect ratio (whatever its size); else its own resize to the resolution on
    the shortest side, cropped in its centre (``random_crop``: at the same relative position) and flipped alike,
    so it is never stretched. Its ``original_size`` is that image's own: SDXL's micro-conditioning describes each
    image, so a pair judged with its label flipped sees each image under the same conditioning."""
    a = augmentation
    resized = _resized(size, a.resolution)
    if resized == a.resized:  # the same transform; the conditioning on its own size (512 beside a 1024 chosen)
        return replace(a, original_size=(size[1], size[0]))

    def at(offset: int, span: int, other_span: int) -> int:  # the same fraction of the room to move the crop in
        return round(offset / span * other_span) if span and random_crop else other_span // 2

    return Augmentation(resized, at(a.top, a.resized[1] - a.resolution, resized[1] - a.resolution),
                        at(a.left, a.resized[0] - a.resolution, resized[0] - a.resolution), a.flip, a.resolution,
                        (size[1], size[0]))


def apply_augmentation(image: Image.Image, augmentation: Augmentation) -> torch.Tensor:
    """``image`` transformed by ``augmentation`` as a [-1, 1] tensor (3, R, R)."""
    a = augmentation
    image = image.resize(a.resized, Image.BICUBIC).crop((a.left, a.top, a.left + a.resolution, a.top + a.resolution))
    if a.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
