"""`rlaif sample` end to end through the real CLI: outputs, resume after SIGKILL, sharding, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import PROMPTS, cli_env, run_cli
from PIL import Image

from rlaif.errors import RlaifError
from rlaif.files import folder_identity, setting_change
from rlaif.prompts import load_prompts
from rlaif.sample import check_resumable
from rlaif.seeding import image_seed
from rlaif.tables import SAMPLES_SCHEMA, prompt_id
from rlaif.tiny import TINY_SD_DIR

FAST = ("--steps", 4, "--batch-size", 4)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), except run.json and the table."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("run.json", "samples.parquet")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run (one thread, like each torchrun rank) to compare against."""
    folder = tmp_path_factory.mktemp("reference")
    prompts = folder / "8prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = run_cli("sample", "--model", "tiny", "--prompts", prompts, "--per-prompt", 4, "--out", folder / "out",
                     *FAST, env=cli_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    return prompts, folder / "out"


def test_writes_32_pngs_and_a_valid_table(reference):
    _, out = reference
    table = pl.read_parquet(out / "samples.parquet")
    assert table.columns == list(SAMPLES_SCHEMA)
    assert table.height == 32 and len(list((out / "images").rglob("*.png"))) == 32
    assert table["sample_id"].n_unique() == 32
    for row in table.iter_rows(named=True):
        assert row["prompt_id"] == prompt_id(row["prompt"])
        assert row["seed"] == image_seed(0, row["prompt"], row["candidate"])
        assert Image.open(out / row["image"]).size == (row["width"], row["height"]) == (64, 64)
        assert (row["model"], row["scheduler"], row["steps"]) == ("tiny", "DDIMScheduler", 4)
    run = json.loads((out / "run.json").read_text())
    assert run["generation"]["steps"] == 4 and run["versions"]["torch"]
    assert sorted(table["prompt"].unique()) == sorted(PROMPTS)


def test_tiny_xl_writes_pngs_and_table(tmp_path, prompts_file):
    result = run_cli("sample", "--model", "tiny-xl", "--prompts", prompts_file, "--per-prompt", 4,
                     "--out", tmp_path / "xl", "--steps", 2, "--batch-size", 16)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "xl" / "images").rglob("*.png"))) == 32
    table = pl.read_parquet(tmp_path / "xl" / "samples.parquet")
    assert table.height == 32 and set(table["scheduler"]) == {"EulerDiscreteScheduler"}


def test_rerun_with_same_arguments_skips_finished_images(reference, tmp_path):
    prompts, out = reference
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    result = run_cli("sample", "--model", "tiny", "--prompts", prompts, "--per-prompt", 4, "--out", out, *FAST,
                     env=cli_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    # what an earlier run made is counted at once, not as speed (it printed "32/32 images, 135081.52 images/s")
    assert "sampling: 32/32 images (100%), - images/s, ETA 0:00:00" in result.stderr


def test_a_rerun_with_more_prompts_that_stops_leaves_no_stale_table(reference, tmp_path):
    """A finished folder rerun with a prompt more, stopped before the end, must not leave the earlier, smaller
    samples.parquet for `rlaif label` to take as this run's (a review); the table is rewritten at the end."""
    prompts, expected = reference
    out = tmp_path / "out"
    shutil.copytree(expected, out)
    more, extra = tmp_path / "more.txt", "a small green triangle on a red background"
    more.write_text(prompts.read_text() + extra + "\n")
    (out / "images" / prompt_id(extra)).write_text("in the way")  # the new prompt's images cannot be written
    stopped = run_cli("sample", "--model", "tiny", "--prompts", more, "--per-prompt", 4, "--out", out, *FAST)
    assert stopped.returncode != 0 and not (out / "samples.parquet").exists()
    label = run_cli("label", out, "--scorer", "compressibility")
    assert label.returncode == 2 and "holds an `rlaif sample` run that has not finished" in label.stderr


@pytest.mark.parametrize("kill_after_pngs", [1, 13])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(reference, tmp_path, kill_after_pngs):
    prompts, expected = reference
    out = tmp_path / "out"
    args = [sys.executable, "-m", "rlaif", "sample", "--model", "tiny", "--prompts", str(prompts),
            "--per-prompt", "4", "--out", str(out), *map(str, FAST)]
    env = cli_env(OMP_NUM_THREADS="1")
    victim = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(out.rglob("*.png"))) < kill_after_pngs and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "samples.parquet").exists(), "the run finished before it could be killed"
    assert len(list(out.rglob("*.png"))) < 32
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert tree(out) == tree(expected)  # byte-identical PNGs, no temporaries left behind
    assert pl.read_parquet(out / "samples.parquet").equals(pl.read_parquet(expected / "samples.parquet"))


