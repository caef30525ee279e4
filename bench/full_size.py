"""An SD1.5-sized diffusers folder with random weights, for timing training at the real model's size offline.

Timing depends on the architecture, not on the weights, and no hub download works on the bench machines: this
writes Stable Diffusion 1.5's UNet (860M parameters), VAE and CLIP ViT-L/14 text encoder at their published
sizes, randomly initialised, with the tiny model's tokenizer (its ids fit the real 49,408-token embedding).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from rlaif.tiny import NOISE_SCHEDULE, build_tokenizer

SD15_RESOLUTION = 512


def write_sd15_architecture(out: Path, seed: int = 0) -> Path:
    """Write an SD1.5-architecture pipeline with random weights to ``out`` (built on the GPU when there is one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=SD15_RESOLUTION // 8, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            sample_size=SD15_RESOLUTION, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to("cpu").save_pretrained(out, safe_serialization=True)
    return out
