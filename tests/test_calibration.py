"""Thresholds calibrated on validation only, and the fine-tune → test round trip.

The end-to-end tests run ``configs/experiments/npr_fp4_aug.yaml`` (with tiny NPR and the
tiny shards of ``mix_shards``): a detector fitted on real vs FP32 stands in for the
official weights, is fine-tuned with FP4 mixed in, and tested on held-out prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qdd.calibration import fit_threshold, parse_rule, stored_calibration
from qdd.cli import main
from qdd.errors import QddError

EXPERIMENT = Path(__file__).parents[1] / "configs" / "experiments" / "npr_fp4_aug.yaml"
FAST = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


# -- the rules ---------------------------------------------------------------------------
def test_balanced_acc_rule_finds_the_optimum() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(50), torch.ones(30)])
    logits = torch.randn(80, generator=generator) + 1.5 * labels + 2.0  # shifted: 0 is poor
    fitted = fit_threshold(logits, labels, "balanced_acc")
    grid = torch.linspace(-5, 8, 5001)
    real, fake = logits[labels == 0], logits[labels == 1]
    best = max(float((real <= t).float().mean() + (fake > t).float().mean()) / 2 for t in grid)
    assert fitted["val_balanced_acc"] == pytest.approx(best)
    at_zero = float((real <= 0).float().mean() + (fake > 0).float().mean()) / 2
    assert fitted["val_balanced_acc"] > at_zero and fitted["threshold"] > 0


def test_fpr_rule_holds_the_false_positive_rate() -> None:
    logits = torch.tensor([-3.0, -2.0, -1.0, 0.5, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 6.0])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    fitted = fit_threshold(logits, labels, "fpr@0.2")
    real = logits[labels == 0]
    assert int((real > fitted["threshold"]).sum()) <= 2  # 20 % of 10 real images
    lower = real[real < fitted["threshold"]].max()  # the next lower threshold breaks it
    assert int((real > lower).sum()) > 2
    assert fit_threshold(logits, labels, "fpr@0")["threshold"] == 5.0


def test_rules_are_checked() -> None:
    assert parse_rule("fpr@0.05") == ("fpr", 0.05)
    for rule in ("fpr", "fpr@1.5", "accuracy"):
        with pytest.raises(QddError, match="balanced_acc or fpr@P"):
            parse_rule(rule)
    with pytest.raises(QddError, match="needs both"):
        fit_threshold(torch.zeros(3), torch.zeros(3), "balanced_acc")


# -- fit, fine-tune, test ----------------------------------------------------------------
def experiment(shards: Path, train: list[tuple[str, float]], test: list[str]) -> list[str]:
    """The experiment YAML, pointed at the tiny shards, with tiny NPR and short epochs."""
    sources = [{"path": str(shards / p), "weight": w, "name": p} for p, w in train]
    return [
        "--config",
        str(EXPERIMENT),
        "--data.train",
        json.dumps(sources),
        "--data.test",
        json.dumps([str(shards / t) for t in test]),
        "--data.holdout_generators=[sd3]",
        "--data.val_fraction=0.25",
        "--data.num_workers=0",
        "--data.batch_size=16",
        "--data.samples_per_epoch=96",
        "--model.detector_args",
        json.dumps({"resize": 64, "crop": 56}),
        *FAST,
    ]


FINE_TUNE = [("real-skimage", 1.0), ("sd15-fp32", 1.0), ("sd15-fp4", 1.0)]


def last_checkpoint(run: Path) -> str:
    return json.loads((run / "metrics.json").read_text())["last_checkpoint"]


def calibration_in(ckpt: str) -> dict | None:
    """The calibrated threshold a checkpoint carries (None if none)."""
    return stored_calibration(torch.load(ckpt, map_location="cpu", weights_only=True))


def val_loss(run: Path) -> float:
    history = pd.read_csv(run / "metrics.csv")
    return float(history["val_loss"].dropna().iloc[-1])


def fine_tune(args: list[str], start: str, out: Path) -> None:
    """The FP4 fine-tune of ``start``: one recipe, whatever test set ``args`` names."""
    main(["fit", *args, "--model.weights", start, "--trainer.max_epochs=4", "--out", str(out)])


@pytest.fixture(scope="module")
def runs(mix_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A stand-in for the official weights, its validation, and its FP4 fine-tune."""
    root = tmp_path_factory.mktemp("runs")
    pretrain = [("real-skimage", 1.0), ("sd15-fp32", 1.0)]
    args = experiment(mix_shards, pretrain, ["sd15-*"])
    main(["fit", *args, "--random-weights", "--model.lr=0.001", "--out", str(root / "start")])
    start = last_checkpoint(root / "start")
    args = experiment(mix_shards, FINE_TUNE, ["sd15-*", "sd3-*", "real-*"])
    main(["validate", *args, "--model.weights", start, "--out", str(root / "before")])
    fine_tune(args, start, root / "tuned")
    return root