def test_two_processes_shard_and_match_one_process(reference, tmp_path):
    prompts, expected = reference
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29500 + os.getpid() % 1000), "-m", "rlaif", "sample", "--model", "tiny", "--prompts", str(prompts),
         "--per-prompt", "4", "--out", str(out), *map(str, FAST)],
        env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "run.json").read_text())["processes"] == 2  # really sharded, not run twice
    assert tree(out) == tree(expected)
    assert pl.read_parquet(out / "samples.parquet").equals(pl.read_parquet(expected / "samples.parquet"))


def test_other_generation_settings_are_refused(reference):
    prompts, out = reference
    before = tree(out)
    result = run_cli("sample", "--model", "tiny", "--prompts", prompts, "--per-prompt", 4, "--out", out,
                     "--steps", 5, "--batch-size", 4)
    assert result.returncode == 2
    assert "steps 4 -> 5" in result.stderr and str(out) in result.stderr
    assert tree(out) == before


def test_max_prompts_samples_the_same_subset_as_the_prompt_loader(reference, tmp_path):
    prompts, _ = reference
    result = run_cli("sample", "--model", "tiny", "--prompts", prompts, "--per-prompt", 1, "--max-prompts", 3,
                     "--out", tmp_path / "s", *FAST)
    assert result.returncode == 0, result.stderr
    table = pl.read_parquet(tmp_path / "s" / "samples.parquet")
    assert table["prompt"].to_list() == load_prompts(str(prompts), limit=3) and table.height == 3
    assert set(table["prompt"]) < set(load_prompts(str(prompts)))


def test_a_folder_sampled_at_the_former_default_guidance_says_which_to_pass(reference, tmp_path):
    """A run begun when an unset --guidance meant 7.5 for every model (here: as if at 6.0, not tiny's 7.5) is not
    resumed at today's default: the refusal says which --guidance goes on with it."""
    prompts, out = reference
    shutil.copytree(out, tmp_path / "old")
    record = json.loads((tmp_path / "old" / "run.json").read_text())
    record["generation"]["guidance"] = 6.0
    (tmp_path / "old" / "run.json").write_text(json.dumps(record))
    argv = ("sample", "--model", "tiny", "--prompts", prompts, "--per-prompt", 4, "--out", tmp_path / "old", *FAST)
    refused = run_cli(*argv)
    assert refused.returncode == 2 and refused.stderr == (
        f"error: {tmp_path / 'old'} was sampled at guidance 6.0, and --guidance unset means this model's pipeline "
        "default, 7.5; pass --guidance 6.0 to go on with it, or choose another --out\n")
    assert run_cli(*argv, "--guidance", 6.0).returncode == 0  # every image is there: nothing to make
    other = run_cli(*argv[:-4], "--steps", 5, "--batch-size", 4)  # more than the guidance differs: all of it listed
    assert other.returncode == 2 and "(steps 4 -> 5; guidance 6.0 -> 7.5)" in other.stderr, other.stderr


