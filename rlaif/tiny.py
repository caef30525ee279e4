"""The tiny offline model world: real diffusers / transformers architectures with small configs.

``tiny`` is an SD1.5-style pipeline pretrained on the shapes world (``rlaif/shapes.py``) by
``scripts/pretrain_tiny.py``; ``tiny-sd3`` an SD3-style one (MMDiT transformer, two CLIP encoders with
projection and a T5 encoder, rectified flow) and ``tiny-flux`` a FLUX.1-dev-style one (double- and
single-stream transformer with guidance embedding, CLIP and T5) are pretrained from ``build_sd3_pipeline`` /
``build_flux_pipeline`` by ``scripts/pretrain_tiny_flow.py``; their weights are committed under
``rlaif/assets``. ``tiny-xl`` is an SDXL-style pipeline (two text encoders, ``text_time`` conditioning): random
weights from a fixed seed around the pretrained tiny VAE, built on first use into the cache. All are ordinary
diffusers folders that the plain diffusers pipelines load.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from rlaif.cache import cache_dir
from rlaif.distributed import process_state
from rlaif.files import TMP_MARK
from rlaif.shapes import VOCABULARY

TINY_SD_DIR = Path(__file__).parent / "assets" / "tiny-sd"
TINY_SD3_DIR = Path(__file__).parent / "assets" / "tiny-sd3"  # written by scripts/pretrain_tiny_flow.py
TINY_FLUX_DIR = Path(__file__).parent / "assets" / "tiny-flux"  # the same, --kind flux
# Built aliases and their recipe versions: bump one when its recipe changes, so stale caches are not reused.
BUILT_VERSIONS = {"tiny-xl": 1}
RESOLUTION = 64
# Prompt lengths in tokens of the tiny SD3 / FLUX models (the longest shapes-world caption is 10 CLIP tokens):
# short sequences keep their transformers cheap on a CPU. SD1.5 / SDXL-style models keep CLIP's 77.
TEXT_LENGTHS = {"clip": 16, "t5": 32}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The UNet layout both tiny UNet models share: two resolutions, the lower one with cross-attention
UNET_LAYOUT = {"sample_size": RESOLUTION // 4, "in_channels": 4, "out_channels": 4,
               "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
               "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "block_out_channels": (32, 64),
               "layers_per_block": 1}
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
            **UNET_LAYOUT,
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
            **UNET_LAYOUT,
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


def build_t5_tokenizer() -> T5TokenizerFast:
    """A T5 (SentencePiece unigram) tokenizer whose pieces are the shapes-world words, with letters to spell
    anything else; ``</s>`` ends every sequence, as in T5."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{w}", -1.0) for w in VOCABULARY),
             ("\u2581", -3.0), *((c, -6.0) for c in letters)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=TEXT_LENGTHS["t5"])


def _t5_encoder(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    """A two-layer T5 v1.1-style encoder (gated GELU), as SD3 and FLUX use."""
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


def _flow_vae() -> AutoencoderKL:
    """The pretrained tiny VAE with the latent shift that SD3 and FLUX pipelines apply (0: none)."""
    vae = AutoencoderKL.from_pretrained(TINY_SD_DIR / "vae")
    vae.register_to_config(shift_factor=0.0, force_upcast=False)
    return vae


def _short_clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TINY_SD_DIR / "tokenizer", model_max_length=TEXT_LENGTHS["clip"])


def build_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3-style pipeline: MMDiT transformer, CLIP encoders 1 and 2 with projection, T5 encoder 3 (random
    from ``seed``), the pretrained tiny VAE, rectified flow with SD3's shift 3."""
    tokenizer = _short_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, hidden=32, projection_dim=32))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, hidden=32, projection_dim=32))
        text_encoder_3 = _t5_encoder(t5_tokenizer, d_model=64)  # >= the two CLIP widths side by side, as in SD3
        transformer = SD3Transformer2DModel(
            sample_size=RESOLUTION // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
            attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
            pooled_projection_dim=32 + 32, pos_embed_max_size=RESOLUTION // 4,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_flow_vae(), text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )


def build_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A FLUX.1-dev-style pipeline: double- and single-stream transformer with guidance embedding, a CLIP
    encoder (pooled) and a T5 encoder (random from ``seed``), the pretrained tiny VAE, rectified flow with
    resolution-dependent (dynamic) shift."""
    tokenizer = _short_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, projection_dim=32))
        text_encoder_2 = _t5_encoder(t5_tokenizer, d_model=64)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * 4, out_channels=None, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_flow_vae(), text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer)


COMMITTED = {"tiny": TINY_SD_DIR, "tiny-sd3": TINY_SD3_DIR, "tiny-flux": TINY_FLUX_DIR}  # pretrained, in the package
BUILDERS = {"tiny-xl": build_sdxl_pipeline}  # random weights, built on first use


def write_tiny(out: str | Path, alias: str = "tiny") -> Path:
    """Write the tiny pipeline ``alias`` (``tiny``, ``tiny-xl``, ``tiny-sd3``, ``tiny-flux``) to ``out`` as a
    diffusers folder."""
    out = Path(out)
    if alias in COMMITTED:
        shutil.copytree(COMMITTED[alias], out, dirs_exist_ok=True)
    else:
        pipe: DiffusionPipeline = BUILDERS[alias]()
        pipe.save_pretrained(out, safe_serialization=True)
    return out


def tiny_model_dir(alias: str) -> Path:
    """The local folder behind a tiny model alias (building a built one once, atomically)."""
    if alias in COMMITTED:
        return COMMITTED[alias]
    if alias not in BUILT_VERSIONS:
        raise ValueError(f"not a tiny model alias: {alias!r}")
    target = cache_dir() / "models" / f"{alias}-v{BUILT_VERSIONS[alias]}"
    # the main process builds it, the others wait and then find it (transformers saves weights from the main
    # process only when a process group is up, so every other process would write a folder without them)
    with process_state().main_process_first():
        if not (target / "model_index.json").exists():
            staging = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
            write_tiny(staging, alias)
            try:
                staging.rename(target)
            except OSError:  # another run on this machine finished first; its copy is identical
                shutil.rmtree(staging, ignore_errors=True)
    return target
