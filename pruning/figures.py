"""The pruning figure: headline accuracy against the fraction of visual tokens pruned, one panel per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
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


def coverage_bins(coverage: pd.Series, full: float = 1.0) -> pd.Series:
    """Each referent's patch coverage as a bin: none kept, under half, half or more, fully kept (>= `full`)."""
    bins = pd.Series(np.select([coverage >= full, coverage >= 0.5, coverage > 0], ["full", ">=1/2", "<1/2"], "none"),
                     index=coverage.index)
    return pd.Categorical(bins, categories=COVERAGE_BINS, ordered=True)


COVERAGE_BINS = ("none", "<1/2", ">=1/2", "full")


def plot_coverage(table: pd.DataFrame, path: str | Path | None = None, *, full: float = 1.0,
                  positions: Sequence[str] | None = None, title: str | None = None) -> object:
    """A panel per (method, budget): REC accuracy against how much of the referent was kept, for the
    unpruned model on the same samples and for each position policy, with 95% bootstrap CIs; the
    samples per bin under each axis label. `table` is `pruning.coverage.coverage_table`'s."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from grounding.metrics import bootstrap_intervals

    data = table.copy()
    data["bin"] = coverage_bins(data.patch_coverage, full)
    policies = [p for p in (positions or POLICY_STYLES) if p in set(data.positions)]
    panels = list(data[["method", "budget"]].drop_duplicates().itertuples(index=False, name=None))
    figure, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 2.9), sharey=True, squeeze=False)
    for ax, (method, budget) in zip(axes[0], panels):
        panel = data[(data.method == method) & (data.budget == budget)]
        counts = panel[panel.positions == policies[0]].groupby("bin", observed=False).size() if policies else None
        series = [("unpruned", panel[panel.positions == policies[0]] if policies else panel, "hit_unpruned",
                   {"color": "0.4", "marker": "D", "label": "unpruned, same samples"})]
        series += [(policy, panel[panel.positions == policy], "hit", POLICY_STYLES[policy]) for policy in policies]
        for offset, (_, rows, column, style) in zip(np.linspace(-0.15, 0.15, len(series)), series):
            xs, ys, lows, highs = [], [], [], []
            for position, name in enumerate(COVERAGE_BINS):
                hits = rows[rows.bin == name][column].to_numpy(float)
                if not len(hits):
                    continue
                low, high = bootstrap_intervals({"hit": hits}, resamples=500)["hit"]
                xs.append(position + offset)
                ys.append(hits.mean())
                lows.append(hits.mean() - low)
                highs.append(high - hits.mean())
            ax.errorbar(xs, ys, yerr=[lows, highs], fmt=style.get("marker", "o"), color=style["color"],
                        label=style["label"], ms=4, capsize=2, lw=1)
        labels = [f"{name}\nn={counts[name] if counts is not None else 0}" for name in COVERAGE_BINS]
        ax.set_xticks(range(len(COVERAGE_BINS)), labels, fontsize=7)
        ax.set_title(f"{method} {budget}", fontsize=9)
        ax.set_xlabel("referent's patches kept")
    axes[0][0].set_ylabel("REC accuracy (IoU >= threshold)")
    axes[0][0].set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=6)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if path is not None:
        path = Path(path)
        figure.savefig(path.with_suffix(".png"), dpi=150, bbox_inches="tight")
        figure.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
        plt.close(figure)
    return figure
