"""Load a generator's pipeline at one precision: ``from_pretrained``, then the precision recipe.

Every level loads through ``from_pretrained`` (a hub id or a local folder) in one dtype,
then quantizes the scoped components in place. In-place quantization is the one path that
runs everywhere (diffusers refuses bitsandbytes 4-bit loading without a GPU) and it gives
the same numerics as quantizing during loading: the weights are quantized from the same
half-precision tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from qdd.errors import QddError
from qdd.generation.registry import GeneratorSpec

log = logging.getLogger(__name__)

#: Precisions that run the model unquantized.
UNQUANTIZED = ("fp32", "fp16")
SCOPES = ("denoiser", "text", "all")


@dataclass(frozen=True)
class QuantSummary:
    """What a precision recipe did to a loaded pipeline (recorded in every sample)."""

    precision: str
    backend: str  #: resolved backend: emulate, torchao, bitsandbytes, or none
    scope: str | None  #: None for fp32/fp16
    dtype: str  #: dtype of everything not quantized and of the compute
    n_quantized: int  #: parameters stored in the quantized format
    n_params: int  #: parameters of the scoped components
    kept: tuple[str, ...] = ()  #: Linear layers the precision left unquantized
    #: format fields of every sample (GGUF: tensor types, file sha256, keep list …)
    details: dict[str, Any] = field(default_factory=dict)
    denoiser_bytes: int = 0  #: the denoiser as the real format stores it (`qdd.quant.size`)

    @property
    def fraction(self) -> float:
        return self.n_quantized / self.n_params if self.n_params else 0.0


def compute_dtype_name(spec: GeneratorSpec, precision: str) -> str:
    """fp32 runs in float32; every other level in the generator's half dtype."""
    return "float32" if precision == "fp32" else spec.half_dtype


def is_local_path(model_path: str) -> bool:
    """A folder on disk, or a string that can only be meant as one (not ``owner/name``)."""
    if Path(model_path).expanduser().exists():
        return True
    return model_path.startswith((".", "/", "~")) or model_path.count("/") != 1


def resolve_model_path(model_path: str) -> str:
    """Check a local folder before loading; hub ids pass through unchanged."""
    if not is_local_path(model_path):
        return model_path
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        raise QddError(
            f"model folder {model_path} not found: pass a diffusers pipeline folder "
            "(with model_index.json) or a Hugging Face hub id to --model-path"
        )
    if not (folder / "model_index.json").is_file():
        raise QddError(
            f"{model_path} is not a diffusers pipeline folder (no model_index.json): "
            "save one with pipeline.save_pretrained(DIR) or pass a hub id"
        )
    return str(folder)


def load_pipeline(
    spec: GeneratorSpec,
    model_path: str,
    dtype: str,
    device: Any,
    denoiser_file: str | Path | None = None,
) -> Any:
    """``from_pretrained`` in ``dtype`` on ``device``; hub failures become a `QddError`.

    ``denoiser_file``: a GGUF file loaded through diffusers' GGUF loader in place of the
    folder's denoiser (the rest of the pipeline still comes from ``model_path``).
    """
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    source = resolve_model_path(model_path)
    pipeline_class = getattr(diffusers, spec.pipeline_class)
    components: dict[str, Any] = {}
    if denoiser_file is not None:
        from qdd.quant.gguf import load_denoiser

        components[spec.denoiser] = load_denoiser(
            spec.family, spec.name, source, spec.denoiser, denoiser_file, getattr(torch, dtype)
        )
    try:
        pipeline = pipeline_class.from_pretrained(
            source, dtype=getattr(torch, dtype), **spec.load_kwargs, **components
        )
    except OSError as error:
        if is_local_path(model_path):
            raise QddError(
                f"cannot load the pipeline in {model_path} ({error}): re-save it with "
                "save_pretrained or pass another --model-path"
            ) from None
        reason = str(error).splitlines()[0].split(" (")[0][:200]
        raise QddError(
            f"cannot load {model_path} from the Hugging Face hub ({reason}): download it "
            f"first (`hf download {model_path}`, then HF_HUB_OFFLINE=1) or pass a local folder"
        ) from None
    if type(pipeline).__name__ != spec.pipeline_class:
        raise QddError(
            f"{model_path} holds a {type(pipeline).__name__}, not a {spec.pipeline_class}: "
            f"pass the right --generator for this model"
        )
    pipeline.set_progress_bar_config(disable=True)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline.to(device)


