"""`rlaif train --streaming ORG/NAME` against a Hugging Face Hub on localhost (tests/local_hub.py), through the
unchanged huggingface_hub client: the table is read in place at one commit, only what training needs is fetched,
a resume after the dataset moved on is refused, and a missing dataset is a one-line error."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli_env, run_cli
from local_hub import LocalHub
from PIL import Image

FIRST, SECOND = "1" * 40, "2" * 40  # commits of the dataset
ROWS, ROW_GROUP = 240, 10


def noise_png(rng: np.random.Generator) -> bytes:
    """A 64 x 64 PNG of noise: ~12 kB that do not compress, so image columns dwarf the rest, as in Pick-a-Pic."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def pick_a_pic_commit(folder, rows: int, seed: int) -> None:
    """Pick-a-Pic v2's layout: data/train-*-of-*.parquet shards of several row groups, beside a validation split."""
    rng = np.random.default_rng(seed)
    labels = [(1.0, 0.0, 0.5)[i % 3] for i in range(rows)]
    table = pa.table({"caption": [f"a photo of thing {i % 40}" for i in range(rows)],
                      "jpg_0": [noise_png(rng) for _ in range(rows)], "jpg_1": [noise_png(rng) for _ in range(rows)],
                      "label_0": labels, "label_1": [1 - v for v in labels]})
    (folder / "data").mkdir(parents=True)
    half = rows // 2
    pq.write_table(table.slice(0, half), folder / "data" / "train-00000-of-00002.parquet", row_group_size=ROW_GROUP)
    pq.write_table(table.slice(half), folder / "data" / "train-00001-of-00002.parquet", row_group_size=ROW_GROUP)
    pq.write_table(table.slice(0, 10), folder / "data" / "validation-00000-of-00001.parquet")


def byte_ranges(file) -> list[tuple[int, int]]:
    """What a reader of ``file`` may ask for in one read: (a part of) one row group, whose column chunks pyarrow
    may fetch together, or the footer (the last 64 kB, as pyarrow reads it first)."""
    meta = pq.ParquetFile(file).metadata
    ranges = []
    for group in range(meta.num_row_groups):
        chunks = [meta.row_group(group).column(column) for column in range(meta.num_columns)]
        starts = [chunk.dictionary_page_offset or chunk.data_page_offset for chunk in chunks]
        ranges.append((min(starts), max(s + c.total_compressed_size for s, c in zip(starts, chunks, strict=True))))
    size = file.stat().st_size
    return [*ranges, (max(0, size - 65536), size)]


def images_fetched(hub: LocalHub, commit) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
    """(image bytes the hub served per (shard, row group), each row group's byte span), for the train shards of the
    commit folder ``commit``: the reads of more than 10 kB within a row group (footers and label columns excluded)."""
    spans = {shard.relative_to(commit).as_posix(): byte_ranges(shard)[:-1]  # row groups, no footer
             for shard in sorted((commit / "data").glob("train-*.parquet"))}
    fetched: dict[tuple[str, int], int] = {}
    for read in hub.reads:
        for group, (start, end) in enumerate(spans[read.path]):
            if start <= read.start and read.end <= end and read.end - read.start > 10_000:  # images
                fetched[read.path, group] = fetched.get((read.path, group), 0) + read.end - read.start
    return fetched, {(path, group): end - start for path, groups in spans.items()
                     for group, (start, end) in enumerate(groups)}


@pytest.fixture
def hub(tmp_path):
    with LocalHub() as server:
        pick_a_pic_commit(tmp_path / "first", ROWS, seed=0)
        server.commit("someone/pairs", FIRST, tmp_path / "first")
        yield server


