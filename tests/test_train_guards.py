"""Guard rails of long runs: automatic checkpoints when a run will outlast ~30 minutes, and no cache writing
into a disk that cannot hold it."""

import polars as pl
import pytest
import torch
from accelerate import Accelerator

from rlaif.errors import RlaifError
from rlaif.train.trainer import auto_checkpoint_every, check_cache_space


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_a_long_run_checkpoints_every_half_hour_and_a_short_one_never(accelerator):
    # 5 steps in 10 s: 2 s a step. 2,000 more steps (~67 min) -> a checkpoint every 900 steps (30 min)
    assert auto_checkpoint_every(accelerator, elapsed=10.0, steps=5, remaining=2000) == 900
    assert auto_checkpoint_every(accelerator, elapsed=10.0, steps=5, remaining=900) == 0  # exactly 30 min: none
    assert auto_checkpoint_every(accelerator, elapsed=5000.0, steps=5, remaining=10) == 2  # 1000 s a step
    assert auto_checkpoint_every(accelerator, elapsed=20000.0, steps=5, remaining=10) == 1  # every step


def test_the_cache_refuses_a_disk_too_small_and_says_what_to_do(tmp_path):
    check_cache_space(tmp_path / "not" / "made" / "yet", 1, 1)  # the nearest existing folder's disk is checked
    with pytest.raises(RlaifError, match=r"may need 931322574.6 GiB \(latents 465661287.3, text embeddings "
                                         r"465661287.3\) but only .* GiB is free there; free space, point "
                                         r"RLAIF_CACHE elsewhere, use --cache-dtype bf16 \(half of both\) or "
                                         r"--no-cache"):
        check_cache_space(tmp_path / "cache", 5 * 10**17, 5 * 10**17)


def test_automatic_checkpoints_resume_with_the_run(tiny_pairs, tmp_path, monkeypatch):
    """A run without --checkpoint-every times its first steps and, being "long" (a threshold of ~0 s here),
    checkpoints every step from then on; resumed, it times its first steps again and goes on checkpointing."""
    from rlaif.config import TrainConfig
    from rlaif.train import trainer

    monkeypatch.setattr(trainer, "AUTO_CHECKPOINT_PROBE", 2)
    monkeypatch.setattr(trainer, "AUTO_CHECKPOINT_SECONDS", 1e-9)
    settings = dict(pairs=str(tiny_pairs), model="tiny", out=tmp_path / "run", batch_size=2)
    trainer.run_train(TrainConfig(**settings, max_steps=3))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    steps = []
    trainer.run_train(TrainConfig(**settings, max_steps=6, resume="latest", overwrite=True),
                      progress=lambda step, total, logs: steps.append(step))
    assert steps == [4, 5, 6]  # resumed from step 3, not started again (--overwrite alone would also write 5, 6)
    assert {"step_00000005", "step_00000006"} <= {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}


