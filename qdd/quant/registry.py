"""Every precision, declared once: what it stores, which layers it takes, what it reproduces.

Like timm's ``pretrained_cfg``: one frozen `Precision` per name in `REGISTRY`, added with
`register`; qdd's own entries are in `qdd.quant.precisions` (loaded with ``qdd.quant``).
Everything that needs to know about a precision reads it here: the backends
(`qdd.quant.backends`), the layer entry point (`qdd.quant.layer.quantize_linear`), sizes
(`qdd.quant.size`), the ``--precision`` help and plan validation, the report's palette
(`qdd.report.palette`) and the format table of docs/quantization.md (`render_table`).
Adding a format is one entry here plus its kernel (docs/quantization.md, "Adding a format").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import Tensor, nn

from qdd.errors import QddError
from qdd.quant.keep import Rule

KINDS: tuple[str, ...] = ("unquantized", "weight-only", "weights+activations", "gguf")
#: Where ``--quant-backend auto`` takes a precision's library (`qdd.quant.backends`).
LIBRARY_DEVICES = {
    "cpu+cuda": "CPU or CUDA",
    "cuda": "CUDA",
    "sm89": "CUDA sm89+ (FP8 tensor cores)",
    "sm100": "CUDA sm100+ (FP4 tensor cores)",
}
#: A weight-only kernel: quantize→dequantize one weight (fp32 out); the ``str`` is which
#: bitsandbytes the 4-bit formats reproduce (`qdd.quant.bnb4bit`), ignored by the others.
WeightKernel = Callable[[Tensor, str], Tensor]


@dataclass(frozen=True)
class Precision:
    """One precision. ``weight_kernel`` (weight-only) or ``layer_kernel`` (activations too)
    is its emulation; neither: not applied per layer (unquantized levels, GGUF files)."""

    name: str
    kind: str  #: one of `KINDS`
    help: str  #: what it is, in a few words (docs table, error messages)
    weight_format: str = ""  #: recorded per sample; "" → the compute dtype
    activation_format: str | None = None  #: None: activations stay in the compute dtype
    group_size: int | None = None  #: values per scale (None: per tensor / row / token)
    rank: int | None = None  #: the 16-bit low-rank branch (SVDQuant)
    scale_format: str = "–"
    takes: Rule | None = None  #: which Linear layers it quantizes (`qdd.quant.keep`)
    keeps: str = "–"  #: the keep rule in words
    weight_bytes: Callable[[int, int], int] | None = None  #: (rows, cols) → stored bytes
    weight_kernel: WeightKernel | None = None
    linear_class: type[nn.Linear] = nn.Linear  #: weight-only layers' op order
    #: ``(linear, precision, act_absmax) -> module``: formats that quantize activations
    layer_kernel: Callable[[nn.Linear, Precision, Tensor | None], nn.Module] | None = None
    calibration: str | None = None  #: what it needs from calibration ("activation abs-max")
    smoothing: str | None = None  #: SVDQuant's smoothing: "data-free" or "calibrated"
    emulation: str | None = None  #: the sample's ``emulation`` tag: the numerics followed
    library: str | None = None  #: the Python library that runs it for real (a backend)
    library_refusal: str | None = None  #: why that library is never used, if it is not
    #: where ``auto`` takes the library: ``cpu+cuda``, ``cuda``, ``sm89`` (FP8 tensor cores)
    #: or ``sm100`` (FP4 tensor cores); explicit ``--quant-backend`` needs ``sm89`` for
    #: formats that quantize activations
    library_device: str = "cuda"  #: one of `LIBRARY_DEVICES`
    runtime: str = "–"  #: what deploys it, in short (named when only emulation runs here)
    reproduces: str = "–"  #: the library code the emulation follows
    exactness: str = "–"  #: "bit for bit" or "approximate: …"
    evidence: str = "–"
    order: float = 0.0  #: palette position: fewer bits to the right
    color: str = "#333333"

    @property
    def emulated(self) -> bool:
        """Whether `qdd.quant.layer.quantize_linear` applies it to a Linear layer."""
        return self.weight_kernel is not None or self.layer_kernel is not None

    @property
    def activations_quantized(self) -> bool:
        return self.activation_format is not None


REGISTRY: dict[str, Precision] = {}
#: What a name may be: a folder name part, a group label part (`qdd.identity`).
NAME = re.compile(r"[a-z0-9][a-z0-9._+-]*")
#: `qdd.identity.VAE_SUFFIX`: the VAE-precision suffix a label may carry.
VAE_LIKE = re.compile(r"-vae[a-z0-9]+$")


def register(precision: Precision) -> Precision:
    """Add ``precision``; a name already taken is refused."""
    if precision.kind not in KINDS:
        raise ValueError(f"{precision.name}: kind {precision.kind!r} is not one of {KINDS}")
    if not NAME.fullmatch(precision.name) or VAE_LIKE.search(precision.name):
        raise ValueError(
            f"precision name {precision.name!r}: use lower-case letters, digits, '.', '_', "
            "'+' and '-' (no '@' or '/', which group labels use, nor a '-vae…' ending)"
        )
    if precision.name in REGISTRY:
        raise ValueError(f"precision {precision.name!r} is already registered")
    if precision.library_device not in LIBRARY_DEVICES:
        raise ValueError(f"{precision.name}: library_device is one of {list(LIBRARY_DEVICES)}")
    if precision.emulated and (precision.takes is None or precision.weight_bytes is None):
        raise ValueError(f"{precision.name}: a quantized precision needs takes and weight_bytes")
    REGISTRY[precision.name] = precision
    return precision


def unregister(name: str) -> None:
    """Remove ``name`` (tests that add a throw-away format clean up with this)."""
    REGISTRY.pop(name)


def get(name: str) -> Precision:
    """The entry of ``name``; an unknown name ends in one line listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise QddError(f"unknown precision {name!r}: choose one of {', '.join(names())}") from None


