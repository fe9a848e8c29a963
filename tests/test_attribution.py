"""Precision attribution (`qdd-cli fit|test --task attribution`): classes from the training
data, a widened head, probabilities per image, confusion counted once, bad inputs in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdd.attribution import attribution_metrics, class_of, decide_classes, family
from qdd.cli import main
from qdd.errors import QddError
from qdd.report.stats import wilson
from tests.test_cli_detect import FAST, write_set

N = 32  # images per precision


@pytest.fixture(scope="module")
def precision_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny generator at fp32 (smooth images) and fp4 (noisy ones: a strong trace),
    paired by key, plus real noise images (no class unless reals are one)."""
    shards = tmp_path_factory.mktemp("attribution") / "shards"
    write_set(shards / "tiny-fp32", N, 1, "tiny", "fp32", smooth=True)
    write_set(shards / "tiny-fp4", N, 1, "tiny", "fp4")
    write_set(shards / "real-noise", 8, 0, None, None, offset=1000)
    return shards


@pytest.fixture(scope="module")
def fitted(precision_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fit") / "run"
    main(["fit", "--task", "attribution", "--detector", "clipd", "--random-weights",
          "--data", str(precision_shards / "*"), "--out", str(out), "--data.batch_size=8",
          "--data.val_fraction=0.2", "--data.test_fraction=0.25", "--trainer.max_epochs=5",
          "--model.detector_args={backbone: qdd-tiny-vit, backbone_weights: null}",
          "--model.lr=0.01",
          "--trainer.logger=false", *FAST])  # fmt: skip
    return out


def test_fit_decides_classes_and_test_separates_16_from_4_bit(
    fitted: Path, precision_shards: Path, tmp_path: Path
) -> None:
    summary = json.loads((fitted / "metrics.json").read_text())
    assert summary["task"] == "attribution" and summary["classes"] == ["fp32", "fp4"]
    import torch

    saved = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["hyper_parameters"]["classes"] == ["fp32", "fp4"]
    assert saved["state_dict"]["detector.fc.weight"].shape[0] == 2  # the widened head
    out = tmp_path / "test"
    main(["test", "--data", str(precision_shards / "*"), "--data.split=test",  # held-out prompts
          "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt"), "--out", str(out),
          "--data.num_workers=2", "--data.batch_size=5", "--trainer.logger=false",
          *FAST])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    scores = pd.read_parquet(out / "scores.parquet")
    fakes = scores[scores["class"].notna()]
    assert metrics["n"] == len(fakes) > 0
    assert metrics["n_without_class"] == (scores["label"] == 0).sum()
    assert not scores.duplicated(["group", "key"]).any()  # each image once over two workers
    assert len(scores) == metrics["expected"]
    probs = scores[["prob_fp32", "prob_fp4"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    confusion = pd.read_csv(out / "confusion.csv", index_col=0)
    assert list(confusion.index) == list(confusion.columns) == ["fp32", "fp4"]
    assert confusion.to_numpy().sum() == metrics["n"]
    assert confusion.to_numpy().tolist() == metrics["confusion"]
    # above chance: a one-sided binomial test against 1/2 (Wilson lower bound above 0.5)
    hits = int(np.trace(confusion.to_numpy()))
    assert wilson(hits, metrics["n"])[0] > 0.5, metrics
    recall = metrics["per_class"]["fp4"]
    assert recall["recall_low"] <= recall["recall"] <= recall["recall_high"]
    report = tmp_path / "report"
    main(["report", str(out), "--out", str(report)])
    assert (report / f"attribution_{out.name}.png").is_file()
    table = pd.read_csv(report / "tables" / "attribution.csv")
    assert table["n"].sum() == metrics["n"] and list(table["class"]) == ["fp32", "fp4"]
    assert f"attribution_{out.name}" in (report / "report.md").read_text()


def test_unknown_class_at_test_is_refused(fitted: Path, tmp_path: Path, capsys) -> None:
    write_set(tmp_path / "tiny-nf4", 6, 1, "tiny", "nf4")
    with pytest.raises(SystemExit) as exited:
        main(["test", "--data", str(tmp_path / "tiny-nf4"), "--ckpt_path",
              str(fitted / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "t"),
              "--data.allow_train_overlap=true", *FAST])  # fmt: skip
    assert exited.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "nf4" in err[-1] and "does not know" in err[-1]


def test_task_must_match_the_checkpoint(fitted: Path, precision_shards: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["test", "--task", "detection", "--data", str(precision_shards / "tiny-fp4"),
              "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt"), *FAST])
    assert "pass --task attribution" in capsys.readouterr().err


def test_single_class_training_set_is_refused(precision_shards: Path, tmp_path: Path,
                                              capsys) -> None:  # fmt: skip
    with pytest.raises(SystemExit):
        main(["fit", "--task", "attribution", "--detector", "npr", "--random-weights",
              "--data", str(precision_shards / "tiny-fp4"),
              "--data", str(precision_shards / "real-noise"),
              "--out", str(tmp_path / "f"), "--trainer.max_epochs=1", "--trainer.logger=false",
              *FAST])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert "at least two classes" in err[-1] and "found fp4" in err[-1]
    assert not (tmp_path / "f" / "checkpoints").exists()


def test_classes_and_families() -> None:
    assert class_of("sd3/fp4@emulate", "precision", False) == "fp4"
    assert class_of("sd3/fp4-vaefp32", "precision", False) == "fp4"
    assert class_of("real/coco", "precision", False) is None
    assert class_of("real/coco", "family", True) == "real"
    assert [family(p) for p in ("fp32", "fp16", "fp8", "fp8-w8a8", "nf4", "svdq-int4",
                                "nvfp4-w4a4", "gguf-q4_k")] == [
        "32-bit", "16-bit", "8-bit", "8-bit", "4-bit weight-only", "4-bit W4A4",
        "4-bit W4A4", "GGUF"]  # fmt: skip
    groups = ["a/fp4", "a/nf4", "b/fp16", "real/x"]
    assert decide_classes(groups, "precision", True) == ["real", "fp16", "fp4", "nf4"]
    assert decide_classes(groups, "family", False) == ["16-bit", "4-bit weight-only"]
    with pytest.raises(QddError, match="at least two classes"):
        decide_classes(["a/fp4", "b/nf4"], "family", False)
    with pytest.raises(QddError, match="use precision or family"):
        decide_classes(groups, "bits", False)


def test_metrics_against_sklearn() -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    got = attribution_metrics(truth, predicted, ["a", "b", "c"])
    assert got["confusion"] == confusion_matrix(truth, predicted).tolist()
    assert got["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert got["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    recalls = recall_score(truth, predicted, average=None)
    assert [got["per_class"][c]["recall"] for c in "abc"] == pytest.approx(list(recalls))


def test_families_with_reals_as_a_class(precision_shards: Path, tmp_path: Path) -> None:
    """``--attribute family`` with reals as a class: three classes, and the test's
    confusion counts the reals too."""
    fit, test = tmp_path / "fit", tmp_path / "test"
    main(["fit", "--task", "attribution", "--attribute", "family", "--detector", "clipd",
          "--random-weights", "--model.include_real=true",
          "--model.detector_args={backbone: qdd-tiny-vit, backbone_weights: null}",
          "--data", str(precision_shards / "*"), "--out", str(fit), "--trainer.max_epochs=1",
          "--trainer.logger=false", *FAST])  # fmt: skip
    classes = json.loads((fit / "metrics.json").read_text())["classes"]
    assert classes == ["real", "32-bit", "4-bit weight-only"]
    main(["test", "--data", str(precision_shards / "*"), "--data.split=test", "--ckpt_path",
          str(fit / "checkpoints" / "last.ckpt"), "--out", str(test), "--trainer.logger=false",
          *FAST])  # fmt: skip
    metrics = json.loads((test / "metrics.json").read_text())
    scores = pd.read_parquet(test / "scores.parquet")
    assert metrics["n_without_class"] == 0 and metrics["n"] == len(scores)
    assert (scores["label"] == 0).sum() == metrics["per_class"]["real"]["n"] > 0
    assert pd.read_csv(test / "confusion.csv", index_col=0).to_numpy().sum() == len(scores)


def test_one_class_predictor_is_at_chance_in_the_report(tmp_path: Path) -> None:
    """Calling every image of an unbalanced test set (10 vs 40) one class scores accuracy
    0.8; the report's figure and table also give the balanced accuracy, 0.5 = chance."""
    from sklearn.metrics import balanced_accuracy_score

    from qdd.callbacks.attribution import write_confusion
    from qdd.report.attribution import attribution_section, balanced_accuracy

    classes = ["16-bit", "4-bit weight-only"]
    truth, predicted = np.repeat([0, 1], [10, 40]), np.ones(50, dtype=np.int64)
    run = tmp_path / "attribution-npr"
    run.mkdir()
    metrics = {"task": "attribution", "detector": "npr", "attribute": "family",
               "classes": classes, **attribution_metrics(truth, predicted, classes)}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    write_confusion(run / "confusion.csv", metrics["confusion"], classes)
    table = pd.read_csv(run / "confusion.csv", index_col=0)
    assert metrics["accuracy"] == 0.8
    assert balanced_accuracy(table) == (balanced_accuracy_score(truth, predicted), 2) == (0.5, 2)
    figures: dict[str, str] = {}
    tables: dict[str, tuple[Path, Path]] = {}
    attribution_section([run], tmp_path / "report", figures, tables)
    rows = pd.read_csv(tmp_path / "report" / "tables" / "attribution.csv")
    assert rows["balanced_accuracy"].tolist() == [0.5, 0.5]
    assert "attribution_attribution-npr" in figures