def test_fine_tune_lowers_validation_loss(runs: Path) -> None:
    before, after = val_loss(runs / "before"), val_loss(runs / "tuned")
    assert after < before, (before, after)
    summary = json.loads((runs / "tuned" / "metrics.json").read_text())
    assert summary["weights"].endswith("last.ckpt")  # started from the given weights
    shares = {s["name"]: s["share"] for s in summary["data"]["sources"]}
    assert shares == pytest.approx({"real-skimage": 0.5, "sd15-fp32": 0.25, "sd15-fp4": 0.25})
    assert summary["data"]["holdout_generators"] == ["sd3"]


def test_checkpoint_reloads_for_test_with_identical_logits(
    runs: Path, mix_shards: Path, tmp_path: Path
) -> None:
    ckpt = last_checkpoint(runs / "tuned")
    args = experiment(mix_shards, FINE_TUNE, ["sd15-*", "sd3-*", "real-*"])
    scores, metrics = [], []
    for i, flag in enumerate((["--ckpt_path", ckpt], ["--weights", ckpt])):
        main(["test", *args, *flag, "--out", str(tmp_path / f"t{i}")])
        scores.append(pd.read_parquet(tmp_path / f"t{i}" / "scores.parquet"))
        metrics.append(json.loads((tmp_path / f"t{i}" / "metrics.json").read_text()))
    np.testing.assert_array_equal(scores[0]["logit"], scores[1]["logit"])
    assert {"sd3/fp4@emulate", "sd15/fp4@emulate"} <= set(metrics[0]["groups"])
    threshold = calibration_in(ckpt)["threshold"]
    assert metrics[0]["calibrated_threshold"] == metrics[1]["calibrated_threshold"] == threshold
    assert metrics[0]["calibration"]["rule"] == "balanced_acc"
    # acc at logit 0 and at the calibrated threshold, from the same scores
    frame = scores[0]
    real = frame[frame["label"] == 0]
    for group, values in metrics[0]["groups"].items():
        rows = pd.concat([real, frame[(frame["group"] == group) & (frame["label"] == 1)]])
        for key, cut in (("acc", 0.0), ("acc_calibrated", threshold)):
            expected = ((rows["logit"] > cut).astype(int) == rows["label"]).mean()
            assert values[key] == pytest.approx(expected), (group, key)


def test_threshold_comes_from_validation_only(runs: Path, mix_shards: Path, tmp_path: Path) -> None:
    """Another test set, the same threshold; and it is the rule applied to val logits."""
    ckpt = last_checkpoint(runs / "tuned")
    start = json.loads((runs / "tuned" / "metrics.json").read_text())["weights"]
    args = experiment(mix_shards, FINE_TUNE, ["sd3-fp4"])  # a different test set
    fine_tune(args, start, tmp_path / "f")
    first = calibration_in(ckpt)
    assert calibration_in(last_checkpoint(tmp_path / "f")) == first

    from qdd.datamodules.reader import read_entry
    from qdd.datamodules.shard import ShardDataModule, Source
    from qdd.modules.detector import DetectorModule

    module = DetectorModule.load_from_checkpoint(ckpt).eval()
    data = ShardDataModule(
        train=[Source(str(mix_shards / p), w) for p, w in FINE_TUNE], val_fraction=0.25
    )
    data.setup("fit")
    transform = module.eval_transform()
    with torch.inference_mode():
        logits = torch.cat(
            [module(transform(read_entry(s.entry)[0])[None]) for s in data.split["val"]]
        )
    labels = torch.tensor([s.label for s in data.split["val"]])
    refit = fit_threshold(logits, labels, "balanced_acc")
    assert refit["n_real"] == first["n_real"] and refit["n_fake"] == first["n_fake"]
    assert refit["threshold"] == pytest.approx(first["threshold"], abs=1e-4)


