"""The report's denoiser × decoder view."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SWAP = {"sd3": ["fp32", "fp4", "fp32-vaefp4", "fp4-vaefp32"], "sd15": ["fp32", "fp4"]}


def test_swap_table_reads_both_precisions_from_the_labels(make_run) -> None:
    from qdd.report.runs import group_table, load_runs
    from qdd.report.swap import swap_table

    run = make_run("t", "npr", SWAP)
    table = group_table(load_runs([run]))
    swap = swap_table(table)
    assert set(swap["generator"]) == {"sd3"}  # sd15 has no swapped group
    cells = {(r.denoiser, r.decoder): r.precision for r in swap.itertuples()}
    # plain fp4 SD3 decoded with its bf16 VAE; fp32 with its fp32 one
    assert cells == {("fp32", "fp32"): "fp32", ("fp4", "bf16"): "fp4",
                     ("fp32", "fp4"): "fp32-vaefp4", ("fp4", "fp32"): "fp4-vaefp32"}  # fmt: skip


def test_report_draws_the_view_only_when_swapped_groups_exist(make_run, tmp_path: Path) -> None:
    from qdd.report.command import build_report
    from qdd.report.runs import group_table, load_runs
    from qdd.report.swap import plot_swap, swap_table

    run = make_run("t", "npr", SWAP)
    build_report([run], tmp_path / "r")
    assert (tmp_path / "r" / "heatmap_swap.png").is_file()
    assert "heatmap_swap" in (tmp_path / "r" / "report.md").read_text()
    plain = make_run("u", "npr", {"sd3": ["fp32", "fp4"]})
    build_report([plain], tmp_path / "p")
    assert not (tmp_path / "p" / "heatmap_swap.png").exists()
    fig = plot_swap(swap_table(group_table(load_runs([run]))))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "bf16", "fp4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fp32", "fp4"]
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("–") == 2 and len(texts) == 6  # 2 × 3 cells, fp32 × bf16 etc. absent
    assert all(np.isfinite(float(t)) for t in texts if t != "–")


def test_labels_with_a_backend_keep_their_denoiser_row(make_run) -> None:
    """Emulated groups are labelled ``fp4@emulate`` (`qdd.identity.group_label`): the swap
    view reads the backend as part of the denoiser's row, not as a decoder."""
    from qdd.report.runs import group_table, load_runs
    from qdd.report.swap import swap_table

    grid = {"sd3": ["fp32", "fp4@emulate", "fp4-vaefp32@emulate", "fp32-vaefp4"]}
    swap = swap_table(group_table(load_runs([make_run("t", "npr", grid)])))
    cells = {(r.denoiser, r.decoder) for r in swap.itertuples()}
    assert cells == {("fp32", "fp32"), ("fp4@emulate", "bf16"), ("fp4@emulate", "fp32"),
                     ("fp32", "fp4")}  # fmt: skip
