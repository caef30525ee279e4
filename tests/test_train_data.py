"""Training pairs: both table formats in every layout (parquet file, shard folder, datasets folder, hub id),
winner-first order, ties dropped, the shuffle order, identical augmentation."""

import dataclasses
import io
import os
import random
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REVISION
from PIL import Image

from rlaif.errors import RlaifError
from rlaif.images import open_rgb
from rlaif.train.data import apply_augmentation, fit_augmentation, plan_augmentation
from rlaif.train.pair_table import PairTable, parquet_shards


def png(color, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pick_a_pic_and_rlaif_tables(tmp_path):
    red, blue = png("red"), png("blue")
    pl.DataFrame({"caption": ["a", "b", "c"], "jpg_0": [red, red, red], "jpg_1": [blue, blue, blue],
                  "label_0": [1.0, 0.0, 0.5], "label_1": [0.0, 1.0, 0.5]}).write_parquet(tmp_path / "pap.parquet")
    pairs = PairTable(tmp_path / "pap.parquet")
    assert [(p.caption, p.chosen, p.rejected) for p in pairs] == [("a", red, blue), ("b", blue, red)]
    assert pairs[1].chosen_name == f"{tmp_path / 'pap.parquet'} row 1 jpg_1"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "r.png").write_bytes(red)
    (tmp_path / "imgs" / "b.png").write_bytes(blue)
    pl.DataFrame({"caption": ["x"], "image_0": ["imgs/r.png"], "image_1": ["imgs/b.png"], "label_0": [0.0]}
                 ).write_parquet(tmp_path / "pairs.parquet")
    (pair,) = PairTable(tmp_path / "pairs.parquet")
    assert pair.chosen == tmp_path / "imgs" / "b.png" and open_rgb(pair.chosen).getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize(("frame", "message"), [
    ({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [0.5]}, "no pairs with a preference"),
    ({"caption": ["a", "b"], "jpg_0": [b"x"] * 2, "jpg_1": [b"y"] * 2, "label_0": [None, 0.5]},
     r"no pairs with a preference in label_0 \(all ties, unlabelled or empty\)"),
    ({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [0.7]}, "row 0: label_0 is 0.7"),
    ({"caption": ["a"], "picture": [b"x"]}, "has neither the rlaif columns"),
])
def test_bad_tables(tmp_path, frame, message):
    pl.DataFrame(frame).write_parquet(tmp_path / "t.parquet")
    with pytest.raises(RlaifError, match=message):
        PairTable(tmp_path / "t.parquet")


