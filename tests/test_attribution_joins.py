"""Precision attribution's joins, broken as a user would: a checkpoint against flags that
change what its classes mean, ``--weights`` of an attribution checkpoint, classes the fit
never saw, fake images without a precision, swap groups, and its metrics against sklearn
and a hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdd.attribution import attribution_metrics, class_of, family
from qdd.cli import main
from qdd.errors import QddError
from tests.test_cli_detect import FAST, write_set

TINY = "--model.detector_args={backbone: qdd-tiny-vit, backbone_weights: null}"
QUIET = ["--trainer.logger=false", *FAST]
SPLIT = ["--data.val_fraction=0.2", "--data.test_fraction=0.25"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("joins") / "shards"
    write_set(root / "tiny-fp32", 16, 1, "tiny", "fp32", smooth=True)
    write_set(root / "tiny-fp4", 16, 1, "tiny", "fp4")
    write_set(root / "real-noise", 6, 0, None, None, offset=1000)
    return root


def fit(shards: Path, out: Path, *flags: str) -> str:
    main(["fit", "--detector", "clipd", "--random-weights", TINY, "--data", str(shards / "*"),
          "--out", str(out), "--trainer.max_epochs=1", *SPLIT, *flags, *QUIET])  # fmt: skip
    return str(out / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def checkpoints(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A precision attribution fit, a family one with reals as a class, a detection fit."""
    root = tmp_path_factory.mktemp("fits")
    by_family = ("--task", "attribution", "--attribute", "family", "--model.include_real=true")
    return {
        "precision": fit(shards, root / "precision", "--task", "attribution"),
        "family": fit(shards, root / "family", *by_family),
        "detection": fit(shards, root / "detection"),
    }


def last_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_flags_that_change_the_classes_are_refused_naming_both(
    shards: Path, checkpoints: dict[str, str], tmp_path: Path, capsys
) -> None:
    """Today's main refused these only as "test data holds 32-bit ... the model does not know",
    or (``--weights``) silently kept the run's own ``attribute``."""
    test = ["test", "--data", str(shards / "*"), "--data.split=test", *SPLIT, *QUIET]
    cases = [
        (["--attribute", "family", "--ckpt_path", checkpoints["precision"]],
         "--attribute family", "--attribute precision"),
        (["--model.include_real=true", "--ckpt_path", checkpoints["precision"]],
         "--model.include_real=true", "--model.include_real=false"),
        (["--model.include_real=false", "--ckpt_path", checkpoints["family"]],
         "--model.include_real=false", "--model.include_real=true"),
        (["--task", "attribution", "--attribute", "precision", "--weights", checkpoints["family"]],
         "--attribute precision", "--attribute family"),
    ]  # fmt: skip
    for i, (flags, mine, saved) in enumerate(cases):
        with pytest.raises(SystemExit) as exited:
            main([*test, *flags, "--out", str(tmp_path / f"t{i}")])
        assert exited.value.code != 0
        line = last_line(capsys)
        assert f"{mine} conflicts with" in line and f"fitted with {saved}" in line, line
        assert not (tmp_path / f"t{i}").exists()  # refused before anything ran


def test_weights_of_an_attribution_checkpoint_keep_its_task_and_classes(
    shards: Path, checkpoints: dict[str, str], tmp_path: Path, capsys
) -> None:
    """``--weights X.ckpt`` is read like ``--ckpt_path``: its task and what its classes mean
    (today's main tested it as a binary detector: a shape mismatch; with --task
    attribution it kept ``attribute=precision`` for a family head and refused the data)."""
    out = tmp_path / "weights"
    main(["test", "--data", str(shards / "*"), "--data.split=test", *SPLIT, "--weights",
          checkpoints["family"], "--out", str(out), *QUIET])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "attribution" and metrics["attribute"] == "family"
    assert metrics["include_real"] is True and metrics["n_without_class"] == 0
    assert metrics["classes"] == ["real", "32-bit", "4-bit weight-only"]
    from qdd import api  # the same through the API, the weights in the model section

    trainer = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False}
    data = {"paths": str(shards / "*"), "split": "test", "val_fraction": 0.2, "test_fraction": 0.25}
    tested = api.test(model={"weights": checkpoints["family"]}, data=data, trainer=trainer,
                      out=tmp_path / "api")  # fmt: skip
    assert tested.metrics["attribute"] == "family" and tested.metrics["n"] == metrics["n"]
    for task, ckpt, fitted in [("detection", "precision", "attribution"),
                               ("attribution", "detection", "detection")]:  # fmt: skip
        with pytest.raises(SystemExit):
            main(["test", "--task", task, "--data", str(shards / "*"), "--data.split=test",
                  *SPLIT, "--weights", checkpoints[ckpt], *QUIET])  # fmt: skip
        assert f"was fitted for {fitted}, not {task}" in last_line(capsys)
    with pytest.raises(SystemExit):  # a binary fit cannot start from a precision head
        fit(shards, tmp_path / "f", "--task", "detection", "--weights", checkpoints["precision"])
    assert "pass --task attribution" in last_line(capsys)


