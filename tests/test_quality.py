"""`qdd-cli quality` (issue 18): every image against its reference twin, exactly once.

PSNR and SSIM are checked against independent implementations (numpy; scikit-image's
Gaussian-weighted SSIM), LPIPS against a hand-written LPIPS on torchvision's AlexNet, FID
and KID against numpy/scipy formulas; exactly-once for worker counts, batch sizes and DDP.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from qdd.cli import main
from qdd.datamodules.schema import make_meta
from qdd.datamodules.writer import ShardWriter, write_manifest
from qdd.errors import QddError
from qdd.quality import run_quality
from qdd.quality.metrics import distribution_distances
from tests.conftest import run_qdd, zero_images

CPU = {"accelerator": "cpu"}
#: (folder, generator, precision, prompt ids, noise σ, size); sd3/fp4 p99 has no fp32 twin,
#: sd3/fp16 p4 is identical to its twin (PSNR +inf).
FOLDERS = [
    ("sd3-fp32", "sd3", "fp32", range(7), 0.0, (24, 20)),
    ("sd3-fp4", "sd3", "fp4", [*range(6), 99], 20.0, (24, 20)),
    ("sd3-fp16", "sd3", "fp16", range(5), 3.0, (24, 20)),
    ("flux-schnell-fp32", "flux-schnell", "fp32", range(3), 0.0, (32, 28)),
    ("flux-schnell-nf4", "flux-schnell", "nf4", range(3), 10.0, (32, 28)),
]
EXPECTED = sorted(
    [("sd3", "fp4", i) for i in range(6)]
    + [("sd3", "fp16", i) for i in range(5)]
    + [("flux-schnell", "nf4", i) for i in range(3)]
)


def image_for(prompt_id: int, noise: float, size: tuple[int, int], generator: str) -> Image.Image:
    """The reference image of a prompt, plus the precision's noise (none on p4 of fp16)."""
    rng = np.random.default_rng([prompt_id, len(generator)])
    base = rng.integers(0, 256, (size[1], size[0], 3)).astype(float)
    if noise and not (noise == 3.0 and prompt_id == 4):
        base += np.random.default_rng([prompt_id, int(noise)]).normal(0, noise, base.shape)
    return Image.fromarray(np.clip(np.round(base), 0, 255).astype(np.uint8))


def write_pairs(root: Path, folders=FOLDERS, costs: bool = True) -> Path:
    for name, generator, precision, ids, noise, size in folders:
        with ShardWriter(root / name, mode="new", max_count=4) as writer:
            for i in ids:
                extra = (
                    {
                        "denoiser_bytes": 4000 if precision == "fp32" else 1000,
                        "seconds_per_image": 0.5,
                        "peak_memory_bytes": 10**6,
                    }
                    if costs
                    else {}
                )
                meta = make_meta(
                    1,
                    generator,
                    generator=generator,
                    precision=precision,
                    prompt_id=i,
                    prompt=f"a photo of object {i}",
                    seed=i,
                    **extra,
                )
                writer.write(f"p{i:05d}-s{i}", image_for(i, noise, size, generator), meta)
        write_manifest(root / name)
    with ShardWriter(root / "real-x", mode="new") as writer:
        for i in range(4):
            writer.write(f"photo{i}", image_for(100 + i, 0, (24, 20), "x"), make_meta(0, "x"))
    write_manifest(root / "real-x")
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def images_of(root: Path) -> dict[tuple[str, str, str], np.ndarray]:
    """Every fake image by (generator, precision, key), read with tarfile and PIL alone."""
    images = {}
    for shard in root.glob("*/*.tar"):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            key, _, ext = name.partition(".")
            if ext == "json":
                meta = json.loads(data)
                if meta["label"] == 1:
                    png = Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB")
                    images[meta["generator"], meta["precision"], key] = np.asarray(png)
    return images


def numpy_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def rows_of(out: Path) -> list[tuple[str, str, int]]:
    scores = pd.read_parquet(out / "quality.parquet")
    return sorted(zip(scores["generator"], scores["precision"], scores["prompt_id"], strict=True))


