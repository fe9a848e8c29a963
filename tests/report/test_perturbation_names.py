"""One perturbation spelled two ways in two runs is one pass of the report (issue 21)."""

from __future__ import annotations

import pandas as pd
import pytest

from qdd.errors import QddError
from qdd.report.runs import group_table, load_runs

GRID = {"sd3": ["fp32", "fp4"]}


def test_spellings_of_one_perturbation_join_as_its_canonical_form(make_run) -> None:
    one = make_run("one", "npr", GRID, perturbations=("none", "blur:1"))
    # the same images and weights, the operation written another way
    other = make_run("other", "npr", GRID, perturbations=("none", "blur:1.0"))
    table = group_table(load_runs([one, other]), resamples=20)
    assert sorted(table["perturbation"].unique()) == ["blur:1", "none"]
    alone = group_table(load_runs([one]), resamples=20)
    pd.testing.assert_frame_equal(table, alone)  # pooled once: nothing counted twice
    upper = make_run("upper", "clipd", GRID, perturbations=("none", "JPEG:75"))
    assert set(group_table(load_runs([upper]), resamples=20)["perturbation"]) == {
        "none",
        "jpeg:75",
    }


def test_an_unknown_perturbation_name_is_refused_in_one_line(make_run) -> None:
    run = make_run("odd", "npr", GRID, perturbations=("none", "swirl:3"))
    with pytest.raises(QddError, match=r"names perturbation 'swirl:3'.*re-run qdd-cli test"):
        load_runs([run])
