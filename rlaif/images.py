"""Image I/O off the model's critical path: PNG encoding and writing on worker threads."""

from __future__ import annotations

import contextlib
import io
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from rlaif.errors import RlaifError
from rlaif.files import atomic_path

ImageSource = Path | bytes
"""An image file, or encoded image bytes (as Pick-a-Pic tables hold them)."""


@contextlib.contextmanager
def _opened(source: ImageSource, name: str | None) -> Iterator[Image.Image]:
    """A file or encoded bytes opened lazily by PIL; an unreadable image is a user error naming ``name`` (or
    the file)."""
    if source is None:  # a null cell of an image column
        raise RlaifError(f"image {name} is missing: its table cell is empty")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            yield image
    except UnidentifiedImageError as exc:  # its message names an in-memory file object, no help to anyone
        raise RlaifError(f"image {name or source} cannot be read: corrupt, or not an image format that PIL "
                         "reads") from exc
    except (OSError, ValueError) as exc:
        raise RlaifError(f"image {name or source} cannot be read: {exc}") from exc


# The version of open_rgb's decoding. Caches key images by their bytes, not their pixels (latents, label scores):
# raise it whenever a release changes the pixels some file decodes to (2: 16-bit greyscale scaled to 8 bits, where
# it was clipped to white), so that a warm cache from before is not reused.
DECODE_VERSION = 2

# 16-bit greyscale (a 16-bit PNG): PIL's convert("RGB") clips its 0..65535 to 255, a white picture; 32-bit "I"
# (older Pillow's 16-bit PNG) only when its values pass 255
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N")


def open_rgb(source: ImageSource, name: str | None = None) -> Image.Image:
    """Decode a file or encoded bytes as RGB; 16-bit greyscale is scaled to 8 bits first (0..65535 -> 0..255)."""
    with _opened(source, name) as image:
        if image.mode in WIDE_GREY or image.mode == "I" and image.getextrema()[1] > 255:
            grey = np.asarray(image, dtype=np.float64) / 257.0
            return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
        return image.convert("RGB")


def image_size(source: ImageSource, name: str | None = None) -> tuple[int, int]:
    """(width, height) of an image, read from its header without decoding the pixels."""
    with _opened(source, name) as image:
        return image.size


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` as a PNG atomically (no metadata, so equal pixels give equal bytes)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


class ImageWriter:
    """Saves PNGs on ``workers`` threads; at most ``max_pending`` wait, so memory stays bounded.

    zlib releases the GIL, so encoding overlaps with the next batch's denoising. Use as a context
    manager: leaving it waits for every write and re-raises the first failure.
    """

    def __init__(self, workers: int = 2, max_pending: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlaif-png")
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending

    def submit(self, image: Image.Image, path: Path) -> None:
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(save_png, image, path))

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
