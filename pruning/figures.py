"""The pruning figure: headline accuracy against the fraction of visual tokens pruned, one panel per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from grounding.tasks import HEADLINE

POLICY_STYLES = {"keep": {"color": "tab:green", "marker": "o", "label": "keep (GAP)"},
                 "reassign": {"color": "tab:red", "marker": "s", "label": "reassign (emit order)"},
                 "reassign-raster": {"color": "tab:orange", "marker": "^", "label": "reassign (raster order)"},
                 "compact": {"color": "tab:blue", "marker": "v", "label": "compact (first n slots' IDs)"}}


def _pyplot(path: str | Path | None) -> object:
    """matplotlib's pyplot, on the file-only Agg backend when the figure goes to a file."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _legend(figure: object, ax: object, fontsize: float) -> None:
    """One legend on `ax` for every line of the figure: a policy run for one method only (`reassign-raster`
    for the score-order emitters) is drawn in that method's panel, not necessarily the first."""
    entries: dict[str, object] = {}
    for panel in figure.axes:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    ax.legend(list(entries.values()), list(entries), fontsize=fontsize)


def _finish(figure: object, path: str | Path | None, title: str | None) -> object:
    """Title and lay out `figure`; with a `path`, save it as PNG and PDF beside each other and close it."""
    import matplotlib.pyplot as plt

    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if path is not None:
        path = Path(path)
        figure.savefig(path.with_suffix(".png"), dpi=150, bbox_inches="tight")
        figure.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
        plt.close(figure)
    return figure


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
    plt = _pyplot(path)
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
    _legend(figure, axes[0][0], 7)
    return _finish(figure, path, title)


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
    plt = _pyplot(path)

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
    _legend(figure, axes[0][0], 6)
    return _finish(figure, path, title)


def plot_attention(table: pd.DataFrame, gains: pd.DataFrame, path: str | Path | None = None, *,
                   title: str | None = None) -> object:
    """Top, a panel per (method, budget): the answer's share of visual attention on the referent per LLM
    layer, unpruned and under each policy, with 95% CIs. Bottom, the same panel's runs: that share (layer
    mean) on the samples the run gains over the unpruned model and on the others, under the run (filled)
    and under the unpruned model on the same samples (hollow). Tables from `pruning.attention`."""
    plt = _pyplot(path)

    unpruned = table[table.method == "unpruned"].sort_values("layer")
    panels = list(table[table.method != "unpruned"][["method", "budget"]].drop_duplicates().itertuples(
        index=False, name=None)) or [("unpruned", "0")]
    figure, axes = plt.subplots(2, len(panels), figsize=(3.0 * len(panels), 5.6), squeeze=False)
    for column, (method, budget) in enumerate(panels):
        top, bottom = axes[0][column], axes[1][column]
        curves = [("unpruned", unpruned, {"color": "0.4", "marker": "D", "label": "unpruned"})]
        curves += [(policy, table[(table.method == method) & (table.budget == budget) & (table.positions == policy)]
                    .sort_values("layer"), style) for policy, style in POLICY_STYLES.items()]
        for _, curve, style in curves:
            if curve.empty:
                continue
            top.plot(curve.layer, curve.referent_of_visual, color=style["color"], marker=style["marker"], ms=3,
                     lw=1, label=style["label"])
            top.fill_between(curve.layer, curve.referent_of_visual_low, curve.referent_of_visual_high,
                             color=style["color"], alpha=0.15, lw=0)
        top.set_title(f"{method} {budget}", fontsize=9)
        top.set_xlabel("LLM layer")
        rows = gains[(gains.method == method) & (gains.budget == budget)]
        for slot, row in enumerate(rows.itertuples()):
            style = POLICY_STYLES.get(row.positions, {"color": "0.2"})
            for value, low, high, filled in ((row.run, row.run_low, row.run_high, True),
                                             (row.unpruned, row.unpruned_low, row.unpruned_high, False)):
                x = slot + (0 if filled else 0.3)
                bottom.errorbar([x], [value], yerr=[[value - low], [high - value]], fmt="o", color=style["color"],
                                mfc=style["color"] if filled else "white", ms=4, capsize=2, lw=1)
        bottom.set_xticks([slot + 0.15 for slot in range(len(rows))],
                          [f"{r.positions}\n{r.group} n={r.n}" for r in rows.itertuples()], fontsize=6)
    axes[0][0].set_ylabel("referent's share of\nvisual attention")
    axes[1][0].set_ylabel("layer mean: run (filled),\nunpruned (hollow)")
    _legend(figure, axes[0][0], 6)
    return _finish(figure, path, title)


TOWER_COLORS = ("tab:blue", "tab:purple", "tab:brown", "tab:olive")


def plot_recovery(tables: dict[str, pd.DataFrame], path: str | Path | None = None, *,
                  methods: Sequence[str] | None = None, paper: float | None = None, title: str | None = None) -> object:
    """A panel per method: the share of renumbering's loss GAP gives back against the fraction pruned, one
    line per model (`tables`: name -> `pruning.recovery.gap_recovery`'s table), with 95% CIs; `paper` marks
    a quoted reference at 50%."""
    plt = _pyplot(path)

    present = list(dict.fromkeys(m for table in tables.values() for m in table.method))
    methods = [m for m in methods if m in present] if methods else present
    figure, axes = plt.subplots(1, len(methods), figsize=(2.9 * len(methods), 2.9), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for color, (name, table) in zip(TOWER_COLORS, tables.items()):
            rows = table[(table.method == method) & (table.budget != "adaptive")].copy()
            rows["pruned"] = rows.budget.astype(float)
            rows = rows.sort_values("pruned")
            ax.errorbar(rows.pruned, rows.given_back, yerr=[rows.given_back - rows.given_back_low,
                                                            rows.given_back_high - rows.given_back],
                        color=color, marker="o", ms=4, capsize=2, lw=1, label=name)
        if paper is not None:
            ax.plot([0.5], [paper], marker="*", color="black", ms=8, ls="none", label="LLaVA-1.5-7B (paper)")
        ax.axhline(1.0, color="0.6", ls=":", lw=1)
        ax.axhline(0.0, color="0.6", lw=0.5)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("fraction of visual tokens pruned")
    axes[0][0].set_ylabel("share of the REC loss\nGAP gives back")
    _legend(figure, axes[0][0], 6)
    return _finish(figure, path, title)
