"""The scripts that rebuild the committed tiny models still run, for a few steps each from the committed weights.

No CLI path runs them, so a change elsewhere can break them unnoticed (one did: ``pretrain_tiny_flow.py`` fed
``Scene`` objects to the tokenizer after ``encode_dataset`` began to return scenes instead of captions).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from rlaif.tiny import COMMITTED

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
# kind -> (script, its options for a short run, the trained network's folder and class)
RUNS = {
    "tiny": ("pretrain_tiny.py", ["--vae-steps", "0", "--decoder-steps", "2", "--shades", "0.4", "--unet-steps", "2"],
             "unet", UNet2DConditionModel),
    "tiny-sd3": ("pretrain_tiny_flow.py", ["--kind", "sd3", "--steps", "2", "--batch-size", "2"], "transformer",
                 SD3Transformer2DModel),
    "tiny-flux": ("pretrain_tiny_flow.py", ["--kind", "flux", "--steps", "2", "--batch-size", "2"], "transformer",
                  FluxTransformer2DModel),
}


@pytest.mark.parametrize("kind", RUNS)
def test_pretraining_runs_from_the_committed_weights_and_changes_them(kind, tmp_path):
    script, options, network, network_class = RUNS[kind]
    committed = COMMITTED[kind]
    run = subprocess.run([sys.executable, str(SCRIPTS / script), *options, "--init", str(committed),
                          "--dataset-size", "128", "--omit-probability", "0.5", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=cli_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    before = network_class.from_pretrained(committed / network).state_dict()
    after = network_class.from_pretrained(tmp_path / network).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before), "two training steps changed nothing"
    if kind == "tiny":  # --decoder-steps trains the decoder alone: the latents the UNet knows stay
        vae_before = AutoencoderKL.from_pretrained(committed / "vae").state_dict()
        vae_after = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
        assert all(torch.equal(vae_before[name], vae_after[name]) for name in vae_before
                   if name.startswith(("encoder.", "quant_conv.")))
        assert any(not torch.equal(vae_before[name], vae_after[name]) for name in vae_before
                   if name.startswith("decoder."))