def test_only_the_newest_checkpoints_are_kept(tiny_pairs, tmp_path):
    """A day of SDXL --full checkpoints every ~30 minutes would be some 50 copies of its weights and optimizer
    states: the newest --keep-checkpoints stay (default 3), and the run still resumes from the last."""
    from rlaif.config import TrainConfig
    from rlaif.train.trainer import run_train

    settings = dict(pairs=str(tiny_pairs), model="tiny", batch_size=2, checkpoint_every=1)
    run_train(TrainConfig(**settings, out=tmp_path / "run", max_steps=5))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_00000003", "step_00000004", "step_00000005"]
    run_train(TrainConfig(**settings, out=tmp_path / "run", max_steps=7, resume="latest", overwrite=True,
                          keep_checkpoints=1))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000007"]
    run_train(TrainConfig(**settings, out=tmp_path / "all", max_steps=4, keep_checkpoints=0))
    assert len(list((tmp_path / "all" / "checkpoints").iterdir())) == 4
    # resumed from an earlier checkpoint while later ones exist: what this run writes is never the one removed
    run_train(TrainConfig(**settings, out=tmp_path / "all", max_steps=2, resume="step_00000001", overwrite=True,
                          keep_checkpoints=1))
    assert sorted(p.name for p in (tmp_path / "all" / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000003", "step_00000004"]  # its own step 2; the later ones of the earlier run stay


def test_the_cache_estimate_counts_each_trained_pair_once(tiny_pairs):
    """The global batch already holds accumulation and processes; flips make at most two variants of a pair."""
    from rlaif.config import TrainConfig
    from rlaif.models import load_pipeline
    from rlaif.train.encoding import latent_bytes
    from rlaif.train.trainer import _cache_estimate

    pipe = load_pipeline("tiny")
    one = latent_bytes(pipe, 64, "fp32")
    with torch.no_grad():  # what the VAE really gives for a 64 px image: mean and log-variance, fp32
        assert one == pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.parameters.numel() * 4
    config = TrainConfig(pairs=str(tiny_pairs), model="tiny", out=None, max_steps=10, accumulation=128)
    assert _cache_estimate(config, pipe, 64, pairs=10**6, global_batch=128 * 2) == 2 * 10 * 256 * one
    assert _cache_estimate(config, pipe, 64, pairs=100, global_batch=256) == 2 * 100 * one  # every pair cached
    config.hflip = True
    assert _cache_estimate(config, pipe, 64, pairs=100, global_batch=256) == 2 * 200 * one
    config.random_crop = True
    assert _cache_estimate(config, pipe, 64, pairs=100, global_batch=256) == 2 * 2560 * one


def test_the_text_cache_estimate_counts_each_caption_once_at_its_padded_size(tiny_pairs, tmp_path):
    """Each distinct caption is cached once, padded to the trained length, in fp32: for FLUX.1-dev 512 x 4096 x 4
    bytes (8 MiB), more than its 512 px latents (a review found the check leaving text out)."""
    from rlaif.models import load_pipeline, prompt_length
    from rlaif.train.encoding import Encoder
    from rlaif.train.pair_table import PairTable
    from rlaif.train.trainer import _text_estimate

    assert _text_estimate(trained=1000, pairs=500, held_out=20, captions=40, entry=3) == 40 * 3  # repeats: once
    assert _text_estimate(trained=10, pairs=500, held_out=20, captions=400, entry=3) == 30 * 3  # a short run
    assert _text_estimate(trained=1000, pairs=500, held_out=20, captions=None, entry=3) == 520 * 3  # not read
    sd = load_pipeline("tiny")
    assert Encoder(sd, None).text_entry_bytes(torch.device("cpu")) == \
        4 * sd.tokenizer.model_max_length * sd.text_encoder.config.hidden_size
    flux = load_pipeline("tiny-flux")
    length = prompt_length(flux)["max_sequence_length"]
    assert Encoder(flux, None).text_entry_bytes(torch.device("cpu")) == \
        4 * (length * flux.text_encoder_2.config.d_model + flux.text_encoder.config.hidden_size)
    assert PairTable(tiny_pairs).distinct_captions is None  # captions not read: at most one per pair
    assert PairTable(tiny_pairs, hold_out=0.1).distinct_captions == pl.read_parquet(tiny_pairs)["caption"].n_unique()


def test_a_checkpoint_written_before_a_setting_existed_still_resumes(tmp_path):
    """A checkpoint from before --flow-weighting existed had its default; another changed setting is refused."""
    import json

    from rlaif.config import TrainConfig
    from rlaif.errors import RlaifError
    from rlaif.train.trainer import _check_same_run, _settings

    config = TrainConfig(pairs=str(tmp_path / "p.parquet"), model="tiny", out=tmp_path / "o", beta=5000.0,
                         lora_targets="to_q,to_k,to_v,to_out.0", learning_rate=3e-4)  # as resolved for a run
    settings = _settings(config)
    del settings["flow_weighting"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "position.json").write_text(json.dumps({"step": 2, "settings": settings}))
    _check_same_run(tmp_path / "old", config, {})
    settings["learning_rate"] = 1.0
    (tmp_path / "old" / "position.json").write_text(json.dumps({"step": 2, "settings": settings}))
    with pytest.raises(RlaifError, match="learning_rate 1.0 -> 0.0003"):
        _check_same_run(tmp_path / "old", config, {})


@pytest.mark.parametrize(("missing", "options", "refusal"), [
    # before --weight-decay, AdamW ran with torch's default 1e-2 and Adafactor with none
    ("weight_decay", {"optimizer": "adamw", "weight_decay": 1e-2}, None),
    ("weight_decay", {"optimizer": "adamw", "weight_decay": 1e-4}, "weight_decay .* -> 0.0001"),
    ("weight_decay", {"optimizer": "adafactor", "weight_decay": 1e-2}, "weight_decay .* -> 0.01"),
    ("weight_decay", {"optimizer": "adafactor", "weight_decay": 0.0}, None),
    # before --dpo-positive the loss had no DPO-Positive term (the default, 1, would change the remaining steps)
    ("dpo_positive", {"weight_decay": 1e-2, "dpo_positive": 0.0}, None),
    ("dpo_positive", {"weight_decay": 1e-2, "dpo_positive": 1.0}, r"dpo_positive 0.0 -> 1.0"),
    # before --keep-unconditional no anchor held the unconditional prediction
    ("keep_unconditional", {"weight_decay": 1e-2, "dpo_positive": 0.0, "keep_unconditional": 0.0}, None),
    ("keep_unconditional", {"weight_decay": 1e-2, "dpo_positive": 0.0, "keep_unconditional": 1.0},
     r"keep_unconditional 0.0 -> 1.0"),
])
def test_a_checkpoint_from_before_a_setting_resumes_only_with_the_value_it_had(tmp_path, missing, options, refusal):
    """A checkpoint written before a setting existed records none: a resume continues only with the value the run
    had then."""
    import json

    from rlaif.config import TrainConfig
    from rlaif.errors import RlaifError
    from rlaif.train.trainer import _check_same_run, _settings

    config = TrainConfig(pairs=str(tmp_path / "p.parquet"), model="tiny", out=tmp_path / "o", beta=5000.0,
                         lora_targets="to_q,to_k,to_v,to_out.0", **options)
    settings = _settings(config)
    del settings[missing]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "position.json").write_text(json.dumps({"step": 2, "settings": settings}))
    if refusal is None:
        _check_same_run(tmp_path / "old", config, {})
    else:
        with pytest.raises(RlaifError, match=refusal):
            _check_same_run(tmp_path / "old", config, {})


def test_a_loop_round_refuses_defaults_that_changed_since_the_round_before(tmp_path):
    """A loop round trained before --keep-unconditional (train.json without it, caption dropout 0.2): the next
    round, left to today's defaults, would train another loss, and is refused naming what changed; with the
    settings it had, pinned, it goes on."""
    import json

    from rlaif.config import TrainConfig
    from rlaif.errors import RlaifError
    from rlaif.train.trainer import _settings, check_defaults_as_before, with_family_defaults

    old = _settings(with_family_defaults(TrainConfig(pairs="p.parquet", model="tiny", out=tmp_path / "round_1",
                                                     keep_unconditional=0.0)))
    del old["keep_unconditional"]
    assert old["caption_dropout"] == 0.2
    (tmp_path / "round_1").mkdir()
    (tmp_path / "round_1" / "train.json").write_text(json.dumps({"config": old}))
    now = TrainConfig(pairs="p2.parquet", model="tiny", out=tmp_path / "round_2", init=tmp_path / "round_1")
    with pytest.raises(RlaifError, match=r"keep_unconditional 0\.0 -> 1\.0; caption_dropout 0\.2 -> 0\.0"):
        check_defaults_as_before(tmp_path / "round_1", now)
    check_defaults_as_before(tmp_path / "round_1", TrainConfig(
        pairs="p2.parquet", model="tiny", out=tmp_path / "round_2", keep_unconditional=0.0))


def test_a_run_moved_with_its_pairs_resumes_and_other_pairs_are_refused(tiny_pairs, tmp_path):
    """A loop folder (pairs and training run side by side) moved elsewhere goes on training from its checkpoint:
    its recorded paths are compared relative to --out (a review found `rlaif loop` in a moved folder refused at
    the training stage, naming --pairs). Pairs that differ are still refused."""
    import shutil

    from rlaif.config import TrainConfig
    from rlaif.train.trainer import run_train

    shutil.copytree(tiny_pairs.parent, tmp_path / "a" / "run")  # copytree keeps the files' times, as mv does

    def train(root, **options):
        return run_train(TrainConfig(pairs=str(root / "run" / tiny_pairs.name), model="tiny", out=root / "train",
                                     batch_size=2, checkpoint_every=1, **options))

    train(tmp_path / "a", max_steps=2)
    shutil.move(tmp_path / "a", tmp_path / "b")
    train(tmp_path / "b", max_steps=3, resume="latest", overwrite=True)
    assert (tmp_path / "b" / "train" / "checkpoints" / "step_00000003").is_dir()
    table = tmp_path / "b" / "run" / tiny_pairs.name
    table.write_bytes(table.read_bytes())  # rewritten in place: another table as far as resuming knows
    with pytest.raises(RlaifError, match=r"that run was made with other settings \(pairs_file "):
        train(tmp_path / "b", max_steps=4, resume="latest", overwrite=True)


def test_a_checkpoint_of_other_batch_rules_resumes_and_says_so(tiny_pairs, tmp_path):
    """A checkpoint written before the VAE draws were keyed by content (and SDXL conditioning made per image)
    goes on with the new rules: a valid run, but not the uninterrupted one, which the run says (a review)."""
    import json

    from rlaif.config import TrainConfig
    from rlaif.train.batches import BATCH_RULES
    from rlaif.train.trainer import run_train

    settings = dict(pairs=str(tiny_pairs), model="tiny", out=tmp_path / "run", batch_size=2, checkpoint_every=1)
    run_train(TrainConfig(**settings, max_steps=1))
    position = tmp_path / "run" / "checkpoints" / "step_00000001" / "position.json"
    record = json.loads(position.read_text())
    assert record["identities"]["batch_rules"] == BATCH_RULES
    notes = []
    run_train(TrainConfig(**settings, max_steps=2, resume="latest", overwrite=True), note=notes.append)
    resumed = f"resuming from {position.parent}: step 1 of 2 done, 1 to go"  # (a new user's trial asked for it)
    assert notes == [resumed]  # the same rules: nothing more to say
    notes.clear()
    del record["identities"]["batch_rules"]  # as an rlaif before the rules were recorded wrote it
    position.write_text(json.dumps(record))
    run_train(TrainConfig(**settings, max_steps=2, resume="step_00000001", overwrite=True), note=notes.append)
    assert notes == [resumed, f"{position.parent} was written by an rlaif that built its batches otherwise (rules 1, "
                     f"now {BATCH_RULES}: other held-out captions, VAE draws, crops, SDXL conditioning, pairs left "
                     "out or text embeddings rounded); the remaining steps and held-out measurements use these, so "
                     "the result will differ from an uninterrupted run's"]


def test_a_refused_overwrite_keeps_the_old_run(tiny_pairs, tmp_path):
    """--overwrite removes the old run's outputs only once every check has passed: a --resolution the model
    cannot take, or LoRA targets that match nothing, refused after the model loads, leave train.json and the
    weights where they were (before, the old run was removed first)."""
    from conftest import run_cli

    common = ["train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "run", "--max-steps", 1]
    assert run_cli(*common).returncode == 0
    kept = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.is_file()}
    assert "train.json" in kept
    for bad in (["--resolution", 60], ["--lora-targets", "no_such_module"]):
        refused = run_cli(*common, "--overwrite", *bad)
        assert refused.returncode == 2, refused.stderr
        assert {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.is_file()} == kept


def test_pairs_sampled_by_another_model_are_trained_with_a_note(tiny_pairs, tmp_path):
    """A table whose every sample another model drew (its record) trains, off-policy, and says so (a new user's
    trial trained FLUX.1 on SD1.5's pictures without a word); Pick-a-Pic tables, with no record, say nothing."""
    from conftest import run_cli

    from rlaif.config import TrainConfig
    from rlaif.train.pair_table import PairTable
    from rlaif.train.trainer import sampled_by_another

    trained = run_cli("train", tiny_pairs, "--model", "tiny-sd3", "--out", tmp_path / "o", "--max-steps", 1)
    assert trained.returncode == 0, trained.stderr
    assert f"note: pairs table {tiny_pairs} was sampled by tiny, not by --model tiny-sd3: training one model on " \
        "another's pictures is off-policy DPO (legitimate, as on Pick-a-Pic), and their sampling settings " \
        "(guidance, T5 length) say nothing of this model's" in trained.stderr
    pairs = PairTable(tiny_pairs)
    config = TrainConfig(pairs=str(tiny_pairs), model="tiny-sd3", out=tmp_path)
    assert sampled_by_another(config, pairs, own=pairs.sampling) is None  # drawn by the model trained
    pairs.sampling = []  # as a Pick-a-Pic table has none (a cached property: set on the instance)
    assert sampled_by_another(config, pairs, own=[]) is None


def test_a_run_begun_under_other_defaults_resumes_with_the_option_it_names(tiny_pairs, tmp_path):
    """A default that changed between a run's start and its resume (SD3 / FLUX.1 caption dropout 0.2 -> 0 on
    2026-11-29) is refused with the option that resumes the run as it began (a review: before, only "resume with
    the same settings", though the user had changed nothing)."""
    import json

    from rlaif.config import TrainConfig
    from rlaif.errors import RlaifError
    from rlaif.train.trainer import run_train

    settings = dict(pairs=str(tiny_pairs), model="tiny", out=tmp_path / "run", batch_size=2, checkpoint_every=1)
    run_train(TrainConfig(**settings, max_steps=1))
    position = tmp_path / "run" / "checkpoints" / "step_00000001" / "position.json"
    record = json.loads(position.read_text())
    assert record["settings"]["caption_dropout"] == 0.0
    record["settings"]["caption_dropout"] = 0.2  # as if the default was 0.2 when the run began
    position.write_text(json.dumps(record))
    with pytest.raises(RlaifError, match=r"other settings \(caption_dropout 0.2 -> 0.0\); left to rlaif's defaults, "
                                         r"these resolve otherwise than when that run began: pass --caption-dropout "
                                         r"0.2 to resume it, or start"):
        run_train(TrainConfig(**settings, max_steps=2, resume="latest", overwrite=True))
    with pytest.raises(RlaifError, match=r"other settings \(caption_dropout 0.2 -> 0.1\); resume with the same "
                                         "settings"):  # given, not defaulted: the user's own change
        run_train(TrainConfig(**settings, max_steps=2, resume="latest", overwrite=True, caption_dropout=0.1))
    with pytest.raises(RlaifError, match=r"\(beta 1000.0 -> 500.0; caption_dropout 0.2 -> 0.0\); resume with the "
                                         "same settings"):  # a change of the user's beside it: no advice to mislead
        run_train(TrainConfig(**settings, max_steps=2, resume="latest", overwrite=True, beta=500.0))
    run_train(TrainConfig(**settings, max_steps=2, resume="latest", overwrite=True, caption_dropout=0.2))
    assert json.loads((tmp_path / "run" / "train.json").read_text())["steps"] == 2


def test_a_rules_change_that_leaves_a_table_alone_says_nothing(tiny_pairs, tmp_path):
    """Rules 4 changed only tables with pairs of one picture twice (Pick-a-Pic's are_different false): a rules-3
    checkpoint of any other table goes on as the same run, without the note (a review found it said so of all).
    Rules 5 changed only runs with a half-precision --cache-dtype (text embeddings rounded like latents)."""
    import polars as pl

    from rlaif.config import TrainConfig
    from rlaif.train.batches import BATCH_RULES
    from rlaif.train.pair_table import PairTable
    from rlaif.train.trainer import resumed_under_other_rules

    assert BATCH_RULES == 5
    exact, rounded = (TrainConfig(pairs="p", model="tiny", out=tmp_path, cache_dtype=d) for d in ("fp32", "bf16"))
    plain = PairTable(tiny_pairs)
    pl.read_parquet(tiny_pairs).with_row_index().with_columns(
        are_different=pl.col("index") > 0,  # its first pair marked one picture twice; its images where they are
        **{side: pl.lit(f"{tiny_pairs.parent}/") + pl.col(side) for side in ("image_0", "image_1")},
    ).drop("index").write_parquet(tmp_path / "marked.parquet")
    marked = PairTable(tmp_path / "marked.parquet")
    assert (plain.same_images, marked.same_images) == (0, 1)
    folder = tmp_path / "checkpoints" / "step_00000001"
    assert resumed_under_other_rules(folder, {"batch_rules": 3}, plain, exact) is None
    assert resumed_under_other_rules(folder, {"batch_rules": 3}, marked, exact).startswith(f"{folder} was written by")
    assert resumed_under_other_rules(folder, {"batch_rules": 2}, plain, exact).startswith(f"{folder} was written by")
    assert resumed_under_other_rules(None, {"batch_rules": 1}, marked, exact) is None
    assert resumed_under_other_rules(folder, {"batch_rules": 4}, plain, exact) is None
    assert resumed_under_other_rules(folder, {"batch_rules": 4}, plain, rounded).startswith(f"{folder} was written")


def holding(out, command: str):
    """Another process that holds ``out`` for ``command`` (rlaif.out_lock) until it is killed; returned once it does."""
    import subprocess
    import sys

    from conftest import cli_env

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from rlaif.out_lock import writing\n"
         f"with writing(Path({str(out)!r}), {command!r}):\n    print('held', flush=True); time.sleep(120)"],
        env=cli_env(), stdout=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "held":
        holder.kill()
        holder.wait()
        raise AssertionError(f"the process meant to hold {out} did not take its lock")
    return holder


