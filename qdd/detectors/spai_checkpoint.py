"""Reading SPAI's released ``spai.pth`` without running code from it.

The file is a training checkpoint: ``model``, ``optimizer``, ``lr_scheduler``, ``epoch``
(and ``amp``) hold tensors and numbers, but ``config`` holds a pickled yacs ``CfgNode``,
which ``torch.load(weights_only=True)`` refuses and plain pickle would instantiate (any
global a pickle names is code it may call). This unpickler resolves only an allow-list of
globals — tensor rebuilding, ordered dicts, sets — and turns ``yacs.config.CfgNode`` into
`ConfigNode`, a plain dict: yacs need not be installed and none of its code runs.
"""

from __future__ import annotations

import pickle
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qdd.detectors.weights import unwrap_state, why_unreadable
from qdd.errors import QddError


class ConfigNode(dict):
    """A yacs ``CfgNode`` read back as data: its items and attributes, nothing callable."""


#: Every global a released SPAI checkpoint may name, and what it resolves to.
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("yacs.config", "CfgNode"): ConfigNode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` answers from `ALLOWED` only (torch resolves storages itself)."""

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol 2's spelling
        found = ALLOWED.get((module, name))
        dtype = getattr(torch, name, None) if module == "torch" else None
        if found is None and isinstance(dtype, torch.dtype):
            found = dtype
        if found is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return found


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


#: The ``pickle_module`` torch.load takes: pickle with `_RestrictedUnpickler`, also for the
#: legacy (non-zip) format's headers, which torch reads with ``pickle_module.load``.
restricted_pickle = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler, load=_restricted_load, __name__="qdd_restricted_pickle"
)


def read_spai_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The ``model`` state dict of a SPAI training checkpoint (or of a plain state dict)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QddError(
            f"weights file {path} does not exist: download spai.pth (see "
            "checkpoints/README.md) or pass --weights FILE"
        )
    try:
        raw = torch.load(path, map_location="cpu", pickle_module=restricted_pickle,
                         weights_only=False)  # fmt: skip
    except Exception as error:  # noqa: BLE001 - any failure is the file's, said in one line
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        why = text if text.startswith("refused global") else why_unreadable(error)
        raise QddError(
            f"cannot read SPAI weights {path}: {why[:160]}; qdd reads only tensors, numbers "
            "and yacs configs from it: pass the released spai.pth (checkpoints/README.md) or "
            "a state_dict saved with torch.save"
        ) from None
    try:
        return unwrap_state(raw)
    except ValueError as error:
        raise QddError(f"cannot read SPAI weights {path}: {error}; pass spai.pth") from None
