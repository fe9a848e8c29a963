"""`qdd-cli fingerprint` (issue 24, part 1): residual spectra per group, their distance to
the fp32 twin group, exactly once over workers, batches and ranks.

The synthetic check of the issue: a faint period-8 grid (+3 grey levels on every 8th row
and column) planted into one precision's images makes its spectrum differ from an
unplanted copy's at multiples of 1/8 cycle per pixel, and its distance to fp32 is clearly
larger than the copy's, which is ~0. The numerics are checked against scipy/numpy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter, median_filter

from qdd.cli import main
from qdd.datamodules.schema import make_meta
from qdd.datamodules.writer import ShardWriter, write_manifest
from qdd.errors import QddError
from qdd.fingerprint import DISTANCES, SPECTRA
from qdd.fingerprint.command import run_fingerprint
from qdd.fingerprint.spectra import (
    distance_db,
    luma,
    median_residual,
    power_spectrum,
    radial_profile,
)
from tests.conftest import run_qdd, zero_images

CPU = {"accelerator": "cpu"}
N = 11  # images per group: batch sizes 3 and 4 do not divide it


def smooth_image(index: int, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A photo-like image: smooth structure plus faint sensor-like noise (H×W×3 float)."""
    rng = np.random.default_rng(index)
    w, h = size
    base = gaussian_filter(rng.normal(0, 1, (h, w, 3)), sigma=(4, 4, 0))
    base = 128 + 60 * base / base.std()
    return base + rng.normal(0, 1.5, base.shape)


def grid(image: np.ndarray) -> np.ndarray:
    """The planted trace: +3 grey levels on every 8th row and column."""
    planted = image.copy()
    planted[::8] += 3
    planted[:, ::8] += 3
    return planted