def names(kind: str | None = None) -> tuple[str, ...]:
    """Registered names in palette order, optionally of one kind."""
    entries = sorted(REGISTRY.values(), key=lambda p: p.order)
    return tuple(p.name for p in entries if kind is None or p.kind == kind)


def quantized() -> frozenset[str]:
    """The precisions applied per Linear layer (the others: no layer changes, or a file)."""
    return frozenset(p.name for p in REGISTRY.values() if p.emulated)


def describe(precision: str, compute_dtype: str) -> dict[str, object]:
    """The format fields of a sample: weight/activation formats, group size, rank.

    A name the registry does not hold (a user GGUF file's label) names its own format.
    """
    entry = REGISTRY.get(precision)
    weight_format = (entry.weight_format if entry else precision) or compute_dtype
    activation = entry.activation_format if entry else None
    return {
        "weight_format": weight_format,
        "activation_format": activation or compute_dtype,
        "activations_quantized": activation is not None,
        "group_size": entry.group_size if entry else None,
        "rank": entry.rank if entry else None,
    }


def precision_help() -> str:
    """The ``--precision`` help: every registered name, grouped by kind."""
    groups = (
        ("", ("unquantized", "weight-only")),
        ("weights and activations: ", ("weights+activations",)),
        ("GGUF files: ", ("gguf",)),
    )
    parts = []
    for prefix, kinds in groups:
        group = [name for kind in kinds for name in names(kind)]
        if group:
            parts.append(prefix + ", ".join(group))
    return "; ".join(parts) + " (docs/quantization.md)"


TABLE_COLUMNS = (
    ("precision", "name"), ("what it is", "help"), ("weights", "weight_format"),
    ("activations", "activation_format"), ("group", "group_size"), ("rank", "rank"),
    ("scale", "scale_format"), ("layers kept in 16 bit", "keeps"),
    ("reproduces", "reproduces"), ("exact?", "exactness"), ("evidence", "evidence"),
    ("real backend (`auto`)", "library"),
)  # fmt: skip


def render_table() -> str:
    """docs/quantization.md's format table, rendered from the registry (one row per name)."""
    known = {f.name for f in fields(Precision)}
    assert all(attr in known for _, attr in TABLE_COLUMNS)
    lines = [
        "| " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for name in names():
        entry = REGISTRY[name]
        cells = []
        for _, attr in TABLE_COLUMNS:
            value = getattr(entry, attr)
            if attr == "name":
                value = f"`{value}`"
            elif attr == "weight_format" and not value:
                value = "compute dtype"
            elif attr == "activation_format" and value is None:
                value = "compute dtype"
            elif attr == "library" and (value is None or entry.library_refusal):
                value = f"none: emulation only ({entry.runtime})" if entry.emulated else "–"
            elif attr == "library":
                value = f"{value} on {LIBRARY_DEVICES[entry.library_device]}"
            elif value is None:
                value = "–"
            cells.append(str(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
