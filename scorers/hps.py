"""HPSv2 and HPSv2.1 (Wu et al., 2023): OpenCLIP ViT-H-14 fine-tuned on Human Preference Dataset v2.

As in the reference ``hpsv2.score``: the architecture is created without pretrained weights, the
checkpoint's ``state_dict`` is loaded strictly, images are made float tensors, scaled so the longest side is
224 (bicubic, on the float tensor), zero-padded centred to a square, normalised with OpenAI mean/std;
score = cosine of the normalised image and text embeddings (about 0.2-0.35 for typical images).
"""

from __future__ import annotations

import open_clip
import torch
from PIL import Image
from torchvision.transforms import Compose, InterpolationMode, Normalize, ToTensor
from torchvision.transforms import functional as TF

from rlaif.cache import hub_file
from rlaif.files import content_identity
from rlaif.scorers.openclip_common import OPENAI_MEAN, OPENAI_STD, image_text_cosine, pixel_batch

ARCH = "ViT-H-14"
REPO = "xswu/HPSv2"
CHECKPOINTS = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}


def resize_longest_and_pad(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Scale a (C, H, W) float image so the longest side is ``size`` (bicubic, antialiased, on the float tensor
    as the reference resizes it after ``ToTensor``: no rounding to 8 bits, no clipping), then zero-pad it centred
    to ``size`` x ``size``.

    Identical to the reference ResizeMaxSize wherever that works; where the longest side already equals
    ``size`` the reference skips the padding too and hands the ViT a non-square image it cannot take,
    so we pad such images instead of failing.
    """
    height, width = pixels.shape[-2:]
    if max(width, height) != size:
        scale = size / max(width, height)
        height, width = round(height * scale), round(width * scale)
        pixels = TF.resize(pixels, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - height, size - width
    if pad_h == pad_w == 0:
        return pixels
    return TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)


class HumanPreferenceScore:
    def __init__(self, version: str, device: str | torch.device = "cpu", arch: str = ARCH, repo: str = REPO) -> None:
        self.name = version
        self.device = torch.device(device)
        model = open_clip.create_model(arch, pretrained=None)
        path = hub_file(repo, CHECKPOINTS[version])
        self.identity = content_identity(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
        self.model = model.eval().to(self.device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        self.preprocess = Compose([ToTensor(), lambda pixels: resize_longest_and_pad(pixels, size),
                                   Normalize(OPENAI_MEAN, OPENAI_STD)])

    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return image_text_cosine(self.model, self.tokenizer, pixel_batch(images, self.preprocess, self.device),
                                 prompts)


def hpsv2(device: str | torch.device = "cpu", arch: str = ARCH, repo: str = REPO) -> HumanPreferenceScore:
    """HPSv2: human preference (HPD v2), cosine of OpenCLIP ViT-H-14 embeddings. Weights: 2.0 GB from the
    hub, fetched once."""
    return HumanPreferenceScore("hpsv2", device, arch, repo)


def hpsv21(device: str | torch.device = "cpu", arch: str = ARCH, repo: str = REPO) -> HumanPreferenceScore:
    """HPSv2.1: HPSv2 retrained on more data, cosine of OpenCLIP ViT-H-14 embeddings. Weights: 2.0 GB from
    the hub, fetched once."""
    return HumanPreferenceScore("hpsv2.1", device, arch, repo)
