"""An example rlaif scorer plugin: mean red minus mean of green and blue, in [-255, 255]."""

from PIL import Image, ImageStat


class Redness:
    name = "redness"
    description = "How red an image is: mean R minus the mean of G and B."

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        values = []
        for image in images:
            r, g, b = ImageStat.Stat(image.convert("RGB")).mean
            values.append(r - (g + b) / 2)
        return values


def redness(device: str = "cpu") -> Redness:
    """How red an image is: mean R minus the mean of G and B (an example plugin). It takes no options, so any
    --scorer-option for it is refused; a plugin that takes some names each as a keyword parameter."""
    return Redness()
