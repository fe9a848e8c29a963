"""From the pipeline's float output to 8-bit pixels, and the check that an image is real data.

Pixels are converted exactly as diffusers does for ``output_type="pil"``
(``round(x * 255)`` of the [0, 1] float image), so a PNG written here equals the image a
user of the pipeline would get. Half-precision VAEs can overflow: such images come out
NaN (or, once NaNs are clamped, all black) and are failures, not data.
"""

from __future__ import annotations

import numpy as np


def image_failure(image: np.ndarray) -> str | None:
    """Why a float HxWx3 image in [0, 1] is not usable (``None`` when it is)."""
    if not np.isfinite(image).all():
        return "non-finite pixels (NaN/inf): the model overflowed at this precision"
    if to_uint8(image).max() == 0:
        return "all-black image: the model overflowed or a filter blanked it"
    return None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """diffusers' conversion: ``(x * 255).round()`` to uint8 (inputs already clamped)."""
    return (image * 255).round().astype("uint8")