def test_pairs_nobody_labelled_are_dropped_and_counted_as_ties_are(tmp_path):
    """A relabelled table's label_0 holds no value for a pair no human labelled (`label --relabel` keeps them):
    training or judging on those human labels leaves such pairs out, as it leaves out ties, and counts them."""
    table = pick_a_pic_rows(6)  # labels 1, 0, 0.5, 1, 0, 0.5
    pq.write_table(table.set_column(3, "label_0", pa.array([1.0, None, 0.5, None, 0.0, 0.5])), tmp_path / "t.parquet")
    pairs = PairTable(tmp_path / "t.parquet")
    assert (len(pairs), pairs.ties, pairs.unlabelled) == (2, 2, 2)
    assert [p.caption for p in pairs.in_table_order()] == ["caption 0", "caption 4"]
    assert pairs.in_table_order()[1].chosen_name.endswith("row 4 jpg_1")  # label 0: the second image won


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
            # SDXL's crop coordinates are those of the same pixels cropped from the flipped picture (diffusers
            # flips, then crops): that crop of the flipped resize is exactly this training image
            top, left = plan.crop_top_left
            mirrored = chosen.resize(plan.resized, Image.BICUBIC).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop = np.asarray(mirrored.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 127.5 - 1.0
            assert torch.allclose(a, torch.from_numpy(crop).permute(2, 0, 1))
        else:
            assert plan.crop_top_left == (plan.top, plan.left)
    assert seen_flip == {True, False}  # some pairs flipped, some not
    centre = plan_augmentation(chosen.size, 32, random_crop=False, hflip=False, rng=random.Random(0))
    assert centre.crop_top_left == (0, (53 - 32) // 2) and centre.key == "53x32-0-10-0-32"


def test_16_bit_greyscale_decodes_to_its_8_bit_values_and_an_empty_cell_is_named():
    """PIL's convert("RGB") clips a 16-bit PNG's 0..65535 to 255 (a white picture, trained and scored as such);
    it is scaled to 8 bits instead. A null image cell (a Hugging Face struct with no bytes) is one line naming
    it, not an AttributeError."""
    wide = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    decoded = np.asarray(open_rgb(buffer.getvalue(), "w.png"))
    assert np.array_equal(decoded[..., 0], np.rint(wide / 257).astype(np.uint8)) and decoded[..., 2].mean() < 128
    with pytest.raises(RlaifError, match="image t.parquet row 3 jpg_1 is missing: its table cell is empty"):
        open_rgb(None, "t.parquet row 3 jpg_1")


def test_a_loser_of_another_aspect_ratio_is_resized_on_its_own_not_stretched():
    """The chosen image plans the pair's transform; a loser of the same aspect ratio (any size) shares it, one of
    another ratio gets its own shortest-side resize, cropped at the same relative place and flipped alike: the
    chosen's absolute size would squash a 64 x 96 loser into a square."""
    rng = np.random.default_rng(1)
    chosen = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8))
    plan = plan_augmentation(chosen.size, 32, random_crop=False, hflip=False, rng=random.Random(0))
    assert fit_augmentation(plan, (64, 64), False) == plan
    bigger = fit_augmentation(plan, (128, 128), False)  # the same transform, conditioned on its own size (SDXL)
    assert bigger == dataclasses.replace(plan, original_size=(128, 128)) and bigger.key == plan.key
    fitted = fit_augmentation(plan, tall.size, False)
    assert (fitted.resized, fitted.top, fitted.left, fitted.original_size) == ((32, 48), 8, 0, (96, 64))
    by_hand = np.asarray(tall.resize((32, 48), Image.BICUBIC).crop((0, 8, 32, 40)), dtype=np.float32) / 127.5 - 1.0
    assert torch.equal(apply_augmentation(tall, fitted), torch.from_numpy(by_hand).permute(2, 0, 1))
    wide = plan_augmentation((80, 48), 32, random_crop=True, hflip=True, rng=random.Random(3))  # left > 0
    moved = fit_augmentation(wide, (120, 48), True)  # more room to the side: the same fraction of it
    assert moved.flip == wide.flip and moved.top == 0 and moved.resized == (80, 32)
    assert moved.left == round(wide.left / (53 - 32) * (80 - 32))
    odd = plan_augmentation((64, 66), 32, random_crop=False, hflip=False, rng=random.Random(0))  # 1 px to spare
    assert fit_augmentation(odd, (48, 64), False).top == (43 - 32) // 2  # centred, not at the top as 0 / 1 says


def test_a_training_batch_crops_a_loser_of_another_aspect_ratio_unstretched(tmp_path):
    from rlaif.train.batches import BatchSettings, MicroBatches

    rng = np.random.default_rng(2)
    tall = Image.fromarray(rng.integers(0, 255, (24, 16, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    tall.save(buffer, format="PNG")
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [png("red", (16, 16))], "jpg_1": [buffer.getvalue()],
                             "label_0": [1.0]}), tmp_path / "t.parquet")
    settings = BatchSettings(seed=0, batch_size=1, processes=1, rank=0, resolution=8, random_crop=False, hflip=False,
                             caption_dropout=0.0, latent_shape=(4, 1, 1), timesteps=10)
    batch = MicroBatches(PairTable(tmp_path / "t.parquet"), settings, None)[0]
    by_hand = np.asarray(tall.resize((8, 12), Image.BICUBIC).crop((0, 2, 8, 10)), dtype=np.float32) / 127.5 - 1.0
    assert torch.equal(batch.images[1].pixels, torch.from_numpy(by_hand).permute(2, 0, 1))
    # SDXL micro-conditioning: each image its own original size; with the label flipped, each image keeps its own
    assert [a.original_size for a in batch.augmentations] == [(16, 16), (24, 16)]
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [png("red", (16, 16))], "jpg_1": [buffer.getvalue()],
                             "label_0": [0.0]}), tmp_path / "flipped.parquet")
    flipped = MicroBatches(PairTable(tmp_path / "flipped.parquet"), settings, None)[0]
    assert flipped.augmentations == batch.augmentations[::-1]
    assert torch.equal(flipped.images[0].pixels, batch.images[1].pixels)


