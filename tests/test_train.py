"""`rlaif train` on the tiny model through the real CLI: loss at step 0, LoRA output in diffusers format,
killed and resumed, the latent cache, trackers, two processes."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import cli_env, run_cli
from safetensors.torch import load_file

from rlaif.models import load_pipeline

FAST = ("--model", "tiny", "--batch-size", 2, "--learning-rate", 1e-3)


def log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_lora_dpo_loads_into_diffusers_and_changes_images(tiny_pairs, tmp_path):
    out = tmp_path / "lora"
    result = run_cli("train", tiny_pairs, "--out", out, "--max-steps", 50, *FAST)
    assert result.returncode == 0, result.stderr
    entries = log(out)
    # step 0: policy == reference, so inside = 0 up to float32 round-off of the MSEs (~1e-7) times beta 1000,
    # and DPO-Positive's penalty is 0
    assert len(entries) == 50 and entries[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    pipe = load_pipeline("tiny")
    before = pipe("a small red circle on a blue background", num_inference_steps=5,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.load_lora_weights(out)
    after = pipe("a small red circle on a blue background", num_inference_steps=5,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert abs(after - before).max() > 0.01


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_first_step_loss_is_ln2(tiny_pairs, tmp_path, full, precision):
    args = ["--full"] if full else []
    result = run_cli("train", tiny_pairs, "--out", tmp_path / "o", "--max-steps", 1, "--mixed-precision", precision,
                     "--beta", 5000, *args, *FAST)  # the official beta: 5x the sensitivity of the default 1000
    assert result.returncode == 0, result.stderr
    # fp16/bf16 autocast rounds both passes alike (same weights, same kernels): inside stays ~0, loss ln 2
    assert log(tmp_path / "o")[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert (tmp_path / "o" / ("unet" if full else "pytorch_lora_weights.safetensors")).exists()


def test_first_step_loss_is_ln2_for_full_sdxl_in_fp16(tiny_pairs, tmp_path):
    """The frozen reference of full fine-tuning computes the policy's function under fp16 autocast too: on CPU a
    copy whose parameters do not require grad was cast differently (outputs 2e-3 apart, a loss of 0.59-0.83 at
    step 1 with beta 5000)."""
    result = run_cli("train", tiny_pairs, "--out", tmp_path / "o", "--max-steps", 1, "--mixed-precision", "fp16",
                     "--full", "--model", "tiny-xl", "--batch-size", 2, "--learning-rate", 1e-3, "--beta", 5000)
    assert result.returncode == 0, result.stderr
    assert log(tmp_path / "o")[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_the_noise_range_reaches_training(tiny_pairs, tmp_path):
    """--min-noise / --max-noise decide where pairs are noised: near the clean image, the epsilon a UNet predicts is
    hidden under the image (large error); near pure noise it is nearly the input itself (small error)."""
    errors = {}
    for low, high in ((0.0, 0.01), (0.99, 1.0)):
        out = tmp_path / str(low)
        result = run_cli("train", tiny_pairs, "--model", "tiny", "--out", out, "--max-steps", 1, "--min-noise", low,
                         "--max-noise", high)
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "train.json").read_text())["config"]["min_noise"] == low
        errors[low] = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["ref_mse_w"]
    assert errors[0.0] > 20 * errors[0.99], errors


@pytest.mark.parametrize("alias", ["tiny", "tiny-xl", "tiny-sd3", "tiny-flux"])
def test_the_half_stored_reference_of_full_fine_tuning_computes_the_policys_function(alias):
    """Under fp16 / bf16 autocast the reference keeps its linear and convolution weights in that dtype: its
    predictions equal the fp32 policy's bit for bit, in fewer bytes."""
    from dataclasses import replace
    from pathlib import Path

    from rlaif.config import TrainConfig
    from rlaif.models import default_size, denoiser
    from rlaif.train.encoding import Encoder, latent_shape
    from rlaif.train.objective import objective_for
    from rlaif.train.trainer import frozen_reference, with_family_defaults

    pipe = load_pipeline(alias)
    config = with_family_defaults(TrainConfig(pairs=Path("p"), model=alias, out=Path("o"), full=True))
    objective, policy = objective_for(pipe), denoiser(pipe)
    policy.requires_grad_(True)
    embeds, pooled = Encoder(pipe, None).text(["a red circle", "a blue square"], torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    shape = (2, *latent_shape(pipe, default_size(pipe)))
    draws = torch.tensor([0.3, 0.8]) if objective.weighting else torch.tensor([100, 700])
    inputs = objective.inputs(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)[:1],
                              draws[:1], embeds[:1], None if pooled is None else pooled[:1], torch.zeros(2, 6))
    size = sum(p.numel() * p.element_size() for p in policy.parameters())
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        reference = frozen_reference(policy, replace(config, mixed_precision=precision))
        assert dtype in {p.dtype for p in reference.parameters()} <= {torch.float32, dtype}
        assert sum(p.numel() * p.element_size() for p in reference.parameters()) < 0.7 * size
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            assert torch.equal(objective.predict(reference, inputs, slice(None)),
                               objective.predict(policy, inputs, slice(None)))
    assert {p.dtype for p in frozen_reference(policy, config).parameters()} == {torch.float32}


