"""The pruning figure: headline accuracy against the fraction of visual tokens pruned, one panel per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from grounding.tasks import HEADLINE

POLICY_STYLES = {"keep": {"color": "tab:green", "marker": "o", "label": "keep (GAP)"},
                 "reassign": {"color": "tab:red", "marker": "s", "label": "reassign (emit order)"},
                 "reassign-raster": {"color": "tab:orange", "marker": "^", "label": "reassign (raster order)"}}


def plot_pruning(table: str | Path | pd.DataFrame, path: str | Path | None = None, *,
                 tasks: tuple[str, ...] = ("rec", "vqa"), methods: Sequence[str] | None = None,
                 title: str | None = None) -> object:
    """A row per task present, a panel per method: the task's headline metric against the fraction pruned.

    `methods` orders the panels (default: as they come in the table). The fraction pruned is measured:
    1 - the visual tokens the LLM's layers saw on average / visual tokens. Adaptive methods sit where
    they landed, and in-LLM methods where their compute says (FastV at 50% after layer 2 of 4 sits at
    25%; SparseVLM's budget is this average already). The unpruned model is the dotted line in every
    panel and the first point of every curve.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = pd.read_csv(table) if isinstance(table, (str, Path)) else table.copy()
    data["pruned"] = 1 - data.tokens_layer_mean.fillna(data.tokens_fed) / data.num_visual
    tasks = [task for task in tasks if (data.task == task).any()] or ["rec"]
    present = [method for method in dict.fromkeys(data.method) if method != "unpruned"]
    methods = [method for method in methods if method in present] if methods else present
    methods = methods or ["unpruned"]
    sns.set_theme(style="whitegrid", context="paper")
    figure, axes = plt.subplots(len(tasks), len(methods), figsize=(2.8 * len(methods), 2.8 * len(tasks)),
                                sharey=True, squeeze=False)
    for row, task in enumerate(tasks):
        rows = data[(data.task == task) & (data.metric == HEADLINE[task])]
        unpruned = rows[rows.method == "unpruned"]
        for ax, method in zip(axes[row], methods):
            for policy, style in POLICY_STYLES.items():
                curve = rows[(rows.method == method) & (rows.positions == policy)]
                if curve.empty:
                    continue
                curve = pd.concat([unpruned, curve]).sort_values("pruned")  # every curve starts unpruned
                sns.lineplot(x=curve.pruned.to_numpy(), y=curve.value.to_numpy(), ax=ax, errorbar=None, **style)
                ax.fill_between(curve.pruned, curve.ci_low, curve.ci_high, color=style["color"], alpha=0.15, lw=0)
            if not unpruned.empty:
                ax.axhline(float(unpruned.value.iloc[0]), color="0.4", linestyle=":", label="unpruned")
            ax.set_title(method, fontsize=9)
            ax.set_xlabel("visual tokens pruned\n(mean over LLM layers)" if row == len(tasks) - 1 else "")
            ax.set_xlim(-0.02, 1.0)
            if ax.get_legend() is not None:
                ax.get_legend().remove()
        axes[row][0].set_ylabel(f"{task.upper()} {HEADLINE[task]}")
    axes[0][0].set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if path is not None:
        path = Path(path)
        figure.savefig(path.with_suffix(".png"), dpi=150, bbox_inches="tight")
        figure.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
        plt.close(figure)
    return figure
