"""What the OpenCLIP-based built-ins share: OpenAI normalisation constants and batched cosine scoring."""

from __future__ import annotations

import open_clip
import torch
from PIL import Image

from rlaif.scoring import unique_prompts

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_pretrained(arch: str, pretrained: str, device: torch.device) -> tuple[torch.nn.Module, object]:
    """An OpenCLIP model with its pretrained weights (tag or file) in eval mode on ``device``, and its
    evaluation preprocessing. Weights trained with QuickGELU (OpenAI's) get it: open_clip >= 2.29 builds
    ``ViT-L-14`` with plain GELU and loads the OpenAI weights into it with a warning, other embeddings."""
    quick = bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu"))
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, force_quick_gelu=quick)
    return model.eval().to(device), preprocess


def pixel_batch(images: list[Image.Image], preprocess, device: torch.device) -> torch.Tensor:
    """Preprocess each image (its own transform, so sizes may differ) and stack them into one batch."""
    return torch.stack([preprocess(image.convert("RGB")) for image in images]).to(device)


@torch.no_grad()
def image_text_cosine(model, tokenizer, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosine between each image's and its prompt's normalised embeddings; each distinct prompt encoded once."""
    distinct, index = unique_prompts(prompts)
    image = model.encode_image(pixels, normalize=True)
    text = model.encode_text(tokenizer(distinct).to(pixels.device), normalize=True)
    return (image * text[index.to(pixels.device)]).sum(dim=-1)
