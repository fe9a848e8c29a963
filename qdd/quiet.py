"""Library messages that do not apply to qdd's runs, silenced where they are emitted.

A newcomer's demo log was 711 lines, 229 of them library warnings that did not apply
(diffusers' "cannot run with `cpu` device … running them will fail" 42 times, while
nothing failed). Each entry below names the logger or warning that emits a message, a
pattern that matches only that message, and why it does not apply to qdd. Nothing else
is filtered: a message not on this list is shown, and ``--verbose`` installs none of
these filters, so every message is shown.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Silenced:
    """One message that does not apply: where it comes from, how to match it, and why."""

    source: str  #: a logger name, or ``warnings`` for Python warnings
    pattern: str  #: regular expression searched in the message
    why: str


SILENCED: tuple[Silenced, ...] = (
    # Lightning, about qdd's own LightningCLI runs
    Silenced(
        "warnings",
        r"args parameter is intended to run from within",
        "qdd-cli hands LightningCLI its arguments on purpose (after expanding --detector …)",
    ),
    Silenced(
        "warnings",
        r"You have overridden `on_after_batch_transfer`",
        "DetectorModule normalises the loader's uint8 batches on the device, on purpose",
    ),
    Silenced(
        "warnings",
        r"It is recommended to use `self.log\('test_",
        "test metrics are computed once, on rank 0, from every rank's gathered scores",
    ),
    Silenced(
        "warnings",
        r"Found \d+ module\(s\) in eval mode",
        "frozen CLIP towers stay in eval mode on purpose (no dropout, fixed norms)",
    ),
    Silenced(
        "warnings",
        r"is smaller than the logging interval",
        "tiny data sets (tests, the demo) log once per epoch anyway",
    ),
    Silenced(
        "warnings",
        r"The dirpath has changed from",
        "testing a fit checkpoint in a new run folder: its old checkpoint folder is unused",
    ),
    Silenced(
        "warnings",
        r"Experiment logs directory .* is not empty",
        "the run folder already holds config.yaml when the CSV logger starts; nothing is lost",
    ),
    # the libraries qdd generates with
    Silenced(
        "diffusers.pipelines.pipeline_utils",
        r"dtype=torch\.float16` cannot run with `cpu` device",
        "PyTorch runs float16 on CPU (slowly); qdd's fp16 level runs and is tested there",
    ),
    Silenced(
        "diffusers.models.modeling_utils",
        r"should be kept in float32: \[\]\.",
        "the list of modules to keep in float32 is empty: nothing is affected",
    ),
    Silenced(
        "diffusers.quantizers.torchao.torchao_quantizer",
        r"Unable to import `torchao` Tensor objects",
        "qdd quantizes at load time and never loads torchao-serialized checkpoints",
    ),
    Silenced(
        "bitsandbytes.backends.cpu.ops",
        r"^Failed to load CPU gemm_4bit_forward from kernels-community",
        "an optional CPU kernel for bitsandbytes' 4-bit matmul, fetched from a model hub at "
        "import (whatever the reason it fails: no `kernels` package, offline, untrusted); qdd's "
        "4-bit levels on CPU never use it (the emulation, or Linear4bit with its fused "
        "AVX512-BF16 path switched off)",
    ),
    Silenced(
        "root",
        r"No pretrained weights loaded for model '.*'\. Model initialized randomly",
        "open_clip, for a backbone built without weights; qdd.detectors.clip_backbone warns "
        "about the same backbone itself (and builds one only when asked for explicitly)",
    ),
    Silenced(
        "torch.utils._pytree",
        r"is an Enum subclass and is now natively supported by torch\.compile",
        "torchao registers its enums the old way at import; qdd does not use torch.compile",
    ),
    Silenced(
        "lightning.pytorch.utilities.rank_zero",
        r"^(GPU available: False, used: False|TPU available: False, using: 0 TPU cores)$",
        "says only that there is no GPU/TPU, once per Trainer; a GPU that is left unused "
        "is still reported",
    ),
    Silenced(
        "lightning.pytorch.utilities.rank_zero",
        r"Tip:",
        "advertises Lightning's other products (e.g. litlogger); no advice about the run",
    ),
    Silenced(
        "warnings",
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning's own code against a newer torch; nothing a user calls",
    ),
    Silenced(
        "warnings",
        r"`upcast_vae` is deprecated",
        "diffusers' SDXL pipeline calls its own deprecated method; nothing qdd calls",
    ),
    Silenced(
        "warnings",
        r"This DataLoader will create \d+ worker processes in total",
        "replaced by qdd.threads' warning, which names --data.num_workers",
    ),
)


class _Drop(logging.Filter):
    """Drops the records of one logger that match one of its silenced patterns."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def silence(quiet: bool = True) -> None:
    """Install the filters of `SILENCED` (again: nothing more); ``quiet=False`` removes them."""
    messages = {f".*{e.pattern}" for e in SILENCED if e.source == "warnings"}
    warnings.filters[:] = [
        f
        for f in warnings.filters
        if not (f[0] == "ignore" and getattr(f[1], "pattern", None) in messages)
    ]
    by_logger: dict[str, list[str]] = {}
    for entry in SILENCED:
        if entry.source != "warnings":
            by_logger.setdefault(entry.source, []).append(entry.pattern)
    for name in by_logger:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _Drop)]:
            logger.removeFilter(old)
    if not quiet:
        return
    for message in sorted(messages):
        warnings.filterwarnings("ignore", message=message)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_Drop(patterns))


def is_silenced(source: str, message: str) -> bool:
    """Whether `SILENCED` lists ``message`` from ``source`` (a logger name or ``warnings``)."""
    return any(e.source == source and re.search(e.pattern, message) for e in SILENCED)