def test_streaming_reads_in_place_at_one_commit_and_fetches_only_what_it_trains_on(hub, tmp_path):
    env = cli_env(HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.endpoint)
    out = tmp_path / "run"
    args = ("train", "someone/pairs", "--streaming", "--out", out, "--model", "tiny", "--batch-size", 2,
            "--max-steps", 2, "--checkpoint-every", 1, "--val-fraction", 0)
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "train.json").read_text())["pinned_pairs"] == f"someone/pairs@{FIRST}"

    shards = sorted((tmp_path / "first" / "data").glob("train-*.parquet"))
    allowed = {shard.relative_to(tmp_path / "first").as_posix(): byte_ranges(shard) for shard in shards}
    assert hub.reads and {read.path for read in hub.reads} <= set(allowed)  # never the validation split
    assert {read.commit for read in hub.reads} == {FIRST}
    groups_read = set()
    for read in hub.reads:  # each read is within a row group or the footer: no read-ahead into other row groups
        inside = [i for i, (start, end) in enumerate(allowed[read.path]) if start <= read.start and read.end <= end]
        assert inside, read
        if read.end - read.start > 10_000 and inside[0] < len(allowed[read.path]) - 1:  # images (no footer)
            groups_read.add((read.path, inside[0]))
    assert 1 <= len(groups_read) <= 4  # 2 steps of 2 pairs: the images of at most 4 row groups
    assert hub.bytes_read() < 0.3 * sum(shard.stat().st_size for shard in shards)

    pick_a_pic_commit(tmp_path / "second", ROWS - 30, seed=1)
    hub.commit("someone/pairs", SECOND, tmp_path / "second")  # main moves on
    resumed = run_cli(*args, "--resume", "latest", "--overwrite", env=env)
    assert resumed.returncode == 2
    assert "that run was made with other settings (pairs_file" in resumed.stderr and SECOND in resumed.stderr
    assert resumed.stderr.count("\n") == 1


def test_workers_fetch_each_row_group_once_and_leave_no_copy_behind(hub, tmp_path):
    """Every micro-batch draws from all the row groups of its shuffle window, so each DataLoader worker (and each
    process) used to fetch every row group it met: here 2 workers fetched the images of the row groups both met
    twice. Kept on disk for the machine's readers, each row group is fetched once, and removed after training."""
    cache = tmp_path / "cache"
    result = run_cli("train", "someone/pairs", "--streaming", "--out", tmp_path / "run", "--model", "tiny",
                     "--batch-size", 2, "--max-steps", 8, "--workers", 2, "--val-fraction", 0,
                     env=cli_env(HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.endpoint, RLAIF_CACHE=str(cache)))
    assert result.returncode == 0, result.stderr
    fetched, span = images_fetched(hub, tmp_path / "first")
    assert len(fetched) >= 8  # 32 pairs drawn from most of the table's 24 row groups
    over = {group: size for group, size in fetched.items() if size > span[group]}
    assert not over, over  # no row group's images fetched more than once
    assert not any((cache / "train" / "blocks").rglob("*.arrow"))


def test_held_out_measurements_fetch_their_row_groups_once_a_run(hub, tmp_path):
    """Held-out pairs are measured every --val-every steps; each pass fetched their row groups again (with P
    processes, P times). Kept apart from the training window's, they are fetched once a run: a row group holding
    both held-out and trained pairs at most twice, once for each."""
    cache = tmp_path / "cache"
    result = run_cli("train", "someone/pairs", "--streaming", "--out", tmp_path / "run", "--model", "tiny",
                     "--batch-size", 2, "--max-steps", 4, "--val-fraction", 0.25, "--val-every", 1,
                     env=cli_env(HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.endpoint, RLAIF_CACHE=str(cache)))
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "val_implicit_acc" in row] == [1, 2, 3, 4]  # four held-out passes
    fetched, span = images_fetched(hub, tmp_path / "first")
    assert len(fetched) >= 8
    assert not {group: size for group, size in fetched.items() if size > 2 * span[group]}
    assert not any(cache.rglob("*.arrow"))


@pytest.mark.parametrize(("source", "message"), [
    ("someone/nothing", "pairs someone/nothing: no such dataset on the hub, or it is private or gated"),
    ("someone/pairs@v9", "pairs someone/pairs@v9: the hub dataset has no such revision"),
])
def test_a_missing_hub_dataset_or_revision_is_one_line(hub, tmp_path, source, message):
    result = run_cli("train", source, "--streaming", "--out", tmp_path / "run", "--model", "tiny",
                     env=cli_env(HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.endpoint))
    assert result.returncode == 2 and f"error: {message}" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