def gguf_file(recipe_file: str | None, precision: str, out_dir: Path) -> Path | None:
    """The GGUF file a run loads: the user's ``--denoiser-file``, else the one qdd wrote for a
    ``gguf-*`` precision into the output folder; ``None`` for every other precision."""
    from qdd.quant.gguf import DEFAULT_FILE, is_gguf

    if recipe_file is not None:
        return Path(recipe_file)
    return Path(out_dir) / DEFAULT_FILE if is_gguf(precision) else None


def gguf_summary(
    pipeline: Any, spec: GeneratorSpec, precision: str, path: Path, written_by_qdd: bool
) -> QuantSummary:
    """What the GGUF denoiser holds: quantized values counted from its GGUF parameters."""
    from gguf import GGMLQuantizationType

    from qdd.quant.gguf import KEEP, UNQUANTIZED_TYPES, describe, read_tensor_types
    from qdd.quant.size import gguf_file_bytes

    dtype = compute_dtype_name(spec, precision)
    denoiser = getattr(pipeline, spec.denoiser)
    n_params = n_quantized = 0
    for parameter in denoiser.parameters():
        kind = getattr(parameter, "quant_type", None)
        numel = prod(parameter.quant_shape) if kind is not None else parameter.numel()
        n_params += numel
        if kind is not None and GGMLQuantizationType(kind).name not in UNQUANTIZED_TYPES:
            n_quantized += numel
    keep = KEEP[spec.family] if written_by_qdd else None
    details = describe(path, precision, dtype, keep)
    if set(read_tensor_types(path).values()) - set(UNQUANTIZED_TYPES) and not n_quantized:
        raise RuntimeError(f"{path}: quantized tensors in the file, none in the loaded model")
    return QuantSummary(
        precision, "gguf", "denoiser", dtype, n_quantized, n_params, details=details,
        denoiser_bytes=gguf_file_bytes(path),
    )  # fmt: skip


def apply_precision(
    pipeline: Any,
    spec: GeneratorSpec,
    precision: str,
    backend: str,
    scope: str,
    device: Any,
    denoiser_file: Path | None = None,
    written_by_qdd: bool = False,
    calibration: dict[str, Any] | None = None,
) -> QuantSummary:
    """Quantize the components of ``scope`` in place; count what was quantized.

    A GGUF denoiser (``denoiser_file``) was quantized by its file: only counted here.
    ``calibration``: ``component.layer`` → input abs-max, for calibrated SVDQuant.
    """
    from qdd.quant.size import module_bytes

    if denoiser_file is not None:
        return gguf_summary(pipeline, spec, precision, denoiser_file, written_by_qdd)
    dtype = compute_dtype_name(spec, precision)
    if precision in UNQUANTIZED:
        denoiser_bytes = module_bytes(getattr(pipeline, spec.denoiser), precision)
        return QuantSummary(precision, "none", None, dtype, 0, 0, denoiser_bytes=denoiser_bytes)
    import torch

    from qdd.quant import quantize_module_, resolve_backend

    resolved = resolve_backend(precision, backend, device)
    n_quantized = n_params = denoiser_bytes = 0
    kept: list[str] = []
    for name in spec.components[scope]:
        module = getattr(pipeline, name, None)
        if not isinstance(module, torch.nn.Module):
            continue  # an optional component this checkpoint does not ship (e.g. no T5)
        given = None
        if calibration is not None:
            given = {k.removeprefix(f"{name}."): v for k, v in calibration.items()
                     if k.startswith(f"{name}.")}  # fmt: skip
        report = quantize_module_(
            module, precision, resolved, getattr(torch, dtype), calibration=given
        )
        n_quantized += report.n_quantized
        n_params += report.n_params
        kept += [f"{name}.{layer}" for layer in report.kept]
        if name == spec.denoiser:
            denoiser_bytes = report.deployed_bytes
    return QuantSummary(
        precision, resolved, scope, dtype, n_quantized, n_params, tuple(kept),
        denoiser_bytes=denoiser_bytes,
    )  # fmt: skip
