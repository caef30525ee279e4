"""What `rlaif train` writes is the model it trained: LoRA alpha survives saving, chained rounds are
self-contained, finished runs are not overwritten, resumed runs keep their settings, files are readable.

"The model it trained" is read independently of rlaif's writer: the last checkpoint holds the trained UNet's
state (base weights, with earlier rounds fused in, plus the LoRA factors), loaded here into a fresh UNet
with PEFT adapters of the run's rank and alpha.
"""

import json
import os
import shutil

import pytest
import torch
from conftest import run_cli
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from rlaif.models import load_pipeline
from rlaif.tiny import TINY_SD_DIR

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FAST = ("--model", "tiny", "--batch-size", 2, "--learning-rate", 1e-2, "--max-steps", 3, "--checkpoint-every", 3)


def trained_unet(out, rank=None, alpha=None):
    """The trained UNet as it was in memory at the last step, rebuilt from its checkpoint."""
    unet = load_pipeline("tiny").unet
    if rank is not None:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TARGETS))
    (checkpoint,) = sorted((out / "checkpoints").iterdir())[-1:]
    unet.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=True)
    return unet.eval()


@torch.no_grad()
def unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    latents = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    text = torch.randn(2, 7, config.cross_attention_dim, generator=generator)
    return unet(latents, torch.tensor([100, 700]), text).sample


def diffusers_lora_unet(out):
    """The tiny model with the output loaded by plain diffusers (no rlaif code): not fused, adapter active."""
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(out)
    return pipe.unet.eval()


# float32 forwards of a tiny UNet: outputs ~1, accumulation over a few hundred terms per layer, so equal
# models agree to ~1e-6; a lost alpha/rank scale or a dropped round changes outputs by >= 1e-3 (asserted).
SAME = 1e-5


def test_lora_alpha_survives_saving(tiny_pairs, tmp_path):
    out = tmp_path / "a16r4"
    result = run_cli("train", tiny_pairs, "--out", out, "--lora-rank", 4, "--lora-alpha", 16, *FAST)
    assert result.returncode == 0, result.stderr
    trained = unet_output(trained_unet(out, rank=4, alpha=16))
    assert (trained - unet_output(load_pipeline("tiny").unet)).abs().max() > 1e-3  # training moved the model
    assert (unet_output(diffusers_lora_unet(out)) - trained).abs().max() < SAME
    assert (unet_output(load_pipeline("tiny", tuned=out).unet) - trained).abs().max() < SAME  # rlaif's reader


def test_lora_alpha_left_out_is_the_rank_and_a_run_begun_at_32_resumes_with_it(tiny_pairs, tmp_path):
    """--lora-rank 4 without --lora-alpha trains at scale 1 (alpha 4, as diffusers' LoRA examples; it was 32, scale
    8, until 2026-11-29), and says so in train.json; a checkpoint begun under the old default is refused with the
    option that resumes it as it began."""
    out = tmp_path / "r4"
    result = run_cli("train", tiny_pairs, "--out", out, "--lora-rank", 4, *FAST)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "train.json").read_text())["config"]["lora_alpha"] == 4
    trained = unet_output(trained_unet(out, rank=4, alpha=4))
    assert (unet_output(load_pipeline("tiny", tuned=out).unet) - trained).abs().max() < SAME
    position = out / "checkpoints" / "step_00000003" / "position.json"
    record = json.loads(position.read_text())
    record["settings"]["lora_alpha"] = 32  # as the default was when the run began
    position.write_text(json.dumps(record))
    result = run_cli("train", tiny_pairs, "--out", out, "--lora-rank", 4, *FAST[:-4], "--max-steps", 4,
                     "--resume", "latest", "--overwrite")
    assert result.returncode != 0
    assert "(lora_alpha 32 -> 4); left to rlaif's defaults" in result.stderr and "pass --lora-alpha 32" in result.stderr


@pytest.mark.parametrize("first", ["lora", "full"])
def test_round_two_alone_reproduces_the_chain(tiny_pairs, tmp_path, first):
    round_1, round_2 = tmp_path / "round_1", tmp_path / "round_2"
    args = ["--full"] if first == "full" else ["--lora-rank", 4, "--lora-alpha", 8]
    result = run_cli("train", tiny_pairs, "--out", round_1, *args, *FAST)
    assert result.returncode == 0, result.stderr
    result = run_cli("train", tiny_pairs, "--out", round_2, "--init", round_1, "--lora-rank", 2, "--lora-alpha", 4,
                     "--seed", 1, *FAST)
    assert result.returncode == 0, result.stderr
    chained = unet_output(trained_unet(round_2, rank=2, alpha=4))  # round 1 fused in its base weights
    round_1_only = unet_output(load_pipeline("tiny", tuned=round_1).unet)
    assert (chained - round_1_only).abs().max() > 1e-3  # round 2 changed something on top of round 1
    shutil.move(round_1, tmp_path / "moved-away")
    if first == "lora":  # one LoRA of rank 4 + 2 holding both rounds, scale folded in
        plain = diffusers_lora_unet(round_2)
        assert {m.lora_A["default_0"].weight.shape[0] for m in plain.modules() if hasattr(m, "lora_A")
                and "default_0" in m.lora_A} == {6}
    else:  # a LoRA on a full UNet is fused into it
        from diffusers import UNet2DConditionModel

        plain = UNet2DConditionModel.from_pretrained(round_2 / "unet")
    assert (unet_output(plain) - chained).abs().max() < SAME
    assert (unet_output(load_pipeline("tiny", tuned=round_2).unet) - chained).abs().max() < SAME


