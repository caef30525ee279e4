"""Model loading: tiny folders through plain diffusers, the hub-id path through an offline HF cache."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import install_in_hf_cache, run_cli
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from rlaif.errors import RlaifError
from rlaif.models import default_guidance, load_pipeline
from rlaif.tiny import TINY_SD3_DIR, TINY_SD_DIR, tiny_model_dir


def test_tiny_folders_load_with_plain_diffusers(tmp_path):
    assert run_cli("tiny", "--out", tmp_path / "sd").returncode == 0
    assert run_cli("tiny", "--out", tmp_path / "xl", "--xl").returncode == 0
    sd = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    xl = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl")
    assert xl.unet.config.addition_embed_type == "text_time"
    assert xl.text_encoder_2 is not None and sd.text_encoder is not None
    for pipe in (sd, xl):
        image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
        assert image.shape == (64, 64, 3)


def test_tiny_xl_is_deterministic_and_cached(tmp_path):
    first = tiny_model_dir("tiny-xl")
    assert run_cli("tiny", "--out", tmp_path / "xl", "--xl").returncode == 0
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        assert (first / name).read_bytes() == (tmp_path / "xl" / name).read_bytes()
    assert tiny_model_dir("tiny-xl") == first


def _foreground_fraction(pipe, prompt: str) -> float:
    """Mean share of pixels that differ clearly from the image's border colour (the drawn shape)."""
    generators = [torch.Generator().manual_seed(i) for i in range(8)]
    images = pipe([prompt] * 8, num_inference_steps=20, generator=generators, output_type="np").images
    shares = []
    for image in images:
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        # 0.25 of the [0, 1] range: far above float noise, below the colour differences the tiny world draws
        shares.append((np.abs(image - np.median(border, axis=0)).max(axis=-1) > 0.25).mean())
    return float(np.mean(shares))


@pytest.mark.parametrize("scene", ["red circle on a blue", "white square on a black", "green circle on a orange"])
def test_pretrained_tiny_model_follows_the_prompt(scene):
    """The pretrained tiny model draws what it is told: 'large' shapes cover far more of the picture."""
    pipe = load_pipeline("tiny")
    small = _foreground_fraction(pipe, f"a small {scene} background")
    large = _foreground_fraction(pipe, f"a large {scene} background")
    # Not float tolerances but behaviour: seen small/large 0.026/0.19, 0.31/0.81, 0.058/0.37 (ratios 7.3, 2.6, 6.3)
    assert large > 2 * small and large > 0.15


