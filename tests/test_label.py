"""`rlaif label` through the real CLI on tiny samples: tables, cache reuse, plugin faults."""

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PROMPTS, cli_env, run_cli
from PIL import Image

from rlaif.tables import PAIRS_SCHEMA, SCORES_SCHEMA

PLUGINS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("label")
    (folder / "p.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    result = run_cli("sample", "--model", "tiny", "--prompts", folder / "p.txt", "--per-prompt", 4,
                     "--steps", 4, "--batch-size", 16, "--out", folder / "run")
    assert result.returncode == 0, result.stderr
    return folder / "run"


@pytest.fixture
def fresh(samples, tmp_path):
    """A private copy of the samples folder (tests write scores and pairs into it)."""
    return Path(shutil.copytree(samples, tmp_path / "run"))


def jpeg_kb(path: Path | io.BytesIO) -> float:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000


def test_compressibility_pairs_match_an_independent_jpeg_computation(fresh):
    result = run_cli("label", fresh, "--scorer", "compressibility")
    assert result.returncode == 0, result.stderr
    scores = pl.read_parquet(fresh / "scores.parquet")
    pairs = pl.read_parquet(fresh / "pairs.parquet")
    assert scores.columns == list(SCORES_SCHEMA) and pairs.columns == list(PAIRS_SCHEMA)
    samples = pl.read_parquet(fresh / "samples.parquet")
    expected = {sid: -jpeg_kb(fresh / image) for sid, image in zip(samples["sample_id"], samples["image"],
                                                                     strict=True)}
    assert dict(zip(scores["sample_id"], scores["score"], strict=True)) == pytest.approx(expected)
    assert pairs.height == 4  # best-worst: one pair per prompt
    for row in pairs.iter_rows(named=True):
        best = max((s for s in expected if s.startswith(row["prompt_id"])), key=expected.get)
        winner = row["sample_id_0"] if row["label_0"] == 1.0 else row["sample_id_1"]
        assert winner == best
        assert (fresh / row["image_0"]).is_file() and row["caption"] in PROMPTS


def test_top_vs_bottom_says_when_a_prompt_has_too_few_candidates_for_top_k(fresh):
    """4 candidates per prompt: --top-k 2 pairs the 2 best with the 2 worst silently; --top-k 3 cannot, pairs the
    same halves, and says so."""
    for k, note in ((2, False), (3, True)):
        result = run_cli("label", fresh, "--scorer", "compressibility", "--strategy", "top-vs-bottom", "--top-k", k,
                         "-o", fresh / f"top-{k}.parquet")
        assert result.returncode == 0, result.stderr
        assert pl.read_parquet(fresh / f"top-{k}.parquet").height == 4 * 4
        said = "note: 4 prompts have fewer than 6 candidates (--top-k 3)" in result.stderr
        assert said == note, result.stderr


def test_a_table_labelled_otherwise_is_not_replaced(fresh):
    """A finished run may have trained on a pairs table: relabelling it with other settings is refused (with the
    same ones, a rerun replaces it, as after adding samples)."""
    assert run_cli("label", fresh, "--scorer", "compressibility").returncode == 0
    before = (fresh / "pairs.parquet").read_bytes()
    again = run_cli("label", fresh, "--scorer", "compressibility:1")  # the same: a weight of 1 is no weight
    assert again.returncode == 0, again.stderr
    other = run_cli("label", fresh, "--scorer", "incompressibility", "--strategy", "all-pairs")
    assert other.returncode == 2 and (fresh / "pairs.parquet").read_bytes() == before
    assert other.stderr.strip() == (f"error: {fresh / 'pairs.parquet'} holds pairs labelled with other settings "
                                    "(scorers ['compressibility:1'] -> ['incompressibility:1']; strategy "
                                    "'best-worst' -> 'all-pairs'), which a training run may have used; give another "
                                    "--out, or delete it to label anew")
    # weights are recorded with every digit they need: 0.1234567 and 0.1234568 both read 0.123457 with :g
    ensemble = ["-o", fresh / "w.parquet", "-s", "incompressibility:1", "-s"]
    assert run_cli("label", fresh, *ensemble, "compressibility:0.1234567").returncode == 0
    near = run_cli("label", fresh, *ensemble, "compressibility:0.1234568")
    assert near.returncode == 2 and "'compressibility:0.1234567', 'incompressibility:1'] -> [" in near.stderr


def test_extra_scorer_reuses_cached_scores(fresh, tmp_path):
    env = cli_env(PYTHONPATH=PLUGINS, RLAIF_TEST_COUNT=str(tmp_path / "count"))
    first = run_cli("label", fresh, "--scorer", "label_plugins:counting_brightness", env=env)
    assert first.returncode == 0, first.stderr
    second = run_cli("label", fresh, "--scorer", "label_plugins:counting_brightness", "--scorer",
                     "compressibility:2", "--strategy", "all-pairs", "--out", tmp_path / "elsewhere.parquet", env=env)
    assert second.returncode == 0, second.stderr
    assert sum(map(int, (tmp_path / "count").read_text().split())) == 16  # scored once, not twice
    scores = pl.read_parquet(fresh / "scores.parquet")
    assert scores.group_by("scorer").len().sort("scorer")["len"].to_list() == [16, 16]
    pairs = pl.read_parquet(tmp_path / "elsewhere.parquet")
    assert (tmp_path / pairs["image_0"][0]).resolve().is_file()  # image paths are relative to the table
    assert set(pairs["scorer"]) == {"label_plugins:counting_brightness:1+compressibility:2"}


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ("label_plugins:raising", "scorer 'label_plugins:raising' raised RuntimeError: model exploded"),
        ("label_plugins:wrong_length", "returned 17 scores for 16 images"),
        ("label_plugins:nan", "scorer 'label_plugins:nan (brightness)' returned a NaN, infinite or non-numeric "
         "score (nan) for image /"),
        ("label_plugins:absent", "scorer 'label_plugins:absent' cannot be imported"),
        ("compressibility:abc", "--scorer 'compressibility:abc': the weight 'abc' is not a positive number"),
        ("no-such-scorer", "unknown scorer 'no-such-scorer'; available: aesthetic, clip, compressibility"),
        ("label_plugins:constant", "no pairs"),
    ],
)
def test_plugin_faults_are_one_clear_line(fresh, plugin, message):
    result = run_cli("label", fresh, "--scorer", plugin, "--batch-size", 64, env=cli_env(PYTHONPATH=PLUGINS))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("error: "), result.stderr
    assert not (fresh / "pairs.parquet").exists()


