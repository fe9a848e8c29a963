"""The denoiser × decoder view: which side of the pipeline moves a detector.

Groups decoded at a set VAE precision are labelled ``<denoiser>-vae<decoder>``
(`qdd.generation.jobs.vae_label`); a plain group ``<p>`` was decoded by the VAE as the
pipeline loads it: fp32 for fp32 runs, the generator's half dtype otherwise (bf16 for
SD3/Flux, fp16 for the UNets). One panel per generator × detector: rows the denoiser's
precision, columns the decoder's, cells the metric (fake accuracy by default).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qdd.generation.vae import VAE_PRECISIONS, dtype_label
from qdd.identity import base_precision
from qdd.report.palette import order_precisions

#: ``fp4-vaefp32``; with the group's backend (`qdd.identity.group_label`): ``fp4-vaefp32@emulate``
VAE_LABEL = re.compile(r"^(?P<denoiser>.+)-vae(?P<decoder>[a-z0-9]+)(?P<backend>@.+)?$")


def usual_decoder(generator: str, precision: str) -> str | None:
    """The VAE precision a plain ``precision`` run of ``generator`` decoded with (None when
    the generator is not a registered one)."""
    from qdd.generation.registry import GENERATORS

    spec = GENERATORS.get(generator)
    if spec is None:
        return None
    import torch

    return "fp32" if precision == "fp32" else dtype_label(getattr(torch, spec.half_dtype))


def swap_table(table: pd.DataFrame) -> pd.DataFrame:
    """The unperturbed rows of the denoiser precisions whose latents were decoded at another
    VAE precision (their plain groups and the swapped ones), with ``denoiser`` and
    ``decoder`` columns (empty when no group was swapped)."""
    rows = table[table["perturbation"] == "none"]
    parsed = rows["precision"].str.extract(VAE_LABEL)
    swapped = rows.loc[parsed["denoiser"].notna(), "generator"].unique()
    if len(swapped) == 0:
        return pd.DataFrame()
    rows = rows[rows["generator"].isin(swapped)].copy()
    parsed = rows["precision"].str.extract(VAE_LABEL)
    denoiser = parsed["denoiser"] + parsed["backend"].fillna("")
    rows["denoiser"] = denoiser.fillna(rows["precision"])
    plain = [usual_decoder(g, base_precision(p))
             for g, p in zip(rows["generator"], rows["precision"], strict=True)]  # fmt: skip
    rows["decoder"] = parsed["decoder"].fillna(pd.Series(plain, index=rows.index))
    swapped_denoisers = set(rows.loc[parsed["denoiser"].notna(), "denoiser"])
    return rows[rows["denoiser"].isin(swapped_denoisers)].dropna(subset=["decoder"])


def plot_swap(
    swap: pd.DataFrame, metric: str = "fake_acc", lined_up: Mapping[str, str] | None = None
) -> Figure:
    """One annotated denoiser × decoder grid per generator and detector (detectors family
    by family where ``lined_up``, `qdd.report.families.lineup`, gives their order)."""
    import matplotlib as mpl

    from qdd.report.heatmap import CMAP, MISSING, norm_for
    from qdd.report.style import RC, bar_aspect, columns_for, panel_grid

    rank = {d: i for i, d in enumerate(lined_up or ())}
    panels = sorted({(g, d) for g, d in zip(swap["generator"], swap["detector"], strict=True)},
                    key=lambda gd: (gd[0], rank.get(gd[1], len(rank)), gd[1]))  # fmt: skip
    fig, axes = panel_grid(len(panels), panel=(3.6, 2.8), max_cols=3)
    cmap, norm = mpl.colormaps[CMAP], norm_for(metric)
    with mpl.rc_context(RC):
        image = None
        for ax, (generator, detector) in zip(axes, panels, strict=True):
            rows = swap[(swap["generator"] == generator) & (swap["detector"] == detector)]
            denoisers = order_precisions(rows["denoiser"].unique())
            decoders = [p for p in VAE_PRECISIONS if p in set(rows["decoder"])]
            grid = rows.pivot_table(index="denoiser", columns="decoder", values=metric,
                                    aggfunc="first")  # fmt: skip
            values = grid.reindex(index=denoisers, columns=decoders).to_numpy(dtype=float)
            image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
            ax.set_facecolor(MISSING)
            for (i, j), value in np.ndenumerate(values):
                dark = not np.isnan(value) and value < 0.6
                ax.text(j, i, "–" if np.isnan(value) else f"{value:.2f}", ha="center",
                        va="center", fontsize=8, color="white" if dark else "black")  # fmt: skip
            ax.set_xticks(range(len(decoders)), decoders)
            ax.set_yticks(range(len(denoisers)), denoisers)
            # axis names on the outer panels only: ten detectors' panels need the room
            ncols = columns_for(len(panels), 3)
            position = axes.index(ax)
            if position >= len(panels) - ncols:
                ax.set_xlabel("decoder (VAE) precision")
            if position % ncols == 0:
                ax.set_ylabel("denoiser precision")
            family = f" ({lined_up[detector]})" if lined_up and detector in lined_up else ""
            ax.set_title(f"{generator} · {detector}{family}", fontsize=9)
        fig.colorbar(image, ax=axes, shrink=0.85, aspect=bar_aspect(fig, 0.85), label=metric)
        fig.suptitle(f"{metric}: denoiser × decoder (–: not measured)")
    return fig