def test_relabelled_tables_train_on_the_ai_labels_unless_told(tmp_path):
    """`rlaif label --relabel` writes ai_label_0 beside the human label_0: training takes the AI labels by
    default, the human ones (or any column) when --label-column says so. A table with both kinds of image columns
    is refused: which pair its labels are about would be a guess."""
    red, blue = png("red"), png("blue")
    pl.DataFrame({"caption": ["a", "b"], "jpg_0": [red, red], "jpg_1": [blue, blue], "label_0": [1.0, 1.0],
                  "ai_label_0": [0.0, 0.5]}).write_parquet(tmp_path / "relabelled.parquet")
    (ai,) = PairTable(tmp_path / "relabelled.parquet")  # the AI tie on "b" is dropped
    assert (ai.caption, ai.chosen, ai.rejected) == ("a", blue, red)
    human = PairTable(tmp_path / "relabelled.parquet", "label_0")
    assert [(p.caption, p.chosen) for p in human] == [("a", red), ("b", red)]
    with pytest.raises(RlaifError, match="has no column 'label_2' \\(--label-column\\)"):
        PairTable(tmp_path / "relabelled.parquet", "label_2")
    with pytest.raises(RlaifError, match="--label-column label_1 is Pick-a-Pic's 'image 1 wins' column"):
        PairTable(tmp_path / "relabelled.parquet", "label_1")  # every preference would be reversed
    pl.DataFrame({"caption": ["a"], "jpg_0": [red], "jpg_1": [blue], "image_0": ["b.png"], "image_1": ["r.png"],
                  "label_0": [1.0]}).write_parquet(tmp_path / "both.parquet")
    with pytest.raises(RlaifError, match="both.parquet has both rlaif's image columns .* and Pick-a-Pic's"):
        PairTable(tmp_path / "both.parquet")


def pick_a_pic_rows(count: int) -> pa.Table:
    """``count`` Pick-a-Pic rows with distinct images (every third a tie), as pyarrow writes the real shards."""
    images = [png((i % 256, (7 * i) % 256, 99), size=(8, 8)) for i in range(2 * count)]
    labels = [(1.0, 0.0, 0.5)[i % 3] for i in range(count)]
    return pa.table({"caption": [f"caption {i}" for i in range(count)], "jpg_0": images[:count],
                     "jpg_1": images[count:], "label_0": labels, "label_1": [1 - v for v in labels]})


def described(pairs) -> list[tuple]:
    return [(p.caption, p.chosen, p.rejected) for p in pairs]


def test_the_train_split_is_chosen_by_the_path_inside_the_table_folder(tmp_path):
    """Only the path inside the table's folder names a split: a Pick-a-Pic layout kept under a folder of the
    user's named ``train`` still drops its validation shard, and a file whose name merely starts with "train"
    (training_notes.parquet) is not taken for the train split of a folder of part-*.parquet shards. A relabelled
    shard written beside the shards (`label --relabel`'s default) is refused, not read as one more shard, and so
    are several splits without a train split, rather than mixed."""
    root = "/runs/train/pap"
    layout = [f"{root}/data/train-00000-of-00001.parquet", f"{root}/data/validation-00000-of-00001.parquet"]
    assert parquet_shards(layout, root, root) == layout[:1]
    parts = ["/data/t/part-0.parquet", "/data/t/part-1.parquet", "/data/t/training_notes.parquet"]
    assert parquet_shards(parts, "/data/t", "/data/t") == parts
    folders = ["/d/default/test/0.parquet", "/d/default/train/0.parquet", "/d/default/train/1.parquet"]
    assert parquet_shards(folders, "/d", "/d") == folders[1:]
    assert parquet_shards(["/d/train.parquet", "/d/test.parquet"], "/d/", "/d") == ["/d/train.parquet"]
    beside = ["/d/data/train-0.parquet", "/d/data/train-0.ai-labels.parquet"]  # `label --relabel SHARD`'s default
    with pytest.raises(RlaifError, match=r"^/d holds the output of `rlaif label --relabel` "
                                         r"\(/d/data/train-0.ai-labels.parquet\) beside its shards"):
        parquet_shards(beside, "/d", "/d")
    assert parquet_shards(beside[1:], "/d", "/d") == beside[1:]  # a folder of such outputs alone is a table
    splits = ["/v/data/test-0.parquet", "/v/data/validation-0.parquet"]  # no train split: not mixed
    with pytest.raises(RlaifError, match="^/v holds the splits test, validation and no train split"):
        parquet_shards(splits, "/v", "/v")
    assert parquet_shards(splits[1:], "/v", "/v") == splits[1:]  # one split alone is a table
    (tmp_path / "train" / "pap" / "data").mkdir(parents=True)  # the same, read from disk
    pq.write_table(pick_a_pic_rows(6), tmp_path / "train" / "pap" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pick_a_pic_rows(9), tmp_path / "train" / "pap" / "data" / "validation-00000-of-00001.parquet")
    assert len(PairTable(tmp_path / "train" / "pap")) == 4  # 6 rows, 2 ties


