"""What the frozen parts of a pipeline compute for training: VAE latent distributions of augmented images and
text conditioning of captions, optionally cached on disk.

The cache keys an image's latent distribution by (VAE weights, image content, augmentation) and a caption's
embeddings by (text encoders + tokenizers, caption), so each image is encoded once per augmentation variant and
each caption once, across epochs, runs and processes. The VAE *sample* is drawn afterwards from the cached
distribution with the pair's own seed, so the cache never changes what is trained.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file

from rlaif.files import atomic_path
from rlaif.images import ImageSource, image_size, open_rgb
from rlaif.train.data import Augmentation, apply_augmentation


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


class Encoder:
    """VAE moments and text conditioning of ``pipe``'s frozen components; cached under ``cache`` unless None."""

    def __init__(self, pipe, cache: Path | None) -> None:
        self.pipe = pipe
        self.xl = isinstance(pipe, StableDiffusionXLPipeline)
        self.latent_dir = self.text_dir = None
        if cache is not None:
            encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
            tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
            self.latent_dir = cache / "latents" / fingerprint(pipe.vae)[:24]
            self.text_dir = cache / "text" / fingerprint(*encoders, *map(_tokenizer_identity, tokenizers))[:24]
        self._hashes: dict[ImageSource, str] = {}
        self._sizes: dict[ImageSource, tuple[int, int]] = {}

    def size(self, source: ImageSource) -> tuple[int, int]:
        """(width, height) of an image, read from its header only."""
        if source not in self._sizes:
            self._sizes[source] = image_size(source)
        return self._sizes[source]

    def _content_hash(self, source: ImageSource) -> str:
        if source not in self._hashes:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            self._hashes[source] = hashlib.sha256(data).hexdigest()
        return self._hashes[source]

    @torch.no_grad()
    def latent_distribution(self, sources: list[ImageSource], augmentations: list[Augmentation],
                            device: torch.device) -> DiagonalGaussianDistribution:
        """The VAE posterior (fp32) of each augmented image, computing only what the cache lacks."""
        paths = [None] * len(sources)
        moments: list[torch.Tensor | None] = [None] * len(sources)
        if self.latent_dir is not None:
            for i, (source, augmentation) in enumerate(zip(sources, augmentations, strict=True)):
                digest = self._content_hash(source)
                paths[i] = self.latent_dir / digest[:2] / f"{digest}-{augmentation.key}.safetensors"
                if paths[i].exists():
                    moments[i] = load_file(paths[i])["moments"]
        missing = [i for i, m in enumerate(moments) if m is None]
        if missing:
            pixels = torch.stack([apply_augmentation(open_rgb(sources[i]), augmentations[i]) for i in missing])
            encoded = self.pipe.vae.encode(pixels.to(device, torch.float32)).latent_dist.parameters.float().cpu()
            for i, row in zip(missing, encoded, strict=True):
                moments[i] = row
                if paths[i] is not None:
                    with atomic_path(paths[i]) as tmp:
                        save_file({"moments": row.contiguous()}, tmp)
        return DiagonalGaussianDistribution(torch.stack(moments).to(device))

    @torch.no_grad()
    def text(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings of each caption and, for SDXL, the pooled embeddings of its second encoder."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        paths = {}
        for caption in dict.fromkeys(captions):
            if self.text_dir is not None:
                digest = hashlib.sha256(caption.encode()).hexdigest()
                paths[caption] = self.text_dir / digest[:2] / f"{digest}.safetensors"
                if paths[caption].exists():
                    found[caption] = load_file(paths[caption])
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        if missing:
            encoded = self.pipe.encode_prompt(missing, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
            for j, caption in enumerate(missing):
                entry = {"embeds": encoded[0][j].float().cpu().contiguous()}
                if self.xl:
                    entry["pooled"] = encoded[2][j].float().cpu().contiguous()
                found[caption] = entry
                if caption in paths:
                    with atomic_path(paths[caption]) as tmp:
                        save_file(entry, tmp)
        embeds = torch.stack([found[c]["embeds"] for c in captions]).to(device)
        pooled = torch.stack([found[c]["pooled"] for c in captions]).to(device) if self.xl else None
        return embeds, pooled