def test_ckpt_path_keeps_the_users_model_flags(
    runs: Path, mix_shards: Path, tmp_path: Path, capsys
) -> None:
    ckpt = last_checkpoint(runs / "tuned")
    args = experiment(mix_shards, FINE_TUNE, ["sd15-fp4", "real-*"])
    main(
        ["test", *args, "--ckpt_path", ckpt, "--model.threshold=0.5", "--out", str(tmp_path / "t")]
    )
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["threshold"] == 0.5
    scores = pd.read_parquet(tmp_path / "t" / "scores.parquet")
    expected = ((scores["logit"] > 0.5).astype(int) == scores["label"]).mean()
    assert metrics["overall"]["acc"] == pytest.approx(expected)
    for flags, message in [
        (["--model.calibration=fpr@0.05"], "calibrated by balanced_acc"),
        (["--model.detector=corvi"], "holds a npr detector"),
        (["--weights", ckpt], "pass one of them"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["test", *args, "--ckpt_path", ckpt, *flags, "--out", str(tmp_path / "x")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_official_weights_carry_no_calibrated_threshold(
    runs: Path, mix_shards: Path, tmp_path: Path
) -> None:
    """A weight file that is not a fit checkpoint: calibrated_threshold null, acc_calibrated
    too; and ``--perturb`` works on an experiment's test split."""
    ckpt = last_checkpoint(runs / "tuned")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    official = tmp_path / "NPR.pth"
    detector = {
        k.removeprefix("detector."): v for k, v in state.items() if k.startswith("detector.")
    }
    torch.save(detector, official)  # the detector's weights alone (no calibration buffers)
    args = experiment(mix_shards, FINE_TUNE, ["sd15-fp4", "real-*"])
    main(
        [
            "test",
            *args,
            "--weights",
            str(official),
            "--perturb",
            "jpeg:75",
            "--out",
            str(tmp_path / "t"),
        ]
    )
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["calibrated_threshold"] is None
    assert all(g["acc_calibrated"] is None for g in metrics["groups"].values())
    # test-time perturbations apply to the experiment's test split as to --data folders
    assert metrics["perturbations"] == ["none", "jpeg:75"]
    assert metrics["by_perturbation"]["jpeg:75"]["n"] == metrics["n"]


# -- a fit starts uncalibrated (issue 16, bug 1) -----------------------------------------
def write_shards(folder: Path, prefix: str, label: int, count: int) -> None:
    """``count`` tiny images whose keys start with ``prefix`` (unique across folders)."""
    from qdd.datamodules.schema import make_meta
    from qdd.datamodules.writer import ShardWriter, write_manifest
    from tests.conftest import random_image

    with ShardWriter(folder, mode="new", max_count=10**6) as writer:
        for n in range(count):
            meta = make_meta(0, "x") if label == 0 else make_meta(1, "g", generator="g",
                                                                  precision="fp4")  # fmt: skip
            writer.write(f"{prefix}{n:03d}", random_image(n + 100 * label, (16, 16)), meta)
    write_manifest(folder)


def test_fit_without_validation_carries_no_threshold(tmp_path: Path) -> None:
    """Fine-tuning ``A.ckpt`` with validation off must not pass A's threshold on as the new
    weights' own: the new checkpoint has none and ``test`` reports acc_calibrated null."""
    from qdd.detectors.tiny import tiny_detector_args

    train, held_out = tmp_path / "train", tmp_path / "held-out"
    write_shards(train / "real-x", "t", 0, 16), write_shards(train / "g-fp4", "t", 1, 16)
    write_shards(held_out / "real-x", "h", 0, 6), write_shards(held_out / "g-fp4", "h", 1, 6)
    common = [
        *("--detector", "npr", "--model.detector_args", json.dumps(tiny_detector_args("npr"))),
        *("--data.batch_size=8", "--data.num_workers=0", "--trainer.logger=false", *FAST),
    ]
    fit = ["fit", *common, "--data", str(train / "*"), "--data.val_fraction=0.5"]
    main([*fit, "--random-weights", "--trainer.max_epochs=1", "--out", str(tmp_path / "a")])
    start = last_checkpoint(tmp_path / "a")
    assert calibration_in(start) is not None  # A validated: it carries its own threshold
    main([*fit, "--weights", start, "--trainer.limit_val_batches=0", "--trainer.max_epochs=1",
          "--out", str(tmp_path / "b")])  # fmt: skip
    tuned = last_checkpoint(tmp_path / "b")
    assert calibration_in(tuned) is None
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["calibrated_threshold"] is None
    test = ["test", *common, "--data", str(held_out / "*"), "--ckpt_path", tuned]
    main([*test, "--out", str(tmp_path / "t")])
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["calibrated_threshold"] is None and metrics["calibration"] is None
    assert metrics["overall"]["acc_calibrated"] is None
    assert all(g["acc_calibrated"] is None for g in metrics["groups"].values())
