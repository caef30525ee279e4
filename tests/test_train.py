"""`rlaif train` on the tiny model through the real CLI: loss at step 0, LoRA output in diffusers format,
resume from a checkpoint, two processes."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import PROMPTS, cli_env, run_cli
from safetensors.torch import load_file

from rlaif.models import load_pipeline

FAST = ("--model", "tiny", "--batch-size", 2, "--learning-rate", 1e-3)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    (folder / "p.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    assert run_cli("sample", "--model", "tiny", "--prompts", folder / "p.txt", "--per-prompt", 4, "--steps", 4,
                   "--batch-size", 16, "--out", folder / "run").returncode == 0
    result = run_cli("label", folder / "run", "--scorer", "compressibility", "--strategy", "all-pairs")
    assert result.returncode == 0, result.stderr
    return folder / "run" / "pairs.parquet"


def log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_lora_dpo_loads_into_diffusers_and_changes_images(pairs, tmp_path):
    out = tmp_path / "lora"
    result = run_cli("train", pairs, "--out", out, "--max-steps", 50, *FAST)
    assert result.returncode == 0, result.stderr
    entries = log(out)
    assert len(entries) == 50 and entries[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    pipe = load_pipeline("tiny")
    before = pipe("a small red circle on a blue background", num_inference_steps=5,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.load_lora_weights(out)
    after = pipe("a small red circle on a blue background", num_inference_steps=5,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert abs(after - before).max() > 0.01


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_first_step_loss_is_ln2(pairs, tmp_path, full, precision):
    args = ["--full"] if full else []
    result = run_cli("train", pairs, "--out", tmp_path / "o", "--max-steps", 1, "--mixed-precision", precision,
                     *args, *FAST)
    assert result.returncode == 0, result.stderr
    assert log(tmp_path / "o")[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert (tmp_path / "o" / ("unet" if full else "pytorch_lora_weights.safetensors")).exists()


def test_resume_from_checkpoint_equals_uninterrupted_run(pairs, tmp_path):
    whole = run_cli("train", pairs, "--out", tmp_path / "whole", "--max-steps", 6, *FAST)
    assert whole.returncode == 0, whole.stderr
    first = run_cli("train", pairs, "--out", tmp_path / "parts", "--max-steps", 3, "--checkpoint-every", 3, *FAST)
    assert first.returncode == 0, first.stderr
    second = run_cli("train", pairs, "--out", tmp_path / "parts", "--max-steps", 6, "--resume", "latest", *FAST)
    assert second.returncode == 0, second.stderr
    a = load_file(tmp_path / "whole" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "parts" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert [e["step"] for e in log(tmp_path / "parts")] == [1, 2, 3, 4, 5, 6]


def test_two_processes_equal_one_with_the_same_global_batch(pairs, tmp_path):
    """Global batch 2 either way: one process accumulating two micro-batches of one pair, or two processes
    of one pair each. (Adam's first steps are sign(gradient) * lr, so comparing different micro-batch shapes
    would only measure float noise on near-zero gradients.)"""
    one = run_cli("train", pairs, "--out", tmp_path / "one", "--max-steps", 3, "--model", "tiny", "--batch-size", 1,
                  "--accumulation", 2, "--learning-rate", 1e-3, env=cli_env(OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(31500 + os.getpid() % 1000), "-m", "rlaif", "train", str(pairs), "--out", str(tmp_path / "two"),
         "--max-steps", "3", "--model", "tiny", "--batch-size", "1", "--learning-rate", "1e-3"],
        env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert [e["step"] for e in log(tmp_path / "two")] == [1, 2, 3]  # one log writer: the processes formed a group
    a = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_sdxl_style_training_writes_a_loadable_lora(pairs, tmp_path):
    result = run_cli("train", pairs, "--out", tmp_path / "xl", "--max-steps", 2, "--model", "tiny-xl",
                     "--batch-size", 2, "--random-crop", "--hflip")
    assert result.returncode == 0, result.stderr
    assert log(tmp_path / "xl")[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    pipe = load_pipeline("tiny-xl")
    pipe.load_lora_weights(tmp_path / "xl")
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(pairs, tmp_path):
    result = run_cli("train", pairs, "--out", tmp_path / "o", "--max-steps", 4, "--model", "tiny", "--batch-size", 2,
                     "--learning-rate", 1e30, "--checkpoint-every", 1)
    assert result.returncode == 2
    assert "error: loss became nan at step 2; the last good checkpoint is kept" in result.stderr
    assert (tmp_path / "o" / "checkpoints" / "checkpoint_0" / "position.json").exists()
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()
