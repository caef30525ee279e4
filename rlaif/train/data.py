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

RLAIF_COLUMNS = ("caption", "image_0", "image_1")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1")
AI_LABEL = "ai_label_0"  # written by `rlaif label --relabel` beside the human label_0


@dataclass(frozen=True)
class PreferencePair:
    """One training pair: the caption, the preferred image and the other one."""

    caption: str
    chosen: ImageSource
    rejected: ImageSource


def label_column(columns: list[str], chosen: str | None) -> str:
    """The column holding the preference: ``chosen`` if given, else the AI labels of a relabelled table
    (``ai_label_0``), else ``label_0``."""
    if chosen is not None:
        return chosen
    return AI_LABEL if AI_LABEL in columns else "label_0"


def load_pairs(path: str | Path, label: str | None = None) -> list[PreferencePair]:
    """Winner-first pairs from an rlaif pairs table (image paths relative to it) or a Pick-a-Pic v2 table
    (image bytes), preferences from column ``label`` (see ``label_column``); ties (0.5) carry no preference and
    are dropped."""
    path = Path(path)
    table = read_table(path, {})  # which columns are needed depends on the format, checked below
    if all(c in table.columns for c in RLAIF_COLUMNS):
        first, second = ([path.parent / p for p in table[c].to_list()] for c in ("image_0", "image_1"))
    elif all(c in table.columns for c in PICKAPIC_COLUMNS):
        first, second = (image_bytes(table[c]) for c in ("jpg_0", "jpg_1"))
    else:
        raise RlaifError(f"pairs table {path} has neither the rlaif columns ({', '.join(RLAIF_COLUMNS)}) nor the "
                         f"Pick-a-Pic ones ({', '.join(PICKAPIC_COLUMNS)}); columns: {', '.join(table.columns)}")
    label = label_column(table.columns, label)
    if label not in table.columns:
        raise RlaifError(f"pairs table {path} has no column {label!r} (--label-column); columns: "
                         f"{', '.join(table.columns)}")
    pairs = []
    try:
        labels = table[label].cast(pl.Float64)
    except pl.exceptions.PolarsError as exc:
        raise RlaifError(f"pairs table {path}: column {label!r} is not numeric ({table[label].dtype})") from exc
    for row, (caption, value, a, b) in enumerate(zip(table["caption"], labels, first, second, strict=True)):
        if value not in (0.0, 0.5, 1.0):
            raise RlaifError(f"pairs table {path}, row {row}: {label} is {value}, expected 1, 0 or 0.5")
        if value != 0.5:
            pairs.append(PreferencePair(caption or "", a, b) if value == 1.0 else PreferencePair(caption or "", b, a))
    if not pairs:
        raise RlaifError(f"pairs table {path} holds no pairs with a preference (all ties or empty)")
    return pairs


@dataclass(frozen=True)
class Augmentation:
    """One resize, crop and flip, decided once per pair and applied to both of its images. It fully describes
    the transform (whatever the image's own size), so it is also part of the latent cache's key."""

    resized: tuple[int, int]  # (width, height) both images are resized to
    top: int
    left: int
    flip: bool
    resolution: int  # side of the square crop
    original_size: tuple[int, int]  # (height, width) of the chosen image, for SDXL micro-conditioning

    @property
    def crop_top_left(self) -> tuple[int, int]:
        return self.top, self.left

    @property
    def key(self) -> str:
        """A file-name-safe description of the transform."""
        return f"{self.resized[0]}x{self.resized[1]}-{self.top}-{self.left}-{int(self.flip)}-{self.resolution}"


def plan_augmentation(size: tuple[int, int], resolution: int, random_crop: bool, hflip: bool,
                      rng: random.Random) -> Augmentation:
    """The transform of a pair whose chosen image is ``size`` (width, height): resize so the shortest side is
    ``resolution``, crop a square (centre, or random from ``rng``), flip with p = 0.5 when ``hflip``."""
    width, height = size
    scale = resolution / min(width, height)
    resized = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if random_crop:
        top, left = rng.randint(0, resized[1] - resolution), rng.randint(0, resized[0] - resolution)
    else:
        top, left = (resized[1] - resolution) // 2, (resized[0] - resolution) // 2
    flip = hflip and rng.random() < 0.5
    return Augmentation(resized, top, left, flip, resolution, (height, width))


def apply_augmentation(image: Image.Image, augmentation: Augmentation) -> torch.Tensor:
    """``image`` transformed by ``augmentation`` as a [-1, 1] tensor (3, R, R)."""
    a = augmentation
    image = image.resize(a.resized, Image.BICUBIC).crop((a.left, a.top, a.left + a.resolution, a.top + a.resolution))
    if a.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
