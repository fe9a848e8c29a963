"""Named, parameterised post-processing of test images (the robustness axis of issue 11).

Images in the wild are re-compressed, resized, blurred and cropped; a detector that only
works on pristine files is of little use. A perturbation is written as a short spec, and the
user's own spelling of it, in lower case (specs are case-insensitive: ``JPEG:75`` is
``jpeg:75``), is its name everywhere (``--perturb blur:1.0`` is ``blur:1.0`` in the
``perturbation`` column of scores.parquet, metrics.json and the report); specs that
mean the same operation (``blur:1`` and ``blur:1.0``) share one ``canonical`` form, which
seeds the randomness and is run once:

- ``none``            the image as stored (always evaluated, always first);
- ``jpeg:Q``          JPEG re-compression at quality Q (integer 1–100), done in memory by
                      PIL/libjpeg with 4:2:0 chroma subsampling (libjpeg's and PIL's default,
                      what web pipelines use), baseline (not progressive), no optimisation;
- ``resize:S[:F]``    resize both sides by the factor S (0 < S ≤ 8) with PIL filter F, one of
                      nearest, box, bilinear (default), hamming, bicubic, lanczos; PIL
                      antialiases when it shrinks. The result keeps the new size: resize:0.5
                      returns a half-size image, and the detector's own preprocessing
                      (resize/crop to its input size) follows, as in SIDBench-style studies;
- ``blur:SIGMA``      Gaussian blur with standard deviation SIGMA pixels (PIL's GaussianBlur,
                      an extended-box approximation of the Gaussian, the same operation as
                      the detectors' training augmentation in qdd.detectors.augment);
- ``noise:SIGMA``     additive Gaussian noise of standard deviation SIGMA in 0–255 pixel
                      units, rounded and clipped to 0–255, seeded per (spec, key);
- ``crop:N``          centre crop to N×N pixels (an integer ≥ 1; a side shorter than N is
                      kept whole); ``crop:F`` with 0 < F < 1 keeps the central fraction F of
                      each side (rounded, at least one pixel). Offsets round as torchvision's
                      CenterCrop does.

Every perturbation is deterministic: the only randomness (noise) comes from a generator
seeded with SHA-256 of (canonical spec, key), never from Python's salted ``hash()``, so a
sample gets the same noise in every process, worker and rerun. Input is converted to RGB,
output is RGB.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from qdd.errors import QddError

FORMS = (
    "none, jpeg:Q (1-100), resize:S[:FILTER] (0<S<=8), blur:SIGMA, noise:SIGMA (0-255 units), "
    "crop:N (pixels) or crop:F (0<F<1)"
)

RESIZE_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_FILTER = "bilinear"
MAX_RESIZE = 8.0


def _number(text: str) -> str:
    """A float written the short way (``.50`` → ``0.5``, ``2.0`` → ``2``)."""
    return f"{float(text):g}"


@dataclass(frozen=True)
class Perturbation:
    """One post-processing operation.

    ``name`` is the spec as the user wrote it (surrounding spaces dropped, lower case, e.g.
    ``"blur:1.0"``): what scores.parquet and metrics.json call it. ``canonical`` is the
    normal form (``"blur:1"``): what the operation and its noise seed depend on.
    """

    name: str
    kind: str
    strength: float | None
    filter: str | None = None  # resize only
    canonical: str = ""

    def apply(self, image: Image.Image, key: str) -> Image.Image:
        """The perturbed RGB image; ``key`` seeds the randomness (noise) of this sample."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return _OPERATIONS[self.kind](self, image, key)

    def seed(self, key: str) -> int:
        """A stable 64-bit seed from (spec, key), the same in every process."""
        digest = hashlib.sha256(f"{self.canonical or self.name}\0{key}".encode()).digest()
        return int.from_bytes(digest[:8], "little")


def _none(p: Perturbation, image: Image.Image, key: str) -> Image.Image:
    return image.copy()


def _jpeg(p: Perturbation, image: Image.Image, key: str) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(p.strength), subsampling="4:2:0")
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _resize(p: Perturbation, image: Image.Image, key: str) -> Image.Image:
    size = (max(1, round(image.width * p.strength)), max(1, round(image.height * p.strength)))
    return image.resize(size, RESIZE_FILTERS[p.filter])


def _blur(p: Perturbation, image: Image.Image, key: str) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=p.strength))


