"""A `qdd-cli fit` checkpoint as one input: read once, and the rules for using it.

A fit checkpoint carries five things a later run must respect: the detector's
hyperparameters (its architecture: ``detector`` and ``detector_args``), the sha256 of every
weight file the detector was built from (a frozen backbone, a training-free detector's
networks), the calibrated threshold, the data module's split settings, and the identities
of the units it trained on (`qdd.datamodules.split`); for a training-free detector, whose
``fit`` only calibrates (`qdd.training_free`), the units it calibrated on. `FitCheckpoint`
holds them, read once per file.

Which value wins, for a run given a checkpoint (``--ckpt_path C.ckpt``, or
``--weights C.ckpt`` for a fine-tune or a test of its weights):

1. values you give (flags, your own ``--config`` YAML) — except that the architecture
   (``detector``, ``detector_args``), an attribution checkpoint's classes and what they name
   (``attribute``, ``include_real``), and the calibration rule of ``--ckpt_path`` cannot be
   changed: a conflicting value is refused in one line naming both;
2. the checkpoint's saved hyperparameters (all of them for ``--ckpt_path``; the architecture
   and the classes for ``--weights``, whose run otherwise keeps its own settings: a
   fine-tune's lr);
3. the packaged preset of ``--detector`` (``configs/detectors/NAME.yaml``);
4. the defaults.

A value equal to the preset's is read as the preset's, not as yours (the two cannot be told
apart once the preset is merged): the checkpoint's value then wins, which keeps its
architecture.

Weight files: a detector rebuilt from the checkpoint must read the same files by content
(sha256; a moved or renamed copy is fine): a head or a threshold fitted on one backbone
means nothing on another, so any other file is refused in one line.

Overlap rules: every split a run evaluates — a fit's validation split, ``validate``'s,
``test``'s — must not share a unit with the checkpoint's training data; it is refused in one
line, or, with ``allow_train_overlap``, counted (``train_overlap`` in metrics.json: 0 when
checked and clean, null when nothing could be checked). A fit from a checkpoint inherits its
trained units, so its own checkpoint names both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from qdd.calibration import stored_calibration
from qdd.datamodules.split import RULE, Indexed
from qdd.errors import QddError

log = logging.getLogger(__name__)

#: Where Lightning stores the data module's state_dict: its class's __qualname__.
DATA_KEY = "ShardDataModule"
#: The split settings a checkpoint stores and a resumed fit must repeat.
SETTINGS = ("val_fraction", "test_fraction", "holdout_generators")
#: Where a fit checkpoint records its detector's weight files (path → sha256).
WEIGHT_FILES_KEY = "qdd_weight_files"
#: Hyperparameters that define what the checkpoint's weights are.
ARCHITECTURE = ("detector", "detector_args")
#: An attribution checkpoint's head: its classes and what they name. Kept from the checkpoint
#: under ``--ckpt_path`` and ``--weights`` alike; another value is refused (`_keep_classes`).
CLASS_DEFINITION = ("classes", "attribute", "include_real")


@dataclass(frozen=True)
class FitCheckpoint:
    """What a fit checkpoint holds, read once (`read_checkpoint`)."""

    path: str
    contents: dict[str, Any]

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.contents.get("hyper_parameters") or {})

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The threshold fitted on the fit's validation split, with its rule (or None)."""
        return stored_calibration(self.contents)

    @property
    def weight_files(self) -> dict[str, str] | None:
        """The weight files its detector was built from, path → sha256 (None: not recorded,
        a checkpoint of an older qdd)."""
        files = self.contents.get(WEIGHT_FILES_KEY)
        return None if files is None else dict(files)

    def check_weight_files(self, files: dict[str, str], detector: str) -> None:
        """Every file a detector rebuilt for this checkpoint read (``files``: path → sha256)
        must be one it was made with, by content; another is refused in one line."""
        recorded = self.weight_files
        if recorded is None:  # an older checkpoint: nothing recorded to compare
            if files:
                log.warning("%s records no weight files (written before qdd recorded them): "
                            "whether %s's %s are the files it was made with cannot be checked",
                            self.path, detector, ", ".join(sorted(files)))  # fmt: skip
            return
        known, mine = set(recorded.values()), set(files.values())
        for path, sha in sorted(files.items()):
            if sha in known:
                continue
            theirs = [f"{p} (sha256 {h[:12]}…)" for p, h in sorted(recorded.items())
                      if h not in mine] or ["none"]  # fmt: skip
            raise QddError(
                f"{detector} was built from {path} (sha256 {sha[:12]}…), but {self.path} was "
                f"made with {', '.join(theirs)}: its weights and threshold belong to those "
                "files; pass them in --model.detector_args, or fit (for a training-free "
                "detector: calibrate) a new checkpoint with this file"
            )
        # A training-free detector reads every file it was calibrated with again (one of
        # AEROBLADE's autoencoders left out: another minimum); a trained one may not (its
        # official starting file: the fit's weights replace it).
        missing = [f"{p} (sha256 {h[:12]}…)" for p, h in sorted(recorded.items()) if h not in mine]
        if missing and self.calibration_only:
            raise QddError(
                f"{detector} was built without {', '.join(missing)}, which {self.path} was made "
                "with: its weights and threshold belong to all of its files; pass them in "
                "--model.detector_args (a moved copy is fine)"
            )

    @property
    def calibration_only(self) -> bool:
        """Written by a training-free detector's fit: its units were calibrated on, not
        trained on (`qdd.training_free`)."""
        return bool((self.split or {}).get("calibration_only"))

    @property
    def split(self) -> dict[str, Any] | None:
        """The data module's split settings and trained units (None: a checkpoint not
        written by this qdd's fit)."""
        return self.contents.get(DATA_KEY) or None

    # -- which value wins -------------------------------------------------------------------
    def resolve_model(self, model: Any, given: dict[str, Any], flag: str, command: str) -> None:
        """Set the parsed ``model`` config by the precedence of the module docstring.

        ``given``: the model values parsed without defaults (yours and the preset's);
        ``flag``: how the checkpoint was named (``--ckpt_path`` or ``--weights``).
        """
        saved = {k: v for k, v in self.hparams.items() if k in model}
        if "detector" not in saved:
            raise QddError(
                f"{flag} {self.path} is not a `qdd-cli fit` checkpoint (no saved detector): "
                "pass one written by `qdd-cli fit`, or an official weights file (not named "
                "*.ckpt) with --weights"
            )
        if given.get("detector") is not None and not _same_detector(given["detector"], saved):
            raise QddError(
                f"{flag} {self.path} holds a {saved['detector']} detector, not "
                f"{given['detector']}: pass --detector {saved['detector']}"
            )
        preset = preset_model(saved["detector"])
        model.detector = saved["detector"]
        model.detector_args = self._detector_args(saved, given, preset, flag)
        self._keep_classes(model, saved, given, flag)
        if flag != "--ckpt_path":
            return  # --weights: the run's own settings (a fine-tune's lr, its calibration)
        if given.get("weights"):
            raise QddError(f"both --weights {given['weights']} and --ckpt_path {self.path} name "
                           "weights: pass one of them")  # fmt: skip
        mine = {k: v for k, v in given.items() if k in preset and preset[k] == v}
        explicit = {k: v for k, v in given.items() if k not in mine}
        stored = (self.calibration or {}).get("rule")
        if stored and explicit.get("calibration") not in (None, stored):
            raise QddError(
                f"the threshold in {self.path} was calibrated by {stored}; "
                f"--model.calibration={explicit['calibration']} cannot be applied at {command} "
                "time (test data never tunes it): drop the flag, or re-fit with that rule"
            )
        for key, value in sorted(saved.items()):
            if key in ARCHITECTURE or key in CLASS_DEFINITION or key == "weights":
                continue
            if key in explicit and explicit[key] != value:
                log.info("--model.%s=%r given: used instead of the checkpoint's %r",
                         key, explicit[key], value)  # fmt: skip
            model[key] = explicit.get(key, value)
        model.weights, model.random_weights = self.path, False  # loaded and checked when built

    def _keep_classes(
        self, model: Any, saved: dict[str, Any], given: dict[str, Any], flag: str
    ) -> None:
        """An attribution checkpoint's classes, ``attribute`` and ``include_real`` (its head
        names those classes); a value of yours that differs is refused, naming both."""
        if not saved.get("classes"):
            return
        for key in CLASS_DEFINITION:
            if key not in saved:
                continue
            if key in given and given[key] != saved[key]:
                raise QddError(
                    f"{_spelling(key, given[key])} conflicts with {flag} {self.path}, fitted "
                    f"with {_spelling(key, saved[key])} (its classes: "
                    f"{', '.join(saved['classes'])}): drop the flag, or fit a new attribution "
                    "checkpoint with it"
                )
            model[key] = saved[key]

    def _detector_args(
        self, saved: dict[str, Any], given: dict[str, Any], preset: dict[str, Any], flag: str
    ) -> dict[str, Any]:
        """The checkpoint's ``detector_args``; yours only where it has none or where you name
        other paths for its files (moved copies: backbone weights, AEROBLADE's autoencoder
        folders; checked by sha256 in `check_weight_files`); a conflict is refused."""
        ours = dict(saved.get("detector_args") or {})
        from_preset = dict(preset.get("detector_args") or {})
        resolved = {**dict(given.get("detector_args") or {}), **ours}
        runtime = _runtime_args(saved["detector"])
        for key, value in dict(given.get("detector_args") or {}).items():
            if key in runtime:  # speed or memory only: the checkpoint's logits either way
                resolved[key] = value
                continue
            if key in from_preset and from_preset[key] == value:
                if key in ours and ours[key] != value:
                    log.info("detector_args.%s: the checkpoint's %r, not the preset's %r",
                             key, ours[key], value)  # fmt: skip
                continue
            if key not in ours:  # the checkpoint ran with the detector's default
                default = _default_arg(saved["detector"], key)
                if default is _UNKNOWN or default == value:
                    continue
                ours[key] = default  # e.g. AEROBLADE's float16: its logits were other ones
            elif ours[key] == value:
                continue
            moved = key.endswith("weights") and isinstance(value, str) and Path(value).is_file()
            if moved or (self.weight_files and _names_paths(value)):  # sha256-checked
                log.warning("detector_args.%s=%s instead of the checkpoint's %s: a moved copy "
                            "is assumed (checked by sha256 where the checkpoint recorded it)",
                            key, value, ours[key])  # fmt: skip
                resolved[key] = value
                continue
            made, make = ("calibrated", "calibrate") if self.calibration_only else (
                "trained", "train")  # fmt: skip
            raise QddError(
                f"--model.detector_args.{key}={value!r} conflicts with {flag} {self.path}, "
                f"whose {saved['detector']} was {made} with {key}={ours[key]!r}: drop the flag "
                f"(the checkpoint's value is used), or {make} a new checkpoint with it"
            )
        return resolved

    # -- the data it trained on -------------------------------------------------------------
    def trained_units(self) -> torch.Tensor | None:
        """The identities of the units the checkpoint trained on (None: not stored)."""
        split = self.split
        return None if split is None else split["train_units"]

    def check_resume(self, settings: dict[str, Any]) -> None:
        """A resumed fit (``fit --ckpt_path``) must split as the checkpoint did."""
        split = self.split or {}
        differ = [k for k in SETTINGS if k in split and split[k] != settings[k]]
        if differ:
            given = ", ".join(f"{k}={settings[k]}" for k in differ)
            saved = ", ".join(f"{k}={split[k]}" for k in differ)
            raise QddError(
                f"resuming a fit with {given}, but it was trained with {saved}: pass the "
                "checkpoint's split settings (they decide which images are trained on)"
            )

    def overlap(self, evaluated: Sequence[Indexed], stage: str, allow: bool) -> int | None:
        """How many ``evaluated`` images share a unit with the checkpoint's training data;
        refused in one line unless ``allow`` (None: the checkpoint stores nothing to check).

        ``stage``: ``fit`` (its validation split), ``validate`` or ``test``.
        """
        split = self.split
        if split is None:
            log.warning("%s stores no split settings (not written by this qdd's fit): whether "
                        "the data was trained on cannot be checked", self.path)  # fmt: skip
            return None
        if split.get("rule") != RULE:
            log.warning("%s was split by another rule: its training data cannot be checked",
                        self.path)  # fmt: skip
            return None
        trained = set(split["train_units"].tolist())
        checked = [s for s in evaluated if s.identity is not None]
        count = sum(s.identity in trained for s in checked)
        if not count:
            return 0
        what = f"{count} of the {len(checked)} {EVALUATED[stage]}"
        learned = "calibration" if self.calibration_only else "training"
        if allow:
            log.warning("%s are in the %s data of %s (allow_train_overlap)", what, learned,
                        self.path)  # fmt: skip
            return count
        fractions = (f"--data.val_fraction={split['val_fraction']} "
                     f"--data.test_fraction={split['test_fraction']}")  # fmt: skip
        # a calibration used every image but the test split: no validation split is left
        fix = FIXES["test"] if self.calibration_only else FIXES[stage]
        raise QddError(
            f"{what} share a prompt (real photos: the image) with the {learned} data of "
            f"{self.path}: {fix.format(fractions=fractions)}, or pass "
            "--data.allow_train_overlap=true to evaluate on them on purpose"
        )