def test_missing_samples_table_and_corrupt_image(fresh, tmp_path):
    result = run_cli("label", tmp_path / "nowhere", "--scorer", "compressibility")
    assert result.returncode == 2 and f"SAMPLES_DIR {tmp_path / 'nowhere'} does not exist" in result.stderr
    image = fresh / pl.read_parquet(fresh / "samples.parquet")["image"][3]
    image.write_bytes(b"not a png")
    result = run_cli("label", fresh, "--scorer", "compressibility")
    assert result.returncode == 2 and f"image {image} cannot be read" in result.stderr
    assert not (fresh / "scores.parquet").exists()
    images = pl.read_parquet(fresh / "samples.parquet")["image"].to_list()
    for name in images[:2]:
        (fresh / name).unlink()  # deleted by hand: `rlaif sample` makes them again
    gone = run_cli("label", fresh, "--scorer", "compressibility")
    assert gone.returncode == 2 and gone.stderr == (
        f"error: 2 images that {fresh / 'samples.parquet'} lists are missing (first: {fresh / images[0]}); rerun "
        f"the `rlaif sample` command that made {fresh}: it makes them again\n")


def test_scorers_list_shows_builtins():
    result = run_cli("scorers", "list")
    assert result.returncode == 0
    assert "compressibility" in result.stdout and "built-in" in result.stdout
    from rlaif.scoring import available_scorers  # what each needs, on one line (a new user's trial asked)

    described = {name: entry.description for name, entry in available_scorers().items()}
    assert described["compressibility"].endswith("(DDPO). No weights: works offline.")
    assert described["pickscore"].endswith("CLIP-H cosine. Weights: 3.9 GB from the hub, fetched once.")


def test_relabel_pick_a_pic_table_prints_agreement(samples, tmp_path):
    table = pl.read_parquet(samples / "samples.parquet")
    paths = [samples / image for image in table["image"].to_list()]
    kb = [jpeg_kb(p) for p in paths]
    rows = []
    for i in range(0, 12, 2):  # six pairs; humans agree with compressibility on the first four
        a, b = i, i + 1
        prefers_0 = kb[a] < kb[b]
        label = float(prefers_0) if i < 8 else float(not prefers_0)
        rows.append({"caption": table["prompt"][a], "jpg_0": paths[a].read_bytes(), "jpg_1": paths[b].read_bytes(),
                     "label_0": label, "label_1": 1 - label})
    rows.append({**rows[0], "label_0": 0.5, "label_1": 0.5})  # a human tie is not compared
    pl.DataFrame(rows).write_parquet(tmp_path / "pickapic.parquet")
    result = run_cli("label", "--relabel", tmp_path / "pickapic.parquet", "--scorer", "compressibility")
    assert result.returncode == 0, result.stderr
    assert "agreement with human labels: 0.667 (4 agree and 0 AI ties counted half, of 6 non-tied pairs; 7 pairs, " \
        "0 AI ties)" in result.stdout
    out = pl.read_parquet(tmp_path / "pickapic.ai-labels.parquet")
    assert out.columns[:5] == ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    assert out["ai_score_0"].to_list() == pytest.approx([-kb[i] for i in range(0, 12, 2)] + [-kb[0]])
    assert out["ai_label_0"].to_list()[:4] == out["label_0"].to_list()[:4]
    again = run_cli("label", "--relabel", tmp_path / "pickapic.ai-labels.parquet", "--scorer", "compressibility",
                    "-o", tmp_path / "again.parquet")  # the AI columns are replaced, not added twice
    assert again.returncode == 0, again.stderr
    assert pl.read_parquet(tmp_path / "again.parquet").equals(out)
    # its AI labels are not replaced by another scorer's under a run that trained on them; the same scorer, written
    # another way, may rerun
    same = run_cli("label", "--relabel", tmp_path / "pickapic.parquet", "--scorer", "compressibility:1")
    assert same.returncode == 0, same.stderr
    other = run_cli("label", "--relabel", tmp_path / "pickapic.parquet", "--scorer", "incompressibility")
    assert other.returncode == 2 and pl.read_parquet(tmp_path / "pickapic.ai-labels.parquet").equals(out)
    assert "pickapic.ai-labels.parquet holds pairs labelled with other settings (scorers ['compressibility:1'] -> " \
        "['incompressibility:1'])" in other.stderr
    # nor by another version of the same scorer (its weights here)
    scorer = "label_plugins:channel_mean"
    argv = ("label", "--relabel", tmp_path / "pickapic.parquet", "--scorer", scorer, "--scorer-option",
            f"{scorer}.channel=1", "-o", tmp_path / "mine.parquet")
    count = str(tmp_path / "count")
    assert run_cli(*argv, env=cli_env(PYTHONPATH=PLUGINS, RLAIF_TEST_COUNT=count, RLAIF_TEST_WEIGHTS="w1")
                   ).returncode == 0
    changed = run_cli(*argv, env=cli_env(PYTHONPATH=PLUGINS, RLAIF_TEST_COUNT=count, RLAIF_TEST_WEIGHTS="w2"))
    assert changed.returncode == 0 and f"mine.parquet was labelled before by another version of {scorer}" in \
        changed.stderr
    # pairs no human labelled are AI-labelled too, and left out of the agreement
    pl.read_parquet(tmp_path / "pickapic.parquet").with_columns(label_0=pl.lit(None, pl.Float64)).write_parquet(
        tmp_path / "unlabelled.parquet")
    blind = run_cli("label", "--relabel", tmp_path / "unlabelled.parquet", "--scorer", "compressibility")
    assert blind.returncode == 0, blind.stderr
    assert "of 0 non-tied pairs; 7 pairs" in blind.stdout
    assert pl.read_parquet(tmp_path / "unlabelled.ai-labels.parquet")["ai_label_0"].to_list()[:4] == \
        out["ai_label_0"].to_list()[:4]


