"""How far the LLM's rotary embedding turns between visual tokens: what attention can read of a token's row and
column from its position IDs alone.

Each RoPE frequency pair rotates a query or key by ID x frequency, so two visual tokens differ in their IDs only
as far as some pair turns between them. Measured here from the model's own rotary module (rebuilt on the CPU
from its config, so no weights are read) on the image's original IDs, as `mllm.positions` numbers them: for each
frequency pair, the angle between row neighbours, between column neighbours, and between the first and last
row and column of a rows x cols grid. Under LLaVA's 1-D RoPE row neighbours are `cols` IDs apart and column
neighbours one; under Qwen2-VL's M-RoPE a row is one h ID and a column one w ID, and transformers gives the h
and w axes their own (lower) bands of frequencies, which this measures too (`axis`).

    python -m mllm.rotary_reach --model /ckpt/Qwen2-VL-7B-Instruct --grid 36x36 --out results/rotary/qwen2-vl-7b
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import mllm
from mllm.loading import MLLM
from mllm.positions import VisualLayout

AXIS_NAMES = {1: ("1-D",), 3: ("t", "h", "w")}


def cpu_rotary(model: MLLM) -> nn.Module:
    """A copy of the LLM's rotary module on the CPU, built from its config: the model is left as it is (and may
    live on the meta device)."""
    rotary = model.adapter.language_model.rotary_emb
    with torch.device("cpu"):
        return type(rotary)(config=rotary.config)


def _angles(rotary: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(N, pairs) rotation angles of (axes, N) position IDs, one per frequency pair."""
    positions = ids[:, None] if ids.shape[0] > 1 else ids  # (axes, 1, N) for M-RoPE, (1, N) for 1-D
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2  # rotate_half: dims j and j + half share pair j's angle
    return torch.atan2(sin[0, :, :half], cos[0, :, :half])


def _apart(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """|angle between|, wrapped into [0, pi]."""
    return (torch.remainder(second - first + math.pi, 2 * math.pi) - math.pi).abs()


def rotary_reach(model: MLLM, rows: int, cols: int) -> pd.DataFrame:
    """One row per frequency pair: the axis whose ID turns it, its radians per unit ID, and the angle it puts
    between row neighbours, column neighbours, the first and last row, and the first and last column."""
    axes = model.adapter.position_axes
    if axes not in AXIS_NAMES:
        raise ValueError(f"{model.path}: position IDs with {axes} axes; rotary_reach knows 1-D RoPE and M-RoPE")
    layout = VisualLayout.grid(0, rows, cols, 0) if axes == 3 else VisualLayout.sequential(0, rows * cols, 0)
    rotary = cpu_rotary(model)
    angles = _angles(rotary, layout.visual_ids)
    unit = _angles(rotary, torch.eye(axes, dtype=torch.long)) - _angles(rotary, torch.zeros(axes, 1, dtype=torch.long))
    # per pair, the axis whose unit step turns it (M-RoPE gives each pair to one axis)
    axis = [AXIS_NAMES[axes][int(index)] for index in unit.abs().argmax(dim=0)]
    first, right, below = 0, min(1, cols - 1), min(cols, rows * cols - 1)
    last_row, last_col = (rows - 1) * cols, cols - 1
    return pd.DataFrame({
        "pair": range(angles.shape[1]),
        "axis": axis,
        "rad_per_id": unit.abs().max(dim=0).values.numpy(),
        "row_neighbours_rad": _apart(angles[first], angles[below]).numpy(),
        "column_neighbours_rad": _apart(angles[first], angles[right]).numpy(),
        "first_to_last_row_rad": _apart(angles[first], angles[last_row]).numpy(),
        "first_to_last_column_rad": _apart(angles[first], angles[last_col]).numpy(),
    })


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """The largest angle any pair puts between each kind of token pair."""
    columns = ["row_neighbours_rad", "column_neighbours_rad", "first_to_last_row_rad", "first_to_last_column_rad"]
    return {column: float(table[column].max()) for column in columns}


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: write ROWSxCOLS, e.g. 24x24") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: rows and columns must be at least 1")
    return rows, cols


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local checkpoint directory (only its config is read)")
    parser.add_argument("--grid", type=_grid, required=True, help="ROWSxCOLS visual tokens, e.g. 24x24")
    parser.add_argument("--out", type=Path, help="write rotary_reach.csv and summary.json here")
    args = parser.parse_args(argv)
    model = mllm.load(args.model, device="meta", random_weights=True)  # a config's worth of model, no memory
    rows, cols = args.grid
    table = rotary_reach(model, rows, cols)
    summary = {"model": str(args.model), "grid": [rows, cols], "position_axes": model.adapter.position_axes,
               **summarise(table)}
    print(table.groupby("axis", sort=False).rad_per_id.agg(["count", "max", "min"]).to_string())
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "rotary_reach.csv", index=False)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
