"""The report reads a detector's family from the cards, without importing model code."""

from __future__ import annotations

import subprocess
import sys

from qdd.detectors.card import FAMILIES
from qdd.detectors.cards import CARDS


def test_every_family_is_some_detectors_and_the_training_free_ones_say_their_cue() -> None:
    assert sorted({card.family for card in CARDS.values()}) == sorted(FAMILIES)
    assert CARDS["aeroblade"].family == "reconstruction" and not CARDS["aeroblade"].trainable
    assert CARDS["rigid"].family == "representation" and not CARDS["rigid"].trainable


def test_reading_families_imports_no_detector_module() -> None:
    """It took ~2 s: every detector module (torchvision, timm, open_clip, diffusers)."""
    code = (
        "import sys\n"
        "from qdd.report.families import lineup\n"
        "lined_up = lineup({'npr-retrained': 'npr', 'aeroblade': 'aeroblade', 'x': 'mine'})\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('qdd.detectors.', 'torchvision',"
        " 'timm', 'open_clip', 'diffusers')))\n"
        "print(lined_up, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lined_up, heavy = out.stdout.rsplit("} ", 1)
    assert lined_up + "}" == str({"npr-retrained": "end-to-end", "aeroblade": "reconstruction",
                                  "x": "other"})  # fmt: skip
    assert heavy.strip() == str(["qdd.detectors.card", "qdd.detectors.cards",
                                 "qdd.detectors.registry"])  # fmt: skip


def test_the_registry_and_the_cards_agree() -> None:
    from qdd.detectors import available, detector_class
    from qdd.detectors.registry import card_of

    assert available() == sorted(CARDS)
    for name in available():
        assert detector_class(name).card is CARDS[name] is card_of(name.upper())


def test_a_name_of_qdds_is_taken_before_its_module_is_imported() -> None:
    import pytest

    from qdd.detectors.registry import register

    with pytest.raises(ValueError, match="registered twice"):
        register("NPR", card=CARDS["npr"])(type("Mine", (), {}))


def test_report_md_lists_runs_and_recipes_family_by_family(tmp_path) -> None:
    """The Runs table and the Recipes' detectors were in alphabetical order (aeroblade,
    clipd, npr, rigid), unlike every figure and table beside them."""
    from qdd.report.index import recipe_table, runs_table
    from qdd.report.runs import load_runs
    from tests.report.conftest import write_run

    grids = {"rigid": {"sd3": ["fp4"]}, "aeroblade": {"sd3": ["fp4"]}, "clipd": {"sd15": ["fp4"]},
             "npr": {"sd3": ["fp4"]}}  # fmt: skip
    results = load_runs([write_run(tmp_path / d, d, grid, n=2, seed=i)
                         for i, (d, grid) in enumerate(grids.items())])  # fmt: skip
    assert list(runs_table(results)["detector"]) == ["npr", "clipd", "aeroblade", "rigid"]
    recipes = recipe_table(results).set_index("generator")["detectors"]
    assert recipes.to_dict() == {"sd15": "clipd", "sd3": "npr, aeroblade, rigid"}


def test_the_readmes_detector_table_goes_by_the_cards_families() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text().splitlines()
    start = readme.index(next(line for line in readme if line.startswith("| name | family |")))
    rows = [line.split(" | ")[:2] for line in readme[start + 2 : start + 12]]
    names = [name.strip("|` ") for name, _ in rows]
    assert [family for _, family in rows] == [CARDS[name].family for name in names]
    assert [FAMILIES.index(CARDS[n].family) for n in names] == sorted(
        FAMILIES.index(c.family) for c in CARDS.values()
    )


def test_attribution_runs_go_family_by_family_whatever_order_they_come_in(tmp_path) -> None:
    """The attribution figures and table followed the order the run folders were given."""
    import json

    import numpy as np
    import pandas as pd

    from qdd.attribution import attribution_metrics
    from qdd.callbacks.attribution import write_confusion
    from qdd.report.attribution import attribution_section

    classes = ["16-bit", "4-bit weight-only"]
    truth, predicted = np.repeat([0, 1], [3, 3]), np.ones(6, dtype=np.int64)
    runs = []
    for name, detector in [("a-clipd", "clipd"), ("b-npr", "npr")]:
        run = tmp_path / name
        run.mkdir()
        metrics = attribution_metrics(truth, predicted, classes)
        metrics |= {"task": "attribution", "detector": detector, "attribute": "family",
                    "classes": classes}  # fmt: skip
        (run / "metrics.json").write_text(json.dumps(metrics))
        write_confusion(run / "confusion.csv", metrics["confusion"], classes)
        runs.append(run)
    for given in (runs, runs[::-1]):
        figures: dict[str, str] = {}
        attribution_section(given, tmp_path / "report", figures, {})
        assert list(figures) == ["attribution_b-npr", "attribution_a-clipd"]
        table = pd.read_csv(tmp_path / "report" / "tables" / "attribution.csv")
        assert list(dict.fromkeys(table["run"])) == ["b-npr", "a-clipd"]
