"""A W&B run the user opened in the same process (a notebook's ``wandb.init()``) survives
qdd.api calls: qdd never logs into it and never ends it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qdd import api
from qdd.errors import QddError
from tests.test_api import _npr, _tiny_shards


@pytest.fixture
def users_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="mine")
    try:
        yield wandb, run
    finally:
        if wandb.run is not None:
            wandb.finish()


def test_a_call_with_a_wandb_logger_is_refused_and_the_users_run_stays_open(
    users_run, tmp_path: Path
) -> None:  # noqa: ANN001
    """Lightning's WandbLogger reuses an open run: qdd's metrics would land in the user's
    run, which the call then ended (`finish_loggers`)."""
    wandb, run = users_run
    data = _tiny_shards(tmp_path / "shards")
    with pytest.raises(QddError, match=r"W&B run .* is open in this process") as refused:
        api.test(_npr(data), out=tmp_path / "refused")
    assert "\n" not in str(refused.value)
    assert wandb.run is run and not run._is_finished
    assert not (tmp_path / "refused").exists()


def test_a_call_without_wandb_leaves_the_users_run_open(users_run, tmp_path: Path) -> None:  # noqa: ANN001
    wandb, run = users_run
    data = _tiny_shards(tmp_path / "shards")
    config = _npr(data)
    config["trainer"]["logger"] = False
    result = api.test(config, out=tmp_path / "csv")
    assert (result.run_dir / "metrics.json").is_file()
    assert wandb.run is run and not run._is_finished
    with pytest.raises(QddError, match="nodetector"):  # a refused call neither
        api.test({**config, "detector": "nodetector"}, out=tmp_path / "refused")
    assert wandb.run is run and not run._is_finished
    run.log({"mine": 1.0})  # still the user's to use