_UNKNOWN = object()


def _default_arg(detector: str, key: str) -> Any:
    """The default of ``detector``'s constructor argument ``key`` (`_UNKNOWN`: none)."""
    import inspect

    from qdd.detectors import detector_class

    parameter = inspect.signature(detector_class(detector)).parameters.get(key)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return _UNKNOWN
    return parameter.default


def _runtime_args(detector: str) -> tuple[str, ...]:
    """``detector``'s arguments that never change its logits (its card's ``runtime_args``)."""
    from qdd.detectors import detector_class

    return detector_class(detector).card.runtime_args


def _names_paths(value: Any) -> bool:
    """Whether a ``detector_args`` value names existing files or folders (a path, or a list
    of them: AEROBLADE's autoencoder folders)."""
    paths = value if isinstance(value, list) else [value]
    return bool(paths) and all(isinstance(p, str) and Path(p).exists() for p in paths)


def _spelling(key: str, value: Any) -> str:
    """How a user writes ``key=value`` on the command line."""
    if key == "attribute":
        return f"--attribute {value}"
    shown = str(value).lower() if isinstance(value, bool) else value
    return f"--model.{key}={shown}"


EVALUATED = {
    "fit": "validation images of this fit (it starts from that checkpoint)",
    "validate": "validation images",
    "test": "images to evaluate",
}
FIXES = {
    "fit": "validate on the split the checkpoint held out, with its fractions ({fractions}), "
    "or on other folders (data.val)",
    "validate": "validate on its own validation split, with the fractions it was trained with "
    "({fractions}), or on other shards",
    "test": "evaluate its held-out split with the fractions it was trained with "
    "(--data.split=test {fractions}) or other shards",
}