def test_fit_from_checkpoints_keeps_the_classes(
    shards: Path, checkpoints: dict[str, str], tmp_path: Path
) -> None:
    """A resumed fit and a fine-tune from an attribution checkpoint keep its classes; an
    attribution fit from a detection checkpoint gets a fresh head on its backbone."""
    import torch

    resumed = tmp_path / "resumed"
    main(["fit", "--data", str(shards / "*"), *SPLIT, "--ckpt_path", checkpoints["family"],
          "--trainer.max_epochs=2", "--out", str(resumed), *QUIET])  # fmt: skip
    tuned = fit(shards, tmp_path / "tuned", "--weights", checkpoints["precision"])
    fresh = fit(shards, tmp_path / "fresh", "--task", "attribution", "--weights",
                checkpoints["detection"])  # fmt: skip
    expected = {resumed / "checkpoints" / "last.ckpt": ["real", "32-bit", "4-bit weight-only"],
                Path(tuned): ["fp32", "fp4"], Path(fresh): ["fp32", "fp4"]}  # fmt: skip
    for path, classes in expected.items():
        saved = torch.load(path, weights_only=False)
        assert saved["hyper_parameters"]["classes"] == classes, path
        assert saved["state_dict"]["detector.fc.weight"].shape[0] == len(classes)
    assert json.loads((resumed / "metrics.json").read_text())["epochs"] == 2


def test_a_validation_class_the_training_split_lacks(shards: Path, tmp_path: Path,
                                                     capsys) -> None:  # fmt: skip
    """Today's main called the fit's validation data "the test data"."""
    write_set(tmp_path / "val" / "tiny-nf4", 16, 1, "tiny", "nf4", offset=500)
    with pytest.raises(SystemExit):
        fit(shards, tmp_path / "f", "--task", "attribution",
            f"--data.val=[{tmp_path / 'val' / 'tiny-nf4'}, {shards / 'tiny-fp4'}]")  # fmt: skip
    line = last_line(capsys)
    assert line.endswith("the validation data holds nf4, which the training split does not "
                         "(its classes: fp32, fp4): add nf4 to the training data, or validate "
                         "on its classes")  # fmt: skip


def test_fake_images_without_a_precision_are_refused(shards: Path, tmp_path: Path,
                                                     capsys) -> None:  # fmt: skip
    """Today's main made them a class named "unknown" (and a traceback-free but wrong family
    error with --attribute family)."""
    write_set(tmp_path / "tiny", 8, 1, "tiny", None, offset=700)
    with pytest.raises(SystemExit):
        main(["fit", "--task", "attribution", "--detector", "clipd", "--random-weights", TINY,
              "--data", str(shards / "tiny-fp32"), "--data", str(tmp_path / "tiny"),
              "--out", str(tmp_path / "f"), "--trainer.max_epochs=1", *QUIET])  # fmt: skip
    assert "the fake images of tiny/unknown record no precision" in last_line(capsys)
    assert not (tmp_path / "f" / "checkpoints").exists()


