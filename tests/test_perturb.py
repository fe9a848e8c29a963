"""Perturbation specs: parsing, determinism, and what each operation does to an image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qdd.errors import QddError
from qdd.perturb import FORMS, parse, perturbations


def smooth_image(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A smooth colour ramp with a little texture (JPEG's errors grow as quality falls)."""
    width, height = size
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    rng = np.random.default_rng(0)
    texture = rng.normal(0, 0.05, (height, width))
    channels = [x + texture, y + texture, (x + y) / 2 + texture]
    pixels = np.clip(np.stack(channels, axis=-1) * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.mark.parametrize(
    ("spec", "name", "kind", "strength"),
    [
        ("none", "none", "none", None),
        (" JPEG:75 ", "jpeg:75", "jpeg", 75.0),
        ("jpeg:75.0", "jpeg:75", "jpeg", 75.0),
        ("resize:.50", "resize:0.5", "resize", 0.5),
        ("resize:0.5:bilinear", "resize:0.5", "resize", 0.5),
        ("resize:2:bicubic", "resize:2:bicubic", "resize", 2.0),
        ("blur:1.0", "blur:1", "blur", 1.0),
        ("noise:5", "noise:5", "noise", 5.0),
        ("crop:224", "crop:224", "crop", 224.0),
        ("crop:0.5", "crop:0.5", "crop", 0.5),
    ],
)
def test_parse_normalises(spec: str, name: str, kind: str, strength: float | None) -> None:
    p = parse(spec)
    assert (p.canonical, p.kind, p.strength) == (name, kind, strength)
    assert parse(p.name) == p  # the name parses to itself
    assert parse(p.canonical).canonical == p.canonical


@pytest.mark.parametrize("spec", ["blur:1.0", "resize:.50", "jpeg:75.0", "noise:5.00"])
def test_name_is_the_users_own_spelling(spec: str) -> None:
    """Bug 6: ``--perturb blur:1.0`` was recorded as ``blur:1``."""
    p = parse(f" {spec} ")
    assert p.name == spec and p.canonical != spec
    assert [q.name for q in perturbations([spec])] == ["none", spec]
    # the spelling does not change the operation, nor the noise drawn for a key
    image = smooth_image()
    assert p.apply(image, "k").tobytes() == parse(p.canonical).apply(image, "k").tobytes()


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "jpg:75",
        "jpeg",
        "jpeg:0",
        "jpeg:101",
        "jpeg:7.5",
        "jpeg:abc",
        "jpeg:75:1",
        "resize:0",
        "resize:9",
        "resize:0.5:cubic",
        "blur:0",
        "blur:-1",
        "noise:nan",
        "crop:0",
        "crop:1.5",
        "none:1",
    ],
)
def test_bad_specs_are_one_line_errors(spec: str) -> None:
    with pytest.raises(QddError) as error:
        parse(spec)
    message = str(error.value)
    assert "\n" not in message and repr(spec) in message
    assert FORMS in message


def test_perturbations_none_first_deduplicated_order_kept() -> None:
    names = [p.name for p in perturbations(["blur:1", "jpeg:75", "none", "blur:1.0", "jpeg:50"])]
    assert names == ["none", "blur:1", "jpeg:75", "jpeg:50"]
    assert [p.name for p in perturbations([])] == ["none"]


@pytest.mark.parametrize(
    "spec", ["none", "jpeg:75", "resize:0.5", "blur:1.5", "noise:5", "crop:20", "crop:0.5"]
)
def test_same_key_same_bytes_rgb_out(spec: str) -> None:
    image = smooth_image()
    p = parse(spec)
    first, second = p.apply(image, "k1"), p.apply(image.copy(), "k1")
    assert first.mode == "RGB" and first.tobytes() == second.tobytes()
    assert np.asarray(image).tobytes() == smooth_image().tobytes()  # input left untouched
    assert p.apply(image.convert("L"), "k1").mode == "RGB"


def test_noise_differs_between_keys_and_specs_but_not_runs() -> None:
    image = smooth_image()
    noise = parse("noise:5")
    a, b = noise.apply(image, "k1"), noise.apply(image, "k2")
    assert a.tobytes() != b.tobytes()
    assert parse("noise:6").apply(image, "k1").tobytes() != a.tobytes()
    # SHA-256 seeds, not Python's salted hash(): a fixed value across processes.
    assert noise.seed("k1") == 0xB1C23AF033FFC5CE
    diff = np.asarray(a, np.float32) - np.asarray(image, np.float32)
    assert 4.0 < diff.std() < 6.0  # sigma in 0-255 units (clipping trims a little)


def test_jpeg_quality_orders_distortion() -> None:
    image = smooth_image()
    errors = [mean_abs_diff(image, parse(f"jpeg:{q}").apply(image, "k")) for q in (100, 75, 50)]
    assert errors[0] < errors[1] < errors[2]
    assert errors[0] < errors[2] / 2


def test_resize_keeps_the_new_size_and_filter_matters() -> None:
    image = smooth_image((64, 48))
    assert parse("resize:0.5").apply(image, "k").size == (32, 24)
    assert parse("resize:2").apply(image, "k").size == (128, 96)
    assert parse("resize:0.01").apply(image, "k").size == (1, 1)  # never empty
    nearest = parse("resize:0.5:nearest").apply(image, "k")
    assert nearest.tobytes() != parse("resize:0.5").apply(image, "k").tobytes()
    # nearest picks source pixels; bilinear (default) averages them.
    assert set(map(tuple, np.asarray(nearest).reshape(-1, 3))) <= set(
        map(tuple, np.asarray(image).reshape(-1, 3))
    )


def test_blur_smooths() -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    stds = [np.asarray(parse(f"blur:{s}").apply(image, "k"), np.float32).std() for s in (0.5, 2)]
    assert stds[1] < stds[0] < np.asarray(image, np.float32).std()
    assert parse("blur:2").apply(image, "k").size == image.size


def test_crop_centre_pixels_and_fraction() -> None:
    pixels = np.arange(10 * 8 * 3, dtype=np.uint8).reshape(8, 10, 3)  # height 8, width 10
    image = Image.fromarray(pixels, "RGB")
    crop = parse("crop:4").apply(image, "k")
    np.testing.assert_array_equal(np.asarray(crop), pixels[2:6, 3:7])
    assert parse("crop:0.5").apply(image, "k").size == (5, 4)
    assert parse("crop:100").apply(image, "k").size == (10, 8)  # shorter sides kept whole


def test_upper_case_spec_is_the_same_kind_with_severity_in_order() -> None:
    """Issue 21, finding 8: ``--perturb JPEG:75`` became its own kind ``JPEG`` in the report,
    ordered as if a higher quality were stronger."""
    from qdd.report.robustness import kinds, spec_rank

    assert parse("JPEG:75").name == "jpeg:75"
    assert [p.name for p in perturbations(["JPEG:75", "jpeg:75"])] == ["none", "jpeg:75"]
    # names recorded by an older qdd, in the user's case: one kind, weakest first
    assert kinds(["JPEG:75", "jpeg:50", "none", "JPEG:90"]) == {
        "jpeg": ["JPEG:90", "JPEG:75", "jpeg:50"]
    }
    assert sorted(["Blur:2", "none", "blur:1"], key=spec_rank) == ["none", "blur:1", "Blur:2"]