def _noise(p: Perturbation, image: Image.Image, key: str) -> Image.Image:
    rng = np.random.default_rng(p.seed(key))
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels + rng.normal(0.0, p.strength, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def _crop(p: Perturbation, image: Image.Image, key: str) -> Image.Image:
    width, height = image.size
    if p.strength < 1:
        crop_w = max(1, round(width * p.strength))
        crop_h = max(1, round(height * p.strength))
    else:
        crop_w, crop_h = min(width, int(p.strength)), min(height, int(p.strength))
    left = int(round((width - crop_w) / 2.0))
    top = int(round((height - crop_h) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


_OPERATIONS: dict[str, Callable[[Perturbation, Image.Image, str], Image.Image]] = {
    "none": _none,
    "jpeg": _jpeg,
    "resize": _resize,
    "blur": _blur,
    "noise": _noise,
    "crop": _crop,
}


def _bad(spec: str, why: str = "") -> QddError:
    detail = f" ({why})" if why else ""
    return QddError(f"unknown perturbation {spec!r}{detail}: use one of {FORMS}")


def parse(spec: str) -> Perturbation:
    """The perturbation a spec names, named as written; a `QddError` naming the valid forms
    if it is malformed."""
    parsed = _canonical(spec)
    return replace(parsed, name=str(spec).strip().lower(), canonical=parsed.name)


def _canonical(spec: str) -> Perturbation:
    """The perturbation a spec names, ``name`` in normal form (``blur:1.0`` → ``blur:1``)."""
    text = str(spec).strip().lower()
    kind, *args = text.split(":")
    if kind == "none" and not args:
        return Perturbation("none", "none", None)
    if kind not in _OPERATIONS or kind == "none" or not args or len(args) > 2:
        raise _bad(spec)
    if len(args) == 2 and kind != "resize":
        raise _bad(spec, f"{kind} takes one value")
    try:
        value = float(args[0])
    except ValueError:
        raise _bad(spec, f"{args[0]!r} is not a number") from None
    if not math.isfinite(value):
        raise _bad(spec, "the value must be finite")
    if kind == "jpeg":
        if value != int(value) or not 1 <= value <= 100:
            raise _bad(spec, "JPEG quality is an integer from 1 to 100")
        return Perturbation(f"jpeg:{int(value)}", "jpeg", float(int(value)))
    if kind == "resize":
        name = args[1] if len(args) == 2 else DEFAULT_FILTER
        if name not in RESIZE_FILTERS:
            raise _bad(spec, f"resize filters: {', '.join(RESIZE_FILTERS)}")
        if not 0 < value <= MAX_RESIZE:
            raise _bad(spec, f"the resize factor must be in (0, {MAX_RESIZE:g}]")
        suffix = "" if name == DEFAULT_FILTER else f":{name}"
        return Perturbation(f"resize:{_number(args[0])}{suffix}", "resize", value, name)
    if kind in ("blur", "noise"):
        if value <= 0:
            raise _bad(spec, f"{kind} sigma must be positive")
        return Perturbation(f"{kind}:{_number(args[0])}", kind, value)
    # crop
    if value <= 0 or (value >= 1 and value != int(value)):
        raise _bad(spec, "crop takes whole pixels N >= 1 or a fraction 0 < F < 1")
    return Perturbation(f"crop:{_number(args[0])}", "crop", value)


#: Kinds whose effect grows as their number falls (JPEG quality, kept crop or size share).
DESCENDING = {"jpeg", "crop"}


def kind_of(spec: str) -> str:
    """The kind of a recorded perturbation name (``JPEG:75`` → ``jpeg``), also for a name
    this qdd cannot parse (the part before the colon, lower case)."""
    try:
        return parse(spec).kind
    except QddError:
        return str(spec).strip().lower().partition(":")[0]


def severity(spec: str) -> float:
    """How strong a perturbation is, for ordering within its kind (larger: stronger).

    JPEG quality and crop share weaken as they grow; a resize by s is as strong as |log s|;
    blur and noise σ grow with their number. A name that does not parse sorts last.
    """
    try:
        parsed = parse(spec)
    except QddError:
        return math.inf
    if parsed.strength is None:
        return 0.0  # none
    if parsed.kind in DESCENDING:
        return -parsed.strength
    if parsed.kind == "resize":
        return abs(math.log(parsed.strength))
    return parsed.strength


def perturbations(specs: Sequence[str] | None) -> list[Perturbation]:
    """``none`` first, then each distinct perturbation of ``specs`` in the order given; one
    operation given twice (``blur:1``, ``blur:1.0``) runs once, named as first written."""
    chosen = {"none": parse("none")}
    for spec in specs or []:
        perturbation = parse(spec)
        chosen.setdefault(perturbation.canonical, perturbation)
    return list(chosen.values())
