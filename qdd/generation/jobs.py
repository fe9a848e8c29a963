"""What one generation run must produce: the work items, their keys and the run's recipe.

A key depends only on the prompt id and the seed (``p00042-s1042``), never on the
precision, so every FP4 image has its FP32 twin under the same key in the sibling folder.
The recipe (``recipe.json`` in the output folder) pins everything that changes pixels; a
resumed run must match it, so one folder never mixes two recipes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from qdd.datamodules.schema import FAKE, check_key, make_meta
from qdd.datamodules.writer import FAILED, existing_keys
from qdd.errors import QddError

log = logging.getLogger(__name__)

RECIPE = "recipe.json"


@dataclass(frozen=True)
class Job:
    """One output folder: a generator at a precision, and how to run it."""

    generator: str
    precision: str
    out: str
    model_path: str | None = None  #: default: the generator's hub id
    denoiser_file: str | None = None  #: a user's GGUF denoiser; the precision is its label
    quant_backend: str = "auto"
    quant_scope: str = "denoiser"
    prompts: str | None = None  #: default: the built-in set
    limit: int | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    shard_size: int = 100
    overwrite: bool = False
    offload: str = "none"  #: diffusers' CPU offload (changes time and memory, not pixels)
    save_latents: bool = False  #: keep each sample's final latents (``latents.npy``)
    vae_precision: str | None = None  #: decode at this VAE precision (default: as loaded)
    #: calibrated SVDQuant: a prompt file to calibrate on (default: the job's own prompts)
    calibration_prompts: str | None = None
    calibration_count: int | None = None  #: its first N prompts (default 64)


JOB_FIELDS = {f.name for f in fields(Job)}


@dataclass(frozen=True)
class WorkItem:
    """One image to make: its prompt, its seed (``base_seed + prompt_id``) and its key."""

    prompt_id: int
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        return sample_key(self.prompt_id, self.seed)


def sample_key(prompt_id: int, seed: int) -> str:
    """The paired key of a sample: the same at every precision."""
    return check_key(f"p{prompt_id:05d}-s{seed}")


def work_items(prompts: list[str], base_seed: int, limit: int | None = None) -> list[WorkItem]:
    """The first ``limit`` prompts (all by default), each with its own seed."""
    if limit is not None and limit < 1:
        raise QddError(f"--limit must be at least 1, got {limit}: or leave it out for all prompts")
    chosen = prompts if limit is None else prompts[:limit]
    return [WorkItem(i, prompt, base_seed + i) for i, prompt in enumerate(chosen)]


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the pixels of one output folder."""

    generator: str
    model_id: str
    precision: str
    quant_backend: str  #: resolved backend (``none`` for fp32/fp16)
    quant_scope: str | None
    dtype: str
    steps: int
    guidance: float
    height: int
    width: int
    base_seed: int
    batch_size: int  #: batch size changes numerics at ~1e-6: fixed per folder
    prompts_sha: str
    denoiser_file: str | None = None  #: a user's GGUF file (``--denoiser-file``), as given
    denoiser_sha256: str | None = None  #: its sha256: another file is another recipe
    #: calibrated SVDQuant: digest of its calibration (`qdd.generation.calibration`)
    calibration_digest: str | None = None
    save_latents: bool | None = None  #: True: each sample keeps its final latents
    vae_precision: str | None = None  #: None: the VAE as the pipeline loads it

    @property
    def label(self) -> str:
        """The samples' ``precision``: the denoiser's, and the VAE's when it was set apart
        (``fp4-vaefp32``), so the denoiser × decoder groups never merge."""
        return self.precision if self.vae_precision is None else vae_label(
            self.precision, self.vae_precision
        )

    def meta(
        self,
        item: WorkItem,
        quant_fraction: float,
        provenance: dict[str, Any] | None = None,
        costs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The sample's json: every schema field, the quantized fraction, dtype, provenance
        and what the image cost (`qdd.generation.costs`)."""
        return make_meta(
            FAKE,
            self.generator,
            generator=self.generator,
            precision=self.label,
            denoiser_precision=self.precision,
            quant_backend=self.quant_backend,
            quant_scope=self.quant_scope,
            model_id=self.model_id,
            prompt=item.prompt,
            prompt_id=item.prompt_id,
            seed=item.seed,
            steps=self.steps,
            guidance=self.guidance,
            width=self.width,
            height=self.height,
            quant_fraction=quant_fraction,
            dtype=self.dtype,
            denoiser_file=self.denoiser_file,
            **(provenance or {}),
            **(costs or {}),
        )


def vae_label(denoiser_precision: str, vae_precision: str) -> str:
    """The precision label of images whose VAE ran at ``vae_precision``."""
    return f"{denoiser_precision}-vae{vae_precision}"


def failed_keys(out_dir: Path) -> set[str]:
    """Keys recorded as failed (NaN or black): deterministic, so a resume does not retry them."""
    path = Path(out_dir) / FAILED
    if not path.exists():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["key"] for line in lines if line.strip()}


def prepare_folder(out_dir: Path, recipe: Recipe, overwrite: bool) -> None:
    """Check (or write) the folder's recipe; ``overwrite`` starts the folder afresh."""
    from qdd.datamodules.writer import shard_files
    from qdd.generation.calibration import CACHE as CALIBRATION_CACHE

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RECIPE
    if overwrite:
        for stale in [*shard_files(out_dir), *out_dir.glob("*.tar.partial")]:
            stale.unlink(missing_ok=True)
        for name in ("manifest.json", FAILED, RECIPE, CALIBRATION_CACHE):
            (out_dir / name).unlink(missing_ok=True)
    elif path.exists():
        held = json.loads(path.read_text(encoding="utf-8"))
        wanted = asdict(recipe)
        changed = sorted(k for k in wanted if held.get(k) != wanted[k])
        if changed:
            diff = ", ".join(f"{k}: {held.get(k)!r} -> {wanted[k]!r}" for k in changed)
            raise QddError(
                f"{out_dir} holds images of a different recipe ({diff}): pass --overwrite "
                "to replace them or choose another --out"
            )
    elif shard_files(out_dir):
        raise QddError(
            f"{out_dir} holds shards of an unknown recipe (no {RECIPE}): pass --overwrite "
            "or choose another --out"
        )
    tmp = out_dir / f".{RECIPE}.tmp"
    tmp.write_text(json.dumps(asdict(recipe), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def pending(items: list[WorkItem], out_dir: Path) -> list[WorkItem]:
    """Items not yet sealed in a complete shard nor recorded as failed (resume)."""
    done = existing_keys(out_dir) | failed_keys(out_dir)
    todo = [item for item in items if item.key not in done]
    if len(todo) < len(items):
        log.info(
            "%s: %d of %d images already done, %d to go",
            out_dir,
            len(items) - len(todo),
            len(items),
            len(todo),
        )
    return todo