def test_a_resume_over_other_base_weights_is_refused(tiny_pairs, tmp_path):
    """A run killed and resumed after its model folder was rewritten (or a new hub revision came) would train its
    LoRA on over another model (or over other latents: another VAE), and train.json would name only the new one:
    refused, its checkpoint kept."""
    model = tmp_path / "model"
    shutil.copytree(TINY_SD_DIR, model)
    out = tmp_path / "o"
    assert run_cli("train", tiny_pairs, "--out", out, *FAST, "--model", model).returncode == 0
    same = run_cli("train", tiny_pairs, "--out", tmp_path / "same", *FAST, "--model", model, "--max-steps", 4,
                   "--resume", out / "checkpoints" / "step_00000003")
    assert same.returncode == 0, same.stderr  # the same weights resume
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    state = load_file(weights)
    name = next(iter(state))
    save_file({**state, name: state[name] + 1e-3}, weights)
    moved = run_cli("train", tiny_pairs, "--out", out, *FAST, "--model", model, "--max-steps", 4, "--resume",
                    "latest", "--overwrite")
    assert moved.returncode == 2
    assert "that run trained on other weights of" in moved.stderr and "its UNet / transformer changed" in moved.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
    weights.write_bytes(original)  # the UNet as it was, and another VAE swapped in (a review found this resumed)
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    vae_state = load_file(vae)
    name = next(iter(vae_state))
    save_file({**vae_state, name: vae_state[name] + 1e-3}, vae)
    swapped = run_cli("train", tiny_pairs, "--out", out, *FAST, "--model", model, "--max-steps", 4, "--resume",
                      "latest", "--overwrite")
    assert swapped.returncode == 2 and "(its VAE or text encoders changed: " in swapped.stderr, swapped.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]


def test_a_finished_run_is_not_overwritten_and_resume_keeps_its_settings(tiny_pairs, tmp_path):
    out = tmp_path / "o"
    assert run_cli("train", tiny_pairs, "--out", out, *FAST).returncode == 0
    weights = out / "pytorch_lora_weights.safetensors"
    before = weights.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as every other output
    again = run_cli("train", tiny_pairs, "--out", out, *FAST, "--seed", 5)
    assert again.returncode == 2
    assert f"error: {out} holds a finished training run; pass --overwrite to replace it" in again.stderr
    assert weights.read_bytes() == before
    changed = run_cli("train", tiny_pairs, "--out", out, *FAST, "--max-steps", 4, "--resume", "latest",
                      "--overwrite", "--seed", 5, "--beta", 100)
    assert changed.returncode == 2
    assert "that run was made with other settings (beta 1000.0 -> 100.0; seed 0 -> 5)" in changed.stderr
    assert weights.read_bytes() == before
    longer = run_cli("train", tiny_pairs, "--out", out, *FAST, "--max-steps", 4, "--resume", "latest", "--overwrite")
    assert longer.returncode == 0, longer.stderr  # more steps is a resumable change
    assert weights.read_bytes() != before
    replaced = run_cli("train", tiny_pairs, "--out", out, *FAST, "--seed", 5, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]  # the old run's are gone
    full = run_cli("train", tiny_pairs, "--out", out, *FAST, "--full", "--overwrite")
    assert full.returncode == 0, full.stderr
    assert (out / "unet").is_dir() and not weights.exists()  # never a stale LoRA beside the new UNet
    assert json.loads((out / "train.json").read_text())["config"]["lora_targets"] is None  # trained no LoRA
    assert not json.loads((out / "unet" / "config.json").read_text()).get("_name_or_path")  # no folder's path
    failed = run_cli("train", tiny_pairs, "--out", out, *FAST, "--overwrite", "--learning-rate", 1e30)
    assert failed.returncode == 2 and "loss became nan" in failed.stderr
    assert not (out / "unet").exists() and not (out / "train.json").exists()  # no old run posing as this one
