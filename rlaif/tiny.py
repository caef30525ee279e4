"""The tiny offline model world: real diffusers / transformers architectures with small configs.

``tiny`` is an SD1.5-style pipeline pretrained on the shapes world (``rlaif/shapes.py``) by
``scripts/pretrain_tiny.py``; its weights are committed under ``rlaif/assets/tiny-sd``. ``tiny-xl`` is an
SDXL-style pipeline (two text encoders, ``text_time`` conditioning) built deterministically from a seed,
reusing the tiny VAE and tokenizer, and cached on first use. Both are ordinary diffusers folders.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from rlaif.cache import cache_dir
from rlaif.shapes import VOCABULARY

TINY_SD_DIR = Path(__file__).parent / "assets" / "tiny-sd"
TINY_XL_VERSION = 1  # bump when the tiny-xl recipe changes, so stale caches are not reused
RESOLUTION = 64
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The noise schedule of SD1.5 / SDXL.
NOISE_SCHEDULE = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000
}


def _byte_symbols() -> list[str]:
    """CLIP's byte-level alphabet: one printable unicode character per byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over bytes, with merges that make each shapes-world word one token."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in VOCABULARY:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = (merged, piece)
            merged += piece
            if merge not in merges:
                merges.append(merge)
                tokens.append(merged)
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_vae() -> AutoencoderKL:
    """A 3-level VAE: 64 px images <-> 4 x 16 x 16 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )


def build_sd_components(seed: int = 0) -> dict:
    """Randomly initialised SD1.5-style components (the starting point of the pretraining script)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=64, projection_dim=64))
        vae = build_vae()
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 4,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    scheduler = DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def build_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-style pipeline: random UNet and text encoders from ``seed``, the pretrained tiny VAE."""
    tokenizer = CLIPTokenizer.from_pretrained(TINY_SD_DIR / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, projection_dim=32))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, hidden=32, projection_dim=32))
        time_embed_dim = 8
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 4,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=32 + 32,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # six time ids (original size, crop top-left, target size) plus encoder 2's pooled projection
            projection_class_embeddings_input_dim=6 * time_embed_dim + 32,
            norm_num_groups=32,
        )
    vae = AutoencoderKL.from_pretrained(TINY_SD_DIR / "vae")
    vae.register_to_config(force_upcast=True)
    scheduler = EulerDiscreteScheduler(**NOISE_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


def write_tiny(out: str | Path, xl: bool = False) -> Path:
    """Write the tiny SD1.5-style (or, with ``xl``, SDXL-style) pipeline to ``out`` as a diffusers folder."""
    out = Path(out)
    if xl:
        build_sdxl_pipeline().save_pretrained(out, safe_serialization=True)
    else:
        shutil.copytree(TINY_SD_DIR, out, dirs_exist_ok=True)
    return out


def tiny_model_dir(alias: str) -> Path:
    """The local folder behind the model alias ``tiny`` or ``tiny-xl`` (building tiny-xl once, atomically)."""
    if alias == "tiny":
        return TINY_SD_DIR
    if alias != "tiny-xl":
        raise ValueError(f"not a tiny model alias: {alias!r}")
    target = cache_dir() / "models" / f"tiny-xl-v{TINY_XL_VERSION}"
    if not (target / "model_index.json").exists():
        staging = target.with_name(f".{target.name}.tmp-{torch.randint(0, 2**31, ()).item()}")
        write_tiny(staging, xl=True)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return target