def test_a_second_run_into_an_output_being_written_is_refused(tiny_pairs, tmp_path):
    """Workers of a killed torchrun launcher go on training; a `--resume latest` started meanwhile interleaved its
    steps with theirs in one train_log.jsonl (a new user's trial), and both ended as if alone. Whatever command holds
    the output, a second one into it stops with one line, leaving nothing there; once the first ends, it runs."""
    import fcntl
    import os
    import shutil

    from conftest import run_cli

    from rlaif.out_lock import lock_dir

    out = tmp_path / "run"
    holder = holding(out, "train")
    try:
        args = ("train", tiny_pairs, "--model", "tiny", "--out", out, "--max-steps", 1, "--batch-size", 2)
        refused = run_cli(*args)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert (f"error: {out} is being written by another `rlaif train (process {holder.pid} on "
                in refused.stderr and "then run this again" in refused.stderr)
        assert not out.exists()
        (out / "checkpoints").mkdir(parents=True)  # its first checkpoint being written: a run still going
        still = run_cli("eval", "-m", "tiny", "--tuned", out, "-p", "demo-eval", "-s", "compressibility", "-o",
                        tmp_path / "e")
        assert still.returncode == 2 and (f"--tuned {out} belongs to a training run still going (`rlaif train "
                                          f"(process {holder.pid} on ") in still.stderr, still.stderr
        assert "not finished weights: wait for it to finish" in still.stderr
        (out / "round_2" / "train" / "checkpoints").mkdir(parents=True)  # inside it: a loop's round, say
        inner = run_cli("eval", "-m", "tiny", "--tuned", out / "round_2" / "train", "-p", "demo-eval", "-s",
                        "compressibility", "-o", tmp_path / "e")
        assert inner.returncode == 2 and "belongs to a training run still going" in inner.stderr, inner.stderr
        shutil.rmtree(out)
        # the lock is on a folder, which systemd-tmpfiles' ageing of /tmp skips while it is locked, as it tests
        probe = os.open(lock_dir(out), os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        holder.kill()
        holder.wait()
    samples = tiny_pairs.parent  # label writes its scores into the samples folder, which a sample may be writing
    holder = holding(samples, "sample")
    try:
        labelled = run_cli("label", samples, "--scorer", "compressibility", "-o", tmp_path / "pairs.parquet")
        assert labelled.returncode == 2 and f"{samples} is being written by another `rlaif sample" in labelled.stderr
        assert not (tmp_path / "pairs.parquet").exists()
    finally:
        holder.kill()
        holder.wait()
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
