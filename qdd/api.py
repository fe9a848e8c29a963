"""qdd's operations as Python functions: what ``qdd-cli``, the demo, sweeps and tests call.

(The demo, `qdd.demo.run_demo`, is built on these functions, one layer up.)

Each takes a config — a dict, or the path of a YAML file holding one — with the keys of
the command line, plus keyword overrides merged on top, and returns a `RunResult`::

    from qdd.api import fit, test
    trained = fit({"detector": "npr", "data": ["shards/real-*", "shards/*-fp32"],
                   "random_weights": True, "trainer": {"max_epochs": 2}}, out="runs/fit")
    scored = test(detector="npr", ckpt_path=trained.checkpoints["last"],
                  data={"paths": "shards/*", "split": "test"})  # the fit's held-out split
    scored.metrics["overall"]["auroc"], scored.scores  # metrics.json, scores.parquet

Trainer commands (fit, validate, test, predict): ``detector`` (a name or a YAML: its
packaged preset), ``data`` (a folder, a glob, a list of them, a preset name such as
``paper``, or the data module's own keys as a dict), ``weights``, ``random_weights``,
``out``, ``perturb``, ``ckpt_path``, and LightningCLI's own sections ``model``, ``data``,
``trainer`` (a dict, or a preset name: ``cpu``, ``gpu``, ``ddp``), ``seed_everything``;
``lightning_args``: LightningCLI command-line arguments applied last (what ``qdd-cli``
passes through: ``--trainer.max_epochs=2``, ``--config FILE``). Presets come first; the
keys given win over them. A call without ``out`` writes into a fresh folder of its own.
Nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdd.errors import QddError

CONFIGS = Path(__file__).parent / "configs"
Config = dict[str, Any] | str | Path | None


@dataclass
class RunResult:
    """What a run left: its folder, its metrics (metrics.json), checkpoints, scores."""

    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    #: ``{"best": ..., "last": ...}`` for fit; ``{}`` otherwise.
    checkpoints: dict[str, Path] = field(default_factory=dict)
    #: scores.parquet of test and predict.
    scores: Path | None = None


def load_config(config: Config, overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a dict or a YAML file) with ``overrides`` merged into it, section by section."""
    if isinstance(config, (str, Path)):
        config = read_yaml(Path(config))
    return merge(dict(config or {}), overrides)


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Dicts merged left to right; nested dicts key by key, anything else replaced."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            nested = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if nested else value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise QddError(f"cannot read config {path} ({error}): check the file") from None
    if not isinstance(content, dict):
        raise QddError(f"config {path} is not a mapping of keys to values: fix the file")
    return content


def preset(kind: str, value: str) -> Path | None:
    """A YAML file the user names, or a packaged preset ``configs/<kind>/<value>.yaml``."""
    if value.endswith((".yaml", ".yml")):
        if not Path(value).is_file():
            raise QddError(f"config {value} does not exist: check the path")
        return Path(value)
    if kind == "detectors":  # an alias (``NPRDetector``, ``clip-d``) finds its preset too
        from qdd.detectors.registry import preset_file

        return preset_file(value)
    name = value if kind == "trainer" else value.lower().replace("-", "_")
    candidate = CONFIGS / kind / f"{name}.yaml"
    return candidate if name.isidentifier() and candidate.is_file() else None


def _registered(detector: str) -> str:
    """``detector``'s registered name; an unknown one is refused now (with the closest
    name), before Lightning is imported or a run folder made."""
    from qdd.detectors.registry import detector_class, registered_name

    return registered_name(detector) or detector_class(detector).name


