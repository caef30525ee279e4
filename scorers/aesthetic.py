"""LAION improved aesthetic predictor v2 (Schuhmann, 2022): an MLP on CLIP ViT-L/14 image embeddings.

The image embedding (OpenAI ViT-L/14, its standard preprocessing) is L2-normalised and fed to the MLP
768-1024-128-64-16-1 of ``sac+logos+ava1-l14-linearMSE.pth`` (linear layers, dropout between the first
four, no activations); the output is the predicted 1-10 rating.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from rlaif.cache import cached_download
from rlaif.files import content_identity
from rlaif.scorers.openclip_common import load_pretrained, pixel_batch

ARCH = "ViT-L-14"
PRETRAINED = "openai"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{HEAD_FILE}"


class AestheticHead(nn.Module):
    """The MLP of the original predictor; its state-dict keys are layers.0/2/4/6/7."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


def load_head(path: str) -> AestheticHead:
    """Load the predictor's MLP strictly from its original .pth file (tensors only)."""
    head = AestheticHead()
    head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return head.eval()


class Aesthetic:
    name = "aesthetic"

    def __init__(self, device: str | torch.device = "cpu", arch: str = ARCH, pretrained: str = PRETRAINED) -> None:
        self.device = torch.device(device)
        self.model, self.preprocess = load_pretrained(arch, pretrained, self.device)
        head = cached_download(HEAD_URL, HEAD_FILE)
        self.identity = content_identity(head)
        self.head = load_head(str(head)).to(self.device)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        embedding = self.model.encode_image(pixel_batch(images, self.preprocess, self.device))
        embedding = embedding / embedding.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return self.head(embedding.float()).squeeze(-1)


def aesthetic(device: str | torch.device = "cpu", arch: str = ARCH, pretrained: str = PRETRAINED) -> Aesthetic:
    """LAION aesthetic predictor v2: predicted 1-10 rating of how pleasing an image looks (prompt unused).
    Weights: 1.7 GB from the hub and a 3.7 MB head, fetched once."""
    return Aesthetic(device, arch, pretrained)