def write_group(folder: Path, generator: str, precision: str, images: list[np.ndarray],
                label: int = 1, start: int = 0, seed_offset: int = 0) -> None:  # fmt: skip
    with ShardWriter(folder, mode="new", max_count=4) as writer:
        for i, array in enumerate(images, start):
            pixels = np.clip(np.round(array), 0, 255).astype(np.uint8)
            if label:
                meta = make_meta(1, generator, generator=generator, precision=precision,
                                 prompt_id=i, seed=i + seed_offset)  # fmt: skip
            else:
                meta = make_meta(0, generator)
            writer.write(f"p{i:05d}-s{i}", Image.fromarray(pixels), meta)
    write_manifest(folder)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sd3 at fp32, an unplanted copy labelled fp16, a grid-planted copy labelled fp4; a
    real folder (no twin by nature); flux at fp4 only (no fp32 twin group)."""
    root = tmp_path_factory.mktemp("fingerprint")
    images = [smooth_image(i) for i in range(N)]
    write_group(root / "sd3-fp32", "sd3", "fp32", images)
    write_group(root / "sd3-fp16", "sd3", "fp16", images)
    write_group(root / "sd3-fp4", "sd3", "fp4", [grid(x) for x in images])
    write_group(root / "real-x", "x", None, [smooth_image(100 + i) for i in range(3)], label=0)
    write_group(root / "flux-fp4", "flux", "fp4", [smooth_image(200 + i) for i in range(2)])
    return root


def distances(run: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with open(run / DISTANCES) as handle:
        return {(r["generator"], r["precision"], r["perturbation"]): r
                for r in csv.DictReader(handle)}  # fmt: skip


@pytest.fixture(scope="module")
def single(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "single"
    run_fingerprint([str(shards / "*")], out, batch_size=1, trainer=CPU)
    return out


def test_planted_grid_peaks_at_multiples_of_one_eighth(single: Path) -> None:
    with np.load(single / SPECTRA) as arrays:
        planted, copy, fp32 = arrays["sd3/fp4"], arrays["sd3/fp16"], arrays["sd3/fp32"]
        frequency = arrays["frequency"]
        radial = arrays["sd3/fp4@radial"] - arrays["sd3/fp16@radial"]
    assert planted.shape == (64, 64)
    difference = (planted - copy).ravel()
    top = np.argsort(difference)[::-1][:12]
    for index in top:  # (row, column) of the fftshift layout: frequency (i - 32) / 64
        fy, fx = divmod(int(index), 64)
        assert (fy - 32) % 8 == 0 and (fx - 32) % 8 == 0, (fy, fx)
    assert difference[top[0]] > 100 * np.median(np.abs(difference))
    assert frequency[np.argmax(radial[1:]) + 1] * 8 % 1 == 0  # radial peak: k/8 too
    np.testing.assert_array_equal(copy, fp32)
    rows = distances(single)
    assert float(rows["sd3", "fp16", "none"]["distance"]) < 1e-9
    assert float(rows["sd3", "fp16", "none"]["high"]) < 1e-6  # paired: every resample ~0
    planted_row = rows["sd3", "fp4", "none"]
    low, distance = float(planted_row["low"]), float(planted_row["distance"])
    assert distance > 0.3 and 1000 * float(rows["sd3", "fp16", "none"]["high"]) < low
    assert low < distance < float(planted_row["high"])  # the interval holds its estimate
    assert distance < float(planted_row["distance_plugin"])  # the noise floor is removed
    assert int(planted_row["n"]) == N


def test_metrics_name_groups_without_twin_and_count_every_image(single: Path) -> None:
    metrics = json.loads((single / "metrics.json").read_text())
    assert metrics["kind"] == "fingerprint" and metrics["crop"] == 64
    assert metrics["crop_limited_by"]["side"] == 64 and metrics["crop_requested"] == 256
    assert metrics["n"] == metrics["expected"] == 3 * N + 3 + 2
    assert metrics["without_reference"] == ["flux/fp4"]
    assert metrics["groups"]["real/x"]["reference"] is None
    assert metrics["groups"]["sd3/fp4"]["reference"] == "sd3/fp32"
    assert set(distances(single)) == {("sd3", "fp16", "none"), ("sd3", "fp4", "none")}
    with np.load(single / SPECTRA) as arrays:
        assert {"real/x", "flux/fp4", "flux/fp4@radial", "sd3/fp32@fingerprint"} <= set(
            arrays.files
        )


@pytest.mark.parametrize(("batch_size", "workers"), [(3, 0), (4, 2)])
def test_same_result_for_any_workers_and_batch(
    shards: Path, single: Path, tmp_path: Path, batch_size: int, workers: int
) -> None:
    out = tmp_path / "run"
    run_fingerprint([str(shards / "*")], out, batch_size=batch_size, num_workers=workers,
                    trainer=CPU)  # fmt: skip
    assert_same_run(out, single)


def assert_same_run(out: Path, reference: Path) -> None:
    with np.load(out / SPECTRA) as got, np.load(reference / SPECTRA) as want:
        assert got.files == want.files
        for name in want.files:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12)
    got, want = distances(out), distances(reference)
    assert got.keys() == want.keys()
    for key, row in want.items():
        assert got[key]["n"] == row["n"]
        for column in ("distance", "low", "high", "distance_plugin"):
            assert float(got[key][column]) == pytest.approx(float(row[column]), rel=1e-9, abs=1e-12)


@pytest.mark.slow  # two real processes: ~110 s on the shared 2-core host
def test_ddp_two_processes_every_image_once(shards: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    run_qdd(["fingerprint", "--data", str(shards / "*"), "--out", str(out),
             "--batch-size", "2", "--num-workers", "1", "--trainer.strategy=ddp",
             "--trainer.devices=2", "--trainer.accelerator=cpu"], cwd=tmp_path)  # fmt: skip
    assert_same_run(out, single)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == metrics["expected"]


def test_same_distribution_reads_zero_and_a_lone_image_no_number(tmp_path: Path) -> None:
    """Different images of one distribution: the plug-in reads ~2 dB of pure noise, the
    distance ~0 with an interval from 0. A group of one image has no jackknife: its
    distance is empty (not 0), named in a warning, with the plug-in beside it."""
    write_group(tmp_path / "a-fp32", "a", "fp32", [smooth_image(i) for i in range(N)])
    write_group(tmp_path / "a-fp8", "a", "fp8", [smooth_image(300 + i) for i in range(N)])
    write_group(tmp_path / "a-fp4", "a", "fp4", [grid(smooth_image(0))])
    result = run_fingerprint([str(tmp_path / "a-*")], tmp_path / "run", trainer=CPU)
    rows = distances(tmp_path / "run")
    same = rows["a", "fp8", "none"]
    assert float(same["distance_plugin"]) > 1 and float(same["distance"]) < 0.2
    assert float(same["low"]) == 0 < float(same["high"])
    lone = rows["a", "fp4", "none"]
    assert lone["distance"] == lone["low"] == lone["high"] == ""
    assert float(lone["distance_plugin"]) > 0
    assert result.metrics["too_few_images"] == ["a/fp4"]
    assert result.metrics["groups"]["a/fp4"]["distance"] is None
    assert any("a/fp4; add images" in note for note in result.metrics["notes"])


def test_images_without_a_twin_are_counted_and_named(tmp_path: Path) -> None:
    """fp4 made for keys 2–9, fp32 for 0–7: both means keep every image, but the jackknife
    pairs twins, so the six pairs and the 2 + 2 lone images are counted, and named."""
    write_group(tmp_path / "a-fp32", "a", "fp32", [smooth_image(i) for i in range(8)])
    write_group(tmp_path / "a-fp4", "a", "fp4", [smooth_image(i) for i in range(2, 10)], start=2)
    result = run_fingerprint([str(tmp_path / "a-*")], tmp_path / "run", trainer=CPU)
    group = result.metrics["groups"]["a/fp4"]
    assert (group["n"], group["unpaired"], group["twin_unpaired"]) == (8, 2, 2)
    assert any("a/fp4 (2 of 8 without a twin, 2 of the twin group's" in note
               for note in result.metrics["notes"])  # fmt: skip
    assert "unpaired" not in result.metrics["groups"]["a/fp32"]  # the reference itself


def test_images_of_one_key_but_another_seed_are_not_twins(tmp_path: Path) -> None:
    """Pairing is `qdd.identity.twin_id`, not the shard key: an fp4 folder whose samples
    share the fp32 folder's keys but were drawn with other seeds has no twin there."""
    write_group(tmp_path / "a-fp32", "a", "fp32", [smooth_image(i) for i in range(8)])
    write_group(tmp_path / "a-fp4", "a", "fp4", [smooth_image(i) for i in range(8)],
                seed_offset=100)  # fmt: skip
    result = run_fingerprint([str(tmp_path / "a-*")], tmp_path / "run", trainer=CPU)
    group = result.metrics["groups"]["a/fp4"]
    assert (group["n"], group["unpaired"], group["twin_unpaired"]) == (8, 8, 8)


