"""`qdd-cli demo`: the whole study in miniature, as a newcomer runs it first."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from qdd.cli import VERBOSE_ENV, main
from qdd.demo import DETECTORS, GENERATORS
from qdd.quant import PRECISIONS
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
    for stem in [*(f"kde_{d}" for d in DETECTORS), *(f"paired_{d}" for d in DETECTORS),
                 "heatmap_fake_acc", "heatmap_auroc"]:  # fmt: skip
        with Image.open(out / "report" / f"{stem}.png") as image:
            image.verify()
        assert f"{stem}.png" in text
    for detector in DETECTORS:
        scores = pd.read_parquet(out / "runs" / f"test-{detector}" / "scores.parquet")
        fig = plot_kde(scores, detector)
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title() for ax in panels] == list(GENERATORS)
        labels = [line.get_label() for line in panels[0].lines if line.get_label()[0] != "_"]
        assert labels == [*PRECISIONS, "real"]
        assert len(plot_paired(scores, detector).axes[0].collections) == len(GENERATORS)
    groups = pd.read_csv(out / "report" / "tables" / "groups.csv")
    assert len(groups) == len(DETECTORS) * len(GENERATORS) * len(PRECISIONS)
    # trained on real vs FP32 fakes, every detector separates them on held-out prompts
    fp32 = groups[groups["precision"] == "fp32"].groupby("detector")["auroc"].mean()
    assert (fp32 > 0.6).all(), fp32

    with pytest.raises(SystemExit) as exit_info:  # an earlier demo is never clobbered silently
        main(["demo", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
