"""The layer-wise probe figure: a metric against layer, with its CI band and the controls drawn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

CONTROL_STYLES = {
    "chance": {"color": "0.35", "linestyle": ":"},
    "patch embedding": {"color": "tab:purple", "linestyle": "--"},
    "patch + position embedding": {"color": "tab:green", "linestyle": "--"},
    "visual tokens": {"color": "tab:red", "linestyle": "-."},
}
LAYER_SERIES = {"probe": "tab:blue", "shuffled labels": "tab:orange"}
METRIC_LABELS = {"accuracy": "accuracy", "top5": "top-5 accuracy", "manhattan": "mean Manhattan distance (patches)"}


@dataclass(frozen=True)
class ReferencePoints:
    """Published probe accuracies to mark on a figure, at their fraction of the tower's depth."""

    label: str
    layers: int  # blocks in the reference tower
    accuracy: dict[int, float]  # hidden-state index -> accuracy


# The paper's linear probe on CLIP ViT-L/14-336 (LLaVA-1.5's tower, 24 blocks): quoted, not measured here.
PAPER_CLIP_L14_336 = ReferencePoints("CLIP ViT-L/14-336 (paper)", layers=24, accuracy={1: 0.98, 23: 0.03})


def read_table(table: str | Path | pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    if isinstance(table, (str, Path)):
        return pd.read_csv(table)
    return pd.DataFrame(list(table))


def plot_layerwise(table: str | Path | pd.DataFrame | Sequence[dict], path: str | Path | None = None, *,
                   metrics: Sequence[str] = ("accuracy", "manhattan"), title: str | None = None,
                   relative_depth: bool = False, reference: ReferencePoints | None = None,
                   axes: Sequence[object] | None = None) -> object:
    """Draw each metric in its own panel; with `path`, save it as PNG and PDF. Returns the figure.

    `relative_depth` puts layer k of an L-block tower at k / L, so towers of different depths (and
    `reference` points) share one axis.
    """
    import matplotlib

    if path is not None and axes is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = read_table(table)
    layered = data[data["series"].isin(list(LAYER_SERIES))].copy()
    layered["layer"] = layered["layer"].astype(float)
    depth = layered["layer"].max() if len(layered) else 1.0
    layered["x"] = layered["layer"] / depth if relative_depth else layered["layer"]
    if axes is None:
        sns.set_theme(style="whitegrid", context="paper")
        figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
        axes = axes[0]
    figure = axes[0].figure
    for ax, metric in zip(axes, metrics):
        rows = layered[layered["metric"] == metric]
        if len(rows):
            sns.lineplot(data=rows, x="x", y="value", hue="series", palette=LAYER_SERIES, marker="o", ax=ax,
                         errorbar=None)
        for series, color in LAYER_SERIES.items():
            band = rows[rows["series"] == series].sort_values("x")
            ax.fill_between(band["x"], band["ci_low"], band["ci_high"], color=color, alpha=0.2, linewidth=0)
        for series, style in CONTROL_STYLES.items():
            control = data[(data["series"] == series) & (data["metric"] == metric)]
            if len(control):
                ax.axhline(float(control["value"].iloc[0]), label=series, linewidth=1.2, **style)
        if reference is not None and metric == "accuracy":
            xs = [layer / reference.layers if relative_depth else layer for layer in reference.accuracy]
            ax.scatter(xs, list(reference.accuracy.values()), marker="*", s=140, color="black", zorder=5,
                       label=reference.label)
        ax.set_xlabel("layer / depth" if relative_depth else "layer (0: embeddings)")
        if not len(layered):  # one feature set with no layers: the axis means nothing
            ax.set_xticks([])
            ax.set_xlabel("")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        if metric in ("accuracy", "top5"):
            ax.set_ylim(-0.02, 1.02)
        if ax.get_legend() is not None:  # none where only horizontal series are drawn (`--features visual-tokens`)
            ax.get_legend().remove()
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if path is not None:
        path = Path(path)
        figure.savefig(path, dpi=150)
        figure.savefig(path.with_suffix(".pdf"))
        plt.close(figure)
    return figure