def test_psnr_and_ssim_equal_numpy_and_scikit_image(pairs: Path, tmp_path: Path) -> None:
    result = run_quality([str(pairs / "*")], "fp32", tmp_path / "q", batch_size=3, trainer=CPU)
    scores = pd.read_parquet(result.scores)
    assert list(scores.columns) == [
        "generator",
        "precision",
        "quant_backend",
        "prompt_id",
        "seed",
        "key",
        "reference_key",
        "psnr",
        "ssim",
    ]
    assert (scores["reference_key"] == scores["key"]).all()
    images = images_of(pairs)
    for row in scores.itertuples():
        image = images[row.generator, row.precision, row.key]
        twin = images[row.generator, "fp32", row.key]
        expected_ssim = structural_similarity(
            image,
            twin,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
            channel_axis=-1,
        )
        assert row.ssim == pytest.approx(expected_ssim, abs=1e-9), row.key
        # torchmetrics takes log(255) in float32: agreement to ~1e-7 relative
        assert row.psnr == pytest.approx(numpy_psnr(image, twin), rel=1e-6), row.key
    identical = scores[(scores["precision"] == "fp16") & (scores["prompt_id"] == 4)]
    assert np.isinf(identical["psnr"]).all() and (identical["ssim"] == 1.0).all()
    # 4-bit noise costs more quality than fp16's: the measures order them
    by = scores.groupby("precision")[["psnr", "ssim"]].median()
    assert by.loc["fp16", "ssim"] > by.loc["fp4", "ssim"]
    assert by.loc["fp16", "psnr"] > by.loc["nf4", "psnr"] > by.loc["fp4", "psnr"]
    groups = result.metrics["groups"]
    finite = scores[(scores["precision"] == "fp16") & np.isfinite(scores["psnr"])]["psnr"]
    assert groups["sd3/fp16"]["psnr"] == pytest.approx(finite.mean())
    assert groups["sd3/fp16"]["psnr_n_infinite"] == 1
    fp4 = scores[scores["precision"] == "fp4"]["ssim"]
    assert groups["sd3/fp4"]["ssim"] == pytest.approx(fp4.mean())
    assert groups["sd3/fp4"]["ssim_lo"] < fp4.mean() < groups["sd3/fp4"]["ssim_hi"]
    assert groups["sd3/fp4"]["n"] == 6


@pytest.mark.parametrize(("workers", "batch_size"), [(0, 3), (0, 5), (2, 4)])
def test_every_pair_once_and_missing_twins_named(
    pairs: Path, tmp_path: Path, workers: int, batch_size: int
) -> None:
    out = tmp_path / "q"
    result = run_quality(
        [str(pairs / "*")], "fp32", out, batch_size=batch_size, num_workers=workers, trainer=CPU
    )
    assert rows_of(out) == EXPECTED
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert metrics["kind"] == "quality" and metrics["reference"] == "fp32"
    assert metrics["n"] == metrics["expected"] == len(EXPECTED) and metrics["n_skipped"] == 0
    assert metrics["n_unpaired"] == 1
    assert {k: metrics["unpaired"][0][k] for k in ("generator", "precision", "key")} == {
        "generator": "sd3",
        "precision": "fp4",
        "key": "p00099-s99",
    }
    assert metrics["n_real_ignored"] == 4
    assert {g: e["n"] for g, e in metrics["groups"].items()} == {
        "flux-schnell/nf4": 3,
        "sd3/fp16": 5,
        "sd3/fp4": 6,
    }
    # the costs each group's samples recorded, for the report's trade-off table
    assert metrics["costs"]["sd3/fp32"]["denoiser_bytes"] == 4000
    cost = metrics["costs"]["sd3/fp4"]  # as `qdd.generation.costs` summarises them
    assert (cost["n"], cost["denoiser_bytes"], cost["peak_memory_bytes"]) == (7, 1000, 10**6)
    assert cost["seconds_per_image"] == cost["seconds_per_image_mean"] == 0.5
    assert any("LPIPS not computed" in note for note in metrics["notes"])


