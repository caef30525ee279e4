"""CLIP score as torchmetrics computes it: text-image alignment, max(100 * cos, 0) per image, with OpenCLIP.
(Hessel et al.'s 2021 CLIP-S is 2.5 * max(cos, 0) with ViT-B/32; the ranking within a prompt is the same.)

Defaults to ViT-L-14 with the OpenAI weights and OpenCLIP's own preprocessing for them (shortest side to
224, bicubic, centre crop, OpenAI mean/std); ``arch`` and ``pretrained`` choose another OpenCLIP model.
"""

from __future__ import annotations

import open_clip
import torch
from PIL import Image

from rlaif.scorers.openclip_common import image_text_cosine, load_pretrained, pixel_batch

ARCH = "ViT-L-14"
PRETRAINED = "openai"
SCALE = 100.0


class ClipScore:
    name = "clip"

    def __init__(self, device: str | torch.device = "cpu", arch: str = ARCH, pretrained: str = PRETRAINED) -> None:
        self.device = torch.device(device)
        self.model, self.preprocess = load_pretrained(arch, pretrained, self.device)
        self.tokenizer = open_clip.get_tokenizer(arch)

    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = pixel_batch(images, self.preprocess, self.device)
        return (SCALE * image_text_cosine(self.model, self.tokenizer, pixels, prompts)).clamp(min=0)


def clip(device: str | torch.device = "cpu", arch: str = ARCH, pretrained: str = PRETRAINED) -> ClipScore:
    """CLIP score: prompt-image alignment, max(100 * cosine, 0) with OpenCLIP ViT-L-14 (OpenAI weights).
    Weights: 1.7 GB from the hub, fetched once."""
    return ClipScore(device, arch, pretrained)
