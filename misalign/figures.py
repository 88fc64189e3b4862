"""The ablation figure: each task's headline accuracy against corruption strength, with 95% CI bands."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from grounding.tasks import HEADLINE

TASK_STYLES = {"rec": {"color": "tab:red", "marker": "o", "label": "REC (acc@0.5)"},
               "vqa": {"color": "tab:blue", "marker": "s", "label": "VQA (accuracy)"}}


def plot_ablation(table: str | Path | pd.DataFrame, path: str | Path | None = None, *,
                  metrics: Mapping[str, str] | None = None, title: str | None = None, ax: object | None = None,
                  xlabel: str = "corruption strength") -> object:
    """Draw one line per task; with `path`, save it as PNG and PDF. Returns the figure.

    The x axis is symmetric-log, linear within the smallest nonzero |strength|, so that fractions
    (0, 0.01, 0.1, 1) and shifts (-16 .. 64) both spread out and 0 stays on the axis.
    """
    import matplotlib

    if path is not None and ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt


    data = pd.read_csv(table) if isinstance(table, (str, Path)) else table
    metrics = dict(metrics or HEADLINE)
    if ax is None:
        figure, ax = plt.subplots(figsize=(4.8, 3.4))
    else:
        figure = ax.figure
    for task, metric in metrics.items():
        curve = data[(data.task == task) & (data.metric == metric)].sort_values("strength")
        if curve.empty:
            continue
        style = TASK_STYLES.get(task, {"label": f"{task} ({metric})"})
        ax.plot(curve.strength, curve.value, **style)
        ax.fill_between(curve.strength, curve.ci_low, curve.ci_high, color=style.get("color"), alpha=0.15, lw=0)
    nonzero = data.strength[data.strength != 0].abs()
    if len(nonzero):
        ax.set_xscale("symlog", linthresh=float(nonzero.min()))
    ticks = sorted(set(data.strength))
    ax.set_xticks(ticks, [f"{tick:g}" for tick in ticks], rotation=45 if len(ticks) > 6 else 0)
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    if path is not None:
        path = Path(path)
        figure.tight_layout()
        figure.savefig(path.with_suffix(".png"), dpi=150, bbox_inches="tight")
        figure.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
        plt.close(figure)
    return figure