def test_a_table_rewritten_while_it_is_read_is_refused_not_read_through_the_old_index(tmp_path):
    """The index (rows kept, which image won) is built once; a table rewritten in place under a running train
    (`rlaif label` rerun into it) must stop the run, not pair the new rows by the old labels."""
    file = tmp_path / "pairs.parquet"
    rows = pick_a_pic_rows(12)
    pq.write_table(rows, file, row_group_size=4)
    table = PairTable(file)
    before = table[0]
    flipped = rows.set_column(3, "label_0", pa.array([1 - v for v in rows.column("label_0").to_pylist()]))
    pq.write_table(flipped, file, row_group_size=4)  # same size: every winner is now the other image
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 1))
    assert table[0] == before  # its row group was read before the rewrite
    with pytest.raises(RlaifError, match="pairs table .*pairs.parquet was rewritten while it was being read"):
        table[len(table) - 1]  # another row group


def test_a_caption_that_is_null_or_not_text_is_refused_before_training(tmp_path):
    """A null caption would train as an empty one (the unconditional model, without a word); an integer column
    would fail in the text encoder with a traceback. Found from the row groups' statistics without reading the
    captions, or by reading them where a file has no statistics; a datasets folder too."""
    import datasets

    rows = pick_a_pic_rows(12)
    captions = rows.column("caption").to_pylist()
    nulled = rows.set_column(0, "caption", pa.array(captions[:7] + [None] + captions[8:]))
    pq.write_table(nulled, tmp_path / "stats.parquet", row_group_size=4)
    pq.write_table(nulled, tmp_path / "bare.parquet", row_group_size=4, write_statistics=False)
    datasets.Dataset(nulled).save_to_disk(tmp_path / "saved")
    for source in ("stats.parquet", "bare.parquet", "saved"):
        with pytest.raises(RlaifError, match=r"row 7: the caption is missing \(null\); give every pair a caption"):
            PairTable(tmp_path / source)
    pq.write_table(rows.set_column(0, "caption", pa.array(range(12))), tmp_path / "ints.parquet")
    with pytest.raises(RlaifError, match="ints.parquet: column 'caption' holds int64, not text"):
        PairTable(tmp_path / "ints.parquet")
    pq.write_table(rows, tmp_path / "fine.parquet", row_group_size=4, write_statistics=False)
    assert len(PairTable(tmp_path / "fine.parquet")) == 8  # 4 ties of 12 dropped


def test_image_paths_that_name_no_file_are_refused_before_training(tmp_path):
    """A table of image paths (rlaif's) is checked before step 1: a missing file met hours in could not be
    mended, since a resume refuses a changed table. A tie's images are never read, so they may be gone."""
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        (tmp_path / "images" / f"{name}.png").write_bytes(png("red" if name == "a" else "blue"))
    table = {"caption": ["x", "y", "z", "w"], "image_0": ["images/a.png", "images/a.png", "images/gone.png",
                                                          str(tmp_path / "images" / "b.png")],
             "image_1": ["images/b.png", "images/gone.png", "images/b.png", "/nowhere/c.png"],
             "label_0": [1.0, 0.5, 0.0, 1.0]}
    pl.DataFrame(table).write_parquet(tmp_path / "pairs.parquet")
    with pytest.raises(RlaifError, match=r"^2 images of pairs table .*pairs.parquet do not exist \(first: "
                                         r".*pairs.parquet row 2 image_0 \(.*images/gone.png\)\); restore them"):
        PairTable(tmp_path / "pairs.parquet")
    pl.DataFrame({**table, "label_0": [1.0, 0.5, 0.5, 0.5]}).write_parquet(tmp_path / "pairs.parquet")
    (only,) = PairTable(tmp_path / "pairs.parquet")  # the ties' images are not needed
    assert only.chosen == tmp_path / "images" / "a.png"


