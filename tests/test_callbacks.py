"""The run outputs the detector module brings along, and its calibration component."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from qdd.calibration import LEGACY_KEY, Calibration, fit_threshold, stored_calibration
from qdd.cli import main
from qdd.detectors.tiny import tiny_detector_args
from tests.conftest import write_fake_shards


class RecordingWandbLogger(WandbLogger):
    """A WandbLogger by type, not by class name, that keeps the tables it is handed."""

    tables: ClassVar[list[dict[str, Any]]] = []

    def log_table(self, key: str, columns: list[str], data: list[list[Any]], **_: Any) -> None:
        self.tables.append({"key": key, "columns": columns, "data": data})


def validation_logits() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(20), torch.ones(12)])
    return torch.randn(32, generator=generator) + 2 * labels + 0.7, labels


def test_calibration_travels_in_the_state_dict(tmp_path: Path) -> None:
    logits, labels = validation_logits()
    fitted = Calibration("fpr@0.1")
    assert fitted.value is None and fitted.summary() is None
    threshold = fitted.fit(logits, labels)
    assert fitted.summary() == fit_threshold(logits, labels, "fpr@0.1")
    torch.save(fitted.state_dict(), tmp_path / "state.pt")
    restored = Calibration()  # another rule: the stored fit is what counts
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.value == threshold and restored.summary() == fitted.summary()
    restored.reset()
    assert restored.value is None and restored.summary() is None
    assert stored_calibration({"state_dict": {}}) is None


def test_checkpoints_of_older_qdd_keep_their_threshold() -> None:
    """Before `Calibration`, checkpoints held the threshold under ``qdd_calibration``."""
    from qdd.modules.detector import DetectorModule

    logits, labels = validation_logits()
    legacy = fit_threshold(logits, labels, "balanced_acc")
    module = DetectorModule("npr", random_weights=True, detector_args=tiny_detector_args("npr"))
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("calibration.")}
    checkpoint = {"state_dict": state, LEGACY_KEY: legacy}
    assert stored_calibration(checkpoint) == legacy
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict: the mapping filled the keys
    assert module.calibration.summary() == legacy


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real and a fake folder whose keys pair up (both classes in every split)."""
    root = tmp_path_factory.mktemp("callbacks")
    write_fake_shards(root / "real-x", [12], "x", None, label=0, size=(16, 16))
    write_fake_shards(root / "g-fp4", [12], "g", "fp4", size=(16, 16))
    return root


def run(command: str, shards: Path, out: Path, *flags: str) -> None:
    main(
        [
            *(command, "--detector", "npr", "--random-weights", "--data", str(shards / "*")),
            *("--model.detector_args", json.dumps(tiny_detector_args("npr"))),
            *("--data.batch_size=5", "--data.num_workers=0", "--out", str(out)),
            *("--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"),
            *flags,
        ]
    )


def test_validate_writes_its_summary(shards: Path, tmp_path: Path) -> None:
    run("validate", shards, tmp_path, "--data.val_fraction=0.5", "--trainer.logger=false")
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["detector"] == "npr" and summary["weights"] == "random"
    assert set(summary["metrics"]) >= {"val_loss", "val_acc", "val_auroc", "val_threshold"}
    assert summary["calibrated_threshold"] == summary["metrics"]["val_threshold"]
    assert summary["calibration"]["n_real"] == summary["calibration"]["n_fake"] > 0
    assert not (tmp_path / "scores.parquet").exists()


def test_test_writes_scores_summary_and_the_wandb_table(
    shards: Path, tmp_path: Path, capsys
) -> None:
    logger = {"class_path": f"{__name__}.RecordingWandbLogger", "init_args": {"offline": True}}
    RecordingWandbLogger.tables.clear()
    run("test", shards, tmp_path, "--trainer.logger", json.dumps(logger))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert metrics["n"] == metrics["expected"] == len(scores) == 24
    assert list(metrics["groups"]) == ["g/fp4"] and metrics["perturbations"] == ["none"]
    assert metrics["calibrated_threshold"] is None and "acc_calibrated" in metrics["overall"]
    [table] = RecordingWandbLogger.tables
    assert table["key"] == "test_groups" and table["columns"][:3] == ["group", "n_fake", "acc"]
    assert [row[:2] for row in table["data"]] == [["g/fp4", 12]]
    assert table["data"][0][2] == metrics["groups"]["g/fp4"]["acc"]
    assert "g/fp4" in capsys.readouterr().out  # the console table


def test_predict_writes_scores_only(shards: Path, tmp_path: Path) -> None:
    run("predict", shards, tmp_path, "--trainer.logger=false")
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert sorted(scores["group"].unique()) == ["g/fp4", "real/x"] and len(scores) == 24
    assert not (tmp_path / "metrics.json").exists()
