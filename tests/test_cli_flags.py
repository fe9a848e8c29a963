"""One flag, one meaning: the shared flags are declared once (`qdd.flags`) and every command
reads a repeated ``--data`` as all of its occurrences (finding 9: quality kept the last)."""

from __future__ import annotations

import pytest

from qdd.errors import QddError
from qdd.flags import trainer_config


def test_quality_keeps_every_data_flag() -> None:
    from qdd.quality import build_parser

    args = build_parser().parse_args(["--data", "A", "--data", "B", "C", "--reference", "fp32"])
    assert args.data == ["A", "B", "C"]


def test_trainer_commands_read_data_and_perturb_the_same_way() -> None:
    config, passed = trainer_config(
        ["--detector", "npr", "--data", "A", "--data.batch_size", "8", "--data=B",
         "--perturb", "jpeg:75", "--perturb", "blur:1", "--trainer.max_epochs=2",
         "--trainer", "cpu", "--random-weights", "--print_config"]
    )  # fmt: skip
    assert config == {"detector": "npr", "data": ["A", "B"], "perturb": ["jpeg:75", "blur:1"],
                      "trainer": "cpu", "random_weights": True}  # fmt: skip
    # LightningCLI's own arguments pass through unchanged, in order
    assert passed == ["--data.batch_size", "8", "--trainer.max_epochs=2", "--print_config"]


def test_a_short_flag_without_its_value_is_one_line() -> None:
    with pytest.raises(QddError, match="--out: expected one argument"):
        trainer_config(["--detector", "npr", "--out"])


def test_presets_and_folders_mix_in_data() -> None:
    from qdd.api import lightning_config

    config = lightning_config({"detector": "npr", "data": ["paper", "shards/x"]})
    assert config["data"]["paths"] == ["shards/x"]  # the folder given wins over the preset's
    assert config["data"]["batch_size"] == 32
