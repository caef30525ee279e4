"""The tiny world's captions and its reader (`rlaif.shapes.read_scene`), which bench/tiny_world.py trusts to judge
the tiny model."""

import itertools
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from rlaif.shapes import (
    COLORS,
    OPTIONAL,
    SHAPES,
    Scene,
    asked,
    draw,
    foreground_mask,
    paint,
    random_omission,
    read_scene,
    shade,
    shorter_caption,
)


@pytest.mark.parametrize("shades", [0.0, 0.4])
def test_the_reader_reads_every_drawn_scene_as_drawn(shades):
    rng = random.Random(0)
    scenes = [Scene(shape, colour, background, size)
              for colour, background in itertools.permutations(sorted(COLORS), 2)
              for shape in SHAPES for size in ("small", "large")]
    read = [read_scene(draw(scene, rng, shades=shades)) for scene in scenes]
    assert read == [(scene.background, scene.color, scene.shape) for scene in scenes]


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.4])
def test_a_shade_is_pils_colour_enhancement_of_the_world_colour(factor):
    for colour in COLORS.values():
        enhanced = ImageEnhance.Color(Image.new("RGB", (1, 1), colour)).enhance(factor).getpixel((0, 0))
        assert np.abs(np.subtract(shade(colour, factor), enhanced)).max() <= 1  # PIL rounds its luma to an integer
    assert shade(COLORS["white"], 1.4) == COLORS["white"] and shade(COLORS["black"], 0.6) == COLORS["black"]


def test_shades_vary_the_colours_and_leave_the_flat_world_as_it_was():
    scene = Scene("circle", "red", "yellow", "large")
    rng, before_shades = random.Random(3), random.Random(3)
    flat = np.asarray(draw(scene, rng))
    assert set(map(tuple, flat.reshape(-1, 3))) == {COLORS["red"], COLORS["yellow"]}
    for _ in range(3):  # what draw took from the generator before shades: the size and the position
        before_shades.uniform(0, 1)
    assert rng.getstate() == before_shades.getstate()  # so runs made before shades replay exactly
    rng = random.Random(3)
    corners = {tuple(np.asarray(draw(scene, rng, shades=0.4))[0, 0]) for _ in range(20)}
    assert len(corners) > 10


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


def test_every_shorter_caption_parses_back_to_what_it_says():
    scene = Scene("triangle", "purple", "white", "small")
    full = {"size": "small", "color": "purple", "shape": "triangle", "background": "white"}
    for count in range(len(OPTIONAL) + 1):
        for omit in itertools.combinations(OPTIONAL, count):
            caption = scene.describe(frozenset(omit))
            assert asked(caption) == {key: value for key, value in full.items() if key not in omit}, caption
    assert scene.describe() == scene.caption == "a small purple triangle on a white background"
    assert scene.describe(frozenset(OPTIONAL)) == "a triangle"


def test_a_caption_outside_the_world_is_refused():
    for caption in ("a red", "the red circle", "a circle on a background", "a red large circle", "a circle of red"):
        with pytest.raises(ValueError, match="not a caption of the shapes world"):
            asked(caption)


def test_omission_leaves_each_attribute_out_at_its_rate():
    rng = random.Random(0)
    draws = [random_omission(rng, 0.25) for _ in range(4000)]
    for key in OPTIONAL:
        assert abs(sum(key in omit for omit in draws) / len(draws) - 0.25) < 0.03


def test_a_full_caption_draws_nothing_so_older_runs_replay():
    rng = random.Random(3)
    state = rng.getstate()
    caption = shorter_caption(Scene("circle", "red", "blue", "large"), rng, 0.0)
    assert caption == "a large red circle on a blue background"
    assert rng.getstate() == state


def test_the_parser_forgives_case_a_full_stop_and_an():
    assert asked("An orange circle on a blue background.") == {"color": "orange", "shape": "circle",
                                                                "background": "blue"}
