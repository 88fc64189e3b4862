"""How much of what renumbering loses GAP gives back, per method and budget, with paired bootstrap CIs.

    from pruning.recovery import gap_recovery
    table = gap_recovery("results/pruning/contrastive")          # REC acc@0.5 by default

For each (method, budget) of a `pruning.evaluate` directory with the unpruned run and both the `reassign`
and `keep` runs, on the samples all three scored:

- `given_back`: (keep - reassign) / (unpruned - reassign), the share of renumbering's loss GAP recovers
  (the paper's LLaVA-1.5 RefCOCO 50%: (51.42 - 15.34) / (56.14 - 15.34) = 88%);
- `keep_minus_unpruned`: whether GAP beats the unpruned model, and `keep_wins` / `unpruned_wins`: the
  samples only one of the two gets right.

The CIs resample samples jointly across the three runs (the same samples in every resample).

`policy_difference(out, "keep", "compact")` compares two position policies the same way: per (method, budget),
the mean of `a - b` over the samples both scored, with a paired CI (which M-RoPE IDs grounding needs, say).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from grounding.metrics import bootstrap_means, percentile_interval
from grounding.records import scored_records

COLUMNS = ("method", "budget", "n", "unpruned", "reassign", "keep", "given_back", "given_back_low",
           "given_back_high", "keep_minus_unpruned", "keep_minus_unpruned_low", "keep_minus_unpruned_high",
           "keep_wins", "unpruned_wins")


def sample_scores(run: Path, task: str, threshold: float = 0.5) -> dict[int, float]:
    """Each scored sample's hit in a run directory: IoU >= `threshold` for REC, the exact match for VQA."""
    return {index: float(record["iou"] >= threshold) if task == "rec" else float(record["correct"])
            for index, record in scored_records(run).items()}


def gap_recovery(out: str | Path, *, task: str = "rec", threshold: float = 0.5, resamples: int = 1000,
                 seed: int = 0) -> pd.DataFrame:
    """One row per (method, budget) of `out` that has both a reassign and a keep run (module docstring)."""
    root = Path(out) / task
    if not (root / "unpruned").is_dir():
        raise ValueError(f"{root / 'unpruned'}: missing; give a pruning.evaluate directory with the {task} task")
    unpruned = sample_scores(root / "unpruned", task, threshold)
    rows = []
    for keep_dir in sorted(root.glob("*/*/keep")):
        reassign_dir = keep_dir.parent / "reassign"
        if not reassign_dir.is_dir():
            continue
        keep, reassign = sample_scores(keep_dir, task, threshold), sample_scores(reassign_dir, task, threshold)
        shared = sorted(set(unpruned) & set(keep) & set(reassign))
        u, r, k = (np.array([scores[i] for i in shared]) for scores in (unpruned, reassign, keep))
        draws = bootstrap_means({"kr": k - r, "ur": u - r, "ku": k - u}, resamples=resamples, seed=seed)
        with np.errstate(invalid="ignore", divide="ignore"):
            given_back_draws = draws[:, 0] / draws[:, 1]
        lost = (u - r).mean()
        config = json.loads((keep_dir / "config.json").read_text())
        rows.append({"method": config["method"], "budget": config["budget"], "n": len(shared),
                     "unpruned": u.mean(), "reassign": r.mean(),
                     "keep": k.mean(), "given_back": (k - r).mean() / lost if lost else float("nan"),
                     **dict(zip(("given_back_low", "given_back_high"), percentile_interval(given_back_draws))),
                     "keep_minus_unpruned": (k - u).mean(),
                     **dict(zip(("keep_minus_unpruned_low", "keep_minus_unpruned_high"),
                                percentile_interval(draws[:, 2]))),
                     "keep_wins": int(((k == 1) & (u == 0)).sum()), "unpruned_wins": int(((u == 1) & (k == 0)).sum())})
    return pd.DataFrame(rows, columns=list(COLUMNS))



def policy_difference(out: str | Path, a: str, b: str, *, task: str = "rec", threshold: float = 0.5,
                      resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (method, budget) of `out` run under both policies `a` and `b`: their scores on the samples
    both scored and `difference` = a - b with a paired 95% bootstrap CI."""
    root = Path(out) / task
    rows = []
    for a_dir in sorted(root.glob(f"*/*/{a}")):
        b_dir = a_dir.parent / b
        if not b_dir.is_dir():
            continue
        first, second = sample_scores(a_dir, task, threshold), sample_scores(b_dir, task, threshold)
        shared = sorted(set(first) & set(second))
        x, y = (np.array([scores[i] for i in shared]) for scores in (first, second))
        draws = bootstrap_means({"difference": x - y}, resamples=resamples, seed=seed)
        config = json.loads((a_dir / "config.json").read_text())
        low, high = percentile_interval(draws[:, 0])
        rows.append({"method": config["method"], "budget": config["budget"], "n": len(shared), a: x.mean(),
                     b: y.mean(), "difference": (x - y).mean(), "difference_low": low, "difference_high": high})
    if not rows:
        raise ValueError(f"{root}: no (method, budget) run under both {a!r} and {b!r}")
    return pd.DataFrame(rows)