def test_shard_folders_datasets_folders_hub_ids_and_urls_read_the_same_pairs(tmp_path):
    """One table as a parquet file, as Pick-a-Pic v2's layout (data/train-*.parquet shards of several row groups
    beside a validation split that must not be read), as a datasets.save_to_disk folder, as a hub dataset id
    resolved offline from a Hugging Face cache, and read in place from an fsspec URL: the same pairs in the same
    order."""
    import datasets

    table = pick_a_pic_rows(30)
    pq.write_table(table, tmp_path / "whole.parquet")
    (tmp_path / "pap" / "data").mkdir(parents=True)
    for shard, start in enumerate((0, 12)):
        pq.write_table(table.slice(start, 12 if shard == 0 else 18),
                       tmp_path / "pap" / "data" / f"train-0000{shard}-of-00002.parquet", row_group_size=5)
    pq.write_table(pick_a_pic_rows(4), tmp_path / "pap" / "data" / "validation-00000-of-00001.parquet")
    datasets.Dataset(table).save_to_disk(tmp_path / "saved")
    whole = PairTable(tmp_path / "whole.parquet")
    assert len(whole) == 20 and whole.ties == 10 and whole.unlabelled == 0  # 10 ties of 30 dropped
    shards = PairTable(tmp_path / "pap")
    assert len(shards.blocks) == 3 + 4  # row groups of 5 rows: 12 -> 3, 18 -> 4
    assert described(shards) == described(whole) == described(PairTable(tmp_path / "saved"))
    assert shards[-1].chosen_name.endswith("train-00001-of-00002.parquet row 16 jpg_1")  # row 28: label 0
    hub = Path(os.environ["HF_HOME"]) / "hub" / "datasets--someone--pairs"  # as hf_hub downloads lay it out
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text(REVISION)
    (hub / "snapshots" / REVISION).mkdir(parents=True)
    shutil.copytree(tmp_path / "pap" / "data", hub / "snapshots" / REVISION / "data")
    hub_table = PairTable("someone/pairs")
    assert described(hub_table) == described(whole) and hub_table.pinned == f"someone/pairs@{REVISION}"
    older = "fedcba9876543210fedcba9876543210fedcba98"  # an earlier commit of the dataset, still in the cache
    (hub / "snapshots" / older / "data").mkdir(parents=True)
    pq.write_table(table.slice(0, 12), hub / "snapshots" / older / "data" / "train-00000-of-00001.parquet")
    pinned = PairTable(f"someone/pairs@{older}")
    assert described(pinned) == described(whole)[:8] and pinned.pinned == f"someone/pairs@{older}"
    streamed = PairTable(f"file://{tmp_path / 'pap'}")  # an fsspec URL: read in place, as --streaming does
    assert described(streamed) == described(whole)


def test_pairs_of_one_picture_twice_are_dropped_in_every_layout(tmp_path):
    """Pick-a-Pic's ``are_different`` false marks a pair whose two images are one picture: a choice between a
    picture and itself, left out like a tie, counted apart, in parquet row groups and a datasets folder; a missing
    value counts as different; a column of another type is refused, naming the file."""
    import datasets

    table = pick_a_pic_rows(12)  # labels 1, 0, 0.5 repeating
    same = [True, False, True, None, True, False, False, True, True, True, True, False]
    table = table.append_column("are_different", pa.array(same, pa.bool_()))
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=5)
    datasets.Dataset(table).save_to_disk(tmp_path / "saved")
    whole = described(PairTable(tmp_path / "t.parquet"))
    preferred = [i for i in range(12) if i % 3 != 2]  # 8 rows labelled 1 or 0
    kept = [i for i in preferred if same[i] is not False]  # rows 1, 6 are one picture twice; row 3's is missing
    assert [caption for caption, _, _ in whole] == [f"caption {i}" for i in kept] == \
        [f"caption {i}" for i in (0, 3, 4, 7, 9, 10)]
    for source in (tmp_path / "t.parquet", tmp_path / "saved"):
        pairs = PairTable(source)
        assert (pairs.same_images, pairs.ties, len(pairs)) == (2, 4, 6)  # row 11, a tie, counts as a tie
        assert described(pairs) == whole
    pq.write_table(table.set_column(table.schema.get_field_index("are_different"), "are_different",
                                    pa.array([int(v is not False) for v in same])), tmp_path / "ints.parquet")
    with pytest.raises(RlaifError, match=f"pairs table {tmp_path / 'ints.parquet'}: column 'are_different' holds "
                                         "int64, not booleans"):
        PairTable(tmp_path / "ints.parquet")
    pq.write_table(table.slice(1, 1), tmp_path / "one.parquet")
    with pytest.raises(RlaifError, match=r"all ties, unlabelled, of one picture twice \(are_different false\) or "
                                         "empty"):
        PairTable(tmp_path / "one.parquet")


