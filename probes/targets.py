"""What a position probe predicts, and how far off a prediction is, on a (rows, cols) patch grid.

Every label starts as the patch's raster index (row * cols + col). A target is what the probe is
asked for: the index itself, its row, its column, or the (row, col) pair as a 2-D regression.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Target = Literal["index", "row", "col", "rowcol"]
TARGETS: tuple[str, ...] = ("index", "row", "col", "rowcol")
METRICS: tuple[str, ...] = ("accuracy", "top5", "manhattan")


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown probe target {target!r}; choose one of {TARGETS}")


def patch_labels(num_images: int, grid: tuple[int, int]) -> np.ndarray:
    """(num_images * rows * cols,) raster indices, image-major, as the store flattens its patches."""
    rows, cols = grid
    return np.tile(np.arange(rows * cols), num_images)


def target_values(index: np.ndarray, target: str, grid: tuple[int, int]) -> np.ndarray:
    """The probe's targets for raster indices `index`: class labels, or (n, 2) rows and cols for `rowcol`."""
    check_target(target)
    _, cols = grid
    row, col = np.divmod(np.asarray(index), cols)
    return {"index": index, "row": row, "col": col, "rowcol": np.stack([row, col], axis=-1)}[target]


def num_classes(target: str, grid: tuple[int, int]) -> int:
    rows, cols = grid
    return {"index": rows * cols, "row": rows, "col": cols, "rowcol": 0}[target]


def distance(predicted: np.ndarray, index: np.ndarray, target: str, grid: tuple[int, int]) -> np.ndarray:
    """Manhattan distance in patches between predictions (in the target's space) and true raster indices."""
    truth = target_values(index, target, grid)
    if target == "index":
        return np.abs(np.stack(np.divmod(predicted, grid[1])) - np.stack(np.divmod(truth, grid[1]))).sum(axis=0)
    if target == "rowcol":
        return np.abs(predicted - truth).sum(axis=-1)
    return np.abs(predicted - truth)


def chance(target: str, grid: tuple[int, int]) -> dict[str, float]:
    """Expected metrics of a guess drawn uniformly from the target's values, with every position equally likely."""
    rows, cols = grid
    positions = np.arange(rows * cols)
    if target == "rowcol":
        guesses = np.stack(np.divmod(positions, cols), axis=-1)
    else:
        guesses = np.arange(num_classes(target, grid))
    distances = np.stack([distance(np.broadcast_to(guess, (len(positions), *np.shape(guess))), positions, target, grid)
                          for guess in guesses])  # (guesses, positions)
    hits = (distances == 0).mean()
    top5 = float("nan") if target == "rowcol" else min(5, len(guesses)) / len(guesses)
    return {"accuracy": float(hits), "top5": top5, "manhattan": float(distances.mean())}