def test_relabel_needs_pick_a_pic_columns(tmp_path):
    pl.DataFrame({"caption": ["x"], "jpg_0": [b"x"]}).write_parquet(tmp_path / "bad.parquet")
    result = run_cli("label", "--relabel", tmp_path / "bad.parquet", "--scorer", "compressibility")
    assert result.returncode == 2 and "lacks column(s) jpg_1, label_0" in result.stderr
    # a null caption is refused before any scoring, as train would refuse the output after it
    pl.DataFrame({"caption": ["x", None], "jpg_0": [b"x", b"x"], "jpg_1": [b"y", b"y"], "label_0": [1.0, 0.0]}
                 ).write_parquet(tmp_path / "nullcap.parquet")
    nulled = run_cli("label", "--relabel", tmp_path / "nullcap.parquet", "--scorer", "compressibility")
    assert nulled.returncode == 2 and "nullcap.parquet, row 1: the caption is missing (null)" in nulled.stderr
    assert not (tmp_path / "nullcap.ai-labels.parquet").exists()


def test_relabel_refuses_an_output_disk_without_room_before_scoring(samples, tmp_path, monkeypatch):
    """The relabelled table holds the images again (Pick-a-Pic v2: ~335 GB); a disk that cannot hold it was found
    only when writing, after every chunk had been scored."""
    images = [(samples / image).read_bytes() for image in pl.read_parquet(samples / "samples.parquet")["image"]]
    pl.DataFrame({"caption": ["a circle"] * 3, "jpg_0": images[:3], "jpg_1": images[3:6], "label_0": [1.0, 0.0, 1.0]}
                 ).write_parquet(tmp_path / "pickapic.parquet")
    size = (tmp_path / "pickapic.parquet").stat().st_size
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    result = run_cli("label", "--relabel", tmp_path / "pickapic.parquet", "--scorer", "compressibility",
                     env=cli_env(RLAIF_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert (f"pickapic.ai-labels.parquet will hold the table's images again, about {size / 2**30:.1f} GiB, but only "
            f"{(size - 1) / 2**30:.1f} GiB is free on its disk; give -o a folder on a disk with room") in result.stderr
    assert not (tmp_path / "pickapic.ai-labels.parquet").exists() and not (tmp_path / "cache" / "relabel").exists()
    (tmp_path / ".pickapic.ai-labels.parquet.tmp-1-killed").write_bytes(b"x")  # a killed write's: removed first
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    assert run_cli("label", "--relabel", tmp_path / "pickapic.parquet", "--scorer", "compressibility",
                   env=cli_env(RLAIF_CACHE=str(tmp_path / "cache"))).returncode == 0
    assert not list(tmp_path.glob(".pickapic*"))


def test_relabel_refuses_captions_that_are_not_text_before_scoring(tmp_path):
    """A caption column of numbers was relabelled for hours, and then `rlaif train` refused the output."""
    images = noise_pngs(np.random.default_rng(2), 4, 8)
    pl.DataFrame({"caption": [1, 2], "jpg_0": images[:2], "jpg_1": images[2:], "label_0": [1.0, 0.0]}
                 ).write_parquet(tmp_path / "numbers.parquet")
    result = run_cli("label", "--relabel", tmp_path / "numbers.parquet", "--scorer", "compressibility",
                     env=cli_env(RLAIF_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"table {tmp_path / 'numbers.parquet'}: column 'caption' holds int64, not text" in result.stderr
    assert not (tmp_path / "numbers.ai-labels.parquet").exists() and not (tmp_path / "cache" / "relabel").exists()


def test_relabel_agreement_leaves_out_pairs_of_one_picture_twice(tmp_path):
    """As `rlaif train` and `rlaif eval --pairs` do, a pair whose are_different is false (Pick-a-Pic: one picture
    twice) is left out of the agreement, and counted; it is AI-labelled all the same. A missing value counts as two
    pictures; a column of other values than booleans is refused before scoring."""
    images = noise_pngs(np.random.default_rng(3), 12, 16)
    kb = [jpeg_kb(io.BytesIO(image)) for image in images]  # compressibility prefers the smaller JPEG
    assert all(kb[i] != kb[i + 6] for i in range(6))  # no AI ties
    label = [float(kb[i] < kb[i + 6]) for i in range(6)]
    label[4:] = [1 - value for value in label[4:]]  # humans disagree with the AI on the last two pairs only
    table = pl.DataFrame({"caption": [f"c{i}" for i in range(6)], "jpg_0": images[:6], "jpg_1": images[6:],
                          "label_0": label, "are_different": [True, None, True, True, False, False]})
    table.write_parquet(tmp_path / "pap.parquet")
    result = run_cli("label", "--relabel", tmp_path / "pap.parquet", "--scorer", "compressibility")
    assert result.returncode == 0, result.stderr
    assert ("agreement with human labels: 1.000 (4 agree and 0 AI ties counted half, of 4 non-tied pairs; 6 pairs, "
            "0 AI ties, 2 pairs of one picture twice (are_different false) left out)") in result.stdout
    out = pl.read_parquet(tmp_path / "pap.ai-labels.parquet")
    assert out["ai_label_0"].to_list() == [float(kb[i] < kb[i + 6]) for i in range(6)]
    from rlaif.relabel import _agreement

    agreement = _agreement(out, np.array([True, True, True, True, False, False]))
    assert (agreement.compared, agreement.agree, agreement.same_images) == (4, 4, 2)
    table.with_columns(are_different=pl.Series([1, 1, 1, 1, 0, 0])).write_parquet(tmp_path / "ints.parquet")
    ints = run_cli("label", "--relabel", tmp_path / "ints.parquet", "--scorer", "compressibility",
                   env=cli_env(RLAIF_CACHE=str(tmp_path / "cache")))
    assert ints.returncode == 2 and "column 'are_different' holds int64, not booleans" in ints.stderr
    assert not (tmp_path / "cache" / "relabel").exists()


def test_relabel_reads_image_paths_relative_to_the_table_from_any_folder(tmp_path, monkeypatch):
    """Image cells that are paths are relative to the table's folder, as `rlaif train` reads them, not to the
    folder relabel is run from."""
    folder = tmp_path / "rel"
    (folder / "img").mkdir(parents=True)
    images = noise_pngs(np.random.default_rng(4), 4, 8)
    for i, image in enumerate(images):
        (folder / "img" / f"{i}.png").write_bytes(image)
    pl.DataFrame({"caption": ["a", "b"], "jpg_0": ["img/0.png", "img/1.png"], "jpg_1": ["img/2.png", "img/3.png"],
                  "label_0": [1.0, 0.0]}).write_parquet(folder / "t.parquet")
    monkeypatch.chdir(tmp_path)
    result = run_cli("label", "--relabel", "rel/t.parquet", "--scorer", "compressibility")
    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(folder / "t.ai-labels.parquet")
    expected = [-jpeg_kb(folder / "img" / f"{i}.png") for i in range(4)]
    assert out["ai_score_0"].to_list() + out["ai_score_1"].to_list() == pytest.approx(expected)
    # Hugging Face image structs that hold a path and no bytes, read as train reads them
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"caption": ["a", "b"], "label_0": [1.0, 0.0], **{
        column: pa.array([{"bytes": None, "path": f"img/{i}.png"} for i in indices], struct)
        for column, indices in (("jpg_0", (0, 1)), ("jpg_1", (2, 3)))}}), folder / "structs.parquet")
    structs = run_cli("label", "--relabel", "rel/structs.parquet", "--scorer", "compressibility")
    assert structs.returncode == 0, structs.stderr
    out = pl.read_parquet(folder / "structs.ai-labels.parquet")
    assert out["ai_score_0"].to_list() + out["ai_score_1"].to_list() == pytest.approx(expected)
    (folder / "img" / "3.png").unlink()  # found before any scoring, as train finds it, not when its chunk is scored
    gone = run_cli("label", "--relabel", "rel/t.parquet", "--scorer", "compressibility", "-o", "rel/gone.parquet",
                   env=cli_env(RLAIF_CACHE=str(tmp_path / "fresh-cache")))
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1
    assert (f"error: 1 images of table rel/t.parquet do not exist (first: rel/t.parquet row 1 jpg_1 "
            f"({Path('rel') / 'img' / '3.png'}))") in gone.stderr
    assert not (tmp_path / "fresh-cache" / "relabel").exists() and not (folder / "gone.parquet").exists()


def test_shards_widen_only_to_a_type_that_holds_every_value():
    """A review: int64 beside float64, or uint64 beside a signed type, was widened to float64 or int64, whose cast
    then failed on a large value at the write, after every chunk had been scored."""
    from rlaif.relabel import _common_type

    assert _common_type([pa.float32(), pa.float64()]) == pa.float64()
    assert _common_type([pa.int8(), pa.uint8()]) == pa.int64() and _common_type([pa.int64(), pa.uint32()]) == pa.int64()
    assert _common_type([pa.int32(), pa.float32()]) == pa.float64()
    assert _common_type([pa.int64(), pa.uint64()]) is None and _common_type([pa.int64(), pa.float64()]) is None
    assert _common_type([pa.string(), pa.large_string()]) == pa.large_string()
    assert _common_type([pa.binary(), pa.large_binary()]) == pa.large_binary()
    assert _common_type([pa.int32(), pa.string()]) is None


def test_relabel_reads_shards_whose_numbers_differ_in_width_into_one_table_that_loses_nothing(tmp_path):
    """`rlaif train` reads a folder of shards whose label_0 is float32 in one and float64 in another; relabel refused
    it. The output holds each column in a type every shard's values fit (the widest); columns of other names, or of
    types of another kind, are refused as before."""
    images = noise_pngs(np.random.default_rng(5), 8, 8)

    def shard(folder: Path, name: str, rows: slice, **types: pa.DataType) -> None:
        folder.mkdir(exist_ok=True)
        columns = {"caption": [f"c{i}" for i in range(8)][rows], "jpg_0": images[:4][rows],
                   "jpg_1": images[4:][rows], "label_0": [1.0, 0.0, 0.5, 1.0][rows], "ranking": [1, 2, 2**40, 3][rows],
                   "weight": [0.5, 0.25, 0.1, 0.2][rows]}
        table = pa.table({k: pa.array(v, types.get(k)) for k, v in columns.items()})
        pq.write_table(table.replace_schema_metadata({b"huggingface": b"{}", b"note": b"kept"}), folder / name)

    narrow = {"label_0": pa.float32(), "ranking": pa.int32(), "weight": pa.float32(), "caption": pa.string()}
    shard(tmp_path / "mixed", "train-0.parquet", slice(0, 2), **narrow)
    shard(tmp_path / "mixed", "train-1.parquet", slice(2, 4), caption=pa.large_string())
    result = run_cli("label", "--relabel", tmp_path / "mixed", "--scorer", "compressibility",
                     "-o", tmp_path / "mixed.parquet")
    assert result.returncode == 0, result.stderr
    out = pq.read_table(tmp_path / "mixed.parquet")
    assert [out.schema.field(c).type for c in ("caption", "label_0", "ranking", "weight")] == [
        pa.large_string(), pa.float64(), pa.int64(), pa.float64()]
    assert out["ranking"].to_pylist() == [1, 2, 2**40, 3] and out["weight"].to_pylist()[2:] == [0.1, 0.2]
    assert out["label_0"].to_pylist() == [1.0, 0.0, 0.5, 1.0]
    # the first shard's features name its narrower types: datasets would cast the output back to them
    assert b"huggingface" not in out.schema.metadata and out.schema.metadata[b"note"] == b"kept"
    shard(tmp_path / "kinds", "train-0.parquet", slice(0, 2))
    shard(tmp_path / "kinds", "train-1.parquet", slice(2, 4))
    texts = pq.read_table(tmp_path / "kinds" / "train-1.parquet")
    pq.write_table(texts.set_column(texts.schema.get_field_index("ranking"), "ranking", pa.array(["3", "4"])),
                   tmp_path / "kinds" / "train-1.parquet")
    kinds = run_cli("label", "--relabel", tmp_path / "kinds", "--scorer", "compressibility")
    assert kinds.returncode == 2 and f"table {tmp_path / 'kinds' / 'train-1.parquet'}: column 'ranking' holds " \
        f"string where {tmp_path / 'kinds' / 'train-0.parquet'} holds int64" in kinds.stderr
    shard(tmp_path / "names", "train-0.parquet", slice(0, 2))
    shard(tmp_path / "names", "train-1.parquet", slice(2, 4))
    pq.write_table(pq.read_table(tmp_path / "names" / "train-1.parquet").drop_columns(["weight"]),
                   tmp_path / "names" / "train-1.parquet")
    names = run_cli("label", "--relabel", tmp_path / "names", "--scorer", "compressibility")
    assert names.returncode == 2 and "train-1.parquet has other columns than" in names.stderr


def test_relabel_refuses_an_output_folder_it_cannot_write_before_scoring(tmp_path):
    """`-o /proc/ai.parquet` was refused as a disk without room ("about 0.0 GiB, but only 0.0 GiB is free"); a
    folder that is yet to be made is fine."""
    images = noise_pngs(np.random.default_rng(6), 2, 8)
    pl.DataFrame({"caption": ["a"], "jpg_0": images[:1], "jpg_1": images[1:], "label_0": [1.0]}
                 ).write_parquet(tmp_path / "t.parquet")
    args = ("label", "--relabel", tmp_path / "t.parquet", "--scorer", "compressibility")
    result = run_cli(*args, "-o", "/proc/ai.parquet", env=cli_env(RLAIF_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "-o /proc/ai.parquet: cannot write in /proc (" in result.stderr and "give -o a file in a folder you " \
        "can write" in result.stderr
    assert not (tmp_path / "cache" / "relabel").exists()
    assert run_cli(*args, "-o", tmp_path / "new" / "deeper" / "ai.parquet").returncode == 0
    assert pl.read_parquet(tmp_path / "new" / "deeper" / "ai.parquet").height == 1


def test_two_processes_score_the_same_as_one(fresh, tmp_path):
    single = run_cli("label", fresh, "--scorer", "compressibility", "--batch-size", 3)
    assert single.returncode == 0, single.stderr
    expected = pl.read_parquet(fresh / "scores.parquet")
    (fresh / "scores.parquet").unlink()
    (fresh / "pairs.parquet").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(30500 + os.getpid() % 1000), "-m", "rlaif", "label", str(fresh), "--scorer", "compressibility",
         "--batch-size", "3"], env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert pl.read_parquet(fresh / "scores.parquet").equals(expected)
    assert (fresh / "pairs.parquet").is_file()


def scored(count_file: Path) -> int:
    """How many images the counting plugins scored so far."""
    return sum(int(n) for n in count_file.read_text().split()) if count_file.exists() else 0


def channel_means(folder: Path, channel: int) -> dict[str, float]:
    samples = pl.read_parquet(folder / "samples.parquet")
    return {sid: float(np.asarray(Image.open(folder / image).convert("RGB"))[..., channel].mean())
            for sid, image in zip(samples["sample_id"], samples["image"], strict=True)}


def test_cached_scores_are_keyed_by_options_weights_code_and_image_content(fresh, tmp_path, monkeypatch):
    """Each thing that changes a score makes the cache recompute it: a scorer option, the scorer's weights
    (its identity), the plugin's code or the code beside it that it may import, and the image file's bytes.
    Anything else reuses the cache. In this process (ten runs): the plugin is a copy under a name of its own,
    whose code the cache key reads from its file at each run."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    shutil.copy(Path(PLUGINS) / "label_plugins.py", plugins / "cached_scores_plugin.py")
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.delitem(sys.modules, "cached_scores_plugin", raising=False)
    count = tmp_path / "count"
    scorer = "cached_scores_plugin:channel_mean"
    plugin = plugins / "cached_scores_plugin.py"

    def label(channel: int, weights: str = "w1") -> float:
        env = cli_env(RLAIF_TEST_COUNT=str(count), RLAIF_TEST_WEIGHTS=weights)
        (fresh / "pairs.parquet").unlink(missing_ok=True)  # the pairs of other options: labelled anew
        result = run_cli("label", fresh, "--scorer", scorer, "--scorer-option", f"{scorer}.channel={channel}",
                         env=env)
        assert result.returncode == 0, result.stderr
        scores = pl.read_parquet(fresh / "scores.parquet")
        assert scores.height == 16  # one row per sample and scorer: stale rows are replaced, not added
        assert dict(zip(scores["sample_id"], scores["score"], strict=True)) == pytest.approx(
            channel_means(fresh, channel))
        return scored(count)

    assert label(0) == 16
    assert label(0) == 16  # same everything: all 16 cached
    assert label(1) == 32  # another option value: all rescored, with the new option
    assert label(1, weights="w2") == 48  # other weights behind the same name and options
    with open(plugin, "a") as source:
        source.write("\n# a new version of the plugin\n")
    assert label(1, weights="w2") == 64
    image = fresh / pl.read_parquet(fresh / "samples.parquet")["image"][5]
    Image.new("RGB", Image.open(image).size, (10, 200, 30)).save(image)  # rewritten in place
    assert label(1, weights="w2") == 65  # only the rewritten image, now scored from its new pixels
    (plugins / "plugin_helpers.py").write_text("OFFSET = 0\n")  # code the plugin could import, beside it
    assert label(1, weights="w2") == 81
    (plugins / "plugin_helpers.py").write_text("OFFSET = 1\n")  # edited: the plugin's scores may have changed
    assert label(1, weights="w2") == 97
    # a table labelled by an earlier version of its scorer is replaced with a note: the same settings, other labels
    env = cli_env(RLAIF_TEST_COUNT=str(count), RLAIF_TEST_WEIGHTS="w3")
    again = run_cli("label", fresh, "--scorer", scorer, "--scorer-option", f"{scorer}.channel=1", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stderr.splitlines()[-1] == (
        f"note: {fresh / 'pairs.parquet'} was labelled before by another version of {scorer} (its code, options or "
        "weights, or where they are, changed); it now holds the new labels, not those a training run may have read")
    assert scored(count) == 113
    unchanged = run_cli("label", fresh, "--scorer", scorer, "--scorer-option", f"{scorer}.channel=1", env=env)
    assert unchanged.returncode == 0 and "note:" not in unchanged.stderr and scored(count) == 113


def kill_when(args: list, env: dict, ready) -> None:
    """Run ``rlaif ARGS`` and SIGKILL it as soon as ``ready()`` holds (it must not finish first)."""
    process = subprocess.Popen([sys.executable, "-m", "rlaif", *map(str, args)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not ready():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"


def noise_pngs(rng: np.random.Generator, count: int, side: int) -> list[bytes]:
    """``count`` PNG files of random pixels, ``side`` pixels square, as bytes (a Pick-a-Pic table's images)."""
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def test_relabel_killed_part_way_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    """SIGKILL while relabelling a 48-pair table in chunks of 8 pairs: no output is half-written, the saved
    chunks survive, the rerun scores only the chunks that were not saved, and the table it writes (in row groups,
    chunk by chunk) equals that of a run never killed."""
    rng = np.random.default_rng(0)
    images = noise_pngs(rng, 96, 16)
    labels = rng.integers(0, 2, 48).astype(float)
    pl.DataFrame({"caption": [f"c{i}" for i in range(48)], "jpg_0": images[:48], "jpg_1": images[48:],
                  "label_0": labels, "label_1": 1 - labels}).write_parquet(tmp_path / "pap.parquet")
    args = ["label", "--relabel", tmp_path / "pap.parquet", "--scorer", "label_plugins:slow_brightness",
            "--chunk-size", 16, "--batch-size", 4]

    def env(name: str, **extra: str) -> dict:
        return cli_env(PYTHONPATH=PLUGINS, RLAIF_CACHE=str(tmp_path / f"cache-{name}"),
                       RLAIF_TEST_COUNT=str(tmp_path / f"count-{name}"), **extra)

    whole = run_cli(*args, "-o", tmp_path / "whole.parquet", env=env("whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "parts.parquet"
    saved = lambda: list((tmp_path / "cache-parts" / "relabel").rglob("chunk-*.parquet"))  # noqa: E731
    kill_when([*args, "-o", out], env("parts", RLAIF_TEST_DELAY="0.02"), lambda: len(saved()) >= 2)
    assert not out.exists() and not list(tmp_path.glob(".parts*"))
    kept = len(saved())
    assert 2 <= kept < 6
    again = run_cli(*args, "-o", out, env={**env("parts"), "RLAIF_TEST_COUNT": str(tmp_path / "count-again")})
    assert again.returncode == 0, again.stderr
    assert scored(tmp_path / "count-again") == 96 - 16 * kept  # only the chunks not saved before the kill
    assert pl.read_parquet(out).equals(pl.read_parquet(tmp_path / "whole.parquet"))
    assert pq.ParquetFile(out).metadata.num_row_groups == 6
    assert again.stdout.splitlines()[-1] == whole.stdout.splitlines()[-1]  # the same agreement line


def test_relabel_deals_whole_row_groups_to_processes():
    """Each row group goes to one process (largest first, to the one with the fewest rows so far), so processes
    never read a row group twice between them, unless it holds more than a process's share: then its chunks are
    dealt one by one (a table of one row group still keeps every process scoring, a review found); every chunk
    is dealt once, and each share is in table order."""
    from rlaif.relabel import Chunk, process_shares

    sizes = {("a", 0): [4, 4, 4], ("a", 1): [4], ("b", 0): [4, 2], ("b", 1): [4], ("b", 2): [3]}
    wanted, first = [], {"a": 0, "b": 0}  # as `chunks` cuts them: each file's rows numbered on across row groups
    for (file, group), counts in sizes.items():
        for i, count in enumerate(counts):
            wanted.append(Chunk("ab".index(file), file, group, first[file], 4 * i, count))
            first[file] += count
    shares = process_shares(wanted, 2)
    assert [[(c.file, c.group) for c in share] for share in shares] == [
        [("a", 0)] * 3 + [("b", 2)], [("a", 1)] + [("b", 0)] * 2 + [("b", 1)]]  # rows 12 + 3, 4 + 6 + 4
    assert sorted(sum(shares, []), key=wanted.index) == wanted
    assert process_shares(wanted, 1) == [wanted] and process_shares([], 3) == [[], [], []]
    eight = process_shares(wanted, 8)  # a share is 29 / 8 rows: a0 and b0 are dealt chunk by chunk
    assert [[(c.file, c.group, c.offset) for c in share] for share in eight] == [
        [("a", 0, 0)], [("a", 0, 4)], [("a", 0, 8)], [("a", 1, 0)], [("b", 0, 0)], [("b", 1, 0)], [("b", 2, 0)],
        [("b", 0, 4)]]
    one_group = [Chunk(0, "a", 0, 4 * i, 4 * i, 4) for i in range(6)]  # each process a run of it: reads stop early
    assert process_shares(one_group, 3) == [one_group[0:2], one_group[2:4], one_group[4:6]]
    assert process_shares(one_group, 4) == [one_group[0:2], one_group[3:5], one_group[2:3], one_group[5:6]]


def test_two_processes_relabel_their_own_row_groups_and_write_the_same_table(tmp_path):
    """`label --relabel` under torchrun: each process scores (so reads) whole row groups of its own, both images
    of each pair, and the table written equals one process's (Pick-a-Pic: 335 GB read once, not once per GPU).
    Each process has a cache of its own, as on two machines: the scores are saved where the main process is, and
    another process that went on to read them there (it did, to measure agreement) failed."""
    rng = np.random.default_rng(1)
    images = noise_pngs(rng, 80, 8)
    labels = rng.integers(0, 2, 40).astype(float)
    pq.write_table(pa.table({"caption": [f"c{i}" for i in range(40)], "jpg_0": images[:40], "jpg_1": images[40:],
                             "label_0": labels}), tmp_path / "pap.parquet", row_group_size=10)
    args = ["label", "--relabel", tmp_path / "pap.parquet", "--scorer", "label_plugins:recording_brightness",
            "--chunk-size", 10, "--batch-size", 3]  # 5 pairs a chunk: 2 chunks in each of 4 row groups
    env = {"PYTHONPATH": PLUGINS}
    one = run_cli(*args, "-o", tmp_path / "one.parquet",
                  env=cli_env(**env, RLAIF_CACHE=str(tmp_path / "c1"), RLAIF_TEST_COUNT=str(tmp_path / "log1")))
    assert one.returncode == 0, one.stderr
    own_cache = 'RLAIF_CACHE="$RLAIF_CACHE-$RANK" exec "$0" -m rlaif "$@"'  # per rank, as on two machines
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(31500 + os.getpid() % 1000), "--no-python", "bash", "-c", own_cache, sys.executable, *map(str, args),
         "-o", str(tmp_path / "two.parquet")],
        env=cli_env(**env, OMP_NUM_THREADS="1", RLAIF_CACHE=str(tmp_path / "c2"),
                    RLAIF_TEST_COUNT=str(tmp_path / "log2")), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert pl.read_parquet(tmp_path / "two.parquet").equals(pl.read_parquet(tmp_path / "one.parquet"))
    assert two.stdout.splitlines()[-1] == one.stdout.splitlines()[-1]  # the same agreement line
    assert any((tmp_path / "c2-0" / "relabel").rglob("chunk-*")) and not (tmp_path / "c2-1" / "relabel").exists()
    by_rank: dict[str, list[int]] = {}
    for line in (tmp_path / "log2").read_text().splitlines():
        rank, caption = line.split()
        by_rank.setdefault(rank, []).append(int(caption[1:]))
    groups = {rank: sorted({row // 10 for row in rows}) for rank, rows in by_rank.items()}
    assert groups == {"0": [0, 2], "1": [1, 3]}  # whole row groups, two each, none scored twice
    for rank, rows in by_rank.items():
        assert sorted(rows) == sorted(2 * [10 * g + i for g in groups[rank] for i in range(10)])  # both images


def test_label_killed_part_way_keeps_the_chunks_it_scored(fresh, tmp_path):
    """`rlaif label` saves scores chunk by chunk: after a SIGKILL the rerun scores only the missing images and
    writes the same scores as an uninterrupted run."""
    args = ["label", fresh, "--scorer", "label_plugins:slow_brightness", "--chunk-size", 4, "--batch-size", 2]
    env = cli_env(PYTHONPATH=PLUGINS, RLAIF_TEST_COUNT=str(tmp_path / "count"), RLAIF_TEST_DELAY="0.05")
    kill_when(args, env, lambda: len(list((fresh / "scores.parts").glob("part-*.parquet"))) >= 2)
    kept = len(list((fresh / "scores.parts").glob("part-*.parquet")))
    assert kept < 4 and not (fresh / "scores.parquet").exists()
    done = run_cli(*args, env={**env, "RLAIF_TEST_COUNT": str(tmp_path / "count-again")})
    assert done.returncode == 0, done.stderr
    assert scored(tmp_path / "count-again") == 16 - 4 * kept
    assert not (fresh / "scores.parts").exists()
    scores = pl.read_parquet(fresh / "scores.parquet")
    samples = pl.read_parquet(fresh / "samples.parquet")
    brightness = {sid: float(np.asarray(Image.open(fresh / image).convert("L"), dtype=np.float64).mean())
                  for sid, image in zip(samples["sample_id"], samples["image"], strict=True)}
    assert scores.height == 16 and dict(zip(scores["sample_id"], scores["score"], strict=True)) == \
        pytest.approx(brightness)


def test_agreement_counts_an_ai_tie_half_on_pairs_humans_decided():
    """As `rlaif eval --pairs` scores a judge: an AI tie on a pair the humans decided is a coin toss, half right;
    pairs the humans tied are not compared."""
    from rlaif.relabel import _agreement

    labelled = pl.DataFrame({"label_0": [1.0, 0.0, 1.0, 0.5, 0.5], "ai_label_0": [1.0, 1.0, 0.5, 0.5, 1.0]})
    agreement = _agreement(labelled, np.ones(5, dtype=bool))
    assert (agreement.compared, agreement.agree, agreement.ai_ties, agreement.ai_ties_compared) == (3, 1, 2, 1)
    assert agreement.accuracy == (1 + 0.5) / 3 and agreement.same_images == 0


def test_a_plugins_code_hash_does_not_depend_on_where_it_lives(tmp_path, monkeypatch):
    """The same code in two folders gets the same cache key (processes of a multi-node run may hold their
    checkouts at different paths, and must agree on what to score); an editor's broken lock file is skipped."""
    import importlib

    from rlaif.scoring import _code_hash

    keys = []
    for place in ("a", "b"):
        (tmp_path / place).mkdir()
        (tmp_path / place / "plug_where.py").write_text("def f(device='cpu'):\n    return None\n")
        monkeypatch.syspath_prepend(str(tmp_path / place))
        monkeypatch.delitem(sys.modules, "plug_where", raising=False)
        keys.append(_code_hash(importlib.import_module("plug_where")))
    (tmp_path / "b" / ".#plug_where.py").symlink_to(tmp_path / "nowhere")
    monkeypatch.delitem(sys.modules, "plug_where", raising=False)
    assert _code_hash(importlib.import_module("plug_where")) == keys[0] == keys[1]
    (tmp_path / "b" / "plug_where.py").write_text("def f(device='cpu'):\n    return 1\n")
    monkeypatch.delitem(sys.modules, "plug_where", raising=False)
    assert _code_hash(importlib.import_module("plug_where")) != keys[0]


def test_a_regular_installs_code_changed_under_the_same_version_is_another_version(tmp_path, monkeypatch):
    """A plugin's author edits its code and reinstalls it (`pip install .`) without a new version number: its
    cached scores must not be reused. A regular install (a wheel's files and a dist-info with a RECORD) is laid
    out by hand here; its version stays in the key too, for what a release ships beside the code."""
    import importlib

    from rlaif.scoring import plugin_version

    site = tmp_path / "site"
    (site / "plugdist").mkdir(parents=True)
    info = site / "plugdist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugdist\nVersion: 0.1\n")
    (info / "top_level.txt").write_text("plugdist\n")
    (info / "RECORD").write_text("plugdist/__init__.py,,\nplugdist-0.1.dist-info/METADATA,,\n")
    monkeypatch.syspath_prepend(str(site))

    def version_of(code: str) -> str:
        (site / "plugdist" / "__init__.py").write_text(f"def scorer(device='cpu'):\n    return {code}\n")
        monkeypatch.delitem(sys.modules, "plugdist", raising=False)
        module = importlib.import_module("plugdist")
        return plugin_version("plugdist:scorer", module.scorer)

    first = version_of("1")
    assert first.startswith("plugdist==0.1+") and version_of("1") == first
    assert version_of("-1") != first


def test_a_library_upgrade_is_another_scorer_version(monkeypatch):
    """An upgrade of a library a score depends on (open_clip >= 2.29 changed OpenAI CLIP's activation), or of how
    rlaif decodes images, makes the cache score anew: both versions are part of a scorer's key."""
    from rlaif import scoring

    before = scoring.LoadedScorer("compressibility").key
    assert scoring.LoadedScorer("compressibility").key == before
    real = scoring.library_versions
    monkeypatch.setattr(scoring, "library_versions", lambda names: {**real(names), "open-clip-torch": "99.0"})
    assert scoring.LoadedScorer("compressibility").key != before

    monkeypatch.setattr(scoring, "library_versions", real)
    assert scoring.LoadedScorer("compressibility").key == before
    from rlaif import images

    monkeypatch.setattr(images, "DECODE_VERSION", images.DECODE_VERSION + 1)  # images decode to other pixels
    assert scoring.LoadedScorer("compressibility").key != before


def test_a_scorer_checkpoint_is_identified_by_its_content_alone(tmp_path):
    """The built-in scorers' identity (part of their cache key) names their checkpoint's bytes, not its path or
    time: two processes that raced to download the aesthetic head, or nodes with their own cache folders, would
    otherwise key the same scorer apart and disagree on what is left to score."""
    from rlaif.files import content_identity

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = tmp_path / "a" / "head.pth"
    first.write_bytes(bytes(range(256)) * 64)
    copy = tmp_path / "b" / "head.pth"
    shutil.copyfile(first, copy)
    os.utime(copy, (1, 1))
    assert content_identity(first) == content_identity(copy) == content_identity(tmp_path / "a")
    (tmp_path / "a" / ".cache").mkdir()  # `hf download --local-dir`'s metadata is not the weights
    (tmp_path / "a" / ".cache" / "head.pth.metadata").write_text("etag and time of this download")
    assert content_identity(tmp_path / "a") == content_identity(tmp_path / "b")
    copy.write_bytes(bytes(range(256)) * 63 + bytes(256))
    assert content_identity(copy) != content_identity(first)
    assert content_identity("org/name") == "org/name"  # a hub id: its name
