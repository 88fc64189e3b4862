"""What each of an image's visual tokens is and where it comes from: the token map every adapter gives.

LLaVA-1.5, Shikra and Qwen2-VL feed one crop's tokens in raster order over one grid (`VisualTokens.raster`).
LLaVA-NeXT feeds its base crop (the whole image squashed to the tower's square) in raster order, then its anyres
tiles stitched into one canvas, unpadded to the image's aspect ratio, row by row with an `image_newline` token
after each row (`VisualTokens.llava_next`). Per token, in the order the LLM reads them:

- `kind`: `BASE`, `TILE` or `NEWLINE`;
- `crop`: 0 for the base crop, 1 for the tile canvas;
- `row`, `col`: its cell on its crop's grid (`grids[crop]`); a newline has its tile row and the column just
  past the canvas's last;
- `tower_pass`, `tower_patch`: which of the image's vision-tower passes made it and which of that pass's patches
  it is (LLaVA-NeXT: pass 0 is the base crop, pass 1 + i the i-th tile in raster order); -1 for a newline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BASE, TILE, NEWLINE = 0, 1, 2
KIND_NAMES = ("base", "tile", "newline")


@dataclass(frozen=True)
class VisualTokens:
    kind: torch.Tensor  # (N,) BASE / TILE / NEWLINE
    crop: torch.Tensor  # (N,)
    row: torch.Tensor  # (N,)
    col: torch.Tensor  # (N,)
    grids: tuple[tuple[int, int], ...]  # per crop: (rows, cols)
    tower_pass: torch.Tensor | None = None  # (N,)
    tower_patch: torch.Tensor | None = None  # (N,)

    @classmethod
    def raster(cls, rows: int, cols: int) -> VisualTokens:
        """One crop's rows x cols tokens in raster order (LLaVA-1.5, Shikra, Qwen2-VL)."""
        index = torch.arange(rows * cols)
        return cls(torch.full_like(index, BASE), torch.zeros_like(index), index // cols, index % cols,
                   ((rows, cols),), torch.zeros_like(index), index)

    @classmethod
    def llava_next(cls, base: tuple[int, int], canvas: tuple[int, int], tiles: tuple[int, int] = (1, 1),
                   offset: tuple[int, int] = (0, 0)) -> VisualTokens:
        """LLaVA-NeXT's span: the `base` grid in raster order, then each row of the unpadded tile `canvas`
        followed by its newline token. The canvas is cut from `tiles` (rows, cols) of tiles of the base grid's
        size, its unpadding having removed `offset` (top, left) cells."""
        first = cls.raster(*base)
        rows, cols = canvas
        row = torch.arange(rows).repeat_interleave(cols + 1)
        col = torch.arange(cols + 1).repeat(rows)
        kind = torch.where(col == cols, NEWLINE, TILE)
        side_rows, side_cols = base
        padded_row, padded_col = row + offset[0], col + offset[1]
        tile = (padded_row // side_rows) * tiles[1] + padded_col // side_cols
        patch = (padded_row % side_rows) * side_cols + padded_col % side_cols
        newline = kind == NEWLINE
        return cls(torch.cat([first.kind, kind]), torch.cat([first.crop, torch.ones_like(row)]),
                   torch.cat([first.row, row]), torch.cat([first.col, col]), (tuple(base), (rows, cols)),
                   torch.cat([first.tower_pass, torch.where(newline, -1, 1 + tile)]),
                   torch.cat([first.tower_patch, torch.where(newline, -1, patch)]))

    @property
    def count(self) -> int:
        return len(self.kind)

    @property
    def grid(self) -> tuple[int, int] | None:
        """The one grid the tokens tile in raster order, or None (a base crop and tiles with newlines)."""
        if len(self.grids) != 1 or bool((self.kind != BASE).any()):
            return None
        return self.grids[0]

    def counts(self) -> dict[str, int]:
        """Tokens of each kind."""
        return {name: int((self.kind == code).sum()) for code, name in enumerate(KIND_NAMES)}