def lightning_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config with qdd's short keys in LightningCLI's own (what ``qdd-cli`` rewrites)."""
    rest = dict(config)
    layers: list[dict[str, Any]] = []
    trainer, data = rest.pop("trainer", None) or {}, rest.pop("data", None) or {}
    if isinstance(trainer, str):
        path = preset("trainer", trainer)
        if path is None:
            raise QddError(f"trainer preset {trainer} unknown: use cpu, gpu, ddp or a dict")
        layers.append(read_yaml(path))
        trainer = {}
    if "detector" in rest:
        detector = str(rest.pop("detector"))
        path = preset("detectors", detector)
        layers.append(read_yaml(path) if path else {"model": {"detector": _registered(detector)}})
    if isinstance(data, (str, Path, list, tuple)):  # folders, globs and presets, in order
        items = [str(d) for d in ([data] if isinstance(data, (str, Path)) else data)]
        presets = [path for path in map(lambda d: preset("data", d), items) if path]
        folders = [d for d in items if not preset("data", d)]
        layers += [{"data": read_yaml(path)} for path in presets]
        many = isinstance(data, (list, tuple))
        data = {"paths": folders if many else folders[0]} if folders else {}
    model, data, trainer = dict(rest.pop("model", None) or {}), dict(data), dict(trainer)
    weights, out, perturb = (rest.pop(k, None) for k in ("weights", "out", "perturb"))
    if rest.pop("task", None) == "attribution":
        data["task"] = "attribution"
    attribute = rest.pop("attribute", None)
    if attribute is not None:
        model["attribute"] = str(attribute)
    if weights is not None:
        model["weights"] = str(weights)
    if rest.pop("random_weights", False):
        model["random_weights"] = True
    if out is not None:
        trainer["default_root_dir"] = str(out)
    if perturb:
        data["perturb"] = [str(spec) for spec in perturb]
    if rest.get("ckpt_path") is not None:
        rest["ckpt_path"] = str(rest["ckpt_path"])
    return merge(*layers, {"model": model, "data": data, "trainer": trainer}, rest)


def check_data(paths: str | list[str] | None, perturb: list[str] | None = None) -> None:
    """Fail on missing or broken shard folders and unknown perturbations now, before
    Lightning is imported, weights are read or a model is built."""
    if perturb:
        from qdd.perturb import perturbations

        perturbations([str(spec) for spec in perturb])
    if paths:
        from qdd.datamodules.reader import read_manifest, resolve_folders

        for folder in resolve_folders(paths):
            read_manifest(folder)


def fit(config: Config = None, **overrides: Any) -> RunResult:
    """Train a detector; ``checkpoints`` holds the best and last checkpoint."""
    return run_lightning("fit", load_config(config, overrides))


def validate(config: Config = None, **overrides: Any) -> RunResult:
    """Run a detector's validation loop."""
    return run_lightning("validate", load_config(config, overrides))


def test(config: Config = None, **overrides: Any) -> RunResult:
    """Benchmark a detector: metrics per generator x precision and every image's score."""
    return run_lightning("test", load_config(config, overrides))


test.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported


def predict(config: Config = None, **overrides: Any) -> RunResult:
    """Score shards with a detector: scores only, no metrics."""
    return run_lightning("predict", load_config(config, overrides))