@pytest.mark.slow  # ~150 s on the shared 2-core host
def test_ddp_two_processes_every_pair_once(pairs: Path, tmp_path: Path) -> None:
    """A real `python -m qdd quality` with DDP on 2 CPU processes and 2 workers each."""
    single = tmp_path / "single"
    run_quality([str(pairs / "*")], "fp32", single, trainer=CPU)
    out = tmp_path / "ddp"
    run_qdd(
        [
            "quality",
            "--data",
            str(pairs / "*"),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--num-workers",
            "2",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
        ],
        cwd=tmp_path,
    )
    assert rows_of(out) == EXPECTED
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "quality.parquet"), pd.read_parquet(single / "quality.parquet")
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == metrics["expected"] == len(EXPECTED)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "quality.parquet"]


def test_unreadable_pair_is_counted_and_named(tmp_path: Path) -> None:
    root = write_pairs(tmp_path / "shards", FOLDERS[:2])
    zero_images(root / "sd3-fp4" / "shard-000000.tar", ["p00002-s2"])
    result = run_quality([str(root / "*")], "fp32", tmp_path / "q", trainer=CPU)
    assert result.metrics["n"] == 5 and result.metrics["expected"] == 6
    assert [s["key"] for s in result.metrics["skipped"]] == ["p00002-s2"]
    assert "cannot read" in result.metrics["skipped"][0]["error"]


def test_costs_absent_in_older_shards_are_left_out(tmp_path: Path) -> None:
    root = write_pairs(tmp_path / "shards", FOLDERS[:2], costs=False)
    result = run_quality([str(root / "*")], "fp32", tmp_path / "q", trainer=CPU)
    assert result.metrics["costs"] == {} and result.metrics["n"] == 6