def test_crop_is_centred_and_never_resized(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "crop"
    run_fingerprint([str(shards / "sd3-fp32"), str(shards / "sd3-fp4")], out, crop=32,
                    trainer=CPU)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["crop"] == 32 and metrics["crop_limited_by"] is None
    with np.load(out / SPECTRA) as arrays:
        spectrum = arrays["sd3/fp4"]
    assert spectrum.shape == (32, 32)
    image = torch.from_numpy(np.clip(np.round(smooth_image(0)), 0, 255).astype(np.uint8))
    centre = image.permute(2, 0, 1)[None, :, 16:48, 16:48]
    one = power_spectrum(median_residual(luma(centre)))[0].numpy()
    assert one.shape == (32, 32)  # the spectrum of the centre, as the run computes it


def test_perturbations_are_groups_of_their_own(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "perturbed"
    run_fingerprint([str(shards / "sd3-fp32"), str(shards / "sd3-fp4")], out,
                    perturb=["jpeg:90", "resize:0.5"], trainer=CPU)  # fmt: skip
    rows = distances(out)
    passes = ("none", "jpeg:90", "resize:0.5")
    assert set(rows) == {("sd3", "fp4", p) for p in passes}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["groups"]["sd3/fp4/jpeg:90"]["reference"] == "sd3/fp32/jpeg:90"
    assert metrics["n"] == 2 * N
    assert metrics["crop"] == 32  # the half-size images of resize:0.5 set the crop


def test_unreadable_image_is_counted_and_named(shards: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "shards"
    for name in ("sd3-fp32", "sd3-fp4"):
        shutil.copytree(shards / name, root / name)
    zero_images(root / "sd3-fp4" / "shard-000000.tar", ["p00001-s1"])
    result = run_fingerprint([str(root / "*")], tmp_path / "run", trainer=CPU)
    assert result.metrics["n"] == 2 * N - 1 and result.metrics["expected"] == 2 * N
    assert [s["key"] for s in result.metrics["skipped"]] == ["p00001-s1"]
    assert result.metrics["groups"]["sd3/fp4"]["n"] == N - 1


def test_smallest_image_side_sets_the_crop(tmp_path: Path) -> None:
    write_group(tmp_path / "a-fp32", "a", "fp32", [smooth_image(i) for i in range(2)])
    write_group(tmp_path / "a-fp4", "a", "fp4", [smooth_image(i, (40, 24)) for i in range(2)])
    result = run_fingerprint([str(tmp_path / "a-*")], tmp_path / "run", trainer=CPU)
    assert result.metrics["crop"] == 24
    assert result.metrics["crop_limited_by"]["shard"].endswith(".tar")
    assert any("crop 24 (not 256)" in note for note in result.metrics["notes"])


def test_bad_inputs_end_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(QddError, match="no shards in"):
        run_fingerprint([str(tmp_path / "empty")], tmp_path / "run", trainer=CPU)
    with pytest.raises(QddError, match="--crop 4 is below 16"):
        run_fingerprint([str(tmp_path / "empty")], tmp_path / "run", crop=4, trainer=CPU)
    with pytest.raises(QddError, match="--folds 1 is below 2: pass --folds 2 or more"):
        run_fingerprint([str(tmp_path / "empty")], tmp_path / "run", folds=1, trainer=CPU)
    with pytest.raises(QddError, match="--folds 5000 is above 200.*pass --folds 200 or fewer"):
        run_fingerprint([str(tmp_path / "empty")], tmp_path / "run", folds=5000, trainer=CPU)
    write_group(tmp_path / "tiny-fp32", "tiny", "fp32", [smooth_image(0, (12, 12))])
    with pytest.raises(QddError, match="12 pixels on its short side, below"):
        run_fingerprint([str(tmp_path / "tiny-fp32")], tmp_path / "run", trainer=CPU)
    write_group(tmp_path / "small-fp32", "small", "fp32", [smooth_image(0, (24, 24))])
    with pytest.raises(QddError, match="12 pixels on its short side after --perturb"):
        run_fingerprint([str(tmp_path / "small-fp32")], tmp_path / "run",
                        perturb=["resize:0.5"], trainer=CPU)  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(["fingerprint", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]
    assert not (tmp_path / "run").exists()


def test_an_image_twice_in_one_group_is_refused(shards: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(shards / "sd3-fp32", tmp_path / "sd3-fp32-copy")
    with pytest.raises(QddError, match="p00000-s0 is twice in group sd3/fp32 .* pass each"):
        run_fingerprint([str(shards / "sd3-fp32"), str(tmp_path / "sd3-fp32-copy")],
                        tmp_path / "run", trainer=CPU)  # fmt: skip


def test_median_residual_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 256, (2, 9, 13)).astype(np.float64)
    want = y - median_filter(y, size=(1, 3, 3), mode="mirror")  # mirror = torch's reflect
    np.testing.assert_allclose(median_residual(torch.from_numpy(y)).numpy(), want)


def test_luma_spectrum_radial_and_distance_match_numpy() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (1, 3, 10, 12)).astype(np.uint8)
    y = luma(torch.from_numpy(rgb))[0].numpy()
    pil = np.asarray(Image.fromarray(rgb[0].transpose(1, 2, 0)).convert("L"), dtype=float)
    assert np.abs(y - pil).max() <= 0.5 + 1e-9  # PIL rounds BT.601 luma to 8 bits
    spectrum = power_spectrum(torch.from_numpy(y)).numpy()
    want = np.fft.fftshift(np.abs(np.fft.fft2(y)) ** 2) / y.size
    np.testing.assert_allclose(spectrum, want, rtol=1e-12)
    assert spectrum.mean() == pytest.approx(np.mean(y**2))  # Parseval
    frequency, profile = radial_profile(spectrum)
    assert frequency[-1] == 0.5 and profile[0] == pytest.approx(spectrum[5, 6])
    fy, fx = np.meshgrid((np.arange(10) - 5) / 10, (np.arange(12) - 6) / 12, indexing="ij")
    ring = np.rint(np.hypot(fy, fx) * 10) == 2
    assert profile[2] == pytest.approx(spectrum[ring].mean())
    assert distance_db(2 * spectrum, spectrum) == pytest.approx(10 * np.log10(2))
    assert distance_db(spectrum, spectrum) == 0


def test_report_draws_spectra_radial_and_a_table(single: Path, tmp_path: Path) -> None:
    from qdd.report.command import build_report

    out = tmp_path / "report"
    index = build_report([single], out)
    for stem in ("spectra_sd3", "radial_sd3", "radial_flux"):
        assert (out / f"{stem}.png").is_file(), stem
    assert not (out / "spectra_flux.png").exists()  # flux has no fp32 group to differ from
    table = (out / "tables" / "spectral_distance.csv").read_text().splitlines()
    assert table[0].startswith("generator,precision,perturbation,n,distance,low,high,"
                               "distance_plugin")  # fmt: skip
    assert [line.split(",")[1] for line in table[1:]] == ["fp16", "fp4"]
    assert table[0].endswith(",crop,folds")  # runs with other --folds stay told apart
    text = index.read_text()
    assert "spectra_sd3.png" in text and "no spectra_flux" in text


def test_report_refuses_one_group_from_two_runs(single: Path, tmp_path: Path) -> None:
    import shutil

    from qdd.report.command import build_report

    shutil.copytree(single, tmp_path / "again")
    with pytest.raises(QddError, match="is in both .* pass one fingerprint run per group"):
        build_report([single, tmp_path / "again"], tmp_path / "report")


def test_report_refuses_a_run_of_plugin_distances(single: Path, tmp_path: Path) -> None:
    """A run written before the jackknife (metrics.json without ``interval``) holds plug-in
    distances under ``distance``: mixing them with corrected ones would mislead."""
    import shutil

    from qdd.report.command import build_report

    old = tmp_path / "old"
    shutil.copytree(single, old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["interval"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(QddError, match="old holds plug-in spectral distances .* re-run qdd-cli"):
        build_report([old], tmp_path / "report")
    assert not (tmp_path / "report").exists()  # refused before anything was drawn


def test_cli_and_api_write_the_same_run(
    shards: Path, single: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from qdd.api import fingerprint

    folders = [str(shards / "*")]
    result = fingerprint(data=folders, out=str(tmp_path / "api"), batch_size=5, trainer=CPU)
    assert result.run_dir == tmp_path / "api" and result.metrics["kind"] == "fingerprint"
    assert_same_run(tmp_path / "api", single)
    main(["fingerprint", "--data", *folders, "--out", str(tmp_path / "cli"),
          "--trainer.accelerator=cpu"])  # fmt: skip
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "cli")
    assert_same_run(tmp_path / "cli", single)
