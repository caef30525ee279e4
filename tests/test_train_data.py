"""Training pairs: both table formats, winner-first order, ties dropped, identical augmentation."""

import dataclasses
import io
import random

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from rlaif.errors import RlaifError
from rlaif.images import open_rgb
from rlaif.train.data import apply_augmentation, load_pairs, plan_augmentation


def png(color, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pick_a_pic_and_rlaif_tables(tmp_path):
    red, blue = png("red"), png("blue")
    pl.DataFrame({"caption": ["a", "b", "c"], "jpg_0": [red, red, red], "jpg_1": [blue, blue, blue],
                  "label_0": [1.0, 0.0, 0.5], "label_1": [0.0, 1.0, 0.5]}).write_parquet(tmp_path / "pap.parquet")
    pairs = load_pairs(tmp_path / "pap.parquet")
    assert [(p.caption, p.chosen, p.rejected) for p in pairs] == [("a", red, blue), ("b", blue, red)]
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "r.png").write_bytes(red)
    (tmp_path / "imgs" / "b.png").write_bytes(blue)
    pl.DataFrame({"caption": ["x"], "image_0": ["imgs/r.png"], "image_1": ["imgs/b.png"], "label_0": [0.0]}
                 ).write_parquet(tmp_path / "pairs.parquet")
    (pair,) = load_pairs(tmp_path / "pairs.parquet")
    assert pair.chosen == tmp_path / "imgs" / "b.png" and open_rgb(pair.chosen).getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize(("frame", "message"), [
    ({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [0.5]}, "no pairs with a preference"),
    ({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [0.7]}, "row 0: label_0 is 0.7"),
    ({"caption": ["a"], "picture": [b"x"]}, "has neither the rlaif columns"),
])
def test_bad_tables(tmp_path, frame, message):
    pl.DataFrame(frame).write_parquet(tmp_path / "t.parquet")
    with pytest.raises(RlaifError, match=message):
        load_pairs(tmp_path / "t.parquet")


def test_augmentation_is_shared_by_winner_and_loser():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    chosen, rejected = Image.fromarray(base), Image.fromarray(255 - base)
    seen_flip = set()
    for seed in range(8):
        plan = plan_augmentation(chosen.size, 32, random_crop=True, hflip=True, rng=random.Random(seed))
        a, b = apply_augmentation(chosen, plan), apply_augmentation(rejected, plan)
        assert a.shape == b.shape == (3, 32, 32)
        # rejected is the pixel-wise inverse of chosen before resizing; bicubic resize is linear up to clipping,
        # so the same crop and flip keep them (almost) exact inverses of each other
        assert torch.allclose(a, -b, atol=0.02)
        assert plan.original_size == (48, 80) and plan.resized == (53, 32) and 0 <= plan.left <= 53 - 32
        seen_flip.add(plan.flip)
        if plan.flip:  # the flip is the only difference from the unflipped plan
            unflipped = apply_augmentation(chosen, dataclasses.replace(plan, flip=False))
            assert torch.equal(a, unflipped.flip(-1))
    assert seen_flip == {True, False}  # some pairs flipped, some not
    centre = plan_augmentation(chosen.size, 32, random_crop=False, hflip=False, rng=random.Random(0))
    assert centre.crop_top_left == (0, (53 - 32) // 2) and centre.key == "53x32-0-10-0-32"


def test_relabelled_tables_train_on_the_ai_labels_unless_told(tmp_path):
    """`rlaif label --relabel` writes ai_label_0 beside the human label_0: training takes the AI labels by
    default, the human ones (or any column) when --label-column says so."""
    red, blue = png("red"), png("blue")
    pl.DataFrame({"caption": ["a", "b"], "jpg_0": [red, red], "jpg_1": [blue, blue], "label_0": [1.0, 1.0],
                  "ai_label_0": [0.0, 0.5]}).write_parquet(tmp_path / "relabelled.parquet")
    (ai,) = load_pairs(tmp_path / "relabelled.parquet")  # the AI tie on "b" is dropped
    assert (ai.caption, ai.chosen, ai.rejected) == ("a", blue, red)
    human = load_pairs(tmp_path / "relabelled.parquet", "label_0")
    assert [(p.caption, p.chosen) for p in human] == [("a", red), ("b", red)]
    with pytest.raises(RlaifError, match="has no column 'label_1' \\(--label-column\\)"):
        load_pairs(tmp_path / "relabelled.parquet", "label_1")