def test_user_errors_are_one_line(pairs: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(QddError, match="no fp32 images in --data"):
        run_quality([str(pairs / "sd3-fp4")], "fp32", tmp_path / "a", trainer=CPU)
    with pytest.raises(QddError, match="no image in --data has a fp32 twin"):
        run_quality([str(pairs / "sd3-fp32")], "fp32", tmp_path / "b", trainer=CPU)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "quality",
                "--data",
                str(pairs / "*"),
                "--lpips-weights",
                "nothing.pth",
                "--out",
                str(tmp_path / "c"),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing.pth" in err[0], err


def hand_lpips(x: torch.Tensor, y: torch.Tensor, alexnet: torch.nn.Module) -> torch.Tensor:
    """LPIPS (Zhang et al. 2018) written out: AlexNet ReLU taps, unit-normalised over
    channels, squared differences weighted by torchmetrics' bundled linear layers."""
    import os

    import torchmetrics.functional.image.lpips as tm

    path = os.path.join(os.path.dirname(tm.__file__), "lpips_models", "alex.pth")
    lins = torch.load(path, map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(image: torch.Tensor) -> list[torch.Tensor]:
        h, out = (2 * image - 1 - shift) / scale, []
        for i, layer in enumerate(alexnet.features[:12]):
            h = layer(h)
            if i in (1, 4, 7, 9, 11):
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = torch.zeros(len(x))
    for k, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        weight = lins[f"lin{k}.model.1.weight"]
        total += torch.nn.functional.conv2d((a - b) ** 2, weight).mean((1, 2, 3))
    return total


def test_lpips_from_a_local_alexnet_file(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).eval()
    for module in alexnet.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    weights = tmp_path / "alexnet.pth"
    torch.save(alexnet.state_dict(), weights)
    big = [(n, g, p, range(2), s, (64, 64)) for n, g, p, _, s, _ in FOLDERS[:2]]
    root = write_pairs(tmp_path / "shards", big)
    result = run_quality(
        [str(root / "*")], "fp32", tmp_path / "q", lpips_weights=weights, trainer=CPU
    )
    scores = pd.read_parquet(result.scores)
    assert "lpips" in scores.columns and len(scores) == 2
    record = result.metrics["lpips"]  # a random trunk: recorded, and marked unverified
    assert (record["net"], record["weights"], record["verified"]) == ("alex", str(weights), False)
    assert len(record["sha256"]) == 64 and result.metrics["verified"] is False
    images = images_of(root)
    for row in scores.itertuples():
        a, b = (
            torch.from_numpy(images["sd3", p, row.key]).permute(2, 0, 1)[None] / 255.0
            for p in ("fp4", "fp32")
        )
        with torch.no_grad():
            expected = float(hand_lpips(a, b, alexnet))
        assert row.lpips == pytest.approx(expected, rel=1e-4) and row.lpips > 0
    torch.save({"classifier.1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(QddError, match="not a torchvision alex state_dict"):
        run_quality(
            [str(root / "*")],
            "fp32",
            tmp_path / "r",
            lpips_weights=tmp_path / "other.pth",
            trainer=CPU,
        )


def test_fd_clip_and_kd_clip_equal_the_formulas() -> None:
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    fake, ref = rng.normal(0.3, 1.2, (40, 6)), rng.normal(0, 1, (30, 6))
    got = distribution_distances(fake, ref, "clip")
    mu1, mu2 = ref.mean(0), fake.mean(0)
    s1, s2 = np.cov(ref, rowvar=False), np.cov(fake, rowvar=False)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert got["fd_clip"] == pytest.approx(fid, rel=1e-5)

    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    # subsets of the full size of both sets are the sets: KID is the full unbiased MMD², and
    # no spread over subsets is reported (none were drawn)
    n = 30
    x, y = ref[:n], fake[:n]
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1))
    mmd -= 2 * kxy.mean()
    got = distribution_distances(fake[:n], ref, "clip")
    assert got["kd_clip"] == pytest.approx(mmd, rel=1e-6) and got["kd_clip_std"] is None
    # fake has 40: subsets of 30 are drawn from it, and their spread is reported
    got = distribution_distances(fake, ref, "inception")
    assert set(got) == {"fid", "kid", "kid_std"} and got["kid_std"] > 0
    empty = {"fd_clip": None, "kd_clip": None, "kd_clip_std": None}
    assert distribution_distances(fake[:1], ref, "clip") == empty


def test_fd_clip_and_kd_clip_per_group_from_a_local_clip_tower(pairs: Path, tmp_path: Path) -> None:
    import open_clip

    from qdd.detectors.clip_backbone import TINY_CONFIG, _register_configs

    _register_configs()
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CONFIG.stem, pretrained=None)
    weights = tmp_path / "tiny-clip.pt"
    torch.save(clip.state_dict(), weights)
    result = run_quality(
        [str(pairs / "*")],
        "fp32",
        tmp_path / "q",
        trainer=CPU,
        feature_weights=str(weights),
        feature_model=TINY_CONFIG.stem,
    )
    groups = result.metrics["groups"]
    assert result.metrics["clip"]["model"] == TINY_CONFIG.stem
    assert result.metrics["clip"]["weights"] == str(weights)
    assert "fid" not in groups["sd3/fp4"]  # CLIP features are never called FID
    assert not any("CLIP score not computed" in note for note in result.metrics["notes"])
    for group in ("sd3/fp4", "sd3/fp16", "flux-schnell/nf4"):
        assert np.isfinite(groups[group]["fd_clip"]) and groups[group]["fd_clip"] > -1e-6
        assert np.isfinite(groups[group]["kd_clip"])
    # fp16's images are nearly their twins: their features nearly coincide
    assert groups["sd3/fp16"]["fd_clip"] < groups["sd3/fp4"]["fd_clip"]
    # CLIP score (100 · max(cos, 0)) of each image and of its twin against their prompt,
    # recomputed with open_clip's tokenizer and constants and torchvision's transforms
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import v2

    scores = pd.read_parquet(result.scores)
    size = clip.visual.image_size[0]
    preprocess = v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(size),
            v2.Lambda(lambda x: x.clamp(0, 1)),  # bicubic overshoot, as PIL's 8-bit resize
            v2.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ]
    )
    tokenizer = open_clip.get_tokenizer(TINY_CONFIG.stem)
    images = images_of(pairs)
    clip.eval()
    for row in scores.itertuples():
        with torch.no_grad():
            text = clip.encode_text(tokenizer([f"a photo of object {row.prompt_id}"]))
            for column, precision in (
                ("clip_score", row.precision),
                ("clip_score_reference", "fp32"),
            ):
                pixels = images[row.generator, precision, row.key]
                image = clip.encode_image(preprocess(pixels)[None])
                expected = 100 * max(float(torch.cosine_similarity(image, text)), 0.0)
                assert getattr(row, column) == pytest.approx(expected, abs=1e-3), row.key
    assert (scores["clip_score"] > 0).sum() >= 3  # not all clamped to 0
    assert groups["sd3/fp4"]["clip_score"] == pytest.approx(
        scores.loc[scores["precision"] == "fp4", "clip_score"].mean()
    )


