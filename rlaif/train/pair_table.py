"""Preference pairs read lazily from a table of any size: an rlaif pairs table or a Pick-a-Pic v2 style one, as
one parquet file, a folder of parquet shards, a ``datasets.save_to_disk`` folder, a hub dataset id (its parquet
shards, downloaded; or read in place with ``streaming``) or an fsspec URL of parquet shards.

Only an index is held in memory (per pair: its block, its row, which image won); rows are read a block at a
time when a pair is asked for. A block is a parquet row group, or the whole of a memory-mapped Arrow dataset.
The training order (``pair_index``) shuffles blocks and then pairs within windows of a few blocks, so a reader
keeps only a window's blocks and never makes a pass over the table before the first step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlaif.config import hub_dataset_id, missing_pairs
from rlaif.errors import RlaifError, first_line
from rlaif.files import file_identity, loaded_files_identity
from rlaif.images import ImageSource
from rlaif.seeding import keyed_seed
from rlaif.tables import SAMPLES_SCHEMA, SAMPLING_METADATA, SCORES_SCHEMA
from rlaif.train.block_cache import BlockCache, table_folder

RLAIF_COLUMNS = ("caption", "image_0", "image_1")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1")
AI_LABEL = "ai_label_0"  # written by `rlaif label --relabel` beside the human label_0
DIFFERENT_COLUMN = "are_different"  # Pick-a-Pic's: false when both images are the same picture
MIN_HELD_OUT_CAPTIONS = 20  # fewer distinct captions: nothing is held out (too few to measure anything)
SPREAD_RUNS = 16  # stretches a measured sample of a table is drawn in (``PairTable.spread``)
SHUFFLE_WINDOW = 2048  # pairs shuffled together: blocks are added to a window until it holds at least this many


@dataclass(frozen=True)
class PreferencePair:
    """One training pair: the caption, the preferred image and the other one, and where each came from (for
    errors naming the table, row and column of an image that cannot be read)."""

    caption: str
    chosen: ImageSource
    rejected: ImageSource
    chosen_name: str = ""
    rejected_name: str = ""


def label_column(columns: Sequence[str], chosen: str | None) -> str:
    """The column holding the preference: ``chosen`` if given, else the AI labels of a relabelled table
    (``ai_label_0``), else ``label_0``."""
    if chosen == "label_1":  # Pick-a-Pic's 1 - label_0: read as 1 = image 0 wins, every preference reversed
        raise RlaifError("--label-column label_1 is Pick-a-Pic's 'image 1 wins' column, and a label column here says "
                         "1 when image 0 wins; use label_0")
    if chosen is not None:
        return chosen
    return AI_LABEL if AI_LABEL in columns else "label_0"


RELABELLED_SUFFIX = ".ai-labels.parquet"  # `rlaif label --relabel TABLE`'s default output: TABLE.ai-labels.parquet
_SPLIT = re.compile(r"^(train|validation|valid|val|test|eval|dev)(?:[-_.][^/]*)?$")  # train-00000-of-00002.parquet


def parquet_shards(files: list[str], root: str, where: str) -> list[str]:
    """The shards to train on among the parquet ``files`` under the folder ``root``: when it holds several splits,
    named like Pick-a-Pic v2's ``data/train-*.parquet`` / ``data/validation-*.parquet`` or in folders
    (``train/*.parquet``), the train split's. Only the path inside ``root`` counts, so a folder that lies under a
    ``train`` directory of the user's does not make every split a train split. Splits without a train split are
    refused rather than mixed."""
    if not files:
        raise RlaifError(f"{where} holds no parquet files")
    relabelled = [f for f in files if f.endswith(RELABELLED_SUFFIX)]
    if relabelled and len(relabelled) < len(files):  # `label --relabel SHARD` writes beside the shard by default
        raise RlaifError(f"{where} holds the output of `rlaif label --relabel` ({relabelled[0]}) beside its shards: "
                         "it would be read as one more shard, its pairs twice; move it out of the folder, or give "
                         "that file alone")
    prefix = root.rstrip("/") + "/"

    def split_of(file: str) -> str | None:
        *folders, name = (file[len(prefix):] if file.startswith(prefix) else file.rsplit("/", 1)[-1]).split("/")
        found = [match[1] for part in (*folders, name) if (match := _SPLIT.match(part))]
        return "train" if "train" in found else found[0] if found else None

    splits = {file: split_of(file) for file in files}
    train = [f for f in files if splits[f] == "train"]
    named = sorted(set(splits.values()) - {None})
    if not train and len(named) > 1:
        raise RlaifError(f"{where} holds the splits {', '.join(named)} and no train split; give one split's folder "
                         "or file")
    return train or files


def parquet_files(path: Path) -> list[str]:
    """The parquet files of a local table: the file itself, or a folder's shards (``parquet_shards``)."""
    if path.is_dir():
        if (path / "samples.parquet").is_file():  # a folder of `rlaif sample`: its tables are not shards of one
            labelled = (path / "pairs.parquet").is_file()
            raise RlaifError(f"pairs table {path} is a folder of `rlaif sample`; train on the pairs table `rlaif "
                             f"label` writes into it: {path / 'pairs.parquet'}"
                             + ("" if labelled else f" (run `rlaif label {path} --scorer NAME` first)"))
        return parquet_shards(sorted(map(str, path.rglob("*.parquet"))), str(path), str(path))
    return [str(path)]


def is_datasets_folder(path: Path) -> bool:
    """Whether ``path`` is a folder ``datasets.save_to_disk`` wrote (a Dataset's or a DatasetDict's)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def table_changed(source: str, recorded: str | None) -> bool:
    """Whether the local pairs table ``source`` is no longer the one whose identity train.json recorded
    (``recorded``, its ``pairs_file``): gone, rewritten, shards added or removed, or no longer a table. False when
    nothing was recorded (an older rlaif) and for a ``datasets.save_to_disk`` folder (known by its fingerprint,
    not its files)."""
    path = Path(source)
    if recorded is None or is_datasets_folder(path):
        return False
    try:
        return local_identity(parquet_files(path) if path.exists() else []) != recorded
    except RlaifError:
        return True


def local_identity(files: list[str]) -> str:
    """The identity of a local table's parquet files (``file_identity`` of each): a table rewritten in place, or
    with shards added or removed, is another table."""
    return ";".join(map(file_identity, files))


def recorded_sampling(files: list[str]) -> list[dict]:
    """The generation settings `rlaif label` recorded in local parquet files (run.json's of the samples it
    paired), one per file that holds them: none for tables it did not write."""
    recorded = [(open_parquet(file).metadata.metadata or {}).get(SAMPLING_METADATA.encode()) for file in files]
    return [json.loads(value) for value in recorded if value]


def sampled_by(samplings: list[dict], model: str, identity: Callable[[], str | None]) -> list[dict]:
    """The records among ``samplings`` (``recorded_sampling``) of pictures ``model`` drew: named alike, or drawn
    by its weights (``identity()``, asked only when a record names another model: a local copy of a hub model)."""
    weights = identity() if any(s.get("model") != model for s in samplings) else None
    return [s for s in samplings if s.get("model") == model
            or weights is not None and loaded_files_identity(s.get("model_weights") or "") == weights]


def hub_revision(source: str) -> tuple[str, str | None]:
    """(ORG/NAME, REVISION or None) of a hub dataset id, pinned as ``ORG/NAME@REVISION`` or not."""
    repo_id, _, revision = source.partition("@")
    return repo_id, revision or None


def hub_snapshot(source: str) -> Path:
    """The local snapshot (``.../snapshots/COMMIT``) of hub dataset ``source``'s parquet files, at its pinned
    revision or the newest: downloaded once into the Hugging Face cache; offline, the cached one. Read as
    shards, lazily: no Arrow copy of the table is made."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    repo_id, revision = hub_revision(source)
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                      allow_patterns=["*.parquet", "**/*.parquet"]))
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError) as exc:
        raise hub_fault(source, exc) from exc


def hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit that ``revision`` (a commit, tag or branch; None: main) of a hub dataset is at now."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return HfApi().dataset_info(repo_id, revision=revision).sha
    except (HfHubHTTPError, HFValidationError, OSError) as exc:
        raise hub_fault(f"{repo_id}@{revision}" if revision else repo_id, exc) from exc


def hub_fault(source: str, exc: Exception) -> RlaifError:
    """The one-line error for a hub dataset that cannot be had: what is missing, and what to do about it."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return RlaifError(f"pairs {source}: the hub dataset has no such revision (a commit, tag or branch)")
    if isinstance(exc, RepositoryNotFoundError):
        return RlaifError(f"pairs {source}: no such dataset on the hub, or it is private or gated (log in with "
                          "`hf auth login`, and accept a gated dataset's terms on its page)")
    return RlaifError(f"pairs {source}: cannot get the hub dataset ({first_line(exc)})")


def remote_shards(source: str) -> dict[str, str]:
    """The parquet shards under an fsspec URL (``hf://datasets/ORG/NAME``, ``s3://...``; a hub id when streaming),
    read in place: only the label column and the row groups trained on are fetched. Each with its
    ``remote_stamp``."""
    import fsspec

    url = source if "://" in source else f"hf://datasets/{source}"
    try:
        fs, root = fsspec.core.url_to_fs(url)
        found = {root: fs.info(root)} if fs.isfile(root) else fs.find(root, detail=True)
    except _read_faults(url) as exc:  # a missing backend too: its ImportError says what to install
        raise RlaifError(f"pairs {source}: cannot list it ({first_line(exc)})") from exc
    files = sorted(f for f in found if f.endswith(".parquet"))
    return {fs.unstrip_protocol(f): remote_stamp(found[f]) for f in parquet_shards(files, root, source)}


def remote_stamp(info: dict) -> str:
    """What tells a remote file's content from the listing's entry for it: its size and the store's version of
    it (the hub's blob id or LFS hash, an object store's version or generation, else its ETag or modification
    time), so that a shard rewritten under its name is another table. The identity holds it as ``URL#STAMP``."""
    lfs = info.get("lfs") if isinstance(info.get("lfs"), dict) else {}
    version = next((str(info[key]) for key in ("blob_id", "VersionId", "generation", "ETag", "etag", "md5Hash",
                                               "LastModified", "last_modified", "mtime", "created") if info.get(key)),
                   "")
    return f"{info.get('size')}:{lfs.get('sha256') or version}"


_OPENED: OrderedDict[tuple, pq.ParquetFile] = OrderedDict()  # most recently used last
MAX_OPEN_FILES = 64  # per process: Pick-a-Pic v2's 645 shards, each kept open, pass a common limit of 1024 files


def open_parquet(file: str) -> pq.ParquetFile:
    """A parquet file, local or at an fsspec URL, opened once per process (its footer read once) while among
    the MAX_OPEN_FILES used last, without pre-buffering (which would read, and keep, whole files); an unreadable
    file is a one-line error."""
    stat = os.stat(file) if "://" not in file else None
    key = (os.getpid(), file, stat and (stat.st_size, stat.st_mtime_ns))  # per worker; a rewritten file anew
    if key in _OPENED:
        _OPENED.move_to_end(key)
    else:
        while len(_OPENED) >= MAX_OPEN_FILES:  # a forked worker's first: the parent's, whose copies it never reads
            _OPENED.popitem(last=False)[1].close(force=True)
        try:
            if "://" in file:
                import fsspec

                fs, path = fsspec.core.url_to_fs(file)
                # No read-ahead: pyarrow asks for the footer and for exactly the column chunks it reads (a row
                # group's labels are a few hundred bytes), where fsspec's default cache fetches 5 MB with each.
                _OPENED[key] = pq.ParquetFile(fs.open(path, "rb", cache_type="none"))
            else:
                _OPENED[key] = pq.ParquetFile(file, pre_buffer=False)
        except _read_faults(file) as exc:
            raise RlaifError(f"table {file} is not a readable Parquet file: {first_line(exc)}") from exc
    return _OPENED[key]


def read_row_group(file: str, group: int, columns: list[str]) -> pa.Table:
    """``columns`` of row group ``group`` of a parquet file; a read that fails is a one-line error naming it."""
    parquet = open_parquet(file)
    try:
        return parquet.read_row_group(group, columns=columns)
    except _read_faults(file) as exc:
        raise RlaifError(f"table {file}: cannot read row group {group} ({first_line(exc)})") from exc


def _read_faults(file: str) -> tuple[type[Exception], ...]:
    """What reading ``file`` raises when the file or the way to it is at fault. A remote file's backend raises
    its own types (httpx, botocore, ...) for a network fault: any error."""
    return (Exception,) if "://" in file else (pa.ArrowException, OSError)


def _image_columns(columns: Sequence[str], where: str) -> tuple[str, str]:
    """Which pair of image columns the table has: rlaif's or Pick-a-Pic's, never both (which would be a guess)."""
    if all(c in columns for c in RLAIF_COLUMNS):
        if any(c in columns for c in PICKAPIC_COLUMNS[1:]):
            raise RlaifError(f"pairs table {where} has both rlaif's image columns (image_0, image_1) and Pick-a-Pic's "
                             "(jpg_0, jpg_1); keep the pair its labels are about")
        return "image_0", "image_1"
    if all(c in columns for c in PICKAPIC_COLUMNS):
        return "jpg_0", "jpg_1"
    raise RlaifError(f"pairs table {where} has neither the rlaif columns ({', '.join(RLAIF_COLUMNS)}) nor the "
                     f"Pick-a-Pic ones ({', '.join(PICKAPIC_COLUMNS)}); columns: {', '.join(columns)}"
                     f"{_another_rlaif_table(columns)}")


def _another_rlaif_table(columns: Sequence[str]) -> str:
    """What to train on instead, when ``columns`` are those of another table rlaif writes (a new user's trial
    gave `rlaif train` samples.parquet)."""
    for name, command, schema in (("samples", "sample", SAMPLES_SCHEMA), ("scores", "label", SCORES_SCHEMA)):
        if set(schema) <= set(columns):
            return (f"; it is the {name} table of `rlaif {command}`: train on the pairs.parquet that `rlaif label` "
                    "writes beside it")
    return ""


def checked_labels(values: pa.ChunkedArray | pa.Array, where: str, label: str, first_row: int,
                   missing_ok: bool = False) -> np.ndarray:
    """A label column as float64, every value checked to be 1, 0 or 0.5 (``missing_ok``: or missing)."""
    try:
        array = np.asarray(values.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise RlaifError(f"pairs table {where}: column {label!r} is not numeric ({values.type})") from exc
    bad = np.flatnonzero(~np.isin(array, (0.0, 0.5, 1.0)) & ~(missing_ok & np.isnan(array)))
    if bad.size:
        value = "missing" if np.isnan(array[bad[0]]) else array[bad[0]]
        raise RlaifError(f"pairs table {where}, row {first_row + int(bad[0])}: {label} is {value}, expected "
                         "1, 0 or 0.5")
    return array


@dataclass(frozen=True)
class _Block:
    """Where a block's rows are: a parquet file's row group, or a whole Arrow dataset (group -1)."""

    file: str
    group: int
    first_row: int  # of the block within its file, for error messages


class PairTable(Sequence[PreferencePair]):
    """The pairs with a preference of a table (ties, unlabelled pairs and pairs of one picture twice dropped), winner
    first, read lazily.
    Picklable (DataLoader workers re-open files on first use) and safe to read from several processes at once."""

    def __init__(self, source: str | Path, label: str | None = None, streaming: bool = False,
                 hold_out: float = 0.0, share_blocks: Path | None = None) -> None:
        """``share_blocks``: a folder where a remote table's row groups are kept while they are trained on, for
        every reader of the machine to share (``rlaif.train.block_cache``); a local table is shared by the page
        cache already."""
        self.source = str(source)
        self.hold_out = hold_out
        self._share_root = share_blocks
        self._shared: BlockCache | None = None
        self._largest_block = 0  # bytes of the largest row group, uncompressed (0: not known)
        self.columns: list[str] = []
        self.label: str | None = None  # both set from the first file's columns (_check_columns)
        path = Path(source)
        if streaming and not hub_dataset_id(self.source):
            raise RlaifError(f"--streaming reads a hub dataset id in place; {source} is not one (a local table is "
                             "read lazily anyway; give an fsspec URL for other remote tables)")
        self.pinned: str | None = None  # for a hub dataset id: ORG/NAME@REVISION, the version read
        if streaming:  # read in place at one commit throughout: a resume after the dataset changed is refused
            repo_id, revision = hub_revision(self.source)
            self.pinned = f"{repo_id}@{hub_commit(repo_id, revision)}"  # a tag or branch too: its commit now
            self._init_parquet(remote_shards(self.pinned), remote=True)
        elif "://" in self.source:
            self._init_parquet(remote_shards(self.source), remote=True)
        elif is_datasets_folder(path):
            self._init_arrow(str(path), label)
            return
        elif path.exists():
            self._init_parquet(parquet_files(path))
        elif hub_dataset_id(self.source):
            snapshot = hub_snapshot(self.source)
            self.pinned = f"{hub_revision(self.source)[0]}@{snapshot.name}"
            self._init_parquet(parquet_shards(sorted(map(str, snapshot.rglob("*.parquet"))), str(snapshot),
                                              self.source))
        else:
            raise RlaifError(missing_pairs(str(source)))
        self._index(label)

    @cached_property
    def sampling(self) -> list[dict]:
        """The generation settings `rlaif label` recorded of the samples it paired (run.json's), one per file
        that holds them: none for tables it did not write (Pick-a-Pic, a datasets folder, a remote table)."""
        return [] if getattr(self, "remote", True) else recorded_sampling(self.files)

    # -- building the index ------------------------------------------------------------------------------------

    def _init_parquet(self, files: list[str] | dict[str, str], remote: bool = False) -> None:
        """Read ``files``: local paths, or remote URLs each with its ``remote_stamp`` (not needed in the identity
        of a hub dataset pinned to a commit, whose URLs name it)."""
        self.files = list(files)
        self.remote = remote
        self._file_identities = {} if remote else {file: file_identity(file) for file in files}
        if not remote:
            self.identity = ";".join(self._file_identities.values())
        else:
            self.identity = ";".join(files if self.pinned else (f"{file}#{files[file]}" for file in files))

    def _init_arrow(self, source: str, label: str | None) -> None:
        self.files, self._file_identities = [source], {}
        dataset = self._dataset
        self.identity = f"{source}@{dataset._fingerprint}"
        table = dataset.data.table
        self._check_columns(table.schema, source, label)
        check_captions(table.column("caption"), source, 0)
        labels = checked_labels(table.column(self.label), source, self.label, 0, missing_ok=True)
        self.blocks = [_Block(source, -1, 0)]
        self._set_index([labels], [caption_hashes(table.column("caption"))], [different_images(table, source)])

    @cached_property
    def _dataset(self):
        """The memory-mapped ``datasets.Dataset`` of a save_to_disk folder (a DatasetDict's train split)."""
        import datasets

        try:
            loaded = datasets.load_from_disk(self.source)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; the cause goes into the line
            raise RlaifError(f"pairs {self.source}: cannot load it with datasets ({first_line(exc)})") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise RlaifError(f"pairs {self.source} has no train split (splits: {', '.join(loaded)})")
            loaded = loaded["train"]
        return loaded

    def _check_columns(self, schema: pa.Schema, where: str, label: str | None) -> None:
        """Check a file's columns (image columns of either format, a caption column of text, the label column);
        the first file's decide the table's image columns and label column."""
        columns = schema.names
        image_columns = _image_columns(columns, where)
        check_caption_type(schema, where)
        if self.label is None:
            self.columns, self.label = image_columns, label_column(columns, label)
        if self.label not in columns:
            raise RlaifError(f"pairs table {where} has no column {self.label!r} (--label-column); columns: "
                             f"{', '.join(columns)}")

    def _index(self, label: str | None) -> None:
        blocks, labels, hashes, different, missing = [], [], [], [], []
        for file in self.files:
            meta = open_parquet(file)
            self._check_columns(meta.schema_arrow, file, label)
            caption_column = meta.schema_arrow.get_field_index("caption")
            # image paths (rlaif's tables) are checked now: a missing file met hours into a run could not be
            # mended there, as a resume refuses a table changed since
            paths = [] if self.remote else [c for c in self.columns if is_text(meta.schema_arrow.field(c).type)]
            first = 0
            for group in range(meta.metadata.num_row_groups):
                stats = meta.metadata.row_group(group).column(caption_column).statistics
                nulls = stats is None or not stats.has_null_count or stats.null_count > 0
                # captions are read to hold some out, or to find a null one the row group's statistics count
                captions = ["caption"] if self.hold_out or nulls else []
                same = [DIFFERENT_COLUMN] if DIFFERENT_COLUMN in meta.schema_arrow.names else []
                values = read_row_group(file, group, [self.label, *captions, *paths, *same])
                if captions:
                    check_captions(values.column("caption"), file, first)
                labels.append(checked_labels(values.column(0), file, self.label, first, missing_ok=True))
                hashes.append(caption_hashes(values.column("caption")) if self.hold_out else None)
                different.append(different_images(values, file))
                if paths:
                    missing += missing_images(values, paths, np.isin(labels[-1], (0.0, 1.0)), file, first)
                blocks.append(_Block(file, group, first))
                self._largest_block = max(self._largest_block, meta.metadata.row_group(group).total_byte_size)
                first += len(values)
        if missing:
            raise RlaifError(f"{len(missing)} images of pairs table {self.source} do not exist (first: {missing[0]}); "
                             "restore them, or remove their rows, before training")
        self.blocks = blocks
        self._set_index(labels, hashes, different)

    def _set_index(self, labels: list[np.ndarray], hashes: list[np.ndarray | None],
                   different: list[np.ndarray]) -> None:
        """Index the rows with a preference between ``different`` images, less those of held-out captions (a
        ``hold_out`` share of the distinct captions, when there are at least MIN_HELD_OUT_CAPTIONS), which
        ``held_out_pairs`` gives."""
        # dropped: a tie teaches no preference, nor does a pair nobody labelled (a relabelled table's label_0), nor
        # a choice between a picture and itself (its DPO term is 0, and it would count against implicit accuracy)
        # distinct captions of the whole table where its captions were read (None: at most one per pair), told apart
        # as held-out captions are (``caption_key``): retyped variants count once
        self.distinct_captions = None if not hashes or hashes[0] is None else len(np.unique(np.concatenate(hashes)))
        self.ties = int(sum((values == 0.5).sum() for values in labels))
        self.unlabelled = int(sum(np.isnan(values).sum() for values in labels))
        preferred = [(values == 0.0) | (values == 1.0) for values in labels]
        self.same_images = int(sum((p & ~d).sum() for p, d in zip(preferred, different, strict=True)))
        valid = [p & d for p, d in zip(preferred, different, strict=True)]
        held = [np.zeros_like(v) for v in valid]
        if self.hold_out and self.distinct_captions >= MIN_HELD_OUT_CAPTIONS:
            held = [held_out_hashes(h, self.hold_out) for h in hashes]
        chosen_first = [values == 1.0 for values in labels]
        self._held = [v & h for v, h in zip(valid, held, strict=True)], chosen_first
        self._assign([v & ~h for v, h in zip(valid, held, strict=True)], chosen_first)
        if self._share_root is not None and getattr(self, "remote", False):  # two windows in flight, and a margin
            self._shared = BlockCache(table_folder(self._share_root, self.identity), keep=2 * self._cache_size + 2)
        if not len(self):
            twice = f", of one picture twice ({DIFFERENT_COLUMN} false)" if self.same_images else ""
            raise RlaifError(f"pairs table {self.source} holds no pairs with a preference in {self.label} (all ties, "
                             f"unlabelled{twice} or empty)")

    def _assign(self, kept: list[np.ndarray], chosen_first: list[np.ndarray], cache_blocks: int | None = None) -> None:
        """Make the rows ``kept`` (a mask per block) the table's pairs."""
        rows = [np.flatnonzero(k) for k in kept]
        self.block_sizes = np.array([len(r) for r in rows], dtype=np.int64)
        self._block_of = np.repeat(np.arange(len(rows), dtype=np.int32), self.block_sizes)
        self._row_of = np.concatenate(rows).astype(np.int64)
        self._chosen_first = np.concatenate([c[r] for c, r in zip(chosen_first, rows, strict=True)])
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._cache_size = cache_blocks or window_blocks(self.block_sizes)
        self._sizes_key = tuple(int(size) for size in self.block_sizes)

    def held_out_pairs(self) -> PairTable:
        """The pairs of the held-out captions (empty without ``hold_out``), to be read in table order: each row
        group once per pass, one kept at a time."""
        part = copy.copy(self)
        part._assign(*self._held, cache_blocks=1)
        part._shared = None  # read again and again, its row groups would push the training window's out (kept_whole)
        return part

    @property
    def shared_blocks(self) -> BlockCache | None:
        """Where this table's row groups are kept for the machine's readers (None: not kept)."""
        return self._shared

    @property
    def shared_bytes(self) -> int:
        """The most disk this table's kept row groups may take: as many as are kept and a few being written, of the
        largest, with a margin (Arrow holds dictionary-encoded captions expanded; parquet's sizes are encoded)."""
        return (self._shared.keep + 2) * self._largest_block * 5 // 4 if self._shared else 0

    def in_table_order(self) -> PairTable:
        """This table, to be read in table order (one row group kept at a time)."""
        part = copy.copy(self)
        part._cache, part._cache_size = OrderedDict(), 1
        return part

    def spread(self, count: int, runs: int = SPREAD_RUNS) -> PairTable:
        """``count`` of its pairs (all, when it has no more) to be read in table order: ``runs`` stretches of
        consecutive pairs, one at the start of each of as many equal parts of the table. A sample of the whole
        table at the cost of reading a row group or so per stretch: a table in the order its pairs were collected
        (Pick-a-Pic) holds only a few prompts in its first pairs."""
        part = self.in_table_order()
        if len(self) <= count:
            return part
        runs, stretches, end = max(1, min(runs, count)), [], 0
        for k in range(runs):  # stretch k: its share of count, from its part's start or the last stretch's end
            start = max(k * len(self) // runs, end)
            end = start + (k + 1) * count // runs - k * count // runs
            stretches.append(np.arange(start, end))
        chosen = np.concatenate(stretches)  # ends within the table: see the test
        part._block_of, part._row_of = self._block_of[chosen], self._row_of[chosen]
        part._chosen_first = self._chosen_first[chosen]
        part.block_sizes = np.bincount(part._block_of, minlength=len(self.blocks)).astype(np.int64)
        part._sizes_key = tuple(int(size) for size in part.block_sizes)
        return part

    def kept_whole(self, purpose: str) -> PairTable:
        """This table, read again and again (held-out measurements), with its row groups kept for the machine's
        readers all at once, in a folder apart from the training window's (``purpose`` tells it apart); itself when
        its row groups are not kept (a local table) or it has no pairs (nothing held out)."""
        if self._share_root is None or not getattr(self, "remote", False) or not len(self):
            return self
        part = copy.copy(self)
        part._shared = BlockCache(table_folder(self._share_root, f"{self.identity}\n{purpose}"),
                                  keep=int(np.count_nonzero(self.block_sizes)) + 2)
        return part

    # -- reading -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._row_of)

    def __getitem__(self, index: int) -> PreferencePair:  # type: ignore[override]
        block_number = int(self._block_of[index])
        block, row = self.blocks[block_number], int(self._row_of[index])
        values = self._read_block(block_number)
        caption = values.column("caption")[row].as_py()
        names = [f"{block.file} row {block.first_row + row} {c}" for c in self.columns]
        root = Path(block.file) if block.group < 0 else Path(block.file).parent  # rlaif paths: relative to it
        images = [image_cell(values.column(c)[row].as_py(), root, name) for c, name in zip(self.columns, names,
                                                                                         strict=True)]
        if not self._chosen_first[index]:
            images, names = images[::-1], names[::-1]
        return PreferencePair(caption, images[0], images[1], names[0], names[1])

    def _read_block(self, number: int) -> pa.Table:
        """A block's caption and image columns, kept for the next reads (at most a shuffle window of blocks)."""
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        block = self.blocks[number]
        columns = ["caption", *self.columns]
        if block.group < 0:
            values = self._dataset.data.table.select(columns)  # memory-mapped: nothing is read until used
        else:
            if block.file in self._file_identities and file_identity(block.file) != self._file_identities[block.file]:
                # the index (rows kept, which image won) is the old file's: read on, it would pair the new rows
                raise RlaifError(f"pairs table {block.file} was rewritten while it was being read; the run (and any "
                                 "checkpoint of it) used the table as it was: put that back to go on, or train on "
                                 "the new table in another --out")
            fetch = partial(read_row_group, block.file, block.group, columns)
            values = self._shared.read(f"{block.file}\n{block.group}\n{columns}", fetch) if self._shared else fetch()
        self._cache[number] = values
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return values

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}  # workers read their own blocks


def image_cell(value: object, root: Path, name: str) -> ImageSource:
    """An image cell: a path relative to the table's folder ``root`` (rlaif), bytes (Pick-a-Pic) or a datasets
    Image struct (its bytes, else its path); ``name`` says which cell, in an error."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        return root / value
    if not isinstance(value, bytes):
        raise RlaifError(f"image {name} holds {type(value).__name__}, not image bytes or a path")
    return value


def check_caption_type(schema: pa.Schema, where: str) -> None:
    """Refuse a caption column that is not text (file ``where``), before any row is read."""
    caption = schema.field("caption").type
    if not is_text(caption):
        raise RlaifError(f"pairs table {where}: column 'caption' holds {caption}, not text; write the captions as "
                         "strings")


def is_text(kind: pa.DataType) -> bool:
    """Whether an Arrow type holds text (string, large_string or string_view)."""
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"


def missing_images(values: pa.Table, columns: list[str], wanted: np.ndarray, where: str, first_row: int) -> list[str]:
    """Each image path of the rows ``wanted`` (those with a preference) in ``columns`` of a row group of table
    file ``where`` that names no file, as ``FILE row N COLUMN (PATH)``; paths are relative to the table's folder."""
    root = Path(where).parent
    found = []
    for column in columns:
        for row, path in enumerate(values.column(column).to_pylist()):
            if wanted[row] and isinstance(path, str) and not (root / path).is_file():
                found.append(f"{where} row {first_row + row} {column} ({root / path})")
    return found


def different_images(rows: pa.Table, where: str) -> np.ndarray:
    """Per row, whether its two images may differ: False only where the table's ``are_different`` column (Pick-a-Pic
    v2's) says they are the same picture; a table without the column, or a missing value, counts as different."""
    if DIFFERENT_COLUMN not in rows.column_names:
        return np.ones(rows.num_rows, dtype=bool)
    column = rows.column(DIFFERENT_COLUMN)
    if not pa.types.is_boolean(column.type):
        raise RlaifError(f"pairs table {where}: column {DIFFERENT_COLUMN!r} holds {column.type}, not booleans "
                         "(Pick-a-Pic's: false when both images are the same picture)")
    return np.asarray(column.fill_null(True).to_numpy(zero_copy_only=False), dtype=bool)


def check_captions(captions: pa.ChunkedArray | pa.Array, where: str, first_row: int) -> None:
    """Refuse a null caption: trained as an empty one, it would teach the unconditional model without a word."""
    if captions.null_count:
        row = first_row + int(np.flatnonzero(captions.is_null().to_numpy(zero_copy_only=False))[0])
        raise RlaifError(f"pairs table {where}, row {row}: the caption is missing (null); give every pair a caption "
                         "(an empty string trains on the pictures alone)")


def caption_hashes(captions: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A 64-bit hash of each caption's ``caption_key``: which captions are held out is a pure function of their
    text, so a prompt's pairs are all in one part, whatever the table's order, shards or process count."""
    return np.array([int.from_bytes(hashlib.blake2b(caption_key(c).encode(), digest_size=8).digest(), "little")
                     for c in captions.to_pylist()], dtype=np.uint64)


def held_out_hashes(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Which ``caption_hashes`` a ``fraction`` of held-out captions takes: those below that share of 2**64."""
    return hashes < np.uint64(fraction * 2.0**64)


def caption_key(caption: str) -> str:
    """A caption as the held-out split compares it: Unicode-normalised (NFKC), case-folded, its whitespace
    collapsed. Pick-a-Pic holds a prompt typed again as "A cat", "a cat " or "a  cat"; split apart, the held-out
    accuracy would be measured on prompts trained on."""
    return " ".join(unicodedata.normalize("NFKC", caption).casefold().split())


def window_blocks(block_sizes: np.ndarray) -> int:
    """The most blocks with pairs that any shuffle window can hold: the smallest such blocks taken until they
    reach SHUFFLE_WINDOW pairs (an upper bound on what a reader needs to keep)."""
    sizes = np.sort(block_sizes[block_sizes > 0])
    reached = np.flatnonzero(np.cumsum(sizes) >= SHUFFLE_WINDOW)
    return int(reached[0]) + 1 if reached.size else len(sizes)


@lru_cache(maxsize=2)
def _epoch_order(block_sizes: tuple[int, ...], seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng(keyed_seed("order", seed, epoch))
    starts = np.concatenate([[0], np.cumsum(block_sizes)[:-1]])
    order, window, count = [], [], 0
    for block in rng.permutation(len(block_sizes)):
        window.append(np.arange(starts[block], starts[block] + block_sizes[block]))
        count += block_sizes[block]
        if count >= SHUFFLE_WINDOW:
            order.append(rng.permutation(np.concatenate(window)))
            window, count = [], 0
    if window:
        order.append(rng.permutation(np.concatenate(window)))
    return np.concatenate(order)


def pair_index(position: int, table: PairTable, seed: int) -> int:
    """The pair trained at global ``position``: epochs follow each other, each a permutation that depends only on
    (seed, epoch and the table's blocks): blocks shuffled, then pairs within windows of SHUFFLE_WINDOW pairs."""
    epoch, offset = divmod(position, len(table))
    return int(_epoch_order(table._sizes_key, seed, epoch)[offset])
