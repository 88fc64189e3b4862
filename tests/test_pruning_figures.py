"""The pruning figures draw, and name in their legend, every position policy a run can use."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from pruning.apply import POSITIONS
from pruning.figures import POLICY_STYLES, plot_attention, plot_pruning

matplotlib.use("Agg")


def test_every_position_policy_has_a_style():
    assert set(POLICY_STYLES) == set(POSITIONS)


def pruning_table() -> pd.DataFrame:
    """Two methods, REC only: `random` under reassign, compact and keep, `text-visual` under reassign-raster too."""
    rows = [{"method": "unpruned", "budget": 0.0, "positions": "none", "value": 0.7}]
    for method, policies in (("random", ("reassign", "compact", "keep")),
                             ("text-visual", ("reassign", "reassign-raster", "compact", "keep"))):
        for budget in (0.5, 0.75):
            rows += [{"method": method, "budget": budget, "positions": policy, "value": 0.3 + 0.1 * i}
                     for i, policy in enumerate(policies)]
    table = pd.DataFrame(rows).assign(task="rec", metric="acc@0.5")
    table["ci_low"], table["ci_high"] = table.value - 0.02, table.value + 0.02
    table["num_visual"] = 64.0
    table["tokens_fed"] = 64.0 * (1 - table.budget)
    table["tokens_layer_mean"] = table.tokens_fed
    return table


def legend_labels(figure) -> set[str]:
    return {text.get_text() for ax in figure.axes if ax.get_legend() is not None for text in ax.get_legend().texts}


def test_pruning_figure_draws_every_policy_and_names_each_once():
    figure = plot_pruning(pruning_table(), methods=["random", "text-visual"])
    random_panel, text_panel = figure.axes
    labelled = [line.get_label() for line in text_panel.get_lines() if not line.get_label().startswith("_")]
    assert sorted(labelled) == sorted([POLICY_STYLES[p]["label"] for p in POSITIONS] + ["unpruned"])
    assert POLICY_STYLES["reassign-raster"]["label"] not in [line.get_label() for line in random_panel.get_lines()]
    legend = random_panel.get_legend()
    assert legend is not None and len(legend.texts) == 5  # the four policies and the unpruned line, once each
    assert legend_labels(figure) == {POLICY_STYLES[p]["label"] for p in POSITIONS} | {"unpruned"}
    plt.close(figure)


def test_attention_figure_draws_compact():
    layers = [0, 1]
    rows = [{"method": "unpruned", "budget": "0", "positions": "none", "layer": layer} for layer in layers]
    rows += [{"method": "random", "budget": "0.5", "positions": policy, "layer": layer}
             for policy in ("reassign", "compact", "keep") for layer in layers]
    table = pd.DataFrame(rows).assign(referent_of_visual=0.3, referent_of_visual_low=0.25, referent_of_visual_high=0.35)
    gains = pd.DataFrame([{"method": "random", "budget": "0.5", "positions": policy, "group": group, "n": 10,
                           "run": 0.3, "run_low": 0.2, "run_high": 0.4, "unpruned": 0.3, "unpruned_low": 0.2,
                           "unpruned_high": 0.4} for policy in ("reassign", "compact", "keep")
                          for group in ("gains", "others")])
    figure = plot_attention(table, gains)
    assert legend_labels(figure) == {"unpruned", *(POLICY_STYLES[p]["label"] for p in ("reassign", "compact", "keep"))}
    plt.close(figure)