def read_checkpoint(path: str | Path, flag: str = "checkpoint") -> FitCheckpoint:
    """The checkpoint at ``path`` (named ``flag``), read once while the file is unchanged."""
    file = Path(path)
    if not file.is_file():
        raise QddError(f"{flag} {file} does not exist: check the path")
    stat = file.stat()
    return _read(str(path), str(file.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _read(path: str, resolved: str, mtime_ns: int, size: int) -> FitCheckpoint:
    from qdd.detectors.weights import load_tensor_file

    contents = load_tensor_file(resolved)  # one line if it is not a tensors-only file
    if not isinstance(contents, dict):
        raise QddError(f"{path} is not a Lightning checkpoint of `qdd-cli fit`: check the path")
    return FitCheckpoint(path, contents)


def _same_detector(given: str, saved: dict[str, Any]) -> bool:
    """Whether ``given`` names the checkpoint's detector, in any spelling of its name."""
    from qdd.detectors.registry import registered_name

    ours = registered_name(str(saved["detector"])) or saved["detector"]
    return (registered_name(str(given)) or given) == ours


def preset_model(detector: str) -> dict[str, Any]:
    """The ``model`` section of the packaged preset of ``detector`` (empty: none)."""
    import yaml

    from qdd.detectors.registry import preset_file

    path = preset_file(detector)
    if path is None:
        return {}
    return dict((yaml.safe_load(path.read_text()) or {}).get("model") or {})


def apply_checkpoint(config: Any, given: Callable[[], dict[str, Any]], command: str) -> None:
    """The checkpoint step of a Trainer command, on its parsed config (before anything is
    built): ``--ckpt_path`` or ``--weights X.ckpt`` resolve the model's values, and the data
    module is told whose training data must not be evaluated (nor forgotten by a fine-tune).
    ``given``: the model values you gave (with the preset's), parsed only when needed."""
    ckpt_path, weights = config.get("ckpt_path"), config.model.get("weights")
    if ckpt_path:
        start = read_checkpoint(ckpt_path, "--ckpt_path")
        start.resolve_model(config.model, given(), "--ckpt_path", command)
    elif weights and str(weights).endswith(".ckpt"):
        start = read_checkpoint(weights, "--weights")
        start.resolve_model(config.model, given(), "--weights", command)
    source = ckpt_path or config.model.get("weights")
    if source and str(source).endswith(".ckpt") and not config.data.get("checkpoint"):
        config.data.checkpoint = str(source)
