"""FID/KID on Inception-V3 pool3 features (issue 21, finding 6), from a local file.

The network is torch-fidelity's FID Inception; the test file has its layout with random
values, so it is not the published file: the run must say so (a warning, ``verified:
false``). The FID must equal the Fréchet formula on torch-fidelity's own features.
"""

from __future__ import annotations

import logging
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from qdd.errors import QddError
from qdd.quality import networks, run_quality
from qdd.quality.metrics import distribution_distances
from tests.test_quality import CPU, FOLDERS, images_of, write_pairs


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's Inception-V3 layout with random values (its constructor loads a
    file; here it loads nothing and keeps its initialisation)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    with (
        mock.patch.object(torch, "load", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "unused")
    path = tmp_path_factory.mktemp("fid") / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    two = [(n, g, p, range(2), s, size) for n, g, p, _, s, size in FOLDERS[:2]]
    return write_pairs(tmp_path_factory.mktemp("pairs"), two)


@pytest.mark.slow  # Inception-V3 at 299²: ~3 s per image on the loaded 2-core host
def test_fid_on_inception_pool3_against_twins_and_real_photos(
    inception_file: Path, shards: Path, tmp_path: Path, caplog
) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with caplog.at_level(logging.WARNING, logger="qdd"):
        result = run_quality(
            [str(shards / "sd3-*")],
            "fp32",
            tmp_path / "q",
            trainer=CPU,
            fid_weights=inception_file,
            real=[str(shards / "real-x")],
        )
    metrics = result.metrics
    warned = [r.getMessage() for r in caplog.records if "not the published file" in r.getMessage()]
    assert len(warned) == 1 and str(inception_file) in warned[0]
    assert metrics["fid"]["verified"] is False and metrics["verified"] is False
    assert metrics["fid"]["sha256"] == networks.sha256(inception_file)
    assert metrics["n_real_photos"] == 4
    group, reference = metrics["groups"]["sd3/fp4"], metrics["groups"]["sd3/fp32"]
    # the reference: torch-fidelity's own extractor on the images, the Fréchet formula
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(inception_file))
    extractor.eval()  # torch-fidelity < 0.4 builds it in training mode
    images = images_of(shards)
    keys = sorted(k for g, p, k in images if p == "fp4" and (g, "fp32", k) in images)

    def features(precision: str, names: list[str]) -> np.ndarray:
        batch = torch.stack(
            [torch.from_numpy(images["sd3", precision, k]).permute(2, 0, 1) for k in names]
        )
        return extractor(batch)[0].double().numpy()

    fake, twins = features("fp4", keys), features("fp32", keys)
    assert len(keys) == group["n"] == 2
    # the run's FID is the Fréchet distance (`distribution_distances`, checked against the
    # formula in test_quality) of exactly these pool3 features
    expected = distribution_distances(fake, twins, "inception")
    assert group["fid"] == pytest.approx(expected["fid"], rel=1e-6, abs=1e-9)
    assert group["kid"] == pytest.approx(expected["kid"], rel=1e-6, abs=1e-12)
    assert group["kid_std"] is None  # 2 of 2: no subsets drawn
    assert "fd_clip" not in group  # no CLIP file given
    photos = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in real_photos(shards)])
    photos = extractor(photos)[0].double().numpy()
    for values, images_of_group in ((group, fake), (reference, twins)):
        real = distribution_distances(images_of_group, photos, "inception")
        assert values["fid_real"] == pytest.approx(real["fid"], rel=1e-6, abs=1e-9)
    assert reference["n"] is None and group["fid"] >= 0


def real_photos(root: Path) -> list[np.ndarray]:
    import io
    import json
    import tarfile

    from PIL import Image

    photos = []
    for shard in sorted((root / "real-x").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in sorted(members.items()):
            key, _, ext = name.partition(".")
            if ext == "json" and json.loads(data)["label"] == 0:
                photos.append(np.asarray(Image.open(io.BytesIO(members[f"{key}.png"]))))
    return photos


def test_published_files_are_recognised_by_their_sha256(inception_file: Path, monkeypatch) -> None:
    """The check torch.hub makes on download: the sha256 starts with the name's digits."""
    digest = networks.sha256(inception_file)
    monkeypatch.setitem(networks.PUBLISHED, "inception", {digest[:8]: "the published file"})
    record = networks.provenance(inception_file, "inception", "FID Inception")
    assert record["verified"] is True and record["published"] == "the published file"
    assert networks.PUBLISHED["alex"] == {"7be5be79": "alexnet-owt-7be5be79.pth"}


def test_fid_refusals_are_one_line(shards: Path, tmp_path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    for weights, expected in (
        (tmp_path / "other.pth", "is not the FID Inception-V3"),
        (tmp_path / "none.pth", "do not exist"),
    ):
        with pytest.raises(QddError, match=expected) as error:
            run_quality(
                [str(shards / "sd3-*")], "fp32", tmp_path / "q", trainer=CPU, fid_weights=weights
            )
        assert "\n" not in str(error.value)
    with pytest.raises(QddError, match="--real needs --fid-weights"):
        run_quality(
            [str(shards / "sd3-*")],
            "fp32",
            tmp_path / "q",
            trainer=CPU,
            real=[str(shards / "real-x")],
        )
    assert not (tmp_path / "q").exists()
