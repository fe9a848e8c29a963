"""Precision attribution: which class an image belongs to, and how well a classifier names it.

No Lightning here. A fake image's class is its precision (``fp4`` of ``sd3/fp4@emulate``:
the registry name, backend and VAE suffix dropped) or, with ``attribute="family"``, the
family of that precision as deployments group them (`family`). A real image's class is
``real`` when the fit includes reals as a class, else it has none and is left out. A fake
image that records no precision (``sd3/unknown``) has no class and is refused.

An image of the denoiser/decoder swap (``qdd-cli decode``: ``sd3/fp32-vaefp4``, fp32
latents decoded by an fp4 VAE) belongs to its *denoiser's* precision, ``fp32``: the classes
say which denoiser made an image, as deployments quantize the denoiser and keep the VAE.
Its group stays in scores.parquet and ``by_group`` of metrics.json, so a model trained on
plain fp32/fp4 images and tested on swap images shows which side carries the trace (a
``fp32-vaefp4`` image called ``fp4``: the decoder's).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from qdd.errors import QddError

ATTRIBUTES = ("precision", "family")
REAL_CLASS = "real"
#: The precision label of a fake image that records none (`qdd.identity.group_key`).
UNKNOWN = "unknown"
#: Families in the order tables and figures list them.
FAMILIES = ("32-bit", "16-bit", "8-bit", "4-bit weight-only", "4-bit W4A4", "GGUF")


def family(precision: str) -> str:
    """The deployment family of a registry precision, read from its registry entry."""
    from qdd.quant import registry

    entry = registry.REGISTRY.get(precision)
    if entry is None:
        if precision.startswith("gguf-"):
            return "GGUF"  # a user's own GGUF file, labelled by its quant type
        raise QddError(
            f"precision {precision!r} is not in qdd's registry, so its family is unknown: "
            "use --attribute precision"
        )
    if entry.kind == "unquantized":
        return "32-bit" if precision == "fp32" else "16-bit"
    if entry.kind == "gguf":
        return "GGUF"
    if entry.weight_format.startswith("e4m3"):
        return "8-bit"
    return "4-bit weight-only" if entry.kind == "weight-only" else "4-bit W4A4"


def class_of(group: str, attribute: str, include_real: bool) -> str | None:
    """The class of a sample in ``group`` (``generator/precision`` or ``real/source``);
    None: a real image when reals are not a class."""
    from qdd.identity import base_precision

    generator, _, label = group.partition("/")
    if generator == "real":
        return REAL_CLASS if include_real else None
    precision = base_precision(label)
    if precision == UNKNOWN:
        raise QddError(
            f"the fake images of {group} record no precision, so they have no attribution "
            "class: leave that folder out, or shard it with its precision"
        )
    return family(precision) if attribute == "family" else precision


def recorded_class(group: str, attribute: str, include_real: bool) -> str | None:
    """The class of a sample in ``group`` as a prediction records it: None also where
    `class_of` refuses one (a fake image that records no precision, a precision whose
    family is unknown). Prediction needs no labels, so such an image is still scored."""
    try:
        return class_of(group, attribute, include_real)
    except QddError:  # class_of's only errors: the image has no class of this attribute
        return None


def check_attribute(attribute: str) -> None:
    if attribute not in ATTRIBUTES:
        raise QddError(f"--attribute {attribute!r}: use precision or family")


def decide_classes(groups: Iterable[str], attribute: str, include_real: bool) -> list[str]:
    """The classes present in the training data's groups, in registry (family) order;
    one class has nothing to tell apart and is refused."""
    check_attribute(attribute)
    present = {c for g in groups if (c := class_of(g, attribute, include_real)) is not None}
    classes = sorted(present, key=sort_key)
    if len(classes) < 2:
        found = ", ".join(classes) or "none"
        raise QddError(
            f"attribution needs at least two classes in the training data; found {found} "
            f"(--attribute {attribute}): add shards of another precision"
            + ("" if include_real else " or include reals with --model.include_real=true")
        )
    return classes


def sort_key(name: str) -> tuple[int, int, str]:
    """Registry order for precisions, `FAMILIES` order for families, ``real`` first."""
    from qdd.quant import registry

    if name == REAL_CLASS:
        return (0, 0, name)
    if name in FAMILIES:
        return (1, FAMILIES.index(name), name)
    order = list(registry.REGISTRY)
    return (2, order.index(name) if name in order else len(order), name)


def check_known(groups: Iterable[str], classes: Sequence[str], attribute: str,
                include_real: bool, stage: str = "test") -> None:  # fmt: skip
    """The classes of the data a stage evaluates (``test``; ``validate``; ``fit``: its
    validation split) must be the model's: an unknown one is refused in one line."""
    unknown = Counter()
    for group in groups:
        name = class_of(group, attribute, include_real)
        if name is not None and name not in classes:
            unknown[name] += 1
    if not unknown:
        return
    names, known = ", ".join(sorted(unknown, key=sort_key)), ", ".join(classes)
    if stage == "fit":
        raise QddError(
            f"the validation data holds {names}, which the training split does not (its "
            f"classes: {known}): add {names} to the training data, or validate on its classes"
        )
    what, verb = ("validation", "validate") if stage == "validate" else ("test", "test")
    raise QddError(
        f"the {what} data holds {names}, which the attribution model does not know "
        f"(its classes: {known}): {verb} on those classes only"
    )


def attribution_metrics(truth: np.ndarray, predicted: np.ndarray,
                        classes: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """Accuracy, macro-F1, per-class recall with its Wilson interval, and the confusion
    matrix (rows: true class, columns: predicted) of class indices ``truth``/``predicted``."""
    from qdd.report.stats import wilson

    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    n = int(confusion.sum())
    per_class: dict[str, dict[str, Any]] = {}
    f1s = []
    for i, name in enumerate(classes):
        support, hits = int(confusion[i].sum()), int(confusion[i, i])
        called = int(confusion[:, i].sum())
        recall = hits / support if support else None
        precision = hits / called if called else None
        f1 = (2 * hits / (support + called)) if support + called else None
        if support or called:  # sklearn's labels: those of the truth or the predictions
            f1s.append(f1 or 0.0)
        low, high = wilson(hits, support)
        per_class[name] = {
            "n": support, "recall": recall, "recall_low": None if support == 0 else low,
            "recall_high": None if support == 0 else high, "precision": precision, "f1": f1,
        }  # fmt: skip
    return {
        "n": n,
        "accuracy": float(np.trace(confusion) / n) if n else None,
        # over the classes true or predicted (sklearn's default): a class absent from the
        # test data but predicted counts with F1 0; one neither true nor predicted does not
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