def test_a_swap_image_belongs_to_its_denoiser(shards: Path, checkpoints: dict[str, str],
                                              tmp_path: Path) -> None:  # fmt: skip
    """``decode`` groups (fp32 latents, fp4 VAE) are their denoiser's class; metrics.json's
    ``by_group`` says how each group, swap or plain, was called."""
    assert class_of("sd3/fp32-vaefp4", "precision", False) == "fp32"
    assert class_of("sd3/fp4-vaefp32@emulate", "family", False) == "4-bit weight-only"
    swap = tmp_path / "tiny-fp32-vaefp4"
    write_set(swap, 5, 1, "tiny", "fp32-vaefp4", offset=300)  # prompts no fit trained on
    out = tmp_path / "test"
    main(["test", "--data", str(swap), "--data", str(shards / "tiny-fp32"), "--data.split=test",
          *SPLIT, "--ckpt_path", checkpoints["precision"], "--out", str(out), *QUIET])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    groups = metrics["by_group"]
    assert sorted(groups) == ["tiny/fp32", "tiny/fp32-vaefp4"]
    assert groups["tiny/fp32-vaefp4"]["class"] == groups["tiny/fp32"]["class"] == "fp32"
    assert groups["tiny/fp32-vaefp4"]["n"] == sum(groups["tiny/fp32-vaefp4"]["predicted"].values())
    assert sum(g["n"] for g in groups.values()) == metrics["n"] == metrics["per_class"]["fp32"]["n"]
    scores = pd.read_parquet(out / "scores.parquet")
    called = scores[scores["group"] == "tiny/fp32-vaefp4"]["predicted"].value_counts().to_dict()
    assert {k: v for k, v in groups["tiny/fp32-vaefp4"]["predicted"].items() if v} == called