def test_cli_help_lists_quality(capsys) -> None:
    main([])
    assert "quality" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["quality", "--help"])
    assert "--reference" in capsys.readouterr().out


@pytest.mark.slow  # ~3 min on the shared 2-core host
def test_generate_quality_test_report_chain_on_tiny_sd3(tmp_path: Path, capsys) -> None:
    """The study's path in miniature: tiny SD3 at fp32 and fp4 → quality → test → report
    yields the trade-off table and figure."""
    from qdd.generation.tiny import build_tiny_pipeline
    from tests.conftest import write_fake_shards

    model = build_tiny_pipeline("sd3", tmp_path / "sd3")
    shards = tmp_path / "shards"
    for precision in ("fp32", "fp4"):
        main(
            [
                "generate",
                "--generator",
                "sd3",
                "--model-path",
                str(model),
                "--precision",
                precision,
                "--steps",
                "2",
                "--limit",
                "4",
                "--height",
                "32",
                "--width",
                "32",
                "--trainer.accelerator",
                "cpu",
                "--out",
                str(shards / f"sd3-{precision}"),
            ]
        )
    write_fake_shards(shards / "real-x", [4], "x", None, label=0, size=(32, 32))
    quality = tmp_path / "runs" / "quality"
    main(
        [
            "quality",
            "--data",
            str(shards / "*"),
            "--out",
            str(quality),
            "--trainer.accelerator",
            "cpu",
        ]
    )
    test = tmp_path / "runs" / "npr"
    main(
        [
            "test",
            "--detector",
            "npr",
            "--data",
            str(shards / "*"),
            "--out",
            str(test),
            "--random-weights",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ]
    )
    report = tmp_path / "report"
    capsys.readouterr()
    main(["report", str(test), str(quality), "--out", str(report)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(report / "report.md")
    scores = pd.read_parquet(quality / "quality.parquet")
    assert len(scores) == 4 and set(scores["precision"]) == {"fp4"}
    assert (scores["ssim"] < 1).all() and np.isfinite(scores["psnr"]).all()  # fp4 differs
    table = pd.read_csv(report / "tables" / "tradeoff.csv")
    assert list(zip(table["generator"], table["precision"], strict=True)) == [
        ("sd3", "fp32"),
        ("sd3", "fp4"),
    ]
    fp4 = table.iloc[1]
    assert fp4["ssim"] == pytest.approx(scores["ssim"].mean()) and fp4["n_pairs"] == 4
    assert 0 <= fp4["npr_fake_acc"] <= 1 and 0 <= fp4["npr_auroc"] <= 1
    assert (report / "tradeoff_npr.png").exists() and (report / "tradeoff_npr.svg").exists()
    assert "## Trade-off" in (report / "report.md").read_text()
