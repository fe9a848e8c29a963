"""SVDQuant with calibrated smoothing against today's data-free construction (issue 22)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdd.errors import QddError
from qdd.quant import quantize_module_
from qdd.quant.svdquant import (
    SVDQuantLinear,
    calibrated_smooth,
    smooth_factor,
    smoothing_candidates,
    svdquant_linear,
)

OUTLIER_CHANNELS = [3, 77, 300, 411]


def layer(seed: int = 4, outlier_columns: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(512, 256))
    if outlier_columns:
        with torch.no_grad():
            module[0].weight[:, [3, 77, 300]] *= 40
    return module


def inputs(seed: int, outlier_inputs: bool, n: int = 128) -> torch.Tensor:
    x = torch.randn(n, 512, generator=torch.Generator().manual_seed(seed))
    if outlier_inputs:
        x[:, OUTLIER_CHANNELS] *= 40
    return x


def relative_errors(weight_format: str, outlier_inputs: bool) -> tuple[float, float]:
    """(calibrated, data-free) relative output errors on tokens the calibration never saw."""
    outlier_columns = not outlier_inputs
    calibration = {"0": inputs(1, outlier_inputs).abs().amax(dim=0)}
    x = inputs(2, outlier_inputs)
    with torch.no_grad():
        exact = layer(outlier_columns=outlier_columns)(x)
    errors = []
    for precision, given in ((f"svdq-{weight_format}", calibration),
                             (f"svdq-{weight_format}-datafree", None)):  # fmt: skip
        module = layer(outlier_columns=outlier_columns)
        quantize_module_(module, precision, "emulate", torch.bfloat16, calibration=given)
        with torch.no_grad():
            out = module(x.bfloat16()).float()
        errors.append(((out - exact).norm() / exact.norm()).item())
    return errors[0], errors[1]


@pytest.mark.parametrize("weight_format", ["int4", "nvfp4"])
def test_calibrated_smoothing_rescues_activation_outlier_channels(weight_format: str) -> None:
    calibrated, data_free = relative_errors(weight_format, outlier_inputs=True)
    assert calibrated <= 0.6 * data_free, (calibrated, data_free)


@pytest.mark.parametrize("weight_format", ["int4", "nvfp4"])
def test_calibrated_smoothing_is_no_worse_on_outlier_weight_columns(weight_format: str) -> None:
    calibrated, data_free = relative_errors(weight_format, outlier_inputs=False)
    assert calibrated <= data_free, (calibrated, data_free)


def test_the_search_grid_is_deepcompressors() -> None:
    """alpha 0.5, beta -2, num_grids 20: none, (k/20, 0) and (k/20, 1 - k/20), k = 1..19."""
    grid = smoothing_candidates()
    assert len(grid) == 39 and grid[0] == (0.0, 0.0)
    assert grid[1] == (0.05, 0.0) and grid[19] == (0.95, 0.0)
    assert grid[20] == (0.05, 0.95) and (0.5, 0.5) in grid


def test_a_fixed_alpha_is_smoothquants_formula() -> None:
    linear = layer(outlier_columns=True)[0]
    absmax = inputs(1, True).abs().amax(dim=0)
    quantized = svdquant_linear(
        linear, weight_format="int4", rank=32, group=64, smoothing="calibrated",
        act_absmax=absmax, alpha=0.5,
    )  # fmt: skip
    w_span = linear.weight.detach().abs().amax(dim=0)
    expected = absmax.sqrt() / w_span.sqrt()
    assert torch.equal(quantized.smooth, expected)
    assert torch.equal(calibrated_smooth(absmax, linear.weight, 0.0, 0.0), torch.ones(512))
    assert isinstance(linear, nn.Linear) and type(linear) is nn.Linear  # left as it was


def test_calibrated_layer_reconstructs_the_weight_and_records_alpha() -> None:
    reference = layer(outlier_columns=True)
    module = layer(outlier_columns=True)
    calibration = {"0": inputs(1, True).abs().amax(dim=0)}
    report = quantize_module_(
        module, "svdq-nvfp4", "emulate", torch.float32, calibration=calibration
    )
    quantized = module[0]
    assert isinstance(quantized, SVDQuantLinear) and quantized.alpha is not None
    alpha, beta = round(quantized.alpha, 4), round(quantized.beta, 4)
    assert report.smoothing == {
        "kind": "calibrated",
        "alpha": {"min": alpha, "median": alpha, "max": alpha},
        "beta": {"min": beta, "median": beta, "max": beta},
    }
    smooth = quantized.smooth.float()
    low_rank = quantized.proj_up.float() @ (quantized.proj_down.float() * smooth)
    rebuilt = (quantized.dequantized_weight() + low_rank) / smooth
    weight = reference[0].weight.detach()
    assert ((rebuilt - weight).norm() / weight.norm()).item() < 0.1
    datafree = quantize_module_(layer(), "svdq-nvfp4-datafree", "emulate", torch.float32)
    assert datafree.smoothing == {"kind": "data-free"}


def test_dead_channels_and_zero_inputs_stay_finite() -> None:
    absmax = inputs(1, True).abs().amax(dim=0)
    absmax[:64] = 0  # channels calibration never saw active
    module = layer()
    quantize_module_(module, "svdq-int4", "emulate", torch.bfloat16, calibration={"0": absmax})
    assert torch.isfinite(module[0].smooth).all() and (module[0].smooth[:64] == 1).all()
    with torch.no_grad():
        assert torch.isfinite(module(torch.zeros(2, 512, dtype=torch.bfloat16))).all()


def test_calibration_mismatches_are_refused_in_one_line() -> None:
    with pytest.raises(QddError, match=r"1 of 1 have none \(first: '0'\).*svdq-int4-datafree"):
        quantize_module_(layer(), "svdq-int4", "emulate", torch.bfloat16)
    absmax = torch.ones(512)
    stray = r"calibration names 1 layer\(s\) this module has no Linear of \(first: '1'\)"
    with pytest.raises(QddError, match=stray):
        both = {"0": absmax, "1": absmax}
        quantize_module_(layer(), "svdq-int4", "emulate", torch.bfloat16, calibration=both)
    with pytest.raises(QddError, match="svdq-int4-datafree uses no calibration: drop it"):
        given = {"0": absmax}
        quantize_module_(
            layer(), "svdq-int4-datafree", "emulate", torch.bfloat16, calibration=given
        )
    with pytest.raises(ValueError, match="512 input channels"):
        svdquant_linear(
            layer()[0], weight_format="int4", rank=32, group=64, smoothing="calibrated",
            act_absmax=torch.ones(256),
        )  # fmt: skip


def test_data_free_smoothing_is_the_weight_span() -> None:
    weight = layer(outlier_columns=True)[0].weight.detach()
    quantized = svdquant_linear(
        layer(outlier_columns=True)[0], weight_format="int4", rank=32, group=64,
        smoothing="data-free", act_absmax=None,
    )  # fmt: skip
    assert torch.equal(quantized.smooth, smooth_factor(weight))
    assert quantized.alpha is None


def test_the_searchs_sketched_svd_is_seeded_and_near_exact() -> None:
    from qdd.quant.svdquant import low_rank, sketched_low_rank

    weight = layer(outlier_columns=True)[0].weight.detach()
    state = torch.random.get_rng_state()
    up, down = sketched_low_rank(weight, 32)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    again = sketched_low_rank(weight, 32)
    assert torch.equal(up, again[0]) and torch.equal(down, again[1])
    exact_up, exact_down = low_rank(weight, 32)
    sketched = (weight - up @ down).norm()
    exact = (weight - exact_up @ exact_down).norm()
    assert exact <= sketched <= 1.03 * exact  # a flat spectrum: the hardest case
