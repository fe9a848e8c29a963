"""``qdd-cli generate``: images of one generator at one precision, or a whole study plan.

One run = one output folder of shards (``<out>/`` for a single run, ``<out>/<generator>-
<precision>/`` per cell of a plan), each with its ``recipe.json`` and ``manifest.json``.
Runs resume: started again on the same folder, a run makes only the keys not yet sealed.
``--trainer.devices N`` (and the other ``--trainer.*`` flags) go to Lightning's Trainer,
which splits the prompts over the ranks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from qdd.errors import QddError
from qdd.generation.costs import OFFLOADS
from qdd.generation.jobs import JOB_FIELDS, Job, vae_label
from qdd.generation.registry import GENERATORS, get_generator

log = logging.getLogger("qdd.generation")

BACKENDS = ("auto", "emulate", "torchao", "bitsandbytes")
SCOPES = ("denoiser", "text", "all")
STUDY_DIR = Path(__file__).resolve().parent.parent / "configs" / "study"
#: Trainer settings that would change the numerics behind the recipe's back.
FORBIDDEN_TRAINER_KEYS = ("precision", "plugins")


def build_parser() -> argparse.ArgumentParser:
    from qdd.quant import registry

    parser = argparse.ArgumentParser(
        prog="qdd-cli generate",
        description="Generate images of a diffusion model at one precision (or a study plan's "
        "grid of generators x precisions) into WebDataset shards. Resumable: run it again "
        "to complete an interrupted folder. Lightning Trainer flags: --trainer.devices N, "
        "--trainer.accelerator gpu|cpu, --trainer.strategy ddp, --trainer.num_nodes N.",
    )
    parser.add_argument("--plan", help="study plan YAML (or a name under configs/study/)")
    parser.add_argument("--generator", help=f"one of: {', '.join(GENERATORS)}")
    parser.add_argument(
        "--model-path", help="hub id or local diffusers folder (default: the generator's hub id)"
    )
    parser.add_argument("--precision", help=registry.precision_help())
    parser.add_argument(
        "--denoiser-file",
        help="a GGUF denoiser file used as it is (city96's or llama.cpp's Q8_0 … Q4_K); "
        "the precision is read from its tensor types",
    )
    parser.add_argument(
        "--quant-backend",
        choices=BACKENDS,
        help="default auto: the real library where it runs, else emulation",
    )
    parser.add_argument(
        "--quant-scope",
        choices=SCOPES,
        help="what is quantized: denoiser (default), +text encoders, +VAE",
    )
    parser.add_argument("--prompts", help="prompt file, one per line (default: built-in set)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--seed", type=int, help="base seed; image i uses seed + i (default 0)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    parser.add_argument("--height", type=int, help="image height (default: native)")
    parser.add_argument("--width", type=int, help="image width (default: native)")
    parser.add_argument("--batch-size", type=int, help="images per pipeline call (default 1)")
    parser.add_argument(
        "--shard-size",
        type=int,
        help="images per shard (default 100); a killed run redoes at most this many per rank",
    )
    parser.add_argument("--out", help="output folder (a plan: the parent of its folders)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="delete what --out holds and start again",
    )
    parser.add_argument(
        "--offload",
        choices=OFFLOADS,
        help="diffusers' CPU offload on an accelerator: model (per component) or sequential "
        "(per layer; slowest, least memory); default none",
    )
    parser.add_argument(
        "--save-latents",
        action="store_true",
        default=None,
        help="keep each sample's final latents (before the VAE) in the shard, for "
        "`qdd-cli decode`",
    )
    parser.add_argument(
        "--vae-precision",
        help="decode with the VAE at fp32, fp16, bf16, or quantized fp8, fp4, nf4 (default: "
        "as the pipeline loads it); the samples' precision becomes e.g. fp4-vaefp32",
    )
    parser.add_argument(
        "--calibration-prompts",
        help="svdq-int4/svdq-nvfp4: prompt file whose activations calibrate the smoothing "
        "(default: --prompts); gathered once per folder, reused on resume",
    )
    parser.add_argument(
        "--calibration-count",
        type=int,
        help="svdq-int4/svdq-nvfp4: calibrate on the first N calibration prompts (default 64)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help="print the jobs, image counts, shard disk and denoiser sizes; generate nothing",
    )
    return parser


def split_trainer_flags(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Pull ``--trainer.key value`` / ``--trainer.key=value`` out of ``argv``."""
    rest: list[str] = []
    trainer: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--trainer."):
            name, eq, value = arg[len("--trainer.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise QddError(f"{arg} needs a value: e.g. {arg} 2")
                value = argv[i + 1]
                i += 1
            trainer[name] = yaml.safe_load(value)
        else:
            rest.append(arg)
        i += 1
    return rest, trainer


def check_trainer_kwargs(trainer: dict[str, Any]) -> dict[str, Any]:
    for key in FORBIDDEN_TRAINER_KEYS:
        if key in trainer:
            raise QddError(
                f"--trainer.{key} is not used by generate: the precision recipe sets every "
                "dtype; pass --precision instead"
            )
    return trainer


def find_plan(plan: str) -> Path:
    """A plan file, or the name of a packaged plan (``paper`` → configs/study/paper.yaml)."""
    path = Path(plan)
    if path.is_file():
        return path
    packaged = STUDY_DIR / (path.name if path.suffix else f"{plan}.yaml")
    if packaged.is_file():
        return packaged
    names = sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))
    raise QddError(f"plan {plan} not found: pass a YAML file or one of {', '.join(names)}")


