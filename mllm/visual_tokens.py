"""What each of an image's visual tokens is and where it comes from: the token map every adapter gives.

LLaVA-1.5, Shikra and Qwen2-VL feed one crop's tokens in raster order over one grid (`VisualTokens.raster`).
LLaVA-NeXT feeds its base crop (the whole image squashed to the tower's square) in raster order, then its anyres
tiles stitched into one canvas, unpadded to the image's aspect ratio, row by row with an `image_newline` token
after each row (`VisualTokens.llava_next`). Per token, in the order the LLM reads them:

- `kind`: `BASE`, `TILE` or `NEWLINE`;
- `crop`: 0 for the base crop, 1 for the tile canvas;
- `row`, `col`: its cell on its crop's grid (`grids[crop]`); a newline has its tile row and the column just
  past the canvas's last.
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

    @classmethod
    def raster(cls, rows: int, cols: int) -> VisualTokens:
        """One crop's rows x cols tokens in raster order (LLaVA-1.5, Shikra, Qwen2-VL)."""
        index = torch.arange(rows * cols)
        return cls(torch.full_like(index, BASE), torch.zeros_like(index), index // cols, index % cols,
                   ((rows, cols),))

    @classmethod
    def llava_next(cls, base: tuple[int, int], canvas: tuple[int, int]) -> VisualTokens:
        """LLaVA-NeXT's span: the `base` grid in raster order, then each row of the unpadded tile `canvas`
        followed by its newline token."""
        first = cls.raster(*base)
        rows, cols = canvas
        row = torch.arange(rows).repeat_interleave(cols + 1)
        col = torch.arange(cols + 1).repeat(rows)
        kind = torch.where(col == cols, NEWLINE, TILE)
        return cls(torch.cat([first.kind, kind]), torch.cat([first.crop, torch.ones_like(row)]),
                   torch.cat([first.row, row]), torch.cat([first.col, col]), (tuple(base), (rows, cols)))

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
