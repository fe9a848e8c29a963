"""A detector refusing an image inside a DataLoader worker ends in the same one message as
in the main process (naming the image and its shard); a bug keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from qdd.datamodules.dataset import Collate, ShardDataset
from qdd.datamodules.reader import index_folders
from qdd.errors import QddError, one_line
from tests.conftest import write_fake_shards


class Refuse:
    """A detector's input transform that refuses images under 8 px (picklable for workers)."""

    def __init__(self, kind: type[Exception]) -> None:
        self.kind = kind

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if min(image.size) < 8:
            raise self.kind(f"image {image.width}×{image.height} is under one 8-px cell:\n"
                            "drop such images")  # fmt: skip
        return torch.zeros(3, 8, 8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("worker-errors")
    write_fake_shards(root / "big", [3])
    (tiny,) = write_fake_shards(root / "tiny", [1], generator="tiny", size=(6, 6))
    return root, tiny


def first_error(root: Path, kind: type[Exception], workers: int) -> BaseException:
    entries, _ = index_folders([root / "big", root / "tiny"])
    dataset = ShardDataset(entries, transform=Refuse(kind))
    loader = DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=Collate(["none"]))
    with pytest.raises(Exception) as info:
        list(loader)
    return info.value


def test_the_refusal_reads_the_same_with_and_without_workers(shards) -> None:
    root, tiny = shards
    messages = []
    for workers in (0, 2):
        error = first_error(root, QddError, workers)
        assert isinstance(error, QddError)
        messages.append(one_line(error))
    main, worker = messages
    assert main.startswith(f"{tiny} in ") and "tiny" in main
    assert main.endswith("is under one 8-px cell: drop such images")  # one line
    assert worker == main  # all of it: not only its last line, nor the worker's traceback


def test_a_bug_in_a_worker_keeps_its_type_and_traceback(shards) -> None:
    root, _ = shards
    for workers in (0, 2):
        error = first_error(root, TypeError, workers)
        assert type(error) is TypeError and not isinstance(error, QddError)
    assert "Traceback" in str(error)  # the worker's, as PyTorch re-raises it


class OwnError(QddError):
    """A user's detector module may raise its own kind of QddError."""


class Raises(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        raise OwnError("weights file x.pth has no key head.weight:\npass the head's file")


@pytest.mark.slow  # ~10–20 s: two workers' shutdown; the QddError case above is the same path
def test_a_subclass_of_qdd_error_from_a_worker_is_one_message_too() -> None:
    with pytest.raises(OwnError) as info:
        list(DataLoader(Raises(), num_workers=2))
    expected = "weights file x.pth has no key head.weight: pass the head's file"
    assert one_line(info.value) == expected
