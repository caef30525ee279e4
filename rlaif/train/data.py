"""Preference pairs for training: read rlaif or Pick-a-Pic v2 tables, order them winner-first, and
augment winner and loser identically (same resize, crop and flip), as Diffusion-DPO requires."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image

from rlaif.errors import RlaifError
from rlaif.images import ImageSource, image_bytes
from rlaif.tables import read_table

RLAIF_COLUMNS = ("caption", "image_0", "image_1", "label_0")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


@dataclass(frozen=True)
class PreferencePair:
    """One training pair: the caption, the preferred image and the other one."""

    caption: str
    chosen: ImageSource
    rejected: ImageSource


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Winner-first pairs from an rlaif pairs table (image paths relative to it) or a Pick-a-Pic v2 table
    (image bytes); ties (label_0 = 0.5) carry no preference and are dropped."""
    path = Path(path)
    table = read_table(path, {})  # which columns are needed depends on the format, checked below
    if all(c in table.columns for c in RLAIF_COLUMNS):
        first, second = ([path.parent / p for p in table[c].to_list()] for c in ("image_0", "image_1"))
    elif all(c in table.columns for c in PICKAPIC_COLUMNS):
        first, second = (image_bytes(table[c]) for c in ("jpg_0", "jpg_1"))
    else:
        raise RlaifError(f"pairs table {path} has neither the rlaif columns ({', '.join(RLAIF_COLUMNS)}) nor the "
                         f"Pick-a-Pic ones ({', '.join(PICKAPIC_COLUMNS)}); columns: {', '.join(table.columns)}")
    pairs = []
    for row, (caption, label, a, b) in enumerate(zip(table["caption"], table["label_0"].cast(pl.Float64), first,
                                                     second, strict=True)):
        if label not in (0.0, 0.5, 1.0):
            raise RlaifError(f"pairs table {path}, row {row}: label_0 is {label}, expected 1, 0 or 0.5")
        if label != 0.5:
            pairs.append(PreferencePair(caption or "", a, b) if label == 1.0 else PreferencePair(caption or "", b, a))
    if not pairs:
        raise RlaifError(f"pairs table {path} holds no pairs with a preference (all ties or empty)")
    return pairs


@dataclass(frozen=True)
class AugmentedPair:
    """Both images of a pair as [-1, 1] tensors (3, R, R), with the SDXL micro-conditioning they share."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    original_size: tuple[int, int]  # (height, width) of the chosen image before any resize
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


def augment_pair(chosen: Image.Image, rejected: Image.Image, resolution: int, random_crop: bool, hflip: bool,
                 rng: random.Random) -> AugmentedPair:
    """Resize both images to the chosen image's resized size (shortest side = ``resolution``), then apply
    one crop (centre, or random from ``rng``) and one flip decision (with ``hflip``, p = 0.5) to both."""
    width, height = chosen.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    images = [image.resize(size, Image.BICUBIC) for image in (chosen, rejected)]
    if random_crop:
        top, left = rng.randint(0, size[1] - resolution), rng.randint(0, size[0] - resolution)
    else:
        top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    flip = hflip and rng.random() < 0.5
    tensors = []
    for image in images:
        image = image.crop((left, top, left + resolution, top + resolution))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        tensors.append(torch.from_numpy(array).permute(2, 0, 1))
    return AugmentedPair(tensors[0], tensors[1], (height, width), (top, left))
