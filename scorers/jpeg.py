"""JPEG compressibility rewards of the DDPO paper (Black et al., 2023): file size at quality 95.

``compressibility`` = -kB (simpler images score higher); ``incompressibility`` = +kB.
"""

from __future__ import annotations

import io

from PIL import Image

QUALITY = 95


def jpeg_kilobytes(image: Image.Image) -> float:
    """Size in kB (1000 bytes) of ``image`` saved as an RGB JPEG at quality 95."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=QUALITY)
    return buffer.tell() / 1000.0


class JpegSize:
    """Scores images by their JPEG size; ``sign`` -1 rewards compressible images, +1 incompressible ones."""

    def __init__(self, sign: float, name: str) -> None:
        self.sign, self.name = sign, name

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        return [self.sign * jpeg_kilobytes(image) for image in images]


def compressibility(device: str = "cpu") -> JpegSize:
    """JPEG compressibility (-kB at quality 95): rewards simple, smooth images (DDPO). No weights: works
    offline."""
    return JpegSize(-1.0, "compressibility")


def incompressibility(device: str = "cpu") -> JpegSize:
    """JPEG incompressibility (+kB at quality 95): rewards detailed, textured images (DDPO). No weights:
    works offline."""
    return JpegSize(1.0, "incompressibility")
