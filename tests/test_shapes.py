"""The tiny world's reader (`rlaif.shapes.read_scene`), which bench/tiny_world.py trusts to judge the tiny model."""

import itertools
import random

import numpy as np
from PIL import Image, ImageDraw

from rlaif.shapes import COLORS, SHAPES, Scene, draw, foreground_mask, paint, read_scene


def test_the_reader_reads_every_drawn_scene_as_drawn():
    rng = random.Random(0)
    scenes = [Scene(shape, colour, background, size)
              for colour, background in itertools.permutations(sorted(COLORS), 2)
              for shape in SHAPES for size in ("small", "large")]
    read = [read_scene(draw(scene, rng)) for scene in scenes]
    assert read == [(scene.background, scene.color, scene.shape) for scene in scenes]


def test_a_plain_picture_has_a_background_and_no_shape():
    assert read_scene(Image.new("RGB", (64, 64), (250, 240, 250))) == ("white", None, None)
    # a few off-colour pixels (under 2% of the picture) are noise, not a shape
    image = Image.new("RGB", (64, 64), COLORS["blue"])
    for x in range(40):
        image.putpixel((x, 30), COLORS["red"])
    assert read_scene(image) == ("blue", None, None)


def test_the_foreground_mask_is_the_painted_shape():
    image = Image.new("RGB", (64, 64), COLORS["green"])
    truth = Image.new("L", (64, 64), 0)
    for pen, fill in ((ImageDraw.Draw(image), COLORS["orange"]), (ImageDraw.Draw(truth), 1)):
        paint(pen, "triangle", (5, 30, 40, 60), fill)
    mask = foreground_mask(image)
    assert mask.dtype == bool
    assert (mask == np.asarray(truth, dtype=bool)).all()
    assert not foreground_mask(Image.new("RGB", (64, 64), COLORS["black"])).any()
