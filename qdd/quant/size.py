"""What a denoiser weighs as each format stores it: the deployed size, not the emulation's.

The emulation holds dequantized weights at the compute dtype, so its tensors say nothing
about what a user of the real format keeps in memory. The bytes of a quantized Linear
weight follow its format's storage layout (`qdd.quant.storage`; which one a precision uses
is its registry entry's ``weight_bytes``), from the shape alone, so the same figure comes
out of an emulated run, a real-library run and a ``--dry-run`` on a meta-device model.
Everything else the checkpoint holds (biases, norms, convolutions, embeddings, persistent
buffers, layers a format leaves out) counts at its own dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from qdd.quant import registry
from qdd.quant.storage import dense_bytes


def quantized_weight_bytes(precision: str, rows: int, cols: int) -> int:
    """The bytes of one (rows × cols) Linear weight stored in ``precision``'s format."""
    weight_bytes = registry.get(precision).weight_bytes
    if weight_bytes is None:
        raise ValueError(f"{precision!r} has no quantized storage format")
    return weight_bytes(rows, cols)


def module_bytes(module: nn.Module, precision: str, quantized: Iterable[str] = ()) -> int:
    """Deployed bytes of ``module``: the weights of the Linear layers named in ``quantized``
    in ``precision``'s format, every other tensor of its state dict (parameters and
    persistent buffers, e.g. SD3's position embedding) at its own dtype.

    Works on a meta-device module too (shapes and dtypes only), which is how ``--dry-run``
    weighs a denoiser without its weights.
    """
    names = set(quantized)
    layers = dict(module.named_modules())
    missing = names - set(layers)
    if missing:
        raise ValueError(f"no layer named {sorted(missing)[0]!r} in the module")
    total = 0
    stored: set[int] = set()
    for name in names:
        layer = layers[name]
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is a {type(layer).__name__}, not a Linear layer")
        total += quantized_weight_bytes(precision, layer.out_features, layer.in_features)
        stored.add(id(layer.weight))
    for tensor in module.state_dict(keep_vars=True).values():  # shared tensors count once
        if id(tensor) not in stored:
            stored.add(id(tensor))
            total += dense_bytes(tensor.numel(), tensor.dtype)
    return total


def gguf_file_bytes(path: str | Path) -> int:
    """A GGUF file's tensor data: the sum of its tensors' ``n_bytes`` (header excluded)."""
    from gguf import GGUFReader

    return sum(int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors)
