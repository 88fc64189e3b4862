"""Scores per sample and their summary: REC accuracies at IoU thresholds, VQA exact match, bootstrap CIs."""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np

THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """lmms-eval's GQA exact match (`ignore_case`, `ignore_punctuation`), on the stripped answer."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    return normalize_answer(prediction) in {normalize_answer(answer) for answer in answers}


def rec_columns(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-sample values whose means are the REC metrics, over `records` (scored samples)."""
    ious = np.array([record["iou"] for record in records], dtype=float)
    columns = {f"acc@{threshold}": (ious >= threshold).astype(float) for threshold in THRESHOLDS}
    columns["mean_iou"] = ious
    columns["center_acc"] = np.array([record["center_hit"] for record in records], dtype=float)
    columns["parse_failure_rate"] = np.array([not record["parsed"] for record in records], dtype=float)
    return columns


def vqa_columns(records: Sequence[dict]) -> dict[str, np.ndarray]:
    return {"accuracy": np.array([record["correct"] for record in records], dtype=float)}


def bootstrap_means(columns: dict[str, np.ndarray], *, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(resamples, columns) means of each column over samples drawn with replacement, jointly (fixed seed).

    Resampling the columns jointly keeps each sample's values together, so a statistic of several
    means (a difference, a ratio) gets its interval from the same resamples.
    """
    values = np.stack([np.asarray(column, dtype=float) for column in columns.values()], axis=1)  # (n, metrics)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, 100):  # chunks keep memory at 100 x n counts
        counts = rng.multinomial(n, np.full(n, 1 / n), size=min(100, resamples - start))
        means.append(counts @ values / n)
    return np.concatenate(means)


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of a statistic's bootstrap draws (undefined draws, e.g. 0/0, left out)."""
    draws = np.asarray(draws, dtype=float)
    if not np.isfinite(draws).any():
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(draws[np.isfinite(draws)], [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_intervals(columns: dict[str, np.ndarray], *, resamples: int = 1000, level: float = 0.95,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI of each column's mean, resampling samples jointly (fixed seed)."""
    names = list(columns)
    if not names or len(columns[names[0]]) == 0:
        return {name: (float("nan"), float("nan")) for name in names}
    means = bootstrap_means(columns, resamples=resamples, seed=seed)
    return {name: percentile_interval(means[:, i], level) for i, name in enumerate(names)}


def summarize_scores(columns: dict[str, np.ndarray], *, resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """{metric: {"value", "ci95": [low, high], "n"}}."""
    intervals = bootstrap_intervals(columns, resamples=resamples, seed=seed)
    return {name: {"value": float(values.mean()) if len(values) else float("nan"),
                   "ci95": list(intervals[name]), "n": len(values)}
            for name, values in columns.items()}
