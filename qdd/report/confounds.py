"""What else differs between the real and the fake images: the source file format.

Real photographs are usually JPEGs (stored as PNG pixels, their artefacts kept); images from
`qdd-cli generate` never went through a lossy file. A detector can learn "JPEG = real", so
the report warns whenever the two classes differ in source format — and only then: runs
tested with ``--data.reencode`` (both classes re-encoded, or fakes matched to the reals'
JPEG qualities) removed that difference, which ``source_format`` still describes as stored.
"""

from __future__ import annotations

import pandas as pd

from qdd.report.runs import DetectorResults

#: Format of a generated fake without a recorded source_format: written straight to PNG.
GENERATED = "png"


def formats(scores: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Image count per source format, for the real and the fake class (unknown left out)."""
    fmt = scores["source_format"].astype(object).where(scores["source_format"].notna())
    generated = (scores["label"] == 1) & fmt.isna() & scores["precision"].notna()
    generated &= scores["precision"] != "unknown"
    fmt = fmt.where(~generated, GENERATED).str.lower().replace({"jpg": "jpeg"})
    out = {}
    for name, label in (("real", 0), ("fake", 1)):
        counts = fmt[scores["label"] == label].dropna().value_counts()
        out[name] = {str(k): int(v) for k, v in sorted(counts.items())}
    return out


def describe(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return ", ".join(f"{k} {v / total:.0%}" for k, v in counts.items())


def format_warnings(results: dict[str, DetectorResults]) -> list[str]:
    """One line per distinct real-vs-fake format mismatch, naming the detectors it affects."""
    found: dict[str, list[str]] = {}
    for name, entry in sorted(results.items()):
        if all(run.get("reencode") for run in entry.runs):
            continue  # every run re-encoded after decoding: the stored formats no longer apply
        counts = formats(entry.main)
        real, fake = counts["real"], counts["fake"]
        if not real or not fake or set(real) == set(fake):
            continue  # unknown on one side, or the same formats: nothing to warn about
        line = f"real images are {describe(real)} but fakes are {describe(fake)}"
        found.setdefault(line, []).append(name)
    return [
        f"format confound ({', '.join(names)}): {line} — a detector can separate them by "
        "file format alone; re-encode one class to match the other before trusting these numbers"
        for line, names in found.items()
    ]
