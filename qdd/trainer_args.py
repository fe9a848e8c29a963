"""qdd's own flags of the Trainer subcommands: short help, rewriting, cheap checks first.

Nothing heavy is imported here: ``qdd-cli test --help`` and a bad ``--data`` path answer
in well under two seconds, before Lightning (~7 s to import), weights or models are
touched. The short flags of the CLI contract are rewritten into plain LightningCLI
arguments before parsing, so everything else (``--config``, ``--trainer.*``,
``--model.*``, ``--data.*``, ``--print_config``) works as Lightning documents it:

==========================  ==================================================================
``--detector npr``          ``--config qdd/configs/detectors/npr.yaml`` (a packaged preset) or
                            ``--config X.yaml`` for a YAML, else ``--model.detector=NAME``
``--data X``                a preset under ``configs/data/`` or a YAML → ``--data X.yaml``;
                            anything else (folder, glob; repeatable) → ``--data.paths``
``--weights F``             ``--model.weights=F``
``--random-weights``        ``--model.random_weights=true``
``--out DIR``               the run folder (``--trainer.default_root_dir=DIR``)
``--trainer cpu|gpu|ddp``   ``--config`` of the packaged preset ``configs/trainer/NAME.yaml``
                            (any other value is left to LightningCLI)
``--perturb SPEC``          a test-time perturbation (``jpeg:75``, ``resize:0.5``, ``blur:1.0``;
                            repeatable) → ``--data.perturb=[...]``; ``none`` is always run
==========================  ==================================================================

Presets are applied first, so later flags such as ``--data.batch_size=8`` still override.
"""

from __future__ import annotations

import json
from pathlib import Path

from qdd.errors import QddError

CONFIGS = Path(__file__).parent / "configs"
#: The flag that shows LightningCLI's full help (every --trainer.*, --model.*, --data.*).
HELP_ALL = "--help-all"

_PURPOSE = {
    "fit": "Train a detector on shards: real vs fake, split into train/validation by key.\n"
    "Writes checkpoints/ (last.ckpt and the best), metrics.json and config.yaml into --out.",
    "validate": "Run a detector's validation loop on shards (the validation side of a fit).",
    "test": "Benchmark a detector on shards: metrics per generator x precision.\n"
    "Writes metrics.json, scores.parquet (one logit per image) and config.yaml into --out.",
    "predict": "Score shards with a detector: scores.parquet (one logit per image), no metrics.",
}

_EXAMPLES = {
    "fit": [
        "qdd-cli fit --detector npr --data shards/real-coco --data 'shards/sd3-*' "
        "--random-weights --out runs/npr-fp4aug",
        "qdd-cli fit --detector npr --data 'shards/*' --random-weights "
        "--trainer.max_steps=200 --data.batch_size=16",
        "qdd-cli fit --detector clipd --data 'shards/*' --weights checkpoints/clipd.pth",
    ],
    "test": [
        "qdd-cli test --detector npr --data shards/sd3-fp4 --data shards/real-coco",
        "qdd-cli test --detector clipd --data paper --out runs/clipd-paper",
        "qdd-cli test --detector npr --data 'shards/*' --ckpt_path runs/fit-npr/checkpoints/"
        "last.ckpt",
    ],
}


def short_help(command: str) -> str:
    """The help of ``qdd-cli COMMAND --help``: qdd's flags and examples, then where the rest is."""
    examples = _EXAMPLES.get(command, _EXAMPLES["test"])
    if command not in _EXAMPLES:
        examples = [e.replace("qdd-cli test", f"qdd-cli {command}") for e in examples[:2]]
    lines = [
        f"usage: qdd-cli {command} --detector NAME --data DIR|GLOB|PRESET",
        "           [--weights FILE | --random-weights] [--out DIR] [--ckpt_path CKPT]",
        "           [--verbose] [LightningCLI flags: --trainer.* --model.* --data.* --config]",
        "",
        _PURPOSE[command],
        "",
        "qdd's flags:",
        "  --detector NAME|YAML  npr, clipd, univfd or corvi (its packaged preset: the",
        "                        published recipe), or your own YAML config",
        "  --data DIR|GLOB|PRESET  shard folder(s) from `qdd-cli shard` / `generate`; repeat",
        "                        it or use a quoted glob; or a preset under configs/data/",
        "                        (paper). Checked first, before any model is built",
        "  --weights FILE        the detector's weights: an official file or a .ckpt of",
        "                        `qdd-cli fit` (default: its official file under",
        "                        checkpoints/ or $QDD_CHECKPOINTS; see checkpoints/README.md)",
        "  --random-weights      run with an untrained head, on purpose (smoke tests only)",
        f"  --out DIR             the run folder (default runs/{command}-DETECTOR-TIMESTAMP/);",
        "                        printed as the last line",
        "  --ckpt_path CKPT      resume (fit) or evaluate (test) a `qdd-cli fit`",
        "                        checkpoint; --model.* flags you give win, it fills the rest",
        "  --perturb SPEC        test also after jpeg:Q, resize:S, blur:SIGMA, noise:SIGMA or",
        "                        crop:N (repeatable; the unperturbed pass always runs)",
        "  --trainer cpu|gpu|ddp a packaged Trainer preset (configs/trainer/)",
        "  --verbose             show every library message (see qdd/quiet.py)",
        "",
        "often used LightningCLI flags:",
        "  --trainer.accelerator cpu|gpu   --trainer.devices N   --trainer.max_epochs N",
        "  --trainer.max_steps N   --data.batch_size N   --data.num_workers N",
        "  --model.lr X   --model.threshold X   --config FILE   --print_config",
        "",
        "examples:",
        *(f"  {e}" for e in examples),
        "",
        f"every flag (LightningCLI's full help, ~580 lines): qdd-cli {command} {HELP_ALL}",
    ]
    return "\n".join(lines)


