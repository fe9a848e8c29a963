"""Loading detector weights: official files unchanged, our checkpoints, and loud failures.

A detector must never evaluate with random weights by accident, so every way weights can
be wrong — a missing file, an unreadable one, a key or shape mismatch — is a `QddError`
naming the file, what did not match, and the fix.
"""

from __future__ import annotations

import hashlib
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qdd.detectors.base import Detector
from qdd.detectors.registry import build_detector, detector_class
from qdd.errors import QddError

log = logging.getLogger(__name__)

#: Keys official files wrap their state_dict in, in the order they are tried.
WRAPPERS = ("model", "state_dict", "net")


def unwrap_state(raw: Any) -> dict[str, Tensor]:
    """A flat state_dict from a raw one, one wrapped in model/state_dict/net, or DDP's."""
    state = raw
    while isinstance(state, dict) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict):
        raise ValueError(f"expected a state_dict, found {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def why_unreadable(error: Exception) -> str:
    """What is wrong with a file ``torch.load(weights_only=True)`` refused, in a few words.

    PyTorch's own message advises re-running with ``weights_only=False``, which executes
    whatever the pickle says: advice qdd never passes on for a file given on a command line.
    """
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a pickled Python object ({found.group(1)}), not only tensors"
    if isinstance(error, EOFError) or "Unsupported operand" in text or "invalid load key" in text:
        return "it is not a PyTorch tensor file (empty, truncated or another format)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"it is not a readable PyTorch tensor file ({error.__class__.__name__}: {first[:120]})"


def file_sha256(path: str | Path) -> str:
    """The sha256 of a weight file (cached per path, size and mtime: files are large)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise QddError(
            f"cannot read weights {path}: it is not a readable safetensors file ({first[:120]}); "
            "download it again (see checkpoints/README.md)"
        ) from None


def load_tensor_file(path: str | Path) -> Any:
    """``torch.load`` of tensors and plain containers only, on CPU; failures in one line.

    qdd never unpickles arbitrary objects: a weights file is data from the internet, and
    unpickling one can run any code it carries. State dicts, official detector files and
    Lightning checkpoints of ``qdd-cli fit`` hold only tensors, numbers and strings.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise QddError(
            f"weights file {path} does not exist: download it (see checkpoints/README.md) "
            "or pass --weights FILE"
        )
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise QddError(
            f"cannot read weights {path}: {why_unreadable(error)}; qdd loads only tensors "
            "(see README, 'Weights'): pass a file saved with torch.save(model.state_dict(), "
            "FILE), an official file from checkpoints/README.md, or a `qdd-cli fit` checkpoint"
        ) from None


def read_state(path: str | Path) -> dict[str, Tensor]:
    """The flat state_dict stored in ``path`` (tensors only, loaded safely on CPU)."""
    raw = load_tensor_file(path)
    try:
        return unwrap_state(raw)
    except ValueError as error:
        raise QddError(
            f"cannot read weights {path}: {error}; pass a PyTorch state_dict file"
        ) from None


def _names(keys: list[str], limit: int = 4) -> str:
    more = f" … (+{len(keys) - limit})" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def state_mismatch(expected: dict[str, Tensor], state: dict[str, Tensor]) -> str:
    """What keeps ``state`` from loading strictly where ``expected`` is ('' when it fits)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch {_names(wrong, 2)}")
    return "; ".join(problems)


def apply_state(detector: Detector, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into the detector's trainable part, strictly, or explain the mismatch."""
    state = type(detector).adapt_state(state)
    state = {k: v for k, v in state.items() if not k.startswith(detector.frozen_prefixes)}
    detector.match_state(state)
    problems = state_mismatch(detector.head_state_dict(), state)
    if problems:
        raise QddError(
            f"{source} does not fit detector {detector.name} ({problems}): "
            f"pass the {detector.name} weights listed in checkpoints/README.md, or check "
            "--model.detector_args"
        )
    detector.load_state_dict(state, strict=False)


def load_detector(
    name: str, weights: str | Path | None = None, random_weights: bool = False, **args: Any
) -> Detector:
    """Build detector ``name`` and load its weights: ``weights``, else the official file.

    Without either, it refuses — unless ``random_weights`` asks for an untrained head.
    """
    cls = detector_class(name)
    if not cls.card.trainable:
        return _training_free(cls.name, weights, **args)
    path = Path(weights).expanduser() if weights else cls.official_path()
    if weights is None and not path.is_file():
        if not random_weights:
            raise QddError(
                f"no weights for detector {cls.name}: {path} not found; download it "
                "(checkpoints/README.md), pass --weights FILE, or --random-weights for a smoke test"
            )
        detector = build_detector(name, **args)
        log.warning("detector %s runs with RANDOM head weights (--random-weights)", cls.name)
        return detector
    state = (cls.weights_reader or read_state)(path)
    detector = build_detector(name, **args)
    apply_state(detector, state, str(path))
    detector.weights_source = str(path)
    detector.weight_files[str(path)] = file_sha256(path)
    log.info("detector %s: weights from %s", cls.name, path)
    return detector


def _training_free(name: str, weights: str | Path | None, **args: Any) -> Detector:
    """A detector with no trained weights of its own: its files come through its arguments."""
    if weights:
        raise QddError(
            f"detector {name} is training-free: it takes no --weights ({weights}); give its "
            "files through --model.detector_args (see `qdd-cli detectors`)"
        )
    detector = build_detector(name, **args)
    detector.weights_source = "training-free" + (
        "" if detector.weight_files else ", random backbone"
    )
    return detector