def jobs_from_plan(plan_path: Path, overrides: dict[str, Any]) -> tuple[list[Job], dict[str, Any]]:
    """The plan's grid of jobs; command-line values override the plan's."""
    try:
        plan = yaml.safe_load(plan_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise QddError(f"plan {plan_path} is not valid YAML ({error}): fix the file") from None
    if not isinstance(plan, dict) or not plan.get("generators"):
        raise QddError(f"plan {plan_path} lists no generators: add a `generators:` list")
    plan = dict(plan)
    trainer = dict(plan.pop("trainer", None) or {})
    entries = plan.pop("generators")
    default_precisions = plan.pop("precisions", None)
    plan_out = plan.pop("out", None)
    out = overrides.pop("out", None) or plan_out
    if not out:
        raise QddError(f"plan {plan_path} names no output folder: pass --out DIR")
    for name in ("generator", "precision", "model_path"):
        if overrides.get(name) is not None:
            raise QddError(f"--{name.replace('_', '-')} does not go with --plan: edit the plan")
    unknown = set(plan) - JOB_FIELDS
    if unknown:
        raise QddError(
            f"plan {plan_path}: unknown key(s) {', '.join(sorted(unknown))}: "
            f"use {', '.join(sorted(JOB_FIELDS - {'out', 'generator', 'precision'}))}"
        )
    jobs = []
    for entry in entries:
        entry = {"generator": entry} if isinstance(entry, str) else dict(entry)
        precisions = entry.pop("precisions", default_precisions)
        file = overrides.get("denoiser_file") or entry.get(
            "denoiser_file", plan.get("denoiser_file")
        )
        if file is not None:  # checked against the generator the job will run
            generator = entry.get("generator", plan.get("generator"))
            precisions = [gguf_label(file, precisions, generator)]
        if not precisions:
            raise QddError(
                f"plan {plan_path}: no precisions for {entry.get('generator')}: "
                "add a `precisions:` list"
            )
        unknown = set(entry) - JOB_FIELDS
        if unknown:
            raise QddError(
                f"plan {plan_path}: unknown key(s) {', '.join(sorted(unknown))} in "
                f"the entry of {entry.get('generator')}"
            )
        settings = {**plan, **entry, **{k: v for k, v in overrides.items() if v is not None}}
        generator = get_generator(settings.pop("generator")).name
        for precision in precisions:
            label = precision
            if settings.get("vae_precision") is not None:
                label = vae_label(precision, settings["vae_precision"])
            folder = Path(out) / f"{generator}-{label}"
            jobs.append(Job(generator=generator, precision=precision, out=str(folder), **settings))
    return jobs, trainer


def gguf_label(file: str, precision: str | list[str] | None, generator: str | None) -> str:
    """The precision of a ``--denoiser-file``: its label; a different --precision, or a file
    of another architecture than ``generator``'s, is refused."""
    from qdd.quant.gguf import check_architecture, precision_of

    label = precision_of(file)
    if generator is not None:
        spec = get_generator(generator)
        check_architecture(file, spec.family, spec.name)
    given = [precision] if isinstance(precision, str) else list(precision or [])
    if any(p != label for p in given):
        raise QddError(
            f"{file} is a {label} file, not {', '.join(given)}: leave out --precision "
            "(the file's tensor types decide it)"
        )
    return label


def jobs_from_config(config: dict[str, Any]) -> tuple[list[Job], dict[str, Any]]:
    """Jobs and Trainer keyword arguments from the command line's keys (``model_path`` for
    ``--model-path``; ``plan``; ``trainer``: a dict), as `qdd.api.generate` takes them."""
    settings = {k: v for k, v in config.items() if v is not None}
    trainer = dict(settings.pop("trainer", None) or {})
    plan = settings.pop("plan", None)
    unknown = set(settings) - JOB_FIELDS
    if unknown:
        raise QddError(f"unknown generate key(s) {', '.join(sorted(unknown))}: use "
                       f"{', '.join(sorted(JOB_FIELDS))}, plan or trainer")  # fmt: skip
    if plan is not None:
        jobs, plan_trainer = jobs_from_plan(find_plan(plan), settings)
        return jobs, check_trainer_kwargs({**plan_trainer, **trainer})
    if settings.get("denoiser_file") is not None:
        settings["precision"] = gguf_label(
            settings["denoiser_file"], settings.get("precision"), settings.get("generator")
        )
    for name in ("generator", "precision", "out"):
        if settings.get(name) is None:
            raise QddError(f"--{name} is required (or pass --plan configs/study/NAME.yaml)")
    check_calibration_flags(settings)
    return [Job(**settings)], check_trainer_kwargs(trainer)


def check_calibration_flags(settings: dict[str, Any]) -> None:
    """Calibration flags go with a calibrated precision only (a plan's apply where they can)."""
    from qdd.quant.registry import REGISTRY

    given = [k for k in ("calibration_prompts", "calibration_count") if k in settings]
    entry = REGISTRY.get(settings["precision"])
    if given and (entry is None or entry.calibration is None):
        flag = "--" + given[0].replace("_", "-")
        raise QddError(
            f"{flag} calibrates svdq-int4/svdq-nvfp4, not {settings['precision']}: leave it out"
        )


def run_jobs(jobs: list[Job], trainer_kwargs: dict[str, Any]) -> list[Path]:
    """Generate every job's folder in turn; returns the folders."""
    return [run_job(job, trainer_kwargs) for job in jobs]


def is_launch_leader() -> bool:
    """True in the process that prepares folders: global rank 0 (or before a launch)."""
    for variable in ("RANK", "SLURM_PROCID"):
        if variable in os.environ:
            return int(os.environ[variable]) == 0
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def make_trainer(trainer_kwargs: dict[str, Any]) -> Any:
    """A Trainer for a loop that is not training (generation, quality): one device unless
    asked, no logger or checkpoints, and no distributed sampler — its data modules split
    their items across ranks themselves, exactly once."""
    import lightning as L

    settings: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": sys.stderr.isatty(),
        "use_distributed_sampler": False,  # it pads with duplicates
        "deterministic": "warn",
        **trainer_kwargs,
    }
    try:
        return L.Trainer(**settings)
    except (TypeError, ValueError) as error:
        # Lightning's MisconfigurationException is a ValueError.
        raise QddError(
            f"bad --trainer.* flag ({error}): see `python -c "
            "'import lightning; help(lightning.Trainer)'`"
        ) from None


