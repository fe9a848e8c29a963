"""A detector's name in any spelling the registry takes is one detector everywhere: its
preset, a checkpoint's detector, the refusal of an unknown name (before Lightning)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from qdd import api
from qdd.checkpoint import preset_model, read_checkpoint
from qdd.detectors.registry import detector_class, registered_name
from qdd.errors import QddError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("alias", ["NPRDetector", "npr_detector", "NPR"])
def test_an_alias_runs_the_presets_published_recipe(alias: str) -> None:
    """``--detector NPRDetector`` ran npr without its preset (no max_epochs 50, batch 32)."""
    assert api.lightning_config({"detector": alias}) == api.lightning_config({"detector": "npr"})


def test_an_alias_keeps_the_presets_detector_args() -> None:
    """``--detector clip-d`` built clipd from the class defaults, not the preset's backbone."""
    config = api.lightning_config({"detector": "clip-d"})
    assert config["model"]["detector"] == "clipd"
    assert config["model"]["detector_args"] == preset_model("clipd")["detector_args"]
    assert preset_model("AEROBLADE") == preset_model("aeroblade") != {}


def test_registered_name_reads_no_detector_module() -> None:
    code = (
        "import sys; from qdd.detectors.registry import registered_name as r; "
        "assert (r('NPRDetector'), r('clip-d'), r('dire')) == ('npr', 'clipd', None); "
        "assert not any(m.startswith('qdd.detectors.npr') for m in sys.modules); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize(
    ("typo", "hint"),
    [("nrp", "did you mean npr?"), ("univdf", "did you mean univfd?"),
     ("qdd.detectors.npr.NPR", "not a class path")],
)  # fmt: skip
def test_an_unknown_detector_is_one_line_with_the_closest_name(typo: str, hint: str) -> None:
    with pytest.raises(QddError) as error:
        detector_class(typo)
    message = str(error.value)
    assert "\n" not in message and hint in message and "choose from aeroblade," in message
    assert "did you mean" not in str(pytest.raises(QddError, detector_class, "dire").value)


def test_an_unknown_detector_is_refused_before_lightning_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom qdd import api\nfrom qdd.errors import QddError\n"
        "try:\n    api.lightning_config({'detector': 'nrp'})\n"
        "except QddError as e:\n    print(e)\n"
        "assert 'lightning' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "unknown detector 'nrp': did you mean npr?" in done.stdout


def test_a_checkpoint_takes_its_detector_in_any_spelling(tmp_path: Path) -> None:
    """A checkpoint saved as ``NPRDetector`` (``--model.detector``) is the npr one: neither
    ``--detector npr`` is refused nor its preset lost."""
    path = tmp_path / "c.ckpt"
    hparams = {"detector": "NPRDetector", "weights": None, "random_weights": True,
               "detector_args": {"resize": 64}, "lr": 0.01, "threshold": 0.0,
               "calibration": "balanced_acc"}  # fmt: skip
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, path)
    model = Namespace(**{**hparams, "detector": "npr", "detector_args": None, "lr": None})
    read_checkpoint(path).resolve_model(model, {"detector": "npr"}, "--ckpt_path", "test")
    assert model.detector_args == {"resize": 64} and model.lr == 0.01
    with pytest.raises(QddError, match="holds a NPRDetector detector, not clipd"):
        read_checkpoint(path).resolve_model(model, {"detector": "clipd"}, "--ckpt_path", "test")
    assert registered_name(model.detector) == "npr"


def test_detectors_command_reads_the_cards_without_importing_a_model() -> None:
    """``qdd-cli detectors`` imported every detector module (torch, timm, open_clip: ~3 s)."""
    code = (
        "import sys\nfrom qdd.cli import main\nmain(['detectors'])\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'detectors.' in m)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    names = [line.split("|")[1].strip() for line in done.stdout.splitlines()[2:]]
    assert names == ["commfor", "corvi", "npr", "clipd", "rine", "univfd", "bfree", "spai",
                     "aeroblade", "rigid"]  # fmt: skip


def test_a_users_registered_detector_is_listed_and_looked_up(monkeypatch) -> None:
    """A detector registered by a user's module, before or after qdd's are imported."""
    from qdd.detectors import registry
    from qdd.detectors.base import Detector
    from qdd.detectors.cards import CARDS
    from qdd.detectors.table import rows

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    card = dataclasses.replace(CARDS["spai"], files=("mine.pth",), licence="MIT")
    mine = registry.register("MyDet", card=card)(type("MyDet", (Detector,), {}))
    assert registry.registered_name("my_det") == "MyDet" and registry.card_of("mydet") is card
    assert detector_class("my-det") is mine and "MyDet" in registry.available()
    assert [row[0] for row in rows() if row[1] == "spectral"] == ["MyDet", "spai"]
    assert api.lightning_config({"detector": "mydet"})["model"]["detector"] == "MyDet"


def test_short_help_points_at_every_detector() -> None:
    from qdd.cli import short_help

    assert "`qdd-cli detectors` lists" in short_help("test")
    assert "univfd or corvi" not in short_help("fit")


@pytest.mark.parametrize("module", ["DetectorModule", "AttributionModule"])
def test_a_module_records_the_registered_name(module: str) -> None:
    """``--model.detector=NPRDetector`` wrote ``NPRDetector`` into metrics.json and the
    checkpoint: the report then showed it apart from the same detector's ``npr`` runs."""
    import importlib

    from qdd.detectors.tiny import tiny_detector_args

    home = {"DetectorModule": "detector", "AttributionModule": "attribution"}[module]
    cls = getattr(importlib.import_module(f"qdd.modules.{home}"), module)
    made = cls(detector="NPRDetector", random_weights=True, detector_args=tiny_detector_args("npr"))
    assert made.hparams.detector == "npr"