def test_a_folder_begun_under_other_library_versions_says_so_and_keeps_both(reference, tmp_path):
    """A resume after a diffusers or torch upgrade may make other pixels than an uninterrupted run: it says so,
    and run.json keeps the versions the folder was begun under (it used to overwrite them with the new ones)."""
    prompts, out = reference
    shutil.copytree(out, tmp_path / "old")
    record = json.loads((tmp_path / "old" / "run.json").read_text())
    now = record["versions"]
    record["versions"] = {**now, "diffusers": "0.30.0"}
    (tmp_path / "old" / "run.json").write_text(json.dumps(record))
    argv = ("sample", "--model", "tiny", "--prompts", prompts, "--per-prompt", 4, "--out", tmp_path / "old", *FAST)
    whole = run_cli(*argv)  # every image there: nothing made under the new versions, nothing to say
    assert whole.returncode == 0 and "note:" not in whole.stderr, whole.stderr
    assert "resumed_under" not in json.loads((tmp_path / "old" / "run.json").read_text())
    next(iter((tmp_path / "old" / "images").rglob("*.png"))).unlink()  # killed before its last image
    resumed = run_cli(*argv)
    assert resumed.returncode == 0, resumed.stderr
    assert f"note: 31 of the 32 images are in {tmp_path / 'old'} already: kept; making the other 1" in resumed.stderr
    assert resumed.stderr.rstrip().endswith(f"wrote {tmp_path / 'old' / 'samples.parquet'}: 32 images, 8 prompts x 4")
    assert (f"note: {tmp_path / 'old'} was begun under other library versions (diffusers 0.30.0 -> "
            f"{now['diffusers']}); the images it still lacks are made under these") in resumed.stderr
    after = json.loads((tmp_path / "old" / "run.json").read_text())
    assert after["versions"]["diffusers"] == "0.30.0" and after["resumed_under"] == [now]
    assert run_cli(*argv).returncode == 0  # a later run that makes nothing keeps the record
    assert json.loads((tmp_path / "old" / "run.json").read_text())["resumed_under"] == [now]
    # resumed under a third set (an older record's single set read as such): every set some images came from stays
    between = {**now, "torch": "2.5.0"}
    (tmp_path / "old" / "run.json").write_text(json.dumps({**after, "resumed_under": between}))
    next(iter((tmp_path / "old" / "images").rglob("*.png"))).unlink()
    assert run_cli(*argv).returncode == 0
    assert json.loads((tmp_path / "old" / "run.json").read_text())["resumed_under"] == [between, now]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--per-prompt", 0), "--per-prompt must be at least 1"),
        (("--width", 60), "--width must be a positive multiple of 8"),
        (("--scheduler", "NoSuchScheduler"), "unknown --scheduler 'NoSuchScheduler'"),
        (("--dtype", "fp8"), "--dtype 'fp8'"),
    ],
)
def test_bad_options_fail_cleanly(tmp_path, prompts_file, args, message):
    result = run_cli("sample", "--model", "tiny", "--prompts", prompts_file, "--out", tmp_path / "out", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_inputs_name_the_culprit(tmp_path, prompts_file):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "p.csv").write_text("text\nhello\n")
    (tmp_path / "notamodel").mkdir()
    cases = [
        (("--prompts", tmp_path / "absent.txt"), f"prompts file {tmp_path / 'absent.txt'} does not exist"),
        (("--prompts", tmp_path / "empty.txt"), "holds no prompts"),
        (("--prompts", tmp_path / "p.csv"), "has no column"),
        (("--prompts", prompts_file, "--model", tmp_path / "notamodel"), f"model '{tmp_path / 'notamodel'}'"),
    ]
    for args, message in cases:
        model = () if "--model" in args else ("--model", "tiny")
        result = run_cli("sample", *model, *args, "--out", tmp_path / "out")
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()


def test_a_changed_model_folder_is_another_model(tmp_path, prompts_file):
    """Samples are keyed by the model's weights, not its name: after the folder's weights change, a rerun into
    the same --out is refused instead of mixing images of two models."""
    assert run_cli("tiny", "--out", tmp_path / "model").returncode == 0
    args = ["sample", "-m", tmp_path / "model", "-p", prompts_file, "-n", 1, "--steps", 2, "-o", tmp_path / "s"]
    assert run_cli(*args).returncode == 0
    weights = next((tmp_path / "model" / "unet").glob("*.safetensors"))
    changed = bytearray(weights.read_bytes())
    changed[-1] ^= 1  # one weight's last bit: fine-tuned, say
    weights.write_bytes(changed)
    again = run_cli(*args)
    assert again.returncode == 2
    assert f"holds images made with other settings (model_weights (files changed: unet/{weights.name}))" in again.stderr


def test_a_run_file_rlaif_sample_did_not_write_is_refused(tmp_path):
    generation = {"model": "tiny", "seed": 0}
    check_resumable(tmp_path / "run.json", generation)  # no run file: a new run
    (tmp_path / "run.json").write_text('{"made_by": "sample"}')
    with pytest.raises(RlaifError, match="records no generation settings: not a run of `rlaif sample`; use an empty"):
        check_resumable(tmp_path / "run.json", generation)
    (tmp_path / "run.json").write_text('{"generation": {"model": "tiny", "seed": 1}}')
    with pytest.raises(RlaifError, match=r"holds images made with other settings \(seed 1 -> 0\)"):
        check_resumable(tmp_path / "run.json", generation)
    (tmp_path / "run.json").write_text('{"generation": {"model": "tiny", "seed": 0}}')
    check_resumable(tmp_path / "run.json", generation)  # the same settings: resumable


