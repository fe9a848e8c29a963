"""`qdd-cli demo`: the whole study in miniature, as a newcomer runs it first."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from qdd.cli import VERBOSE_ENV, main
from qdd.demo import (  # DEPLOYED: some
    ATTRIBUTION,
    ATTRIBUTION_FIT,
    ATTRIBUTION_TESTS,
    DEPLOYED,
    DETECTORS,
    GENERATORS,
    PRECISIONS,
    SWAP,
    TEST_PROMPTS,
)
from qdd.identity import base_precision
from qdd.quiet import is_silenced
from qdd.report.kde import plot_kde
from qdd.report.paired import plot_paired


def test_demo_runs_the_study_and_ends_with_the_report(
    tmp_path: Path, capsys, monkeypatch, recwarn
) -> None:
    logged: list[tuple[str, str]] = []  # (logger, message) of every record handlers receive
    call_handlers = logging.Logger.callHandlers

    def keep(self: logging.Logger, record: logging.LogRecord) -> None:
        logged.append((record.name, record.getMessage()))
        call_handlers(self, record)

    monkeypatch.setattr(logging.Logger, "callHandlers", keep)
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    out = tmp_path / "demo"
    main(["demo", "--out", str(out)])
    # quiet by default: none of qdd.quiet's listed library messages reached the log ...
    shown = [m for name, m in logged if is_silenced(name, m)]
    shown += [str(w.message) for w in recwarn if is_silenced("warnings", str(w.message))]
    assert shown == [], shown[:5]
    # ... while what a user must see still did (and the collection above works)
    assert any("RANDOM head weights" in m for _, m in logged)
    index = out / "report" / "report.md"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(index)
    text = index.read_text()
    assert "## Gaps" not in text  # every generator x precision was measured
    assert "tiny random" in text  # the demo caveat
    groups = pd.read_csv(out / "report" / "tables" / "groups.csv")
    names = sorted(groups["detector"].unique())
    # one entry per detector; NPR twice: trained without and with FP4 fakes mixed in
    assert [n.split("-")[0] for n in names] == sorted([*DETECTORS, "npr"])
    assert len([n for n in names if n.startswith("npr-") and n.endswith("fp4mix")]) == 1
    stems = [*(f"kde_{n}" for n in names), *(f"paired_{n}" for n in names)]
    stems += [f"heatmap_{m}" for m in ("fake_acc", "balanced_acc", "auroc")]
    # the JPEG 95/75/50 sweep of the NPR trained without FP4: its robustness curve
    curves = sorted(p.stem for p in (out / "report").glob("robustness_*.png"))
    assert curves == [f"robustness_{n}" for n in names if n.startswith("npr-")][:1]
    stems += [*curves, *(c.replace("robustness_", "perturbed_fake_acc_") for c in curves)]
    stems += ["overview"]  # every detector against precision, family by family
    # the trade-off: costs and quality (the quality run) beside detectability, per detector
    tradeoff = pd.read_csv(out / "report" / "tables" / "tradeoff.csv")
    deployed = [(g, p) for g, formats in DEPLOYED.items() for p in formats]
    made = set(zip(tradeoff["generator"], tradeoff["precision"], strict=True))
    # the denoiser × decoder swap: SD3's fp32 and fp4 latents decoded by the other VAE
    swapped = {(g, p) for g, p in made if "-vae" in p}
    assert {(g, p.split("@")[0]) for g, p in swapped} == {
        (SWAP[0], f"{SWAP[1][0]}-vae{SWAP[1][1]}"), (SWAP[0], f"{SWAP[1][1]}-vae{SWAP[1][0]}")
    }
    # labels carry the backend where it is not the format's library (fp4@emulate on CPU)
    plain = {(g, base_precision(p)) for g, p in made - swapped}
    assert plain == {(g, p) for g in GENERATORS for p in PRECISIONS} | set(deployed)
    lower = tradeoff[tradeoff["precision"] != "fp32"]
    assert lower["psnr"].notna().all() and lower["ssim"].notna().all()
    fp32_bytes = tradeoff[tradeoff["precision"] == "fp32"].set_index("generator")
    svdq = tradeoff[tradeoff["precision"] == "svdq-int4"].set_index("generator")
    assert (svdq["denoiser_bytes"] < fp32_bytes.loc[svdq.index, "denoiser_bytes"]).all()
    stems += sorted(p.stem for p in (out / "report").glob("tradeoff_*.png"))
    stems += ["heatmap_swap", *(f"spectra_{g}" for g in GENERATORS)]
    stems += [f"radial_{g}" for g in GENERATORS]
    assert any(s.startswith("tradeoff_") for s in stems)
    for stem in stems:
        with Image.open(out / "report" / f"{stem}.png") as image:
            image.verify()
        assert f"{stem}.png" in text
    for detector in DETECTORS:
        scores = pd.read_parquet(out / "runs" / f"test-{detector}" / "scores.parquet")
        scores = scores[scores["perturbation"] == "none"]
        fig = plot_kde(scores, detector)
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title() for ax in panels] == list(GENERATORS)
        labels = [line.get_label() for line in panels[0].lines if line.get_label()[0] != "_"]
        # one ridge per precision, fp32 on top
        assert [base_precision(label) for label in labels] == [*PRECISIONS, "real"]
        *scatters, _ = plot_paired(scores, detector).axes
        # every lower precision against FP32; the deployed one for the transformers only
        lower = len(PRECISIONS) - 1 + len({p for _, p in deployed}) + len(swapped)
        assert len(scatters) == lower
        assert sorted(len(ax.collections) for ax in scatters) == sorted(
            [len(GENERATORS)] * (len(PRECISIONS) - 1) + [len(deployed)] + [1] * len(swapped)
        )
    groups = groups[groups["perturbation"] == "none"]
    per_detector = len(GENERATORS) * len(PRECISIONS) + len(deployed) + len(swapped)
    assert len(groups) == len(names) * per_detector
    # trained on real vs FP32 fakes, every detector separates them on held-out prompts
    fp32 = groups[groups["precision"] == "fp32"].groupby("detector")["auroc"].mean()
    assert (fp32 > 0.6).all(), fp32

    check_attribution(out, text)

    with pytest.raises(SystemExit) as exit_info:  # an earlier demo is never clobbered silently
        main(["demo", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


def check_attribution(out: Path, report: str) -> None:
    """The demo's precision attribution: every held-out image of the tested folders scored
    once, its confusion matrix summing to them. Its accuracy is not asserted: on the tiny
    random models it does not separate 16-bit from 4-bit (README, "Precision attribution")."""
    import json

    generator, _, _ = ATTRIBUTION
    run = out / "runs" / f"attribution-{ATTRIBUTION_FIT[0]}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "attribution" and metrics["attribute"] == "family"
    assert metrics["classes"] == ["16-bit", "4-bit weight-only"]
    scores = pd.read_parquet(run / "scores.parquet")
    images = TEST_PROMPTS * len(ATTRIBUTION_TESTS)
    assert len(scores) == metrics["n"] == metrics["expected"] == images
    assert not scores.duplicated(["group", "key"]).any()  # each image once
    assert {g.split("/")[0] for g in scores["group"]} == {generator}
    confusion = pd.read_csv(run / "confusion.csv", index_col=0).to_numpy()
    assert confusion.sum() == images and confusion.tolist() == metrics["confusion"]
    assert confusion.sum(1).tolist() == [TEST_PROMPTS, images - TEST_PROMPTS]  # true classes
    assert f"attribution_{run.name}.png" in report
    with Image.open(out / "report" / f"attribution_{run.name}.png") as image:
        image.verify()
