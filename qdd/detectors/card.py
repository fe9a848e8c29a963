"""What a detector is and how it is fed, declared once beside its class (timm's pretrained_cfg).

`qdd-cli detectors` prints these cards; checkpoints/README.md gives the same files' sources.
qdd's own are in `qdd.detectors.cards`; another detector registers with its own card:
``@register(name, card=DetectorCard(...))``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The families the study compares, in the order `qdd-cli detectors` lists them: by the cue a
#: detector reads (whether it trains is the card's ``trainable``). The last two are the
#: training-free ones: reconstruction error by the generators' autoencoders (AEROBLADE), and
#: how a foundation model's representation of an image moves under noise (RIGID).
FAMILIES = (
    "end-to-end",
    "CLIP features",
    "DINOv2",
    "spectral",
    "reconstruction",
    "representation",
)


@dataclass(frozen=True)
class DetectorCard:
    """A detector's identity card.

    Args:
        family: one of `FAMILIES`.
        input_size: side of the square the network sees (``None``: native resolution).
        resize: test-time resize of the short side, or ``"none"`` (full resolution).
        interpolation: of that resize (``"-"`` when there is none).
        crop: test-time crop (``"centre 224"``, ``"five 504² windows"``, ``"none"``).
        normalisation: ``"imagenet"``, ``"clip"``, or ``"none"`` (pixels in [0, 1]: AEROBLADE).
        files: the files it needs and the flag or place each comes from.
        licence: of the official weights.
        trainable: ``qdd-cli fit`` can train it; training-free ones take no ``--weights``,
            and their ``fit`` only calibrates a threshold (`qdd.training_free`).
        runtime_args: ``detector_args`` that change speed or memory, never the logits (a
            checkpoint takes any value of them: `qdd.checkpoint`).
    """

    family: str
    input_size: int | None
    resize: str
    interpolation: str
    crop: str
    normalisation: str
    files: tuple[str, ...]
    licence: str
    trainable: bool = True
    runtime_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {FAMILIES}")
        if self.normalisation not in ("imagenet", "clip", "none"):
            raise ValueError(f"normalisation {self.normalisation!r}: imagenet, clip or none")

    def input_policy(self) -> str:
        """One phrase: resize, crop and normalisation as the official test code does them."""
        resize = f"resize {self.resize} {self.interpolation}"
        if self.resize == "none":
            resize = "no resize"
        crop = "" if self.crop == "none" else f", {self.crop}"
        norm = "pixels in [0, 1]" if self.normalisation == "none" else f"{self.normalisation} norm"
        return f"{resize}{crop}, {norm}"