def test_the_shuffle_is_a_permutation_by_windows_of_blocks(tmp_path, monkeypatch):
    """Each epoch visits every pair once; blocks (row groups) are shuffled and then pairs within windows of at
    least SHUFFLE_WINDOW pairs, so a reader keeps only a window of blocks; epochs and seeds differ."""
    from rlaif.train import pair_table

    pq.write_table(pick_a_pic_rows(60), tmp_path / "t.parquet", row_group_size=6)  # 10 blocks of 4 pairs
    monkeypatch.setattr(pair_table, "SHUFFLE_WINDOW", 8)  # two blocks per window
    pair_table._epoch_order.cache_clear()
    table = PairTable(tmp_path / "t.parquet")
    epoch = [pair_table.pair_index(p, table, seed=0) for p in range(len(table))]
    second = [pair_table.pair_index(p, table, seed=0) for p in range(len(table), 2 * len(table))]
    other = [pair_table.pair_index(p, table, seed=1) for p in range(len(table))]
    pair_table._epoch_order.cache_clear()
    assert table._cache_size == 2
    assert sorted(epoch) == sorted(second) == list(range(40)) and epoch != second and epoch != other
    blocks = [int(table._block_of[i]) for i in epoch]
    windows = [set(blocks[i:i + 8]) for i in range(0, 40, 8)]
    assert all(len(w) == 2 for w in windows) and len(set().union(*windows)) == 10


def test_an_undecodable_image_is_named_by_table_row_and_column(tmp_path):
    from rlaif.train.batches import BatchSettings, MicroBatches

    rows = pick_a_pic_rows(4).to_pylist()
    rows[3]["jpg_1"] = b"not an image"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    settings = BatchSettings(seed=0, batch_size=3, processes=1, rank=0, resolution=8, random_crop=False, hflip=False,
                             caption_dropout=0.0, latent_shape=(4, 1, 1), timesteps=10)
    message = MicroBatches(PairTable(tmp_path / "t.parquet"), settings, None)[0]
    assert message == f"image {tmp_path / 't.parquet'} row 3 jpg_1 cannot be read: corrupt, or not an image " \
                      "format that PIL reads"


def test_a_pair_with_its_label_flipped_sees_each_image_through_the_same_draws(tmp_path):
    """Noise, timestep and caption dropout are the pair's; each image's VAE posterior draw is keyed by its content,
    not by its side, so `eval --pairs` on another label column judges exactly the same model inputs with winner
    and loser swapped (keyed by side, a model's accuracy on a table and on its flipped copy did not add up to 1)."""
    from rlaif.train.batches import BatchSettings, MicroBatches

    table = pick_a_pic_rows(6)
    pq.write_table(table, tmp_path / "t.parquet")
    flipped = table.set_column(3, "label_0", pa.array([1.0 - v for v in table["label_0"].to_pylist()]))
    pq.write_table(flipped, tmp_path / "flipped.parquet")
    settings = BatchSettings(seed=0, batch_size=4, processes=1, rank=0, resolution=8, random_crop=False, hflip=False,
                             caption_dropout=0.5, latent_shape=(4, 1, 1), timesteps=10, shuffle=False)
    one, other = (MicroBatches(PairTable(tmp_path / name), settings, None)[0] for name in ("t.parquet",
                                                                                           "flipped.parquet"))
    assert torch.equal(one.vae_draws, torch.cat([other.vae_draws[4:], other.vae_draws[:4]]))
    assert torch.equal(torch.stack([i.pixels for i in one.images]),
                       torch.stack([i.pixels for i in other.images[4:] + other.images[:4]]))
    assert (one.captions, torch.equal(one.noise, other.noise), torch.equal(one.timesteps, other.timesteps)) == \
        (other.captions, True, True)


