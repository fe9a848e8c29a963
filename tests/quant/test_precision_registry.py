"""The registry of precisions: one entry is all a format needs, and everything reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qdd.errors import QddError
from qdd.quant import Precision, quantize_linear, quantize_module_, register, registry
from qdd.quant.keep import every_linear

DOC = Path(__file__).parents[2] / "docs" / "quantization.md"


def halve_weight(weight: torch.Tensor, _semantics: str) -> torch.Tensor:
    """A throw-away 'format': every weight halved (visible, and easy to check)."""
    return weight.float() / 2


@pytest.fixture
def throwaway():
    entry = register(Precision(
        "int3-test", "weight-only", "a throw-away test format", weight_format="int3",
        group_size=8, takes=every_linear, weight_bytes=lambda rows, cols: 3 * rows * cols // 8,
        weight_kernel=halve_weight, order=85, color="#123456",
    ))  # fmt: skip
    yield entry
    registry.unregister(entry.name)


def test_a_throwaway_format_reaches_help_sizes_palette_and_layers(throwaway) -> None:
    from qdd.generation.command import build_parser
    from qdd.quant.size import module_bytes, quantized_weight_bytes
    from qdd.report.palette import color, order_precisions

    help_text = next(a.help for a in build_parser()._actions if a.dest == "precision")
    assert "int3-test" in help_text
    assert quantized_weight_bytes("int3-test", 16, 64) == 3 * 16 * 64 // 8
    module = nn.Sequential(nn.Linear(64, 16, bias=False))
    assert module_bytes(module, "int3-test", ["0"]) == 3 * 16 * 64 // 8
    assert color("int3-test") == "#123456"
    assert order_precisions(["nf4", "int3-test", "fp4", "fp32"]) == [
        "fp32", "fp4", "int3-test", "nf4"
    ]  # fmt: skip
    original = module[0].weight.detach().clone()
    report = quantize_module_(module, "int3-test", "emulate", torch.float32)
    assert torch.equal(module[0].weight, original / 2) and report.weight_format == "int3"
    assert report.deployed_bytes == 3 * 16 * 64 // 8 and report.group_size == 8
    assert registry.get("int3-test").library is None
    from qdd.quant import resolve_backend

    assert resolve_backend("int3-test", "auto", "cpu") == "emulate"


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(registry.get("fp8"))
    with pytest.raises(QddError, match="unknown precision 'fp3': choose one of fp32, fp16"):
        registry.get("fp3")


def test_docs_table_is_the_registry_rendering() -> None:
    """docs/quantization.md's precision table: `python scripts/precision_table.py --write`."""
    text = DOC.read_text()
    start = text.index("\n", text.index("<!-- precision table:")) + 1
    documented = text[start : text.index("<!-- end of precision table -->")]
    assert documented == registry.render_table()


def test_every_precision_has_one_colour_and_place() -> None:
    entries = [registry.get(name) for name in registry.names()]
    assert len({e.color for e in entries}) == len(entries)
    assert len({e.order for e in entries}) == len(entries)
    for entry in entries:
        if entry.emulated:
            assert entry.takes is not None and entry.weight_bytes is not None
            assert entry.exactness != "–" and entry.reproduces != "–", entry.name


def test_quantize_linear_equals_the_module_path() -> None:
    torch.manual_seed(0)
    for precision in ("fp8", "nvfp4", "fp4", "fp8-w8a8-row", "svdq-int4-datafree"):
        layer = nn.Linear(64, 32).to(torch.bfloat16)
        module = nn.Sequential(nn.Linear(64, 32))
        module[0].load_state_dict(layer.state_dict())
        quantize_module_(module, precision, "emulate", torch.bfloat16)
        alone = quantize_linear(layer, precision)
        x = torch.randn(5, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(alone(x), module[0](x)), precision
        assert type(alone) is type(module[0])


def test_quantize_linear_refuses_what_a_layer_cannot_take() -> None:
    with pytest.raises(QddError, match="fp16 is not applied per Linear layer"):
        quantize_linear(nn.Linear(64, 32), "fp16")
    with pytest.raises(QddError, match="gguf-q8_0 is not applied per Linear layer"):
        quantize_linear(nn.Linear(64, 32), "gguf-q8_0")
    with pytest.raises(QddError, match="nvfp4 does not take a 32 × 40 Linear"):
        quantize_linear(nn.Linear(40, 32), "nvfp4")
    with pytest.raises(QddError, match="fp8 uses no calibration"):
        quantize_linear(nn.Linear(64, 32), "fp8", calibration=torch.ones(64))
    with pytest.raises(QddError, match="svdq-int4 needs calibration.*use svdq-int4-datafree$"):
        quantize_linear(nn.Linear(64, 32), "svdq-int4")
    with pytest.raises(QddError, match="unknown precision"):
        quantize_linear(nn.Linear(64, 32), "int2")


@pytest.mark.parametrize("precision", ["fp8", "fp8-w8a8", "svdq-nvfp4-datafree"])
def test_a_second_quantization_is_refused_and_changes_nothing(precision: str) -> None:
    module = nn.Sequential(nn.Linear(64, 32))
    quantize_module_(module, precision, "emulate", torch.float32)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(QddError, match=f"already quantized \\({precision}\\)"):
        quantize_module_(module, precision, "emulate", torch.float32)
    with pytest.raises(QddError, match="already quantized"):
        quantize_linear(module[0], "nvfp4")
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())


