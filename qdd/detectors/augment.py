"""Training-time degradations from the UnivFD/CNNDetection recipe, one function each.

They make a detector robust to the blur and JPEG re-compression images meet on the web.
They draw from Python's ``random`` so Lightning's per-worker seeding makes them repeatable.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageFilter


def random_blur(image: Image.Image, p: float, sigma: tuple[float, float]) -> Image.Image:
    """Gaussian blur with probability ``p``, sigma uniform in ``sigma``."""
    if random.random() >= p:
        return image
    return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*sigma)))


def random_jpeg(image: Image.Image, p: float, quality: tuple[int, int]) -> Image.Image:
    """JPEG re-compression with probability ``p``, quality uniform in ``quality``."""
    if random.random() >= p:
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=random.randint(*quality))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


class Degrade:
    """Blur then JPEG, as a picklable transform (DataLoader workers need pickling)."""

    def __init__(
        self,
        p: float = 0.5,
        sigma: tuple[float, float] = (0.0, 3.0),
        quality: tuple[int, int] = (30, 100),
    ) -> None:
        self.p, self.sigma, self.quality = p, sigma, quality

    def __call__(self, image: Image.Image) -> Image.Image:
        return random_jpeg(random_blur(image, self.p, self.sigma), self.p, self.quality)