def test_the_noise_range_bounds_every_draw_and_its_default_draws_as_before(tmp_path):
    from rlaif.seeding import generator, keyed_seed
    from rlaif.train.batches import BatchSettings, MicroBatches
    from rlaif.train.flow import draw_u, shifted_sigma

    pq.write_table(pick_a_pic_rows(64), tmp_path / "t.parquet")
    table = PairTable(tmp_path / "t.parquet")
    unet = BatchSettings(seed=3, batch_size=32, processes=1, rank=0, resolution=8, random_crop=False, hflip=False,
                         caption_dropout=0.0, latent_shape=(4, 1, 1), timesteps=1000, shuffle=False)

    def drawn(settings):
        return MicroBatches(table, settings, None)[0].timesteps.tolist()

    # the full range draws the timesteps that `randrange(1000)` drew before the option existed
    assert drawn(unet) == [random.Random(keyed_seed("t", 3, p)).randrange(1000) for p in range(32)]
    high = drawn(dataclasses.replace(unet, noise_range=(0.75, 1.0)))
    assert all(750 <= t < 1000 for t in high) and len(set(high)) > 16
    assert drawn(dataclasses.replace(unet, noise_range=(0.0, 0.0001))) == [0] * 32  # at least one timestep
    flow = dataclasses.replace(unet, weighting="logit_normal")
    u = [draw_u("logit_normal", generator(keyed_seed("t", 3, p))) for p in range(32)]
    assert drawn(flow) == pytest.approx(u, abs=1e-7)
    assert drawn(dataclasses.replace(flow, noise_range=(0.5, 0.9))) == pytest.approx([0.1 + 0.4 * x for x in u],
                                                                                    abs=1e-6)
    # both families: the noisiest quarter of the schedule is noisier than three quarters of the way to pure noise
    sigma = shifted_sigma(torch.tensor(drawn(dataclasses.replace(flow, noise_range=(0.75, 1.0)))), 1000, 1.0)
    assert sigma.min() >= 0.75 and sigma.max() <= 1.0
    assert drawn(dataclasses.replace(unet, noise_range=(0.9999, 1.0))) == [999] * 32  # the last timestep, no further


def test_held_out_pairs_are_whole_prompts_chosen_by_their_text(tmp_path):
    """--val-fraction holds out every pair of a share of the captions (by a hash of the text, so the split is the
    same whatever the row order or sharding); tables with fewer than 20 captions hold nothing out."""
    table = pick_a_pic_rows(120)
    captions = [f"prompt {i % 40}" for i in range(120)]  # 40 captions, 3 rows each
    table = table.set_column(0, "caption", pa.array(captions))
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)
    pq.write_table(table.take(list(range(119, -1, -1))), tmp_path / "reversed.parquet")
    everything = {p.caption for p in PairTable(tmp_path / "t.parquet")}
    train = PairTable(tmp_path / "t.parquet", hold_out=0.25)
    val = train.held_out_pairs()
    assert len(train) + len(val) == 80  # 40 ties of 120 dropped, the rest split
    held = {p.caption for p in val}
    assert held and not held & {p.caption for p in train} and held | {p.caption for p in train} == everything
    assert 3 <= len(held) <= 18  # about a quarter of the 40 captions
    assert {p.caption for p in PairTable(tmp_path / "reversed.parquet", hold_out=0.25).held_out_pairs()} == held
    # a prompt typed again with other case or spacing (Pick-a-Pic holds many) falls on the same side (a review)
    retyped = table.set_column(0, "caption", pa.array([[c, c.upper(), f" {c.replace(' ', '  ')}\t"][i % 3]
                                                       for i, c in enumerate(captions)]))
    pq.write_table(retyped, tmp_path / "retyped.parquet")
    again = PairTable(tmp_path / "retyped.parquet", hold_out=0.25)
    assert {" ".join(p.caption.split()).lower() for p in again.held_out_pairs()} == held
    assert len(again.held_out_pairs()) == len(val)
    few = pick_a_pic_rows(30)  # 30 distinct captions ... of which only 19 kept as distinct texts below
    few = few.set_column(0, "caption", pa.array([f"p{i % 19}" for i in range(30)]))
    pq.write_table(few, tmp_path / "few.parquet")
    few_pairs = PairTable(tmp_path / "few.parquet", hold_out=0.25)
    assert len(few_pairs) == 20 and len(few_pairs.held_out_pairs()) == 0


def test_a_spread_sample_takes_stretches_from_across_the_table_in_table_order(tmp_path):
    """What training measures its held-out pairs on, and `eval --pairs` judges: not the first pairs of a table
    in the order it was collected (a few prompts of its first shard) but stretches from across it."""
    pq.write_table(pick_a_pic_rows(600), tmp_path / "t.parquet", row_group_size=50)
    table = PairTable(tmp_path / "t.parquet")  # 400 pairs (every third row a tie)
    everything = described(table.in_table_order())
    sample = table.spread(64)
    taken = described(sample)
    assert len(taken) == 64 and len(set(taken)) == 64
    positions = [everything.index(pair) for pair in taken]
    assert positions == sorted(positions)  # table order: each row group read once
    assert positions[:4] == [0, 1, 2, 3] and positions[4] == 25 and positions[-4:] == [375, 376, 377, 378]
    assert sum(sample.block_sizes) == 64 and (np.count_nonzero(sample.block_sizes) == 12)
    assert described(table.spread(400)) == described(table.spread(1000)) == everything
    assert described(table.spread(5, runs=16)) == [everything[i] for i in (0, 80, 160, 240, 320)]