def weights(out):
    return load_file(out / "pytorch_lora_weights.safetensors")


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_killed_at_any_step_and_resumed_equals_uninterrupted_run(tiny_pairs, tmp_path):
    """SIGKILL before the first checkpoint and again between checkpoints, each time rerun with --resume
    latest; a checkpoint cut short by a kill is ignored. The warm-up outlasts the first checkpoints, so a
    resumed schedule that restarted its warm-up would show in the weights. Each run has its own latent cache,
    so both compute the same encodings in the same batches."""
    args = ["train", tiny_pairs, "--max-steps", 8, "--checkpoint-every", 2, "--warmup-steps", 5, *FAST]
    whole = run_cli(*args, "--out", tmp_path / "whole", env=cli_env(RLAIF_CACHE=str(tmp_path / "cache-whole")))
    assert whole.returncode == 0, whole.stderr
    parts = tmp_path / "parts"
    env = cli_env(RLAIF_CACHE=str(tmp_path / "cache-parts"))
    for kill_after in (1, 5):
        process = subprocess.Popen([sys.executable, "-m", "rlaif", *map(str, args), "--out", str(parts),
                                    "--resume", "latest"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        log_path = parts / "train_log.jsonl"
        while process.poll() is None and not (log_path.exists() and
                                              log_path.read_text().count("\n") >= kill_after):
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    assert {"step_00000002", "step_00000004"} <= {p.name for p in (parts / "checkpoints").iterdir()}
    (parts / "checkpoints" / "step_00000006.partial").mkdir()  # as a kill while saving would leave it
    (parts / "checkpoints" / "step_00000006.partial" / "model.safetensors").write_bytes(b"cut short")
    last = run_cli(*args, "--out", parts, "--resume", "latest", env=env)
    assert last.returncode == 0, last.stderr
    # the same computations in the same batch shapes on the same machine: equal up to the last bit, in practice
    assert max_difference(weights(tmp_path / "whole"), weights(parts)) < 1e-6
    assert [e["step"] for e in log(parts)] == list(range(1, 9))
    assert not list((parts / "checkpoints").glob("*.partial"))
    again = run_cli(*args, "--out", parts, env=env)  # without --overwrite, a finished run is not overwritten
    assert again.returncode == 2 and "holds a finished training run; pass --overwrite" in again.stderr


def test_resume_finishes_a_run_killed_after_its_last_checkpoint_and_refuses_one_past_max_steps(tiny_pairs, tmp_path):
    """A checkpoint at --max-steps (killed before the weights were written) finishes the run; one past it is
    refused before anything is written (its weights trained longer than asked); a checkpoint may be named as
    OUT/checkpoints lists it."""
    args = ["train", tiny_pairs, "--max-steps", 4, "--checkpoint-every", 2, *FAST]
    assert run_cli(*args, "--out", tmp_path / "a").returncode == 0
    shutil.copytree(tmp_path / "a", tmp_path / "killed")
    for name in ("train.json", "pytorch_lora_weights.safetensors"):  # as a kill after the last checkpoint leaves it
        (tmp_path / "killed" / name).unlink()
    finished = run_cli(*args, "--out", tmp_path / "killed", "--resume", "latest")
    assert finished.returncode == 0, finished.stderr
    assert "trained 4 steps of 2 pairs each on" in finished.stderr
    assert "no step left after the checkpoint" in finished.stderr
    assert json.loads((tmp_path / "killed" / "train.json").read_text())["steps"] == 4
    assert max_difference(weights(tmp_path / "killed"), weights(tmp_path / "a")) == 0
    past = run_cli(*args[:2], "--max-steps", 3, *args[4:], "--out", tmp_path / "past", "--resume",
                   tmp_path / "a" / "checkpoints" / "step_00000004")
    assert past.returncode == 2 and past.stderr.count("\n") == 1 and not (tmp_path / "past").exists()
    assert "step_00000004 is at step 4, past --max-steps 3; give --max-steps 4 or more" in past.stderr
    named = run_cli(*args, "--out", tmp_path / "a", "--overwrite", "--resume", "step_00000002")
    assert named.returncode == 0, named.stderr
    assert max_difference(weights(tmp_path / "a"), weights(tmp_path / "killed")) < 1e-6  # steps 3-4 again
    missing = run_cli(*args, "--out", tmp_path / "a", "--overwrite", "--resume", "step_00000099")
    assert missing.returncode == 2 and "--resume step_00000099: no such checkpoint folder" in missing.stderr
    assert (tmp_path / "a" / "train.json").exists()  # refused: the finished run is still there
    again = run_cli(*args, "--out", tmp_path / "a")  # a finished run: how to go on, from its last checkpoint
    assert again.returncode == 2 and "holds a finished training run; pass --overwrite to replace it, or choose " \
        "another --out; to train it on from step_00000004 instead, pass --overwrite --resume latest and a higher " \
        "--max-steps" in again.stderr
    plain = [*args[:2], "--max-steps", 1, "--checkpoint-every", 0, *FAST, "--out", tmp_path / "plain"]
    assert run_cli(*plain).returncode == 0
    again = run_cli(*plain)  # no checkpoint to go on from: only replacing is offered
    assert again.returncode == 2 and "pass --overwrite to replace it, or" in again.stderr


def test_no_cache_trains_the_same_and_tensorboard_gets_the_log(tiny_pairs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cached = run_cli("train", tiny_pairs, "--out", tmp_path / "cached", "--max-steps", 3, "--report-to", "tensorboard",
                     *FAST, env=cli_env(RLAIF_CACHE=str(tmp_path / "cache")))
    plain = run_cli("train", tiny_pairs, "--out", tmp_path / "plain", "--max-steps", 3, "--no-cache", *FAST,
                    env=cli_env(RLAIF_CACHE=str(tmp_path / "unused")))
    assert cached.returncode == plain.returncode == 0, cached.stderr + plain.stderr
    # cached latents are the same float32 tensors the VAE gives each step: the same updates
    assert max_difference(weights(tmp_path / "cached"), weights(tmp_path / "plain")) < 1e-6
    assert list((tmp_path / "cache" / "train" / "latents").rglob("shard-*.sqlite"))
    assert not (tmp_path / "unused").exists()
    board = EventAccumulator(str(tmp_path / "cached" / "logs" / "rlaif-train")).Reload()
    logged = [(e.step, e.value) for e in board.Scalars("loss")]
    assert logged == [(e["step"], pytest.approx(e["loss"])) for e in log(tmp_path / "cached")]


AGREE = """
import os, sys
import torch.distributed as dist
from rlaif.distributed import same_on_every_process
rank = int(os.environ["RANK"])
print(f"rank {rank}: {same_on_every_process(sys.argv[1 + rank])}", flush=True)
dist.barrier()
dist.destroy_process_group()  # left to the interpreter's exit, gloo's threads once aborted a rank (CI, 2026-11-29)
"""


def test_processes_that_indexed_different_tables_all_refuse(tiny_pairs, tmp_path, monkeypatch):
    """Each process resolves the table itself (a hub dataset's current commit): if it changed in between, every
    process finds out, none waits for the others, and training refuses (a review)."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(32500 + os.getpid() % 1000), str(script), "table@v1"]
    differ = subprocess.run([*argv, "table@v2"], env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    # the two processes' prints may interleave (seen: "rank 1: Falserank 0: False\n\n"): found, not split on lines
    assert differ.returncode == 0 and sorted(re.findall(r"rank \d: (?:True|False)", differ.stdout)) == [
        "rank 0: False", "rank 1: False"], differ.stdout + differ.stderr
    from rlaif.config import TrainConfig
    from rlaif.errors import RlaifError
    from rlaif.train import trainer

    monkeypatch.setattr(trainer, "same_on_every_process", lambda value: False)  # as the other process answers
    with pytest.raises(RlaifError, match=f"^pairs {tiny_pairs}: the 1 processes read different versions of it"):
        trainer.run_train(TrainConfig(pairs=str(tiny_pairs), model="tiny", out=tmp_path / "t", max_steps=1))
    assert not (tmp_path / "t").exists()


def test_one_two_processes_and_accumulation_give_the_same_steps(tiny_pairs, tmp_path):
    """Global batch 4 as 1 process x 4 pairs (no DataLoader workers), 2 processes x 2 pairs (a worker each),
    or 1 process x 1 pair x 4 accumulation steps. Plain SGD without clipping makes every update exactly
    -lr * gradient, so a gradient scaled by the process count or the accumulation, or a schedule stepped per
    process, shows in the weights; the warm-up makes the learning rate differ from step to step, so a schedule
    running ahead shows in the log."""
    common = ["train", tiny_pairs, "--model", "tiny", "--optimizer", "sgd", "--max-grad-norm", 0,
              "--warmup-steps", 3, "--max-steps", 4, "--learning-rate", 0.01]
    env = cli_env(OMP_NUM_THREADS="1")
    one = run_cli(*common, "--out", tmp_path / "one", "--batch-size", 4, "--workers", 0, env=env)
    accumulated = run_cli(*common, "--out", tmp_path / "accumulated", "--batch-size", 1, "--accumulation", 4, env=env)
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(31500 + os.getpid() % 1000), "-m", "rlaif", *map(str, common), "--out", str(tmp_path / "two"),
         "--batch-size", "2", "--workers", "1"], env=env, capture_output=True, text=True, timeout=600)
    for result in (one, accumulated, two):
        assert result.returncode == 0, result.stderr
    recorded = {run: json.loads((tmp_path / run / "train.json").read_text()) for run in ("one", "two")}
    assert [(r["processes"], r["pairs_per_step"]) for r in recorded.values()] == [(1, 4), (2, 4)]
    assert "trained 4 steps of 4 pairs each over 2 processes on " in two.stderr
    lrs = [0.0, 0.01 / 3, 0.02 / 3, 0.01]  # linear warm-up over 3 optimizer steps, the rate each update used
    for run in ("one", "accumulated", "two"):
        assert [e["step"] for e in log(tmp_path / run)] == [1, 2, 3, 4]  # one log writer: one process group
        assert [e["lr"] for e in log(tmp_path / run)] == pytest.approx(lrs, rel=1e-12)
    for name in ("loss", "implicit_acc", "reward_margin", "uncond_drift"):  # logged: means over the global batch
        # reward_margin and uncond_drift are differences of near-equal errors: their round-off is absolute (4.6e-6
        # seen on a margin of 1.2e-3), where a mean over one process's pairs alone would be off by their size
        assert [e[name] for e in log(tmp_path / "two")] == pytest.approx([e[name] for e in log(tmp_path / "one")],
                                                                        rel=2e-3, abs=2e-5)
    a = weights(tmp_path / "one")
    # LoRA up-projections start at zero, so their size is the size of the updates. Updates of >= 1e-3 against
    # float32 round-off of batched vs per-pair UNet passes (~1e-7 relative): a gradient or learning rate off
    # by a factor of 2 would differ by >= 5e-4, 50x the tolerance.
    update = max(float(w.abs().max()) for k, w in a.items() if ".up." in k)
    print(f"largest update {update:.3g}; differences: two processes "
          f"{max_difference(weights(tmp_path / 'two'), a):.3g}, accumulation "
          f"{max_difference(weights(tmp_path / 'accumulated'), a):.3g}")
    assert update > 1e-3
    assert max_difference(weights(tmp_path / "two"), a) < 1e-5
    assert max_difference(weights(tmp_path / "accumulated"), a) < 1e-5


@pytest.mark.parametrize("loss", ["sigmoid", "sft"])
def test_sdxl_style_training_writes_a_loadable_lora(tiny_pairs, tmp_path, loss):
    result = run_cli("train", tiny_pairs, "--out", tmp_path / "xl", "--max-steps", 2, "--model", "tiny-xl",
                     "--batch-size", 2, "--random-crop", "--hflip", "--loss", loss)
    assert result.returncode == 0, result.stderr
    if loss == "sigmoid":
        assert log(tmp_path / "xl")[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    else:  # SFT: the MSE of the winners' noise prediction, a positive number
        assert 0 < log(tmp_path / "xl")[0]["loss"] < 10
    pipe = load_pipeline("tiny-xl")
    pipe.load_lora_weights(tmp_path / "xl")
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_pairs, tmp_path):
    result = run_cli("train", tiny_pairs, "--out", tmp_path / "o", "--max-steps", 4, "--model", "tiny",
                     "--batch-size", 2, "--learning-rate", 1e30, "--checkpoint-every", 1)
    assert result.returncode == 2
    assert "error: loss became nan at step 2; the last good checkpoint is kept" in result.stderr
    assert (tmp_path / "o" / "checkpoints" / "step_00000001" / "position.json").exists()
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()


def test_held_out_pairs_are_measured_every_val_every_steps(tmp_path):
    """With 40 prompts, --val-fraction 0.25 holds out about 10 prompts' pairs; every --val-every steps (and at
    the last) the log carries their DPO loss, implicit accuracy and reward margin. An update too small to move the
    model leaves policy = reference on them: loss ln 2, margin 0."""
    import io

    import numpy as np
    import polars as pl
    from PIL import Image

    rng = np.random.default_rng(0)

    def png():
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    pl.DataFrame({"caption": [f"a picture of thing {i}" for i in range(40)], "jpg_0": [png() for _ in range(40)],
                  "jpg_1": [png() for _ in range(40)], "label_0": [float(i % 2) for i in range(40)]}
                 ).write_parquet(tmp_path / "pap.parquet")
    common = ["train", tmp_path / "pap.parquet", "--model", "tiny", "--batch-size", 2, "--max-steps", 5,
              "--val-fraction", 0.25, "--val-every", 2, "--optimizer", "sgd"]
    still = run_cli(*common, "--learning-rate", 1e-30, "--out", tmp_path / "still")
    moving = run_cli(*common, "--learning-rate", 0.05, "--out", tmp_path / "moving")
    assert still.returncode == moving.returncode == 0, still.stderr + moving.stderr
    entries = log(tmp_path / "still")
    assert [e["step"] for e in entries if "val_implicit_acc" in e] == [2, 4, 5]
    for entry in entries[1::2]:
        assert entry["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert entry["val_reward_margin"] == pytest.approx(0, abs=1e-6)
    moved = [e for e in log(tmp_path / "moving") if "val_loss" in e]
    assert all(0 <= e["val_implicit_acc"] <= 1 for e in moved) and moved[-1]["val_loss"] != pytest.approx(math.log(2))
    held_out = json.loads((tmp_path / "moving" / "train.json").read_text())["pairs_held_out"]
    measured = 2 * (held_out // 2)  # in whole batches of 2 (up to 256)
    assert held_out > 2 and {e["val_pairs"] for e in moved} == {measured}
    assert f"held-out acc {moved[-1]['val_implicit_acc']:.2f} ({measured} pairs)" in moving.stderr
    few = run_cli(*common[:4], "--batch-size", 4, "--max-steps", 2, "--val-fraction", 0.05, "--optimizer", "sgd",
                  "--learning-rate", 1e-30, "--out", tmp_path / "few")  # 5% of 40 prompts: 1 pair, under a batch
    assert few.returncode == 0, few.stderr
    val_losses = [e["val_loss"] for e in log(tmp_path / "few") if "val_loss" in e]  # every step (max-steps // 10 is 0)
    assert val_losses == pytest.approx([math.log(2)] * 2, abs=1e-4)
    pl.read_parquet(tmp_path / "pap.parquet").with_row_index().with_columns(  # Pick-a-Pic's marks, as read
        are_different=pl.col("index") >= 3).drop("index").write_parquet(tmp_path / "same.parquet")
    same = run_cli("train", tmp_path / "same.parquet", "--model", "tiny", "--max-steps", 1, "--val-fraction", 0,
                   "--out", tmp_path / "same")
    assert same.returncode == 0, same.stderr
    assert json.loads((tmp_path / "same" / "train.json").read_text())["same_images_dropped"] == 3
    assert "on 37 pairs (0 ties dropped, 3 pairs of one picture twice dropped, 0 held out; labels: label_0)" \
        in same.stderr


def test_lora_targets_written_with_spaces_train_every_module_named(tiny_pairs, tmp_path):
    """"to_q, to_v" (a space after the comma, as people write lists) trains both: peft matched " to_v" to nothing
    and, as to_q matched, trained to_q alone without a word."""
    result = run_cli("train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "o", "--max-steps", 1,
                     "--lora-targets", "to_q, to_v")
    assert result.returncode == 0, result.stderr
    trained = {key.split(".lora")[0].rsplit(".", 1)[-1] for key in weights(tmp_path / "o")}
    assert trained == {"to_q", "to_v"}


def test_val_every_on_a_table_that_holds_out_nothing_says_so(tiny_pairs, tmp_path):
    """tiny_pairs has 4 captions, under the 20 a table needs to hold any out: --val-every then measures nothing,
    and the run says why instead of logging no held-out figures without a word."""
    result = run_cli("train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "o", "--max-steps", 2,
                     "--val-every", 1)
    assert result.returncode == 0, result.stderr
    assert f"note: no pairs are held out: captions are held out by their hash, a --val-fraction 0.05 share of them, " \
        f"and none of {tiny_pairs}'s fell there" in result.stderr
    assert not any(key.startswith("val_") for entry in log(tmp_path / "o") for key in entry)


def test_a_run_that_ends_inside_its_warm_up_says_so(tiny_pairs, tmp_path):
    """The SD1.5 recipe's --warmup-steps 500 kept for a 4-step trial trained at 0.6% of its rate, and its weights
    moved by 1e-10 without a word (a new user's trial)."""
    from rlaif.config import TrainConfig
    from rlaif.train.trainer import within_warmup

    result = run_cli("train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "o", "--max-steps", 4,
                     "--warmup-steps", 500)
    assert result.returncode == 0, result.stderr
    assert ("note: --warmup-steps 500 is not below --max-steps 4: the run ends inside its warm-up, its last step at "
            "0.6% of the learning rate, so the weights will barely move; lower --warmup-steps") in result.stderr
    assert log(tmp_path / "o")[-1]["lr"] == pytest.approx(3e-4 * 3 / 500)  # what the note says, as logged
    assert within_warmup(TrainConfig(pairs="p", model="tiny", out=tmp_path, max_steps=501, warmup_steps=500)) is None