def test_macro_f1_counts_a_predicted_class_absent_from_the_test_data() -> None:
    """sklearn's macro-F1 averages over the labels true *or predicted*: a class absent from
    the test data but predicted counts with F1 0 (today's main left it out: 0.65)."""
    from sklearn.metrics import f1_score

    truth, predicted = np.array([0, 0, 1, 1, 1]), np.array([0, 2, 1, 1, 0])
    got = attribution_metrics(truth, predicted, ["a", "b", "c"])
    assert got["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert got["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    c = got["per_class"]["c"]
    assert c["n"] == 0 and c["recall"] is None and c["recall_low"] is None and c["f1"] == 0.0
    # a class neither true nor predicted is left out, as sklearn does
    got = attribution_metrics(truth, np.array([0, 0, 1, 1, 0]), ["a", "b", "c"])
    assert got["macro_f1"] == pytest.approx(
        f1_score(truth, np.array([0, 0, 1, 1, 0]), average="macro")
    )


def test_recall_interval_is_wilsons_by_hand() -> None:
    """Recall 2/3 of class b: Wilson's interval written out, z = 1.959964 (95 %)."""
    got = attribution_metrics(np.array([0, 0, 1, 1, 1]), np.array([0, 2, 1, 1, 0]), "abc")
    b = got["per_class"]["b"]
    n, p, z = 3, 2 / 3, 1.959964
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert b["recall"] == pytest.approx(2 / 3)
    assert (b["recall_low"], b["recall_high"]) == pytest.approx((centre - half, centre + half),
                                                                abs=1e-6)  # fmt: skip
    assert (b["recall_low"], b["recall_high"]) == pytest.approx((0.2077, 0.9385), abs=1e-4)


def test_class_of_refuses_an_unknown_precision() -> None:
    with pytest.raises(QddError, match="record no precision"):
        class_of("sd3/unknown", "precision", False)


def test_every_registry_precision_has_its_family() -> None:
    """Each precision of the registry, by hand: a new one must be given its family here."""
    from qdd.quant.registry import REGISTRY

    w4a4 = ("svdq-int4", "svdq-int4-datafree", "svdq-nvfp4", "svdq-nvfp4-datafree", "nvfp4-w4a4")
    expected = {
        "fp32": "32-bit", "fp16": "16-bit",
        "fp8": "8-bit", "fp8-w8a8": "8-bit", "fp8-w8a8-row": "8-bit",
        **{f"gguf-{q}": "GGUF" for q in ("q8_0", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0")},
        **dict.fromkeys(("fp4", "nf4", "nvfp4", "mxfp4"), "4-bit weight-only"),
        **dict.fromkeys(w4a4, "4-bit W4A4"),
    }  # fmt: skip
    assert {name: family(name) for name in REGISTRY} == expected
    for name in REGISTRY:  # a backend and a VAE suffix never change the class
        for label in (name, f"{name}@emulate", f"{name}-vaefp4", f"{name}-vaebf16@torchao"):
            assert class_of(f"sd3/{label}", "precision", False) == name
            assert class_of(f"sd3/{label}", "family", False) == expected[name]
    assert family("gguf-q3_k") == "GGUF"  # a user's own GGUF file, by its quant type


def test_weighted_sources_need_no_reals(shards: Path, tmp_path: Path) -> None:
    """``data.train`` sources of an attribution fit are drawn by their weights: real vs fake
    class balance is detection's (today's main refused a fit without reals, and with reals
    spent half the draws on images of no class)."""
    sources = [{"path": str(shards / name), "weight": weight}
               for name, weight in (("tiny-fp32", 1.0), ("tiny-fp4", 3.0))]  # fmt: skip
    out = tmp_path / "fit"
    main(["fit", "--task", "attribution", "--detector", "clipd", "--random-weights", TINY,
          "--data.train", json.dumps(sources), "--data.samples_per_epoch=16",
          "--trainer.max_epochs=1", "--out", str(out), *QUIET])  # fmt: skip
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["classes"] == ["fp32", "fp4"] and summary["data"]["class_balance"] is False
    shares = {s["name"]: s["share"] for s in summary["data"]["sources"]}
    assert shares == pytest.approx({"tiny-fp32": 0.25, "tiny-fp4": 0.75})


def test_validate_writes_metrics_json(shards: Path, checkpoints: dict[str, str],
                                      tmp_path: Path) -> None:  # fmt: skip
    """Every run writes metrics.json (today's main wrote none for validate --task attribution)."""
    out = tmp_path / "validate"
    main(["validate", "--data", str(shards / "*"), *SPLIT, "--ckpt_path", checkpoints["family"],
          "--out", str(out), *QUIET])  # fmt: skip
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["task"] == "attribution" and summary["attribute"] == "family"
    assert summary["classes"] == ["real", "32-bit", "4-bit weight-only"]
    assert 0.0 <= summary["metrics"]["val_acc"] <= 1.0 and summary["train_overlap"] == 0


def test_validate_refuses_a_class_the_model_does_not_know(
    shards: Path, checkpoints: dict[str, str], tmp_path: Path, capsys
) -> None:
    """Today's main ended in a KeyError traceback ('nf4') in the validation step."""
    write_set(tmp_path / "tiny-nf4", 16, 1, "tiny", "nf4", offset=500)
    with pytest.raises(SystemExit):
        main(["validate", "--data", str(tmp_path / "tiny-nf4"), "--data", str(shards / "tiny-fp4"),
              *SPLIT, "--data.allow_train_overlap=true", "--ckpt_path", checkpoints["precision"],
              "--out", str(tmp_path / "v"), *QUIET])  # fmt: skip
    assert last_line(capsys).endswith(
        "the validation data holds nf4, which the attribution model does not know (its "
        "classes: fp32, fp4): validate on those classes only"
    )


def test_predict_scores_images_of_any_class_over_the_models_classes(
    checkpoints: dict[str, str], tmp_path: Path
) -> None:
    """Prediction needs no labels: real photos of a model without a real class, a precision
    the fit never saw, a fake image that records no precision and a precision outside the
    registry (no family) each get the model's probabilities; their own class is kept as
    recorded (None where it has none), never taken for one of the model's. Today's main
    ended the whole prediction in "record no precision" after scoring every image."""
    other = tmp_path / "other"
    write_set(other / "real-noise", 3, 0, None, None, offset=2000)
    write_set(other / "tiny-nf4", 3, 1, "tiny", "nf4", offset=500)
    write_set(other / "tiny", 3, 1, "tiny", None, offset=700)
    write_set(other / "tiny-myq", 3, 1, "tiny", "myq", offset=800)
    expected = {
        "precision": {"real/noise": None, "tiny/nf4": "nf4", "tiny/unknown": None,
                      "tiny/myq": "myq"},
        "family": {"real/noise": "real", "tiny/nf4": "4-bit weight-only",
                   "tiny/unknown": None, "tiny/myq": None},
    }  # fmt: skip
    for name, classes in expected.items():
        out = tmp_path / f"predict-{name}"
        main(["predict", "--data", str(other / "*"), "--ckpt_path", checkpoints[name],
              "--out", str(out), *QUIET])  # fmt: skip
        scores = pd.read_parquet(out / "scores.parquet")
        assert len(scores) == 12 and not scores.duplicated(["group", "key"]).any()
        model = torch_classes(checkpoints[name])
        assert [c for c in scores.columns if c.startswith("prob_")] == [f"prob_{c}" for c in model]
        probs = scores[[f"prob_{c}" for c in model]].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
        assert list(scores["predicted"]) == [model[i] for i in probs.argmax(1)]
        got = {g: {c if isinstance(c, str) else None for c in part}  # parquet's None: NaN
               for g, part in scores.groupby("group")["class"]}  # fmt: skip
        assert got == {group: {c} for group, c in classes.items()}, name


def torch_classes(ckpt: str) -> list[str]:
    import torch

    return list(torch.load(ckpt, weights_only=False)["hyper_parameters"]["classes"])


def test_a_prediction_given_to_report_names_the_run_to_make(
    checkpoints: dict[str, str], tmp_path: Path, capsys
) -> None:
    """Today's main told an attribution prediction to "make it with qdd-cli test --detector
    D", a detection command; the line now names the attribution test, and a detection
    prediction is named as a prediction."""
    other = tmp_path / "other" / "tiny-fp4"
    write_set(other, 3, 1, "tiny", "fp4", offset=500)  # prompts the fits never saw
    for name, expected in (("precision", "holds an attribution prediction"),
                           ("detection", "a qdd-cli predict run")):  # fmt: skip
        run = tmp_path / f"predict-{name}"
        main(["predict", "--data", str(other), "--ckpt_path", checkpoints[name],
              "--out", str(run), *QUIET])  # fmt: skip
        assert (run / "scores.parquet").is_file() and not (run / "metrics.json").exists()
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(["report", str(run), "--out", str(tmp_path / f"report-{name}")])
        assert exited.value.code == 2
        line = last_line(capsys)
        assert expected in line, line
        if name == "precision":
            assert "`qdd-cli test --task attribution --ckpt_path CKPT" in line
            assert "--detector D" not in line
        else:
            assert "`qdd-cli test --detector D --data SHARDS" in line
        assert not (tmp_path / f"report-{name}").exists()


def test_predict_with_workers_scores_each_image_once_as_in_process(
    checkpoints: dict[str, str], tmp_path: Path
) -> None:
    """Two DataLoader workers over three shard folders of odd sizes, batches of two, with
    images of no class and of a class the model lacks: the same rows, once each, as one
    process reading them in order."""
    other = tmp_path / "other"
    write_set(other / "real-noise", 3, 0, None, None, offset=2000)
    write_set(other / "tiny-nf4", 5, 1, "tiny", "nf4", offset=500)
    write_set(other / "tiny", 1, 1, "tiny", None, offset=700)
    frames = []
    for workers in (0, 2):
        out = tmp_path / f"predict-{workers}"
        main(["predict", "--data", str(other / "*"), "--ckpt_path", checkpoints["precision"],
              "--out", str(out), f"--data.num_workers={workers}", "--data.batch_size=2",
              *QUIET])  # fmt: skip
        frames.append(pd.read_parquet(out / "scores.parquet"))
    single, pooled = frames
    assert len(pooled) == 9 and not pooled.duplicated(["group", "key"]).any()
    probs = [c for c in single.columns if c.startswith("prob_")]
    pd.testing.assert_frame_equal(pooled[["group", "key", "class", "predicted"]],
                                  single[["group", "key", "class", "predicted"]])  # fmt: skip
    np.testing.assert_allclose(pooled[probs].to_numpy(), single[probs].to_numpy(), atol=1e-6)


def test_report_compare_names_a_run_it_cannot_rank(
    shards: Path, checkpoints: dict[str, str], tmp_path: Path, capsys
) -> None:
    """An attribution test run and a quality run given to --compare: today's main said
    "lacks column(s) logit: re-run qdd-cli test" and "make it with qdd-cli test --out
    <the quality run>"; the line now names the kind of run and the full report."""
    from tests.report.test_tradeoff import write_quality_run

    tested = tmp_path / "attribution-test"
    main(["test", "--data", str(shards / "*"), "--data.split=test", *SPLIT, "--ckpt_path",
          checkpoints["precision"], "--out", str(tested), *QUIET])  # fmt: skip
    quality = write_quality_run(tmp_path / "quality")
    for run, kind in ((tested, "an attribution test"), (quality, "a quality")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(["report", str(run), "--compare", "--out", str(tmp_path / "compare")])
        assert exited.value.code == 2
        assert last_line(capsys).endswith(
            f"{run} is {kind} run, which --compare does not rank (it ranks detection runs of "
            "qdd-cli test): leave it out of --compare, or draw it in the full report, "
            "without --compare"
        )
        assert not (tmp_path / "compare").exists()
    main(["report", str(tested), str(quality), "--out", str(tmp_path / "full")])
    assert (tmp_path / "full" / "report.md").is_file()