def test_no_more_than_max_open_files_stay_open(tmp_path, monkeypatch):
    """A table of more shards than a process may keep open (Pick-a-Pic v2: 645) is read with a bounded number of
    files open: those used least recently are closed (a review: 'Too many open files')."""
    from rlaif.train import pair_table

    for i in range(6):
        pq.write_table(pick_a_pic_rows(9).set_column(0, "caption", pa.array([f"shard {i} {j}" for j in range(9)])),
                       tmp_path / f"part-{i}.parquet")
    monkeypatch.setattr(pair_table, "MAX_OPEN_FILES", 2)
    monkeypatch.setattr(pair_table, "_OPENED", pair_table.OrderedDict())
    before = len(os.listdir("/proc/self/fd"))
    table = PairTable(tmp_path)
    pairs = described(table.in_table_order())
    assert [p[0] for p in pairs] == [f"shard {i} {j}" for i in range(6) for j in range(9) if j % 3 != 2]
    assert len(pair_table._OPENED) == 2 and len(os.listdir("/proc/self/fd")) <= before + 2
    shuffled = [table[i] for i in random.Random(0).sample(range(len(table)), len(table))]  # reopened on demand
    assert sorted(described(shuffled)) == sorted(pairs)


def test_a_remote_shard_rewritten_under_its_name_is_another_table():
    """A remote table (an fsspec URL, unpinned) is known by each shard's size and version, not its name alone:
    a resume over a shard rewritten in place would map positions to other pairs (a review)."""
    import fsspec

    def write(rows: int) -> None:
        with fsspec.open("memory://rewritten/t.parquet", "wb") as file:
            pq.write_table(pick_a_pic_rows(rows), file)

    write(6)
    first = PairTable("memory://rewritten/t.parquet").identity
    assert PairTable("memory://rewritten/t.parquet").identity == first
    write(9)
    assert PairTable("memory://rewritten/t.parquet").identity != first
    from rlaif.train.pair_table import remote_stamp

    # a rewrite of the same size: the store's version tells it (the hub's blob id, an object store's version)
    assert remote_stamp({"size": 10, "blob_id": "a"}) != remote_stamp({"size": 10, "blob_id": "b"})
    assert remote_stamp({"size": 10, "lfs": {"sha256": "x"}, "blob_id": "a"}) == "10:x"
    # GCS: a metadata edit changes the etag, not the generation, which is what is read
    assert remote_stamp({"size": 10, "generation": "7", "etag": "e1"}) == remote_stamp(
        {"size": 10, "generation": "7", "etag": "e2"})


def test_a_checkpoint_of_a_remote_table_named_without_stamps_resumes_as_before():
    """Checkpoints of an unpinned remote table written before its shards' stamps were recorded name the shards
    alone: the same shards resume (a review), other shards do not."""
    from rlaif.train.trainer import _unstamped_as_then

    then = {"pairs_file": "s3://b/t/0.parquet;s3://b/t/1.parquet"}
    now = {"pairs_file": "s3://b/t/0.parquet#10:e1;s3://b/t/1.parquet#12:e2", "beta": 1.0}
    assert _unstamped_as_then(then, now) == {**now, **then}
    other = {"pairs_file": "s3://b/t/0.parquet#10:e1", "beta": 1.0}
    assert _unstamped_as_then(then, other) == other
    stamped = {"pairs_file": "s3://b/t/0.parquet#10:e0;s3://b/t/1.parquet#12:e2"}  # changed since: not accepted
    assert _unstamped_as_then(stamped, now) == now


def test_a_remote_read_that_fails_is_one_line_naming_the_file_and_row_group(monkeypatch):
    """A network fault while training reads a remote shard stops with one line, even for an exception without a
    message (fsspec's timeout has none); the fault is raised in place of the read."""
    import fsspec

    from rlaif.train import pair_table

    with fsspec.open("memory://faults/t.parquet", "wb") as file:
        pq.write_table(pick_a_pic_rows(6), file)
    table = PairTable("memory://faults/t.parquet")
    parquet = pair_table.open_parquet(table.files[0])

    def timeout(*args, **kwargs):
        raise TimeoutError

    monkeypatch.setattr(parquet, "read_row_group", timeout)
    with pytest.raises(RlaifError, match=r"table memory:///faults/t.parquet: cannot read row group 0 \(TimeoutError\)"):
        table[0]
