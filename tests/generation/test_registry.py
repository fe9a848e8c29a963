from __future__ import annotations

import pytest

from qdd.datamodules.schema import check_key
from qdd.errors import QddError
from qdd.generation.registry import GENERATORS, get_generator

REQUIRED = ("sd15", "sd21", "sdxl", "sd3", "sd35", "flux-schnell", "flux-dev")


def test_required_generators_are_registered() -> None:
    assert set(REQUIRED) <= set(GENERATORS)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_spec_is_consistent(name: str) -> None:
    import diffusers

    spec = get_generator(name)
    check_key(spec.name)  # the generator name is part of folder names and groups
    pipeline_class = getattr(diffusers, spec.pipeline_class)
    assert spec.denoiser in ("unet", "transformer")
    for component in (spec.denoiser, *spec.text_encoders, "vae"):
        assert component in pipeline_class._get_signature_keys(pipeline_class)[0]
    assert spec.resolution % 64 == 0 and spec.steps > 0 and spec.guidance >= 0
    assert spec.components["all"][-1] == "vae"


def test_half_dtype_is_bf16_where_fp16_overflows() -> None:
    for name, spec in GENERATORS.items():
        expected = "bfloat16" if spec.family in ("sd3", "flux") else "float16"
        assert spec.half_dtype == expected, name


def test_model_card_defaults() -> None:
    assert (GENERATORS["sd15"].resolution, GENERATORS["sd15"].steps) == (512, 50)
    assert GENERATORS["sd21"].resolution == 768
    assert (GENERATORS["sd3"].steps, GENERATORS["sd3"].guidance) == (28, 7.0)
    assert (GENERATORS["flux-schnell"].steps, GENERATORS["flux-schnell"].guidance) == (4, 0.0)


def test_unknown_generator_names_the_choices() -> None:
    with pytest.raises(QddError, match="unknown generator 'sd4'.*sd15"):
        get_generator("sd4")
