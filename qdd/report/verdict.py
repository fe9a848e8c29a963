"""report.md's trade-off verdict: one line per generator that says only what was measured.

Per generator, among the lower precisions that keep the quality measure (SSIM ≥ 0.90
against the reference twin): which saves the most memory, and which evades the detectors
most. The rules, each a way the line could otherwise misread missing data:

- *Not measured is not failing.* A precision without quality values is named as not
  measured, never counted as below the bar; a generator without any is said to be so.
- *Bytes per generator.* Memory saved is the generator's own recorded denoiser bytes, or,
  where any of its groups lacks them, the nominal weight bits of its precisions, and the
  line says which groups lack bytes. Another generator's gap changes nothing here.
- *Ties are ties.* Values equal at the precision the line prints them (whole percent of
  memory, two decimals of accuracy) are named together, never one of them as the winner.
- *Evading is relative to the reference.* A precision evades when its mean fake accuracy
  is below the reference's (the generator's own fp32) on the same detectors: those that
  scored both. Precisions are ranked against each other only on one common detector set
  (the largest any of them shares with the reference); one scored by fewer detectors is
  named as not compared, so a precision scored by one detector of five cannot win on it.
"""

from __future__ import annotations

import pandas as pd

from qdd.report.palette import order_generators
from qdd.report.tradeoff import (
    KEEP_MEASURE,
    KEEP_SSIM,
    detectors_in,
    memory_saved,
    unrecorded_bytes,
)

#: How the line prints memory shares (87%) and fake accuracies (0.55): values that print
#: alike are ties.
SHARE, ACCURACY = ".0%", ".2f"
#: How the line prints the quality measure (SSIM 0.850).
QUALITY = ".3f"


