"""The reward suite's composition rewards (bench/suite_rewards.py), against values worked out by hand, and the scenes
bench/world_ceiling.py draws for a prompt."""

import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from rlaif.scoring import LoadedScorer
from rlaif.shapes import COLORS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import suite_rewards  # noqa: E402
import world_ceiling  # noqa: E402


def square(box: tuple[int, int, int, int]) -> Image.Image:
    """A red square filling ``box`` (inclusive corners) on blue, 64 x 64."""
    image = Image.new("RGB", (64, 64), COLORS["blue"])
    ImageDraw.Draw(image).rectangle(box, fill=COLORS["red"])
    return image


def score(name: str, image: Image.Image) -> float:
    return getattr(suite_rewards, name)().score([image], ["a large red square on a blue background"])[0]


def test_size_is_the_share_of_the_subject():
    assert score("size", square((10, 10, 25, 25))) == pytest.approx(16 * 16 / 64**2)


def test_centred_and_high_read_the_subject_centroid():
    # centroid (row 11.5, column 11.5); the centre is (31.5, 31.5); half the diagonal is 32 * sqrt(2)
    top_left = square((4, 4, 19, 19))
    assert score("centred", top_left) == pytest.approx(1 - (20 * 2**0.5) / (32 * 2**0.5))
    assert score("high", top_left) == pytest.approx(1 - 11.5 / 63)
    assert score("centred", square((24, 24, 39, 39))) == pytest.approx(1.0)
    assert score("high", square((4, 48, 19, 63))) == pytest.approx(1 - 55.5 / 63)


def test_nothing_drawn_scores_zero():
    empty = Image.new("RGB", (64, 64), COLORS["blue"])
    assert [score(name, empty) for name in ("size", "centred", "high")] == [0.0, 0.0, 0.0]


def test_follows_prompt_counts_what_the_picture_shows_of_the_prompt():
    picture = square((10, 10, 40, 40))  # a red square on blue
    reward = suite_rewards.follows_prompt()
    prompts = ["a large red square on a blue background", "a large red circle on a blue background",
               "a small green circle on a blue background", "a small green circle on a white background"]
    assert reward.score([picture] * 4, prompts) == pytest.approx([1, 2 / 3, 1 / 3, 0])


def test_follows_prompt_checks_only_what_a_shorter_prompt_asks():
    picture = square((10, 10, 40, 40))  # a red square on blue
    reward = suite_rewards.follows_prompt()
    prompts = ["a square", "a circle", "a green square", "a large square on a white background",
               "a red circle on a blue background"]
    assert reward.score([picture] * 5, prompts) == pytest.approx([1, 0, 1 / 2, 1 / 2, 2 / 3])


def test_asked_colour_reads_the_shape_colour_else_the_background():
    picture = square((0, 0, 15, 63))  # a red quarter on blue
    reward = suite_rewards.asked_colour()
    prompts = ["a red square on a blue background", "a square on a blue background", "a blue square", "a square"]
    assert reward.score([picture] * 4, prompts) == pytest.approx([1 / 4, 3 / 4, 3 / 4, 0])


def test_contrast_is_the_luma_spread():
    half = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(half).rectangle((0, 0, 63, 31), fill=(255, 255, 255))  # half white: luma 0 or 255, std 127.5
    assert score("contrast", half) == pytest.approx(1.0)
    assert score("contrast", Image.new("RGB", (64, 64), (200, 30, 30))) == pytest.approx(0.0)


def test_colourfulness_weighs_opponent_colour_not_grey():
    # one colour: no spread, 0.3 x the length of its mean (rg, yb) = (255, 127.5) for pure red
    assert score("colourfulness", Image.new("RGB", (64, 64), (255, 0, 0))) == pytest.approx(
        0.3 * (255**2 + 127.5**2) ** 0.5 / 255)
    assert score("colourfulness", Image.new("RGB", (64, 64), (90, 90, 90))) == pytest.approx(0.0)
    # red and blue halves: rg is 255 or 0, yb 127.5 or -255; spreads 127.5 and 191.25, means 127.5 and -63.75
    halves = Image.new("RGB", (64, 64), (0, 0, 255))
    ImageDraw.Draw(halves).rectangle((0, 0, 63, 31), fill=(255, 0, 0))
    expected = (127.5**2 + 191.25**2) ** 0.5 + 0.3 * (127.5**2 + 63.75**2) ** 0.5
    assert score("colourfulness", halves) == pytest.approx(expected / 255)


def test_the_world_ceiling_draws_only_what_the_prompt_allows():
    named = world_ceiling.allowed_scenes("a large red circle on a blue background")
    assert [(s.shape, s.color, s.background, s.size) for s in named] == [("circle", "red", "blue", "large")]
    free_background = world_ceiling.allowed_scenes("a red square")
    assert len(free_background) == 7 * 2 and {s.color for s in free_background} == {"red"}
    assert "red" not in {s.background for s in free_background}
    assert len(world_ceiling.allowed_scenes("a triangle")) == 8 * 7 * 2
    # white on black: both greys, so every picture the world draws of it has HSV saturation 0; a free colour does not
    saturation = LoadedScorer("suite_rewards:saturation")
    assert world_ceiling.world_scores("a white circle on a black background", saturation, 3, 0).max() == 0.0
    free = world_ceiling.world_scores("a circle on a black background", saturation, 3, 0)
    assert free.shape == (7 * 2, 3) and free.max() > 0.1
