"""Probe plots: the CKA heat-map between block outputs and the CKA trend along depth (optionally with the chosen
intervals shaded). matplotlib with the Agg backend; files are written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ppcl.atomic import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from ppcl.probe_result import ProbeResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Estimator identifiers of probe.json, as the heat-map's title says them.
ESTIMATORS = {"minibatch_unbiased_hsic_linear": "unbiased minibatch HSIC estimate"}

#: What the trend panel shows (also the figure's caption).
TREND_CAPTION = ("trend d_l = CKA(h_l+1, h_l+2) - CKA(h_l, h_l+1): negative where similarity starts to fall. "
                 "Dashed red: where the blocks change kind (dual-stream -> single-stream); intervals never cross it.")


def _nan(rows):
    return [[float("nan") if v is None else v for v in row] for row in rows]


def plot_cka_heatmap(probe: "ProbeResult", path: str | Path) -> Path:
    """One ``L x L`` panel per stream: CKA between block outputs (``probe.cka_matrix``)."""
    plt = _pyplot()
    mats = probe.cka_matrix.matrices
    streams = list(mats)
    fig, axes = plt.subplots(1, max(1, len(streams)), figsize=(5 * max(1, len(streams)), 4.4), squeeze=False)
    # One colour range for all panels, from the data (floored to 0.05): redundant models have every entry in
    # 0.9..1, where a fixed 0..1 scale shows a flat block of one colour.
    values = [v for m in mats.values() for row in m for v in row if v is not None and v == v]
    vmin = max(0.0, math.floor(min(values, default=0.0) * 20) / 20)
    vmin = min(vmin, 0.95)
    for ax, stream in zip(axes[0], streams):
        im = ax.imshow(_nan(mats[stream]), vmin=vmin, vmax=1, cmap="viridis", origin="lower")
        ax.set_title(f"{stream} stream: CKA between block outputs")
        ax.set_xlabel("block")
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax, fraction=0.046)
    # the estimator's name in words (probe.json keeps the identifier)
    fig.suptitle(f"{probe.family} teacher: linear CKA between every pair of block outputs "
                 f"({ESTIMATORS.get(probe.cka_matrix.estimator, probe.cka_matrix.estimator)})", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_trend(probe: "ProbeResult", path: str | Path, intervals: list[list[int]] | None = None) -> Path:
    """CKA(h_l, h_{l+1}) per stream and combined, the trend d_l, kind boundaries, and ``intervals`` shaded."""
    plt = _pyplot()
    idx = [b.index for b in probe.blocks]
    fig, (ax, axd) = plt.subplots(2, 1, figsize=(max(6, 0.18 * len(idx) + 4), 5.5), sharex=True)
    for stream in ("image", "text"):
        ys = [b.per_stream[stream].cka if stream in b.per_stream else None for b in probe.blocks]
        if any(y is not None for y in ys):
            ax.plot(idx, [float("nan") if y is None else y for y in ys], ".-", lw=1, label=f"CKA {stream}")
    ax.plot(idx, [float("nan") if b.cka is None else b.cka for b in probe.blocks], "k.-", lw=1.6,
            label="CKA (mean)")
    axd.bar(idx, [0 if b.trend is None else b.trend for b in probe.blocks], color="tab:gray")
    axd.axhline(0, color="k", lw=0.5)
    boundary = False
    for a in (ax, axd):
        for b0, b1 in zip(probe.blocks, probe.blocks[1:]):
            if b0.kind != b1.kind:
                boundary = True
                a.axvline(b1.index - 0.5, color="tab:red", ls="--", lw=1)
        # Alternate colours and draw edges so adjacent intervals stay distinguishable.
        for k, (s, e) in enumerate(intervals or []):
            a.axvspan(s - 0.5, e + 0.5, color=("tab:orange", "tab:green")[k % 2], alpha=0.22, lw=0)
            a.axvline(s - 0.5, color="0.4", lw=0.6)
            a.axvline(e + 0.5, color="0.4", lw=0.6)
    ax.set_ylabel("CKA(h_l, h_l+1)")
    axd.set_ylabel("trend d_l")
    axd.set_xlabel("block")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    if boundary:
        handles.append(Line2D([], [], color="tab:red", ls="--", lw=1, label="dual -> single-stream blocks"))
    if intervals:
        handles.append(Patch(color="tab:orange", alpha=0.4, label="interval to replace"))
    # outside the axes: inside, the legend covered the lowest (most interesting) points
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.text(0.01, 0.01, TREND_CAPTION, fontsize=7, wrap=True, va="bottom")
    title = f"{probe.family}: similarity along depth"
    if intervals:
        title += f" ({len(intervals)} interval{'s' * (len(intervals) != 1)} shaded)"
    ax.set_title(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the caption
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # the legend outside the axes
    finally:
        plt.close(fig)
    return path