@pytest.mark.parametrize("folder", [TINY_SD_DIR, TINY_SD3_DIR], ids=["sd", "sd3"])
def test_hub_id_resolves_through_an_offline_hf_cache(tmp_path, prompts_file, folder):
    repo = f"rlaif-test/{folder.name}"
    install_in_hf_cache(repo, folder)
    result = run_cli("sample", "--model", repo, "--prompts", prompts_file, "--per-prompt", 2, "--steps", 2,
                     "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 16
    assert run_cli("label", tmp_path / "out", "--scorer", "compressibility").returncode == 0
    trained = run_cli("train", tmp_path / "out" / "pairs.parquet", "--model", repo, "--out", tmp_path / "train",
                      "--max-steps", 1, "--batch-size", 2)  # the family (and its Flow-DPO defaults) from the cache
    assert trained.returncode == 0, trained.stderr
    config = json.loads((tmp_path / "train" / "train.json").read_text())["config"]
    assert (config["beta"], config["dpo_positive"]) == {"tiny-sd": (1000.0, 1.0), "tiny-sd3": (100.0, 0.0)}[folder.name]
    missing = run_cli("sample", "--model", "rlaif-test/not-there", "--prompts", prompts_file,
                      "--out", tmp_path / "out2")
    assert missing.returncode == 2
    assert "model 'rlaif-test/not-there' is not in the local Hugging Face cache" in missing.stderr
    assert not (tmp_path / "out2").exists()


def test_scheduler_by_class_name_and_unknown_ones():
    euler = load_pipeline("tiny", scheduler="EulerDiscreteScheduler")
    assert type(euler.scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(RlaifError, match="unknown --scheduler 'Nope'.*DDIMScheduler"):
        load_pipeline("tiny", scheduler="Nope")


@pytest.mark.parametrize("model", ["tiny", "tiny-sd3"])
def test_generation_settings_are_checked_from_config_files_as_the_loaded_pipeline_takes_them(model):
    """check_generation (a loop's check of [sample] and [eval] before round 1, nothing loaded) takes the schedulers
    and image sides that loading and sampling take, and refuses the others."""
    from rlaif.models import check_generation, is_flow

    pipe = load_pipeline(model)
    for scheduler in {type(pipe.scheduler), *pipe.scheduler.compatibles}:
        check_generation(model, scheduler.__name__, {})
    with pytest.raises(RlaifError, match="unknown --scheduler 'Nope'"):
        check_generation(model, "Nope", {})
    multiple = pipe.vae_scale_factor * (2 if is_flow(pipe) else 1)
    check_generation(model, None, {"--width": 3 * multiple, "--height": multiple})
    with pytest.raises(RlaifError, match=f"--height {multiple * 3 // 2}: this model needs a multiple of {multiple} "):
        check_generation(model, None, {"--width": multiple, "--height": multiple * 3 // 2})


def test_dtype_is_applied():
    assert load_pipeline("tiny", dtype="bf16").unet.dtype == torch.bfloat16


def test_unset_guidance_is_what_each_family_samples_with_in_diffusers():
    # the values of diffusers' pipelines (and FLUX.1-dev's model card): 7.5 would overdrive FLUX.1-dev's distilled
    # guidance input and SDXL, whose pipelines default to 3.5 and 5.0
    expected = {"tiny": 7.5, "tiny-xl": 5.0, "tiny-sd3": 7.0, "tiny-flux": 3.5}
    assert {alias: default_guidance(load_pipeline(alias)) for alias in expected} == expected
    schnell = load_pipeline("tiny-flux")
    schnell.transformer.register_to_config(guidance_embeds=False)  # FLUX.1-schnell's transformer: no guidance input
    assert default_guidance(schnell) == 0.0


def test_unreadable_model_folder(tmp_path):
    (tmp_path / "broken").mkdir()
    with pytest.raises(RlaifError, match="cannot read model"):
        load_pipeline(str(tmp_path / "broken"))
    with pytest.raises(RlaifError, match="does not exist"):
        load_pipeline(str(tmp_path / "absent"))


def test_python_m_rlaif_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "rlaif", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "sample" in result.stdout and "tiny" in result.stdout


def test_tuned_weights_for_another_model_are_refused(tmp_path):
    """`--tuned` outputs made for tiny-xl do not silently half-apply to tiny, and the other way round."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    xl = load_pipeline("tiny-xl")
    xl.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_v"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(xl.unet))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "xl-lora", unet_lora_layers=layers)
    (tmp_path / "xl-lora" / "train.json").write_text('{"format": 2, "config": {"model": "tiny-xl"}}')  # finished
    with pytest.raises(RlaifError, match="32 of its 64 LoRA tensors fit this model's UNet; it was trained on "
                                         "'tiny-xl'"):
        load_pipeline("tiny", tuned=tmp_path / "xl-lora")
    assert load_pipeline("tiny-xl", tuned=tmp_path / "xl-lora") is not None  # where it belongs, it applies
    load_pipeline("tiny").unet.save_pretrained(tmp_path / "full" / "unet")  # a full fine-tuning output's layout
    (tmp_path / "full" / "train.json").write_text('{"format": 2, "config": {"full": true}}')
    (tmp_path / "p.txt").write_text("a red circle\n")
    result = run_cli("sample", "--model", "tiny-xl", "--tuned", tmp_path / "full", "--prompts", tmp_path / "p.txt",
                     "--out", tmp_path / "o")
    assert result.returncode == 2 and not (tmp_path / "o").exists()
    assert result.stderr.strip() == (f"error: {tmp_path / 'full' / 'unet'} does not fit this model "
                                     "(addition_embed_type differ): was it trained on another model?")
    with pytest.raises(RlaifError, match="is a unet but this model's network is a transformer"):
        load_pipeline("tiny-sd3", tuned=tmp_path / "full")  # a UNet output on an SD3 model
    with pytest.raises(RlaifError, match="0 of its 64 LoRA tensors fit this model's transformer"):
        load_pipeline("tiny-sd3", tuned=tmp_path / "xl-lora")  # a UNet LoRA on an SD3 model: nothing would apply


def test_a_hub_id_missing_offline_says_how_to_fetch_it():
    with pytest.raises(RlaifError) as error:
        load_pipeline("someone/not-downloaded-model")
    assert str(error.value) == ("model 'someone/not-downloaded-model' is not in the local Hugging Face cache, and "
                                "HF_HUB_OFFLINE is set: fetch it with `hf download someone/not-downloaded-model` "
                                "while online (or unset HF_HUB_OFFLINE)")


def test_a_hub_id_the_hub_cannot_be_reached_for_says_so(monkeypatch):
    """Not offline, but nothing answers: the error names the network, not a file the model lacks."""
    import socket

    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as http

    with socket.socket() as probe:  # a port that nothing listens on: every connection is refused at once
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)  # time.sleep, during this test: no retry waits
    with pytest.raises(RlaifError) as error:
        load_pipeline("someone/unreachable-model")
    message = str(error.value)
    assert message.startswith("model 'someone/unreachable-model' is not in the local Hugging Face cache, and the "
                              "Hugging Face Hub cannot be reached (")
    assert "refused" in message.lower() and "does not appear to have a file" not in message
    assert message.endswith("or fetch it with `hf download someone/unreachable-model` where the hub is reachable and "
                            "set HF_HUB_OFFLINE=1 here")


def test_docs_name_hub_ids_that_exist():
    """runwayml/stable-diffusion-v1-5 was taken down in 2024; its weights live on under the id below."""
    root = Path(__file__).resolve().parents[1]
    docs = [root / "README.md", *sorted((root / "examples").rglob("*.toml")), *sorted((root / "rlaif").rglob("*.py"))]
    assert not [str(p) for p in docs if "runwayml/" in p.read_text()]
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in (root / "README.md").read_text()


def test_a_weights_fingerprint_is_the_content_not_the_place(tmp_path):
    """Copies of the same weights (another folder, another time) give one fingerprint; a change at either end or
    in a sampled block of a large file gives another, and so does a change anywhere in a small file."""
    from rlaif.files import _END, _SAMPLES, HASHED_UP_TO, weights_fingerprint

    size = HASHED_UP_TO + 3 * _END
    data = bytearray(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, copy = (tmp_path / folder / "diffusion_pytorch_model.safetensors" for folder in ("a", "b"))
    first.write_bytes(data)
    copy.write_bytes(data)  # written later: another modification time
    assert weights_fingerprint([first]) == weights_fingerprint([copy])
    step = (size - 2 * _END) // _SAMPLES
    for offset in (3, size - 5, _END + 7 * step + 100):  # the start, the end, inside the 8th sampled block
        changed = bytearray(data)
        changed[offset] ^= 1
        copy.write_bytes(changed)
        assert weights_fingerprint([copy]) != weights_fingerprint([first]), offset
    small = tmp_path / "a" / "small.safetensors"
    small.write_bytes(bytes(1000))
    before = weights_fingerprint([small])
    small.write_bytes(bytes(500) + b"\x01" + bytes(499))
    assert weights_fingerprint([small]) != before