def run_job(job: Job, trainer_kwargs: dict[str, Any] | None = None) -> Path:
    """Generate one folder (resuming it if it holds part of the set); returns the folder."""
    from qdd.datamodules.writer import write_manifest
    from qdd.generation.calibration import calibrates, calibration_prompts, recipe_digest
    from qdd.generation.jobs import Recipe, pending, prepare_folder, work_items
    from qdd.generation.loading import compute_dtype_name, resolve_model_path
    from qdd.generation.prompts import load_prompts, prompts_digest
    from qdd.generation.vae import check_vae_precision
    from qdd.quant import registry, resolve_backend
    from qdd.quant.gguf import file_sha256

    spec = get_generator(job.generator)
    gguf = job.precision.startswith("gguf-")
    if gguf:
        check_gguf_job(job, spec)
    elif job.denoiser_file is not None:
        raise QddError(f"--denoiser-file needs a gguf-* precision, not {job.precision}")
    else:
        registry.get(job.precision)  # an unknown name: one line listing the known ones
    if job.quant_backend not in BACKENDS:
        raise QddError(
            f"unknown --quant-backend {job.quant_backend!r}: choose one of {', '.join(BACKENDS)}"
        )
    if job.offload not in OFFLOADS:
        raise QddError(f"unknown --offload {job.offload!r}: choose one of {', '.join(OFFLOADS)}")
    check_vae_precision(job.vae_precision)
    if job.quant_scope not in SCOPES:
        raise QddError(
            f"unknown --quant-scope {job.quant_scope!r}: choose one of {', '.join(SCOPES)}"
        )
    for name in ("batch_size", "shard_size", "steps", "height", "width"):
        value = getattr(job, name)
        if value is not None and value < 1:
            raise QddError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    model_path = job.model_path or spec.hub_id
    resolve_model_path(model_path)  # a missing folder fails here, before Lightning starts
    prompts = load_prompts(job.prompts)
    items = work_items(prompts, job.seed, job.limit)
    trainer = make_trainer(trainer_kwargs or {})
    from qdd.threads import use_threads

    use_threads(processes=trainer.num_devices)
    device = trainer.strategy.root_device
    if job.offload != "none" and device.type == "cpu":
        raise QddError(
            f"--offload {job.offload} moves weights between the CPU and an accelerator, and "
            "this run is on the CPU: leave out --offload (or run on a GPU)"
        )
    quantized = job.precision not in ("fp32", "fp16")
    if gguf:
        backend = "gguf"  # diffusers' GGUF loader: no other backend reads the file
    elif quantized:
        backend = resolve_backend(job.precision, job.quant_backend, str(device))
    else:
        backend = "none"
    calibration: list[str] = []
    if calibrates(job.precision, backend):
        if job.offload != "none":
            raise QddError(
                f"{job.precision} calibrates by running the whole pipeline on one device: leave "
                f"out --offload {job.offload}, or use {job.precision}-datafree"
            )
        calibration = calibration_prompts(prompts, job.calibration_prompts, job.calibration_count)
    recipe = Recipe(
        generator=spec.name,
        model_id=model_path,
        precision=job.precision,
        quant_backend=backend,
        quant_scope=job.quant_scope if quantized else None,
        dtype=compute_dtype_name(spec, job.precision),
        steps=job.steps or spec.steps,
        guidance=spec.guidance if job.guidance is None else float(job.guidance),
        height=job.height or spec.resolution,
        width=job.width or spec.resolution,
        base_seed=job.seed,
        batch_size=job.batch_size,
        prompts_sha=prompts_digest(prompts),
        denoiser_file=job.denoiser_file,
        denoiser_sha256=file_sha256(job.denoiser_file) if job.denoiser_file else None,
        save_latents=True if job.save_latents else None,
        vae_precision=job.vae_precision,
    )
    if calibration:
        recipe = replace(recipe, calibration_digest=recipe_digest(recipe, calibration))
    out = Path(job.out)
    leader = is_launch_leader()
    if leader:
        prepare_folder(out, recipe, job.overwrite)
        if gguf and job.denoiser_file is None:
            write_gguf_once(spec.name, model_path, job.precision, out, job.overwrite)
        if quantized and job.quant_backend == "auto":
            log.info(
                "%s %s: --quant-backend auto chose %s on %s",
                spec.name,
                job.precision,
                backend,
                device.type,
            )
    _barrier()  # every rank reads the folder after the leader prepared it ...
    todo = items if job.overwrite else pending(items, out)
    _barrier()  # ... and before any rank writes to it
    if todo:
        from qdd.generation.data import PromptDataModule
        from qdd.modules.generator import GeneratorModule

        module = GeneratorModule(
            recipe, model_path, out, shard_size=job.shard_size, offload=job.offload,
            calibration_prompts=calibration,
        )  # fmt: skip
        data = PromptDataModule(todo, batch_size=job.batch_size)
        with warnings.catch_warnings():  # predict_step writes and returns None on purpose
            warnings.filterwarnings("ignore", message="predict returned None")
            trainer.predict(module, datamodule=data, return_predictions=False)
        _barrier()
    if trainer.is_global_zero:
        from qdd.generation.costs import summarise_costs

        manifest = write_manifest(out, {"costs": summarise_costs(out)})
        log.info("%s: %d images, %d failed", out, manifest["total"], len(manifest["failed"]))
    return out


def check_gguf_job(job: Job, spec: Any) -> None:
    """A GGUF run: SD3/Flux only, a precision qdd writes (or a user's file), scope denoiser."""
    from qdd.quant.gguf import check_family, check_writable

    check_family(spec.family, spec.name)
    if job.denoiser_file is None:
        check_writable(job.precision)
    else:  # a Job built in code: the file's family and label, as the command line checks
        gguf_label(job.denoiser_file, job.precision, spec.name)
    if job.quant_backend != "auto":
        raise QddError(
            f"{job.precision} runs through diffusers' GGUF loader: leave out --quant-backend"
        )
    if job.quant_scope != "denoiser":
        raise QddError(f"{job.precision} is a denoiser file: leave out --quant-scope")


def write_gguf_once(
    generator: str, model_path: str, precision: str, out: Path, fresh: bool
) -> None:
    """qdd's GGUF file of this run, in its folder: written once, kept for resumes and reuse."""
    from qdd.generation.quantize import write_denoiser
    from qdd.quant.gguf import DEFAULT_FILE

    path = out / DEFAULT_FILE
    if fresh or not path.is_file():
        write_denoiser(generator, model_path, precision, path)


def _barrier() -> None:
    """Wait for every rank's last shard before the manifest (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
