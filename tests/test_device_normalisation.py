"""The loader's uint8 batches, normalised on the device, equal each detector's official
preprocessing exactly (the same float operations on the same values)."""

from __future__ import annotations

import random

import pytest
import torch

from qdd.detectors import load_detector
from qdd.detectors.tiny import tiny_detector_args
from qdd.modules.detector import split_normalization
from tests.conftest import random_image


@pytest.mark.parametrize("name", ["npr", "clipd", "univfd", "corvi", "spai", "rine"])
@pytest.mark.parametrize("train", [False, True])
def test_split_normalisation_is_exact(name: str, train: bool) -> None:
    detector = load_detector(name, random_weights=True, **tiny_detector_args(name))
    transform = detector.train_transform() if train else detector.eval_transform()
    host, normalization = split_normalization(transform)
    assert normalization is not None, "the detector's transform no longer ends in Normalize"
    mean, std = normalization
    image = random_image(7, (300, 260))
    random.seed(0), torch.manual_seed(0)  # the same random degradation/crop/flip both times
    expected = transform(image)
    random.seed(0), torch.manual_seed(0)
    pixels = host(image)
    assert pixels.dtype == torch.uint8
    got = pixels[None].float().div(255).sub_(mean).div_(std)[0]
    assert torch.equal(got, expected)
