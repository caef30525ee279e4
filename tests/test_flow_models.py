"""SD3- and FLUX-style models (tiny-sd3, tiny-flux) through the real CLI: plain diffusers loads the folders,
sampling shards like a single process, Flow-DPO starts at ln 2, and the LoRA / transformer outputs load in
plain diffusers and change the images."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import PROMPTS, cli_env, run_cli
from diffusers import FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file

from rlaif.cache import cache_dir
from rlaif.config import TrainConfig
from rlaif.models import load_pipeline, prompt_length
from rlaif.train.encoding import Encoder, encode_captions
from rlaif.train.trainer import frozen_dtypes, trainable_network, with_family_defaults

FLOW_MODELS = {"tiny-sd3": StableDiffusion3Pipeline, "tiny-flux": FluxPipeline}
FAST = ("--batch-size", 2, "--learning-rate", 1e-3)


def log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=list(FLOW_MODELS))
def flow_run(request, tmp_path_factory):
    """A model alias, its folder written by `rlaif tiny`, and a pairs table on it (4 prompts x 4 candidates,
    compressibility, all pairs)."""
    alias = request.param
    folder = tmp_path_factory.mktemp(alias)
    written = run_cli("tiny", "--kind", alias, "--out", folder / "model")
    assert written.returncode == 0, written.stderr
    (folder / "p.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    sampled = run_cli("sample", "--model", alias, "--prompts", folder / "p.txt", "--per-prompt", 4, "--steps", 4,
                      "--batch-size", 16, "--out", folder / "run")
    assert sampled.returncode == 0, sampled.stderr
    labelled = run_cli("label", folder / "run", "--scorer", "compressibility", "--strategy", "all-pairs")
    assert labelled.returncode == 0, labelled.stderr
    return alias, folder


def images(pipe, seed=0):
    return pipe("a small red circle on a blue background", num_inference_steps=3, height=64, width=64,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_plain_diffusers_loads_the_tiny_folders_and_sampling_uses_their_scheduler(flow_run):
    alias, folder = flow_run
    pipe = FLOW_MODELS[alias].from_pretrained(folder / "model")
    assert images(pipe).shape == (1, 64, 64, 3)
    table = pl.read_parquet(folder / "run" / "samples.parquet")
    assert table.height == 16 and set(table["scheduler"]) == {"FlowMatchEulerDiscreteScheduler"}
    assert set(table["width"]) == {64}  # the VAE's native size, not FLUX's hard-coded 1024


def test_sampling_without_guidance_uses_the_pipelines_own(flow_run, tmp_path):
    alias, folder = flow_run
    table = pl.read_parquet(folder / "run" / "samples.parquet")
    expected = {"tiny-sd3": 7.0, "tiny-flux": 3.5}[alias]  # diffusers' StableDiffusion3Pipeline / FluxPipeline
    assert set(table["guidance"]) == {expected}
    assert json.loads((folder / "run" / "run.json").read_text())["generation"]["guidance"] == expected
    made = {}
    for guidance in (expected, 7.5):
        out = tmp_path / str(guidance)
        result = run_cli("sample", "--model", alias, "--prompts", folder / "p.txt", "--per-prompt", 4, "--steps", 4,
                         "--batch-size", 16, "--guidance", guidance, "--out", out)
        assert result.returncode == 0, result.stderr
        made[guidance] = (out / table["image"][0]).read_bytes()
    assert made[expected] == (folder / "run" / table["image"][0]).read_bytes() != made[7.5]
    refused = run_cli("sample", "--model", alias, "--prompts", folder / "p.txt", "--per-prompt", 4, "--steps", 4,
                      "--batch-size", 16, "--guidance", 7.5, "--out", folder / "run")
    assert refused.returncode != 0 and f"guidance {expected} -> 7.5" in refused.stderr


def test_two_processes_sample_the_same_images_as_one(flow_run, tmp_path):
    alias, folder = flow_run
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(30500 + os.getpid() % 1000), "-m", "rlaif", "sample", "--model", alias, "--prompts",
         str(folder / "p.txt"), "--per-prompt", "4", "--steps", "4", "--batch-size", "16", "--out",
         str(tmp_path / "two")], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    one = {p.relative_to(folder / "run"): p.read_bytes() for p in (folder / "run" / "images").rglob("*.png")}
    two = {p.relative_to(tmp_path / "two"): p.read_bytes() for p in (tmp_path / "two" / "images").rglob("*.png")}
    assert len(one) == 16 and one == two


@pytest.mark.parametrize(("full", "precision"), [(False, "no"), (True, "no"), (False, "bf16")])
def test_flow_dpo_starts_at_ln2_with_flow_defaults(flow_run, tmp_path, full, precision):
    alias, folder = flow_run
    out = tmp_path / "o"
    result = run_cli("train", folder / "run" / "pairs.parquet", "--model", alias, "--out", out, "--max-steps", 2,
                     "--mixed-precision", precision, *(["--full"] if full else []), *FAST)
    assert result.returncode == 0, result.stderr
    # step 0: policy == reference (adapters off, or the frozen copy), so inside = 0 and the loss is ln 2
    assert log(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(entry["loss"]) for entry in log(out))
    # a LoRA under bf16 trains on bf16 frozen weights (half the memory); fp32 and full fine-tuning keep fp32
    info = json.loads((out / "train.json").read_text())
    assert info["frozen_weights"] == ("bf16" if precision == "bf16" and not full else "fp32")
    # FLUX.1-dev (tiny-flux has its guidance embedding) trains at the distilled guidance its pairs were sampled at
    sampled_at = json.loads((folder / "run" / "run.json").read_text())["generation"]["guidance"]
    assert info.get("distilled_guidance") == (sampled_at if alias == "tiny-flux" else None)
    config = json.loads((out / "train.json").read_text())["config"]
    assert config["beta"] == 100.0 and config["flow_weighting"] == "logit_normal"
    assert config["lora_targets"] is None if full else "add_q_proj" in config["lora_targets"]
    assert (out / ("transformer" if full else "pytorch_lora_weights.safetensors")).exists()


def test_lora_loads_into_plain_diffusers_and_changes_images(flow_run, tmp_path):
    alias, folder = flow_run
    out = tmp_path / "lora"
    result = run_cli("train", folder / "run" / "pairs.parquet", "--model", alias, "--out", out, "--max-steps", 60,
                     "--batch-size", 2, "--learning-rate", 1e-3)
    assert result.returncode == 0, result.stderr
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".add_q_proj." in k for k in keys)  # the joint attention's text-side projections too
    pipe = FLOW_MODELS[alias].from_pretrained(folder / "model")
    before = images(pipe)
    pipe.load_lora_weights(out)
    assert abs(images(pipe) - before).max() > 0.01
    sampled = run_cli("sample", "--model", alias, "--tuned", out, "--prompts", folder / "p.txt", "--per-prompt", 1,
                      "--steps", 3, "--out", tmp_path / "tuned")  # rlaif's own loader fuses the same LoRA
    assert sampled.returncode == 0, sampled.stderr
    judged = run_cli("eval", "-m", alias, "--tuned", out, "--pairs", folder / "run" / "pairs.parquet",
                     "--max-pairs", 24, "-s", "compressibility")  # the Flow-DPO model as a preference classifier
    assert judged.returncode == 0, judged.stderr
    (line,) = [line for line in judged.stdout.splitlines() if line.startswith("tuned model (DPO implicit")]
    assert float(line.split()[6]) > 0.5, line  # on the pairs it trained on


def test_full_fine_tuning_writes_a_transformer_that_diffusers_loads(tmp_path):
    """On tiny-sd3 only: the transformer folder is the network class diffusers expects."""
    folder = tmp_path
    (folder / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    assert run_cli("sample", "--model", "tiny-sd3", "--prompts", folder / "p.txt", "--per-prompt", 2, "--steps", 2,
                   "--out", folder / "run").returncode == 0
    assert run_cli("label", folder / "run", "--scorer", "compressibility").returncode == 0
    out = folder / "full"
    result = run_cli("train", folder / "run" / "pairs.parquet", "--model", "tiny-sd3", "--out", out, "--full",
                     "--max-steps", 3, "--batch-size", 1, "--learning-rate", 1e-3)
    assert result.returncode == 0, result.stderr
    tuned = SD3Transformer2DModel.from_pretrained(out / "transformer")
    from rlaif.models import load_pipeline

    base = load_pipeline("tiny-sd3").transformer
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values(),
                                                    strict=True))
    applied = load_pipeline("tiny-sd3", tuned=out).transformer
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), applied.state_dict().values(),
                                                strict=True))


def test_cached_embeddings_and_checkpointing_train_the_same_as_fresh_ones(flow_run, tmp_path):
    """The T5 / CLIP embeddings and latents come from the cache in one run and are computed every step in the
    other, which also recomputes activations (gradient checkpointing): the same updates. Plain SGD: a caption
    encoded in a batch of another size differs in the last bit (CLIP's pooled output), which Adam's
    normalisation of near-zero gradients would blow up to ~1e-5; SGD keeps it at rounding size."""
    alias, folder = flow_run
    args = ("train", folder / "run" / "pairs.parquet", "--model", alias, "--max-steps", 3, "--batch-size", 2,
            "--optimizer", "sgd", "--learning-rate", 0.5)
    cached = run_cli(*args, "--out", tmp_path / "cached", env=cli_env(RLAIF_CACHE=str(tmp_path / "cache")))
    fresh = run_cli(*args, "--out", tmp_path / "fresh", "--no-cache", "--gradient-checkpointing")
    assert cached.returncode == fresh.returncode == 0, cached.stderr + fresh.stderr
    assert list((tmp_path / "cache" / "train" / "text").rglob("shard-*.sqlite"))
    a, b = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in ("cached", "fresh"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3  # it did train, 1000x the tolerance


def test_a_size_the_transformer_cannot_patch_is_refused():
    """SD3 / FLUX read 2x2 latent patches: at the real models' VAE scale 8, 520 px (65 latents) cannot work;
    `rlaif train` checks --resolution and `rlaif sample` / `eval` --width and --height with this function."""
    from rlaif.errors import RlaifError
    from rlaif.models import check_size

    pipe = load_pipeline("tiny-sd3")
    pipe.vae_scale_factor = 8  # as on SD3.5 / FLUX.1
    check_size(pipe, "--resolution", 512)
    with pytest.raises(RlaifError, match="--resolution 520: this model needs a multiple of 16 pixels"):
        check_size(pipe, "--resolution", 520)
    unet = load_pipeline("tiny")
    unet.vae_scale_factor = 8  # as on SD1.5 / SDXL: 520 px is fine for a UNet
    check_size(unet, "--width", 520)


def test_lora_under_half_precision_stores_the_frozen_weights_in_it_and_trains_fp32_factors(tmp_path):
    """What makes FLUX.1-dev LoRA fit an 80 GB card: the frozen transformer and text encoders in bf16 (half the
    bytes), the VAE and the trained LoRA factors in fp32; full fine-tuning and fp32 runs keep fp32 weights."""
    config = with_family_defaults(TrainConfig(pairs="p.parquet", model="tiny-sd3", out=Path("o"),
                                              mixed_precision="bf16"))
    pipe = load_pipeline("tiny-sd3", component_dtypes=frozen_dtypes(config))
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    assert {pipe.transformer.dtype, *(encoder.dtype for encoder in encoders)} == {torch.bfloat16}
    assert pipe.vae.dtype == torch.float32
    def size(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    assert size(pipe.transformer) * 2 == size(load_pipeline("tiny-sd3").transformer)
    network, reference, params = trainable_network(pipe, config)
    assert reference is None and params and {p.dtype for p in params} == {torch.float32}
    assert {p.dtype for p in network.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert frozen_dtypes(replace(config, full=True)) == {}
    assert frozen_dtypes(replace(config, mixed_precision="no")) == {}
    full_output = tmp_path / "round1"
    (full_output / "transformer").mkdir(parents=True)  # a full fine-tuning output: the LoRA is fused into it
    assert frozen_dtypes(replace(config, init=str(full_output))) == {}


def test_max_sequence_length_sets_the_t5_prompt_length_of_sampling_and_training(flow_run, tmp_path):
    alias, folder = flow_run
    pipe = load_pipeline(alias, "fp32", "cpu")
    captions = ["a small red circle on a blue background"]
    default = encode_captions(pipe, captions, "cpu")[0]
    short = encode_captions(pipe, captions, "cpu", max_sequence_length=8)[0]
    # SD3 joins CLIP's and T5's sequences, FLUX takes T5's alone: either way 8 T5 tokens instead of the default
    assert short.shape[1] == default.shape[1] - (prompt_length(pipe)["max_sequence_length"] - 8)
    (tmp_path / "p.txt").write_text(captions[0] + "\n")
    argv = ("sample", "--model", alias, "--prompts", tmp_path / "p.txt", "--per-prompt", 2, "--steps", 2,
            "--out", tmp_path / "s")
    assert run_cli(*argv, "--max-sequence-length", 8).returncode == 0
    assert json.loads((tmp_path / "s" / "run.json").read_text())["generation"]["max_sequence_length"] == 8
    resumed = run_cli(*argv)  # the default length would draw other images into the same folder
    assert resumed.returncode == 2 and "max_sequence_length 8 -> 32" in resumed.stderr
    assert run_cli(*argv[:-1], tmp_path / "default").returncode == 0
    drawn = [(tmp_path / run / "images").rglob("*.png") for run in ("s", "default")]
    assert [p.read_bytes() for p in drawn[0]] != [p.read_bytes() for p in drawn[1]]  # the prompt was cut at 8
    beyond = run_cli(*argv[:-1], tmp_path / "beyond", "--max-sequence-length", 64)  # the tiny T5 takes 32
    assert beyond.returncode == 2 and not (tmp_path / "beyond").exists()
    assert beyond.stderr.strip() == "error: --max-sequence-length 64: this model's T5 tokenizer takes at most 32 tokens"
    # a folder from before the length was recorded was sampled at the default: it resumes
    run_file = tmp_path / "default" / "run.json"
    old = json.loads(run_file.read_text())
    del old["generation"]["max_sequence_length"]
    run_file.write_text(json.dumps(old))
    assert run_cli(*argv[:-1], tmp_path / "default").returncode == 0
    out = tmp_path / "o"
    # pairs sampled at the default length are not trained at 8 (rlaif label recorded the length in the table)
    mismatched = run_cli("train", folder / "run" / "pairs.parquet", "--model", alias, "--out", out, "--max-steps", 1,
                         "--max-sequence-length", 8, *FAST)
    assert mismatched.returncode == 2 and not out.exists()
    assert mismatched.stderr.endswith("was sampled at T5 prompt length 32, and training would encode its captions at "
                                      "8; pass --max-sequence-length 32\n")
    assert run_cli("label", tmp_path / "s", "--scorer", "compressibility").returncode == 0
    trained = run_cli("train", tmp_path / "s" / "pairs.parquet", "--model", alias, "--out", out, "--max-steps", 1,
                      "--max-sequence-length", 8, *FAST)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((out / "train.json").read_text())["config"]["max_sequence_length"] == 8
    # the captions were encoded (and cached) at 8 tokens
    texts = Encoder(pipe, cache_dir() / "train", max_sequence_length=8).texts
    assert texts.folder.is_dir() and any(texts.folder.iterdir())
    # rlaif eval samples both sides at the length the model was trained at
    evaluated = run_cli("eval", "--base", alias, "--tuned", out, "--prompts", tmp_path / "p.txt", "--out",
                        tmp_path / "e", "--scorer", "compressibility", "--per-prompt", 1, "--steps", 2)
    assert evaluated.returncode == 0, evaluated.stderr
    for side in ("tuned", "base"):
        assert json.loads((tmp_path / "e" / side / "run.json").read_text())["generation"]["max_sequence_length"] == 8
    assert "distilled guidance" not in evaluated.stderr  # sampled, trained and evaluated at the pipeline's own
    # FLUX.1-dev evaluated at another distilled guidance than it learnt at says so (SD3's guidance is CFG: nothing)
    elsewhere = run_cli("eval", "--base", alias, "--tuned", out, "--prompts", tmp_path / "p.txt", "--out",
                        tmp_path / "e5", "--scorer", "compressibility", "--per-prompt", 1, "--steps", 2,
                        "--guidance", 5)
    assert elsewhere.returncode == 0, elsewhere.stderr
    said = f"note: {out} learnt its preferences at distilled guidance 3.5 (FLUX.1-dev's guidance input, its pairs' " \
        "sampling value), and this evaluation sampled at 5: pass --guidance 3.5 to measure it where it learnt"
    assert (said in elsewhere.stderr) == (alias == "tiny-flux"), elsewhere.stderr
    other = run_cli("eval", "--base", alias, "--tuned", out, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "e2",
                    "--scorer", "compressibility", "--max-sequence-length", 16)
    assert other.returncode == 2 and not (tmp_path / "e2").exists()
    assert other.stderr.strip() == f"error: --max-sequence-length 16: {out} was trained at T5 prompt length 8; " \
        "evaluate it at that length (leave the option out)"


@pytest.mark.parametrize("flow_run", ["tiny-flux"], indirect=True)  # FLUX.1-dev's transformer alone takes it
def test_a_resumed_flux_run_keeps_the_distilled_guidance_it_trained_at(flow_run, tmp_path):
    """The distilled guidance is the pairs' now; a checkpoint trained at another one (an rlaif that trained at 3.5
    whatever the pairs said, recorded nothing) goes on at its own, as an uninterrupted run would have (a review)."""
    alias, folder = flow_run
    out = tmp_path / "o"
    args = ("train", folder / "run" / "pairs.parquet", "--model", alias, "--out", out, "--checkpoint-every", 1, *FAST)
    assert run_cli(*args, "--max-steps", 1).returncode == 0
    position = out / "checkpoints" / "step_00000001" / "position.json"
    record = json.loads(position.read_text())
    assert record["identities"]["distilled_guidance"] == json.loads((out / "train.json").read_text())[
        "distilled_guidance"]
    record["identities"]["distilled_guidance"] = 5.0
    position.write_text(json.dumps(record))
    resumed = run_cli(*args, "--max-steps", 2, "--resume", "step_00000001", "--overwrite")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "train.json").read_text())["distilled_guidance"] == 5.0
    del record["identities"]["distilled_guidance"]
    position.write_text(json.dumps(record))
    older = run_cli(*args, "--max-steps", 2, "--resume", "step_00000001", "--overwrite")
    assert older.returncode == 0, older.stderr
    assert json.loads((out / "train.json").read_text())["distilled_guidance"] == 3.5


def test_flux_schnell_samples_and_trains_without_a_guidance_input(tmp_path):
    """FLUX.1-schnell's layout (no guidance embedding, an unshifted schedule without dynamic shifting), which no
    tiny model has (a review found the path only reasoned about): guidance 0 by default, a 256-token T5 prompt,
    no distilled guidance in training, and sample -> label -> train runs, its first step at ln 2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from rlaif.models import default_guidance
    from rlaif.train.flow import training_shift
    from rlaif.train.objective import objective_for

    dev = load_pipeline("tiny-flux")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel.from_config({**dev.transformer.config, "guidance_embeds": False})
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    schnell = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=dev.vae, text_encoder=dev.text_encoder,
                           tokenizer=dev.tokenizer, text_encoder_2=dev.text_encoder_2, tokenizer_2=dev.tokenizer_2)
    schnell.save_pretrained(tmp_path / "schnell")
    assert (default_guidance(schnell), default_guidance(dev)) == (0.0, 3.5)
    assert objective_for(schnell, "logit_normal", 5.0).distilled_guidance is None
    assert training_shift(schnell.scheduler.config) == 1.0
    dev.tokenizer_2.model_max_length = 1024  # the real T5's room, past the tiny one's 32 (one tokenizer, shared)
    assert (prompt_length(schnell), prompt_length(dev)) == ({"max_sequence_length": 256}, {"max_sequence_length": 512})
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    model = tmp_path / "schnell"
    sampled = run_cli("sample", "--model", model, "--prompts", tmp_path / "p.txt", "--per-prompt", 2, "--steps", 2,
                      "--out", tmp_path / "s")
    assert sampled.returncode == 0, sampled.stderr
    assert json.loads((tmp_path / "s" / "run.json").read_text())["generation"]["guidance"] == 0.0
    assert run_cli("label", tmp_path / "s", "--scorer", "compressibility").returncode == 0
    trained = run_cli("train", tmp_path / "s" / "pairs.parquet", "--model", model, "--out", tmp_path / "o",
                      "--max-steps", 2, *FAST)
    assert trained.returncode == 0, trained.stderr
    assert log(tmp_path / "o")[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    info = json.loads((tmp_path / "o" / "train.json").read_text())
    assert "distilled_guidance" not in info and info["config"]["caption_dropout"] == 0.0
