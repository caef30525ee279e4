"""The row groups of a remote table kept on disk for a machine's readers (rlaif.train.block_cache): fetched once
however many processes ask at once, served memory-mapped, bounded, and never served to another table."""

import multiprocessing
from pathlib import Path

import pyarrow as pa
import pytest

from rlaif.train.block_cache import AVAILABLE, BlockCache, table_folder

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="no fcntl (Windows): training reads remote tables uncached")


def row_group(tag: str) -> pa.Table:
    return pa.table({"caption": [tag] * 3, "jpg_0": [tag.encode() * 100] * 3})


def counted_fetch(log: Path, tag: str):
    """A fetch that appends a line to ``log`` each time it is called (the count survives other processes)."""
    def fetch() -> pa.Table:
        with open(log, "a") as out:
            out.write(f"{tag}\n")
        return row_group(tag)
    return fetch


def test_a_row_group_is_fetched_once_then_served_from_disk(tmp_path):
    cache, log = BlockCache(tmp_path / "blocks", keep=4), tmp_path / "fetches"
    first = cache.read("shard-0 group 3", counted_fetch(log, "a"))
    again = cache.read("shard-0 group 3", counted_fetch(log, "a"))
    assert first.equals(row_group("a")) and again.equals(row_group("a"))
    assert log.read_text() == "a\n"
    assert cache.read("shard-0 group 4", counted_fetch(log, "b")).equals(row_group("b"))
    assert log.read_text() == "a\nb\n" and len(list((tmp_path / "blocks").glob("*.arrow"))) == 2


def test_the_oldest_row_groups_beyond_keep_are_removed_and_fetched_again_when_asked(tmp_path):
    cache, log = BlockCache(tmp_path / "blocks", keep=2), tmp_path / "fetches"
    held = cache.read("g0", counted_fetch(log, "0"))
    for tag in "123":
        cache.read(f"g{tag}", counted_fetch(log, tag))
    assert len(list((tmp_path / "blocks").glob("*.arrow"))) == 2
    assert held.equals(row_group("0"))  # a reader's mapped copy outlives its file's removal
    assert cache.read("g0", counted_fetch(log, "0")).equals(row_group("0"))
    assert log.read_text() == "0\n1\n2\n3\n0\n"


def _reader(folder: str, log: str, barrier) -> None:
    barrier.wait()
    table = BlockCache(Path(folder), keep=8).read("the same row group", counted_fetch(Path(log), "x"))
    assert table.equals(row_group("x"))


def test_processes_asking_at_once_fetch_it_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    readers = [context.Process(target=_reader, args=(str(tmp_path / "blocks"), str(tmp_path / "fetches"), barrier))
               for _ in range(4)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    assert [reader.exitcode for reader in readers] == [0] * 4
    assert (tmp_path / "fetches").read_text() == "x\n"


def test_a_table_changed_upstream_is_another_folder(tmp_path):
    old = table_folder(tmp_path, "hf://datasets/o/n@1111/data/train-0.parquet")
    new = table_folder(tmp_path, "hf://datasets/o/n@2222/data/train-0.parquet")
    assert old != new and old.parent == new.parent == tmp_path
    BlockCache(old, keep=2).read("g", lambda: row_group("old"))
    assert BlockCache(new, keep=2).read("g", lambda: row_group("new")).equals(row_group("new"))


def test_a_file_cut_short_is_fetched_again_and_clear_leaves_the_folder(tmp_path):
    """Nothing is synced to disk: after a power loss a row group's file may be empty. It was then unreadable for
    good (every later read, a resume's too, raised ArrowInvalid); now it is fetched again."""
    cache, log = BlockCache(tmp_path / "blocks", keep=4), tmp_path / "fetches"
    cache.read("g", counted_fetch(log, "a"))
    (written,) = (tmp_path / "blocks").glob("*.arrow")
    written.write_bytes(b"")
    assert cache.read("g", counted_fetch(log, "a")).equals(row_group("a"))
    assert log.read_text() == "a\na\n"
    cache.clear()  # another run on the same table may still read through the folder: it stays
    assert (tmp_path / "blocks").is_dir() and not any((tmp_path / "blocks").iterdir())
    assert cache.read("g", counted_fetch(log, "a")).equals(row_group("a"))