def test_calibration_is_joined_to_layers_by_name() -> None:
    """quantize_module_ passes calibration[name] per layer; a stray or missing name is refused
    in one line before any layer changes."""
    from qdd.quant.layer import act_absmax

    module = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    with pytest.raises(QddError, match="no Linear of .*first: '7'"):
        quantize_module_(module, "svdq-int4", "emulate", torch.float32,
                         calibration={"0": torch.ones(64), "7": torch.ones(64)})  # fmt: skip
    with pytest.raises(QddError, match="1 of 2 have none .*first: '1'.*svdq-int4-datafree$"):
        quantize_module_(module, "svdq-int4", "emulate", torch.float32,
                         calibration={"0": torch.ones(64)})  # fmt: skip
    with pytest.raises(QddError, match="fp8 uses no calibration"):
        quantize_module_(module, "fp8", "emulate", torch.float32, calibration={"0": torch.ones(64)})
    with pytest.raises(QddError, match=r"calibration for 1 ends in \(32,\), not its input"):
        quantize_module_(module, "svdq-int4", "emulate", torch.float32,
                         calibration={"0": torch.ones(64), "1": torch.ones(5, 32)})  # fmt: skip
    assert all(type(m) is nn.Linear for m in module)  # nothing changed
    # activations [tokens, in] and their per-channel abs-max read the same
    x = torch.randn(3, 7, 64)
    absmax = x.abs().amax(dim=(0, 1))
    assert torch.equal(act_absmax(x, 64), absmax) and torch.equal(act_absmax(absmax, 64), absmax)
    with pytest.raises(QddError, match=r"calibration has \(3, 7, 32\) values, not \[..., 64\]"):
        act_absmax(torch.ones(3, 7, 32), 64)


@pytest.mark.parametrize("precision", ["svdq-int4", "svdq-nvfp4-datafree"])
def test_quantize_linear_quantizes_svdquant_in_place_as_documented(precision: str) -> None:
    """A researcher's ``quantize_linear(model.fc, ...)`` that ignores the return value (as every
    other precision allows) used to leave the model in full precision, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
    x = torch.randn(5, 64)
    calibration = x if registry.get(precision).calibration else None
    with torch.no_grad():
        before = model(x)
        returned = quantize_linear(model[0], precision, calibration=calibration)
        assert returned is model[0]
        assert not torch.equal(model(x), before)
    with pytest.raises(QddError, match="already quantized"):
        quantize_linear(model[0], precision, calibration=calibration)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_calibration_that_overflowed_is_refused_in_one_line(bad: float) -> None:
    """Half-precision activations that overflowed (a NaN image among the calibration prompts)
    used to end in a ValueError traceback from deep inside the smoothing search."""
    calibration = torch.ones(2, 64)
    calibration[1, 3] = bad
    layer = nn.Linear(64, 32)
    with pytest.raises(QddError, match="calibration holds inf or NaN.*svdq-int4-datafree"):
        quantize_linear(layer, "svdq-int4", calibration=calibration)
    assert getattr(layer, "qdd_precision", None) is None  # nothing changed


@pytest.mark.parametrize("name", ["int3@test", "int3/test", "int3-vaetest", "Int3 test", ""])
def test_a_name_the_labels_would_misread_is_refused(name: str) -> None:
    """A sample's group label is ``<generator>/<precision>[@backend]``, folders are named
    ``<generator>-<precision>`` and a ``-vae…`` suffix is the VAE's: a format named with
    ``@``, ``/``, spaces or that suffix used to register and then be grouped under another
    name (``int3-vaetest`` as ``int3``'s VAE variant) or no colour."""
    with pytest.raises(ValueError, match="precision name"):
        register(Precision(
            name, "weight-only", "a throw-away test format", takes=every_linear,
            weight_bytes=lambda rows, cols: rows * cols, weight_kernel=halve_weight,
        ))  # fmt: skip
    assert name not in registry.REGISTRY
