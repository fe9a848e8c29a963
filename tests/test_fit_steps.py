"""`qdd-cli fit` stopped by ``--trainer.max_steps``: validated, and metrics.json says how far."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qdd.cli import main
from tests.test_cli_detect import FAST, write_set


def fit_npr(tmp_path: Path, n: int, *flags: str) -> Path:
    """``qdd-cli fit`` of NPR (random start) on n real noise images and n smooth FP32
    fakes; returns the run folder."""
    shards = tmp_path / "shards"
    write_set(shards / "real-noise", n, 0, None, None, offset=1000)
    write_set(shards / "tiny-fp32", n, 1, "tiny", "fp32", smooth=True)
    out = tmp_path / "fit"
    main(["fit", "--detector", "npr", "--random-weights", "--data", str(shards / "*"),
          "--out", str(out), *flags, *FAST])  # fmt: skip
    return out


def test_max_steps_fit_validates_and_reports_partial_epoch(tmp_path: Path, capsys) -> None:
    out = fit_npr(tmp_path, 20, "--data.batch_size=4", "--data.val_fraction=0.25",
                  "--trainer.max_steps=3", "--trainer.log_every_n_steps=1")  # fmt: skip
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    summary = json.loads((out / "metrics.json").read_text())
    per_epoch = summary["batches_per_epoch"]
    assert per_epoch > 3  # the run really stopped mid-epoch
    assert summary["steps"] == 3 and summary["stopped_by"] == "max_steps"
    assert summary["epochs"] == round(3 / per_epoch, 4)
    assert {"val_acc", "val_auroc"} <= set(summary["metrics"])  # validated at the last step
    history = pd.read_csv(out / "metrics.csv")
    assert history["val_acc"].notna().sum() == 1
    assert summary["last_checkpoint"] and Path(summary["last_checkpoint"]).is_file()


def test_full_epochs_are_counted_as_such(tmp_path: Path) -> None:
    out = fit_npr(tmp_path, 8, "--data.batch_size=8", "--data.val_fraction=0.25",
                  "--trainer.max_epochs=2")  # fmt: skip
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["epochs"] == 2 and summary["stopped_by"] == "max_epochs"
    assert summary["steps"] == 2 * summary["batches_per_epoch"]


def test_sanity_check_of_one_class_computes_no_metrics(tmp_path: Path) -> None:
    """Lightning's sanity check runs a few validation batches, here only real images: their
    AUROC would be meaningless (torchmetrics warned "No positive samples"), so none is
    computed; the validations of the fit itself still are."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fit_npr(tmp_path, 12, "--data.batch_size=2", "--data.val_fraction=0.5",
                      "--trainer.num_sanity_val_steps=1", "--trainer.max_epochs=1",
                      "--trainer.logger=false")  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "No positive samples" in m], messages
    summary = json.loads((out / "metrics.json").read_text())
    assert {"val_acc", "val_auroc"} <= set(summary["metrics"])
