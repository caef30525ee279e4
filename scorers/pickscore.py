"""PickScore (Kirstain et al., 2023): a CLIP-H model fine-tuned on Pick-a-Pic human preferences.

score = logit_scale.exp() * cos(text embedding, image embedding), as in the PickScore README (about 20-23
for typical images). Preprocessing is the processor of the CLIP-H model it was fine-tuned from.
"""

from __future__ import annotations

import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, CLIPModel

from rlaif.files import content_identity
from rlaif.scoring import unique_prompts

MODEL = "yuvalkirstain/PickScore_v1"
PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_TOKENS = 77
# PickScore was published with transformers 4's PIL-based CLIP image processor; transformers 5 keeps it as
# CLIPImageProcessorPil (its default CLIPImageProcessor resizes with torchvision and differs slightly).
IMAGE_PROCESSOR = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)


def _embeddings(output: object) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5 returns an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class PickScore:
    name = "pickscore"

    def __init__(self, device: str | torch.device = "cpu", model: str = MODEL, processor: str = PROCESSOR) -> None:
        self.device = torch.device(device)
        self.image_processor = IMAGE_PROCESSOR.from_pretrained(processor)
        self.tokenizer = AutoTokenizer.from_pretrained(processor)
        self.model = CLIPModel.from_pretrained(model).eval().to(self.device)
        # a hub load records the snapshot it read; a local folder is identified by its files
        self.identity = getattr(self.model.config, "_commit_hash", None) or content_identity(model)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        distinct, index = unique_prompts(prompts)
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.tokenizer(distinct, padding=True, truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt").to(self.device)
        image_emb = _embeddings(self.model.get_image_features(pixel_values=pixels))
        text_emb = _embeddings(self.model.get_text_features(**text))
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (image_emb * text_emb[index.to(self.device)]).sum(dim=-1)


def pickscore(device: str | torch.device = "cpu", model: str = MODEL, processor: str = PROCESSOR) -> PickScore:
    """PickScore v1: human preference for a prompt (Pick-a-Pic), logit-scaled CLIP-H cosine. Weights: 3.9 GB
    from the hub, fetched once."""
    return PickScore(device, model, processor)
