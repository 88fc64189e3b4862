"""`spatial`: a uniform lattice over the patch grid, as even as the budget allows."""

from __future__ import annotations

import math

import torch

import mllm
from pruning.registry import Selection, VisionPruning, register_method


def lattice(grid: tuple[int, int], count: int) -> torch.Tensor:
    """`count` raster indices on a near-square lattice over a (rows, cols) grid, centred in its cells."""
    rows, cols = grid
    if count >= rows * cols:
        return torch.arange(rows * cols)
    lattice_rows = min(rows, max(1, round(math.sqrt(count * rows / cols))))
    lattice_cols = min(cols, math.ceil(count / lattice_rows))
    lattice_rows = max(lattice_rows, math.ceil(count / lattice_cols))
    row_at = [math.floor((i + 0.5) * rows / lattice_rows) for i in range(lattice_rows)]
    col_at = [math.floor((j + 0.5) * cols / lattice_cols) for j in range(lattice_cols)]
    cells = torch.tensor([r * cols + c for r in row_at for c in col_at])
    # When the lattice has more cells than the budget, drop evenly spaced ones rather than the last rows.
    pick = torch.linspace(0, len(cells) - 1, count).round().long()
    return cells[pick]


@register_method
class SpatialPruning(VisionPruning):
    """Keeps a uniform lattice of patches, emitted in raster order; the same for every image."""

    name = "spatial"

    def __init__(self) -> None:
        pass

    def select(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int) -> Selection:
        return Selection(lattice(encoding.grid, num_kept).expand(encoding.batch_size, -1))