def _names(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _best(values: pd.Series, spec: str, largest: bool) -> list:
    """The index labels whose value prints (format ``spec``) as the best one (NaN skipped)."""
    values = values.dropna().astype(float)
    if values.empty:
        return []
    shown = format(values.max() if largest else values.min(), spec)
    return [i for i, v in values.items() if format(v, spec) == shown]


def _coverage(row: pd.Series, reference: pd.Series, detectors: list[str]) -> tuple:
    """The detectors that scored both this precision and the reference (fake accuracy)."""
    return tuple(
        d
        for d in detectors
        if pd.notna(row[f"{d}_fake_acc"]) and pd.notna(reference[f"{d}_fake_acc"])
    )


def _saver(candidates: pd.DataFrame, what: str, quality: bool) -> tuple[str, str | None]:
    """The memory clause, and the precision it names alone as saving most (else None)."""
    winners = candidates.loc[_best(candidates["_saved"], SHARE, largest=True)]
    if winners.empty:
        return "", None
    share = f"{winners['_saved'].iloc[0]:{SHARE}} of the {what}"
    measure = KEEP_MEASURE.upper()
    if len(winners) == 1:
        row = winners.iloc[0]
        detail = f", {measure} {row[KEEP_MEASURE]:.3f}" if quality else ""
        return f"{row['precision']} saves the most ({share}{detail})", row["precision"]
    detail = (
        f"; {measure} "
        + ", ".join(
            f"{r.precision} {getattr(r, KEEP_MEASURE):.3f}" for r in winners.itertuples()
        )  # fmt: skip
        if quality
        else ""
    )
    names = _names(list(winners["precision"]))
    return f"{names} tie on memory saved ({share} each{detail})", None


def _evader(
    candidates: pd.DataFrame, reference: pd.Series | None, name: str, detectors: list[str]
) -> tuple[str, str | None]:
    """The evasion clause, and the precision it names alone as evading most (else None)."""
    if not detectors:
        return "", None
    if reference is None or not any(pd.notna(reference[f"{d}_fake_acc"]) for d in detectors):
        return f"evasion not measured (no detector scored {name})", None
    coverage = {i: _coverage(row, reference, detectors) for i, row in candidates.iterrows()}
    shared = [c for c in coverage.values() if c]
    if not shared:
        return f"evasion not measured (no detector scored these precisions and {name})", None
    # the largest detector set shared with the reference; the first such set by detector
    # order when two sets are as large
    common = max(shared, key=len)
    ranked = [i for i, c in coverage.items() if c == common]
    left = [
        f"{candidates.at[i, 'precision']} ({len(c)} of {len(detectors)})"
        for i, c in coverage.items()
        if c != common
    ]
    columns = [f"{d}_fake_acc" for d in common]
    accuracy = candidates.loc[ranked, columns].astype(float).mean(axis=1)
    base = float(reference[columns].astype(float).mean())
    if len(common) < len(detectors):
        on = f"on the {len(common)} of {len(detectors)} detectors that scored both"
    else:
        on = {1: "on the one detector", 2: "on both detectors"}.get(
            len(common), f"on all {len(common)} detectors"
        )
    lowest = _best(accuracy, ACCURACY, largest=False)
    low = float(accuracy[lowest[0]])
    precisions = _names([candidates.at[i, "precision"] for i in lowest])
    sole = None
    if low > base or format(low, ACCURACY) == format(base, ACCURACY):
        text = (
            f"none evades the detectors more than {name} itself (mean fake accuracy "
            f"{on}: {name} {base:.2f}, lowest {precisions} {low:.2f})"
        )
    elif len(lowest) == 1:
        row = candidates.loc[lowest[0]]
        per = ", ".join(f"{d} {row[f'{d}_fake_acc']:.2f}" for d in common)
        sole = precisions
        text = (
            f"{precisions} evades the detectors most (mean fake accuracy {low:.2f} against "
            f"{name}'s {base:.2f} {on}: {per})"
        )
    else:
        text = (
            f"{precisions} tie as the most evasive (mean fake accuracy {low:.2f} each "
            f"against {name}'s {base:.2f} {on})"
        )
    if left:
        others = ", ".join(left)
        text += f"; not compared, scored with {name} by fewer or other detectors: {others}"
    return text, sole


def _line(
    generator: str, rows: pd.DataFrame, reference: str, keep: float, detectors: list[str]
) -> str:
    own = rows[rows["precision"] == reference]
    ref = own.iloc[0] if len(own) else None
    lower = rows[rows["precision"] != reference]
    quality = lower[KEEP_MEASURE].astype(float)
    unmeasured = list(lower.loc[quality.isna(), "precision"])
    kept = lower[quality >= keep]
    measure = KEEP_MEASURE.upper()
    what = "denoiser memory" if rows["_measured"].all() else "nominal weight bits"
    parts = []
    if quality.isna().all():
        candidates = lower
        head = (
            f"quality not measured (no quality run paired its images with {reference} "
            f"twins); of all its lower precisions"
        )
    elif kept.empty:
        tops = _best(quality, QUALITY, largest=True)  # those that print alike: a tie
        names = _names(list(lower.loc[tops, "precision"]))
        which = "measured lower precision" if unmeasured else "lower precision"
        best = f"best: {names}" if len(tops) == 1 else f"best, tied: {names}"
        head = (
            f"no {which} keeps {measure} ≥ {keep:.2f} against {reference} "
            f"({best}, {measure} {quality[tops[0]]:{QUALITY}})"
        )
        candidates = None
    else:
        candidates = kept
        head = f"of the precisions that keep {measure} ≥ {keep:.2f} against {reference}"
    if candidates is not None:
        saver, sole_saver = _saver(candidates, what, quality=not quality.isna().all())
        evader, sole_evader = _evader(candidates, ref, reference, detectors)
        if saver and sole_saver is not None and sole_saver == sole_evader:
            head += f", {saver} and{evader[len(sole_evader) :]}"  # one precision does both
        else:
            head += f", {saver}" if saver else ""
            parts += [evader] if evader else []
        parts.insert(0, head)
    else:
        parts.append(head)
    if unmeasured and not quality.isna().all():
        parts.append(f"quality not measured for {_names(unmeasured)}")
    if not rows["_measured"].all():
        missing = unrecorded_bytes(rows, generator)
        parts.append(
            f"memory as nominal weight bits: denoiser bytes not recorded for {_names(missing)}"
        )
    return f"**{generator}**: " + "; ".join(parts)


def verdicts(table: pd.DataFrame, reference: str = "fp32", keep: float = KEEP_SSIM) -> list[str]:
    """Per generator with a lower precision, one line (see the module docstring)."""
    detectors = detectors_in(table)
    saved, measured = memory_saved(table, reference)
    frame = table.assign(_saved=saved, _measured=measured)
    lines = []
    for generator in order_generators(frame["generator"].unique()):
        rows = frame[frame["generator"] == generator]
        if (rows["precision"] != reference).any():
            lines.append(_line(generator, rows, reference, keep, detectors))
    return lines