def test_a_copied_or_touched_model_folder_resumes_and_a_changed_one_names_its_file(tmp_path):
    """Small files are known by their bytes: a fresh clone or a `touch` is the same model; an edited file is not,
    and the refusal names it instead of printing every file's identity."""
    model = tmp_path / "model"
    shutil.copytree(TINY_SD_DIR, model)
    (tmp_path / "p.txt").write_text("a red circle\n")
    args = ("sample", "--model", model, "--prompts", tmp_path / "p.txt", "--per-prompt", 1, "--steps", 2,
            "--out", tmp_path / "s")
    assert run_cli(*args).returncode == 0
    os.utime(model / "unet" / "config.json", ns=(0, 0))  # what a clone, a copy or a touch does
    shutil.copytree(model, tmp_path / "moved")
    shutil.rmtree(model)
    (tmp_path / "moved").rename(model)
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(index, indent=4))  # other bytes, the same pipeline
    refused = run_cli(*args)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"error: {tmp_path / 's'} holds images made with other settings (model_weights "
                                      "(files changed: model_index.json)); rerun with the same settings to resume, "
                                      "or choose another --out")


def test_a_model_folder_is_known_by_the_files_its_pipeline_loads(tmp_path):
    """A README, a licence or a single-file checkpoint beside model_index.json is not loaded: editing one is the same
    model, and a run.json of an older rlaif, which counted them, resumes too (nothing is made again)."""
    model = tmp_path / "model"
    shutil.copytree(TINY_SD_DIR, model)
    (model / "README.md").write_text("# tiny\n")
    (tmp_path / "p.txt").write_text("a red circle\n")
    args = ("sample", "--model", model, "--prompts", tmp_path / "p.txt", "--per-prompt", 1, "--steps", 2,
            "--out", tmp_path / "s")
    assert run_cli(*args).returncode == 0
    images = {png: png.stat().st_mtime_ns for png in (tmp_path / "s" / "images").rglob("*.png")}
    (model / "README.md").write_text("# tiny, edited\n")
    (model / "model.safetensors").write_bytes(b"not loaded")
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    run["generation"]["model_weights"] = folder_identity(model)  # as an older rlaif recorded it: every file
    (tmp_path / "s" / "run.json").write_text(json.dumps(run))
    (model / "README.md").write_text("# tiny, edited again\n")
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert images and {png: png.stat().st_mtime_ns for png in images} == images


def test_a_setting_change_of_file_identities_names_the_files():
    assert setting_change("steps", 10, 12) == "steps 10 -> 12"
    then = "a.json:10:0123abcd;b.bin:99999999:t1700000000;c.txt:3:ffff0000"
    now = "a.json:10:0123abce;b.bin:99999999:t1700000000;d.txt:5:00001111"
    assert setting_change("model_weights", then, now) == \
        "model_weights (files changed: a.json; added: d.txt; removed: c.txt)"
    assert setting_change("model_weights", "org/name@abc", "org/name@def") == \
        "model_weights 'org/name@abc' -> 'org/name@def'"
    legacy = "/m/a.json:10:1700000000;/m/b.bin:99999999:1700000000"  # before folder_identity: paths and times
    assert setting_change("model_weights", legacy, now).startswith("model_weights (recorded by an older rlaif")


def test_a_model_folder_is_known_by_its_content(tmp_path, monkeypatch):
    import rlaif.files

    monkeypatch.setattr(rlaif.files, "HASHED_UP_TO", 64)  # so that a small test file is a "large" one
    monkeypatch.setattr(rlaif.files, "_END", 8)
    model = tmp_path / "m"
    (model / ".git").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "weights.bin").write_bytes(bytes(range(200)))
    first = folder_identity(model)
    (model / ".git" / "index").write_bytes(b"changed by git status")  # not the model
    os.utime(model / "config.json", ns=(0, 0))
    assert folder_identity(model) == first
    stamp = (model / "weights.bin").stat().st_mtime_ns
    (model / "weights.bin").write_bytes(bytes(range(199)) + b"x")  # its last byte: the same size and time
    os.utime(model / "weights.bin", ns=(stamp, stamp))
    assert setting_change("model_weights", first, folder_identity(model)) == \
        "model_weights (files changed: weights.bin)"
    (model / "weights.bin").write_bytes(bytes(range(200)))
    os.utime(model / "weights.bin", ns=(stamp, stamp))
    assert folder_identity(model) == first
    os.utime(model / "weights.bin", ns=(0, 0))  # a large file's time still counts: a copy is another file
    assert folder_identity(model) != first
