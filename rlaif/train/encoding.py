"""What the frozen parts of a pipeline compute for training: VAE latent distributions of augmented images and
text conditioning of captions, optionally cached on disk.

The cache keys an image's latent distribution by (VAE weights, image content, augmentation, decoding version) and
a caption's embeddings by (text encoders + tokenizers, caption), so each image is encoded once per augmentation
variant and each caption once, across epochs, runs and processes, in sharded stores (``rlaif.train.store``). The VAE
*sample* is drawn afterwards from the cached distribution with the pair's own seed, so the cache never changes
what is trained.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from rlaif.images import DECODE_VERSION, open_rgb
from rlaif.models import prompt_length
from rlaif.train.data import Augmentation, apply_augmentation
from rlaif.train.store import TensorStore

STORED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fingerprint(*parts: object) -> str:
    """A content hash of modules (config and every weight's bytes) and plain values (tokenizer vocabularies)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.nn.Module):
            config = getattr(part, "config", {})
            settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
            for name, tensor in sorted(part.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


def _tokenizer_identity(tokenizer) -> tuple:
    return type(tokenizer).__name__, tokenizer.model_max_length, sorted(tokenizer.get_vocab().items())


@dataclass(frozen=True)
class PreparedImage:
    """One augmented image on its way to the VAE: its cached moments, or its pixels (and the cache key they
    will be stored under; None without a cache)."""

    key: str | None
    moments: torch.Tensor | None = None
    pixels: torch.Tensor | None = None


def prepare_image(data: bytes, name: str, augmentation: Augmentation, store: TensorStore | None,
                  digest: str | None = None) -> PreparedImage:
    """The cached moments of an image's ``augmentation`` if ``store`` has them, else its decoded, augmented
    pixels (runs in DataLoader workers: the main process only encodes what is missing); ``digest``: the SHA-256
    of ``data`` when the caller has it already (MicroBatches keys the image's VAE draw by it)."""
    key = None
    if store is not None:
        key = f"{digest or hashlib.sha256(data).hexdigest()}-{augmentation.key}"
        found = store.get(key)
        if found is not None:
            return PreparedImage(key, moments=found["moments"])
    return PreparedImage(key, pixels=apply_augmentation(open_rgb(data, name), augmentation))


class Encoder:
    """VAE moments and text conditioning of ``pipe``'s frozen components; cached under ``cache`` unless None,
    both kept as ``cache_dtype`` (fp32: cached equals uncached exactly; bf16/fp16 halve the disk, and fresh values
    are rounded the same way, so a run computes the same whether or not a value was cached)."""

    def __init__(self, pipe, cache: Path | None, cache_dtype: str = "fp32", max_sequence_length: int | None = None
                 ) -> None:
        self.pipe = pipe
        # SD3 / FLUX: the T5 length (FLUX.1-dev and -schnell share encoders, not prompt lengths); a UNet model
        # refuses a length here, before anything is encoded
        length = prompt_length(pipe, max_sequence_length)
        self.length = length.get("max_sequence_length")
        self.dtype = STORED_DTYPES[cache_dtype]
        self.latents = self.texts = None
        self.blank: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see unconditional
        if cache is not None:
            components = pipe.components
            present = sorted(name for name, part in components.items() if part is not None)
            encoders = [components[name] for name in present if name.startswith("text_encoder")]
            tokenizers = [components[name] for name in present if name.startswith("tokenizer")]
            vae_key = f"{fingerprint(pipe.vae)[:24]}-{cache_dtype}-d{DECODE_VERSION}"
            self.latents = TensorStore(cache / "latents" / vae_key)
            text_key = fingerprint(*encoders, *map(_tokenizer_identity, tokenizers), *([length] if length else []))[:24]
            self.texts = TensorStore(cache / "text" / (text_key + ("" if cache_dtype == "fp32" else f"-{cache_dtype}")))

    @torch.no_grad()
    def latent_distribution(self, images: list[PreparedImage], device: torch.device) -> DiagonalGaussianDistribution:
        """The VAE posterior (fp32) of each prepared image, encoding (and caching) those not taken from the cache."""
        moments = [image.moments for image in images]
        missing = [i for i, m in enumerate(moments) if m is None]
        if missing:
            pixels = torch.stack([images[i].pixels for i in missing]).to(device, torch.float32)
            encoded = self.pipe.vae.encode(pixels).latent_dist.parameters.to(self.dtype).cpu()
            for i, row in zip(missing, encoded, strict=True):
                moments[i] = row
            if self.latents is not None:
                self.latents.put({images[i].key: {"moments": moments[i]} for i in missing if images[i].key})
        return DiagonalGaussianDistribution(torch.stack(moments).float().to(device))

    @torch.no_grad()
    def text(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings of each caption and, for SDXL, SD3 and FLUX, its pooled embeddings (as the pipeline
        computes them for sampling, at its default T5 sequence length)."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        keys = {caption: hashlib.sha256(caption.encode()).hexdigest() for caption in dict.fromkeys(captions)}
        if self.texts is not None:
            found = {c: entry for c, key in keys.items() if (entry := self.texts.get(key)) is not None}
        missing = [c for c in keys if c not in found]
        if missing:
            embeds, pooled = encode_captions(self.pipe, missing, device, self.length)
            for j, caption in enumerate(missing):
                entry = {"embeds": embeds[j].to(self.dtype).cpu()}
                if pooled is not None:
                    entry["pooled"] = pooled[j].to(self.dtype).cpu()
                found[caption] = entry
            if self.texts is not None:
                self.texts.put({keys[caption]: found[caption] for caption in missing})
        embeds = torch.stack([found[c]["embeds"] for c in captions]).to(device, torch.float32)
        has_pooled = "pooled" in found[captions[0]]  # all or none: one text cache per set of encoders
        pooled = torch.stack([found[c]["pooled"] for c in captions]).to(device, torch.float32) if has_pooled else None
        return embeds, pooled

    def text_entry_bytes(self, device: torch.device) -> int:
        """Disk bytes of one caption's cached embeddings (as ``cache_dtype``, at the T5 length trained, whatever the
        caption: they are padded to it), measured on the empty caption: one call of the text encoders."""
        embeds, pooled = self.text([""], device)
        return self.dtype.itemsize * (embeds[0].numel() + (0 if pooled is None else pooled[0].numel()))

    def unconditional(self, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What ``pipe``'s sampler conditions its unconditional (classifier-free guidance) branch on, ``count``
        times: the empty caption's embeddings, or zeros where the pipeline forces them for an empty prompt
        (SDXL's ``force_zeros_for_empty_prompt``)."""
        if self.blank is None:  # encoded (or read from the cache) once, not every step
            embeds, pooled = self.text([""], device)
            if self.pipe.config.get("force_zeros_for_empty_prompt", False):
                embeds, pooled = torch.zeros_like(embeds), None if pooled is None else torch.zeros_like(pooled)
            self.blank = embeds, pooled
        embeds, pooled = self.blank
        return embeds.expand(count, *embeds.shape[1:]), None if pooled is None else pooled.expand(count, -1)


def encode_captions(pipe, captions: list[str], device: torch.device | str, max_sequence_length: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``pipe``'s prompt embeddings of ``captions`` and, for SDXL, SD3 and FLUX, their pooled embeddings, as the
    pipeline computes them for sampling (SD3 / FLUX at ``prompt_length``); gradients flow if enabled."""
    length = prompt_length(pipe, max_sequence_length)
    if isinstance(pipe, FluxPipeline):  # CLIP pooled + T5 sequence; no negative prompt
        embeds, pooled, _ = pipe.encode_prompt(captions, captions, device=device, num_images_per_prompt=1, **length)
        return embeds, pooled
    if isinstance(pipe, StableDiffusion3Pipeline):  # two CLIPs (pooled, sequence) + T5 (sequence)
        embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False, **length)
        return embeds, pooled
    encoded = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return encoded[0], encoded[2] if isinstance(pipe, StableDiffusionXLPipeline) else None


def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
    """(channels, height, width) of the latents of a ``resolution``-pixel square image under ``pipe``'s VAE."""
    side = resolution // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return pipe.vae.config.latent_channels, side, side


def latent_bytes(pipe, resolution: int, cache_dtype: str) -> int:
    """Disk bytes of one cached latent distribution (mean and log-variance) at ``resolution``."""
    channels, height, width = latent_shape(pipe, resolution)
    return 2 * channels * height * width * STORED_DTYPES[cache_dtype].itemsize