def run_lightning(command: str, config: dict[str, Any]) -> RunResult:
    """Run ``command`` through `qdd.lightning_cli.QddCLI` with a qdd config dict.

    The dict (qdd's short keys, presets resolved: `lightning_config`) is LightningCLI's
    first ``--config``; ``lightning_args``, LightningCLI's own arguments (``--trainer.*``,
    ``--model.*``, ``--data.*``, ``--config FILE``, ``--print_config``: what ``qdd-cli``
    passes through), come after it and win. ``qdd-cli`` and the API take this one path.
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    config = dict(config)
    passed = [str(a) for a in config.pop("lightning_args", None) or []]
    config["task"] = task = task_of(config, passed, command)
    sections = lightning_config(config)
    if not {"--help", "--print_config"} & {a.partition("=")[0] for a in passed}:
        check_data(sections["data"].get("paths"), sections["data"].get("perturb"))
    args = [command, "--config", json.dumps(sections, default=str), *passed]
    from qdd.datamodules.shard import ShardDataModule
    from qdd.lightning_cli import QddCLI, finish_loggers, open_wandb_run

    if task == "attribution":
        from qdd.modules.attribution import AttributionModule as module_class
    else:
        from qdd.modules.detector import DetectorModule as module_class

    users_run = open_wandb_run()  # the caller's own W&B run: never ended here
    try:
        cli = QddCLI(module_class, ShardDataModule, args=args)
    except BaseException:
        finish_loggers(None, failed=True, keep=users_run)  # a W&B run opened before the Trainer ran
        raise
    trainer = cli.trainer
    run_dir = Path(trainer.default_root_dir)
    callback = trainer.checkpoint_callback if command == "fit" else None
    paths = {"best": callback.best_model_path, "last": callback.last_model_path} if callback else {}
    checkpoints = {name: Path(path) for name, path in paths.items() if path}
    if trainer.global_rank != 0:
        return RunResult(run_dir, {}, checkpoints)
    from qdd.callbacks import RunSummary

    summaries = [c for c in trainer.callbacks if isinstance(c, RunSummary)]
    metrics = json.loads(json.dumps(summaries[0].metrics, default=lambda v: v.item()))
    scores = run_dir / "scores.parquet" if command in ("test", "predict") else None
    return RunResult(run_dir, metrics, checkpoints, scores if scores and scores.is_file() else None)


def task_of(config: dict[str, Any], passed: list[str], command: str = "test") -> str:
    """``detection`` or ``attribution``: as given, else as the checkpoint the run starts from
    was fitted (an attribution checkpoint holds its classes), ``--ckpt_path`` or ``--weights
    X.ckpt`` (in ``config`` or LightningCLI's ``passed`` arguments). A mismatch is refused,
    except ``fit --task attribution --weights`` of a detection checkpoint (its backbone, a
    new head)."""
    given = config.get("task")
    if given not in (None, "detection", "attribution"):
        raise QddError(f"--task {given!r}: use detection or attribution")
    ckpt = last_passed(passed, "--ckpt_path", config.get("ckpt_path"))
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    weights = last_passed(passed, "--model.weights", config.get("weights") or model.get("weights"))
    if ckpt is not None:
        task = checkpoint_task(ckpt, given, "--ckpt_path")
    elif weights is not None and str(weights).endswith(".ckpt"):
        task = checkpoint_task(weights, given, "--weights", new_head=command == "fit")
    else:
        task = given or "detection"
    if config.get("attribute") is not None and task != "attribution":
        raise QddError("--attribute applies to --task attribution: add it, or drop --attribute")
    return task


def last_passed(passed: list[str], flag: str, default: Any) -> Any:
    """The value of ``flag`` in LightningCLI's arguments (the last one wins, as there)."""
    value = default
    for i, arg in enumerate(passed):
        name, equals, rest = arg.partition("=")
        if name == flag:
            value = rest if equals else (passed[i + 1] if i + 1 < len(passed) else value)
    return value


def checkpoint_task(ckpt: str | Path, given: str | None, flag: str = "--ckpt_path",
                    new_head: bool = False) -> str:  # fmt: skip
    """The task a fit checkpoint was trained for; ``given`` must agree with it, unless
    ``new_head``: a detection checkpoint may start an attribution fit."""
    from qdd.checkpoint import read_checkpoint

    classes = read_checkpoint(ckpt, flag).hparams.get("classes")
    fitted = "attribution" if classes else "detection"
    if given in (None, fitted) or (new_head and (fitted, given) == ("detection", "attribution")):
        return given or fitted
    head = (f"its head names {', '.join(classes)}, not real vs fake" if classes
            else "its head has no attribution classes")  # fmt: skip
    raise QddError(f"{flag} {ckpt} was fitted for {fitted}, not {given} ({head}): "
                   f"pass --task {fitted}")  # fmt: skip


def generate(config: Config = None, **overrides: Any) -> RunResult:
    """Images of a generator at a precision (``generator``, ``precision``, ``out``, ...: the
    flags of ``qdd-cli generate``), or a study ``plan``; ``trainer``: Trainer keywords.
    With ``dry_run``, nothing runs: ``metrics["dry_run"]`` says what the jobs would make."""
    from qdd.generation.command import jobs_from_config, run_jobs

    settings = load_config(config, overrides)
    dry_run = settings.pop("dry_run", False)
    jobs, trainer_kwargs = jobs_from_config(settings)
    if dry_run:
        from qdd.generation.dryrun import describe_jobs

        return RunResult(Path(jobs[0].out), {"dry_run": describe_jobs(jobs)})
    folders = run_jobs(jobs, trainer_kwargs)
    return RunResult(folders[0] if len(folders) == 1 else folders[0].parent)


def decode(config: Config = None, **overrides: Any) -> RunResult:
    """A ``generate --save-latents`` folder's latents decoded again with the VAE at another
    precision (``src``, ``vae_precision``, ``out``, ``model_path``, ``overwrite``)."""
    from qdd.generation.redecode import run_decode

    out = run_decode(**load_config(config, overrides))
    return RunResult(out, {"total": read_manifest_total(out)})


def read_manifest_total(folder: Path) -> int:
    from qdd.datamodules.reader import read_manifest

    return int(read_manifest(folder)["total"])


def shard(config: Config = None, **overrides: Any) -> RunResult:
    """A folder of images as shards: ``src``, ``out``, ``label`` (real|fake), ``source``,
    ``max_count``, ``overwrite``, ``workers``; metrics: the manifest's totals."""
    from qdd.datamodules.schema import FAKE, REAL
    from qdd.datamodules.tars import shard_source

    settings = load_config(config, overrides)
    label = settings.pop("label")
    if label not in ("real", "fake"):
        raise QddError(f"label {label!r}: use real or fake")
    settings.setdefault("generator", settings["source"] if label == "fake" else None)
    manifest = shard_source(label=REAL if label == "real" else FAKE, **settings)
    summary = {"total": manifest["total"], "shards": len(manifest["shards"])}
    return RunResult(Path(settings["out"]), summary)


def quality(config: Config = None, **overrides: Any) -> RunResult:
    """Every generated image against its twin at the ``reference`` precision (``data``,
    ``reference``, ``out``, ``lpips_weights``, ``feature_weights``, ...: the flags of
    ``qdd-cli quality``); ``scores`` is quality.parquet. Without ``out``: a fresh folder."""
    from qdd.quality import run_quality
    from qdd.run_folder import fresh_run_dir, inherited_ddp_run_dir, shared_with_ddp_ranks

    settings = load_config(config, overrides)
    fresh = settings.get("out") is None and not inherited_ddp_run_dir()
    if settings.get("out") is None:
        settings["out"] = inherited_ddp_run_dir() or fresh_run_dir("quality")
    try:
        with shared_with_ddp_ranks(settings["out"]):
            result = run_quality(settings.pop("data"), **settings)
    except BaseException:
        if fresh and not any(Path(settings["out"]).iterdir()):
            Path(settings["out"]).rmdir()  # refused before writing: no empty folder left
        raise
    return RunResult(result.run_dir, result.metrics, {}, result.scores)


def fingerprint(config: Config = None, **overrides: Any) -> RunResult:
    """Residual power spectra per group and each group's distance to its ``reference``
    twin group (``data``, ``out``, ``crop``, ``reference``, ``perturb``, ...: the flags of
    ``qdd-cli fingerprint``); ``metrics`` is its metrics.json."""
    from qdd.fingerprint.command import run_fingerprint

    settings = load_config(config, overrides)
    result = run_fingerprint(settings.pop("data"), **settings)
    return RunResult(result.run_dir, result.metrics)


def report(config: Config = None, **overrides: Any) -> RunResult:
    """Figures and tables from test runs (``runs``, ``out``), or with ``compare`` the runs
    ranked by ``metric`` on ``group``; ``run_dir`` is the report folder, ``metrics["index"]``
    its report.md (compare.md). Without ``out``: a fresh folder (``qdd-cli report`` passes
    its default, ``report``)."""
    from qdd.report.command import run_report
    from qdd.run_folder import fresh_run_dir

    settings = load_config(config, overrides)
    runs, out = [Path(r) for r in settings.pop("runs")], settings.pop("out", None)
    out = Path(out) if out is not None else fresh_run_dir("report")
    index = run_report(runs, out, **settings)
    return RunResult(out, {"index": str(index)})


def quantize(config: Config = None, **overrides: Any) -> RunResult:
    """A generator's denoiser as a deployable file (``generator``, ``precision``, ``out``,
    ``model_path``: the flags of ``qdd-cli quantize``); ``run_dir`` is the file written."""
    from qdd.generation.quantize import quantize_to_file

    written = quantize_to_file(**load_config(config, overrides))
    return RunResult(Path(written.path), {"precision": written.precision, "sha256": written.sha256})


def sweep(
    config: Config, *, seed: int | None = None, out: str | Path | None = None, **overrides: Any
) -> RunResult:
    """A W&B sweep (a dict, or the path of its YAML; ``overrides`` merged on top) run
    offline: one `fit` per trial into ``out/trial-NNN`` (default: a fresh
    ``runs/sweep-<name>-<time>``); ``seed`` draws a random sweep's trials (default: the one
    ``out`` recorded, else 0). ``metrics["trials"]``: sweep.json's trial records."""
    from qdd.run_folder import fresh_run_dir
    from qdd.sweep import load_sweep, read_sweep, run_sweep

    given = isinstance(config, (str, Path))
    source = Path(config) if given else Path("sweep config")  # type: ignore[arg-type]
    settings = merge(read_sweep(source) if given else dict(config or {}), overrides)  # type: ignore[arg-type]
    load_sweep(source, settings)  # refused in one line before any folder is made
    folder = Path(out) if out is not None else fresh_run_dir("sweep", source.stem)
    return RunResult(folder, {"trials": run_sweep(settings, source, folder, seed, fit)})