def _preset(kind: str, value: str) -> Path | None:
    """A packaged preset (``configs/<kind>/<value>.yaml``) or a YAML file the user names."""
    if value.endswith((".yaml", ".yml")):
        if not Path(value).is_file():
            raise QddError(f"config {value} does not exist: check the path")
        return Path(value)
    candidate = CONFIGS / kind / f"{value.lower().replace('-', '_')}.yaml"
    return candidate if candidate.is_file() else None


def _trainer_preset(value: str) -> Path | None:
    """``configs/trainer/<value>.yaml`` when ``value`` names a packaged trainer preset."""
    candidate = CONFIGS / "trainer" / f"{value}.yaml"
    return candidate if value.isidentifier() and candidate.is_file() else None


def expand_shorthands(argv: list[str]) -> list[str]:
    """Rewrite the CLI contract's short flags into LightningCLI arguments."""
    front: list[str] = []
    rest: list[str] = []
    paths: list[str] = []
    perturb: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        takes_value = name in ("--detector", "--data", "--weights", "--out", "--perturb")
        if takes_value:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise QddError(f"{name} needs a value")
        if name == "--detector":
            preset = _preset("detectors", value)
            front += [f"--config={preset}"] if preset else []
            rest += [] if preset else [f"--model.detector={value}"]
        elif name == "--data":
            preset = _preset("data", value)
            if preset is not None:
                front.append(f"--data={preset}")
            else:
                paths.append(value)
        elif name == "--weights":
            rest.append(f"--model.weights={value}")
        elif name == "--out":
            rest.append(f"--trainer.default_root_dir={value}")
        elif name == "--trainer" and not eq and i + 1 < len(argv) and _trainer_preset(argv[i + 1]):
            front.append(f"--config={_trainer_preset(argv[i + 1])}")
            i += 1
        elif name == "--perturb":
            perturb.append(value)
        elif arg == "--random-weights":
            rest.append("--model.random_weights=true")
        else:
            rest.append(arg)
        i += 1
    if len(paths) == 1:
        rest.append(f"--data.paths={paths[0]}")
    elif paths:
        rest.append(f"--data.paths={json.dumps(paths)}")
    if perturb:
        rest.append(f"--data.perturb={json.dumps(perturb)}")
    return front + rest


def _value(args: list[str], flag: str) -> str | None:
    """The last value of ``flag`` in expanded arguments (``--flag=V`` or ``--flag V``)."""
    found = None
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            found = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(args):
            found = args[i + 1]
    return found


def data_paths(args: list[str]) -> list[str] | None:
    """The shard folders or globs expanded arguments name (``--data.paths`` wins over a
    ``--data`` YAML's ``paths``); None when only a ``--config`` could name them."""
    explicit = _value(args, "--data.paths")
    if explicit is not None:
        if explicit.startswith("["):
            try:
                return [str(p) for p in json.loads(explicit)]
            except json.JSONDecodeError:
                return None  # not ours to judge: LightningCLI parses its own syntax
        return [explicit]
    preset = _value(args, "--data")
    if preset is None or not preset.endswith((".yaml", ".yml")):
        return None
    import yaml

    try:
        config = yaml.safe_load(Path(preset).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise QddError(f"cannot read --data {preset} ({error}): check the YAML") from None
    paths = config.get("paths", config.get("init_args", {}).get("paths"))
    if paths is None:
        return None
    return [str(paths)] if isinstance(paths, str) else [str(p) for p in paths]


def check_data(args: list[str]) -> None:
    """Fail on missing or broken shard folders and unknown --perturb specs now, before
    weights are read or models built."""
    perturb = _value(args, "--data.perturb")
    if perturb is not None and perturb.startswith("["):
        from qdd.perturb import perturbations

        perturbations([str(spec) for spec in json.loads(perturb)])
    paths = data_paths(args)
    if paths is None:
        return
    from qdd.datamodules.reader import read_manifest, resolve_folders

    for folder in resolve_folders(paths):
        read_manifest(folder)
