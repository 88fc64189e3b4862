"""What pruning kept of the referent, against how REC fared: the part of the loss GAP does not recover.

    python -m pruning.coverage results/pruning/NAME [--policy keep] [--threshold 0.5] [--full 1.0]

Reads a finished `pruning.evaluate` directory (any model): every REC run's records carry the grid of
visual tokens and which of them the LLM saw (`visual_grid`, `visual_kept`), so nothing is rerun. Per
sample and run it measures the referent's **coverage**: the fraction of the target box's patches
(grid cells the box overlaps) that were kept, and the fraction of the box's area lying in kept cells.
Then, per (method, budget), it splits the loss against the unpruned model on the same samples into
the samples whose referent was fully kept (coverage >= `--full`) and the rest:

- `gap`: unpruned accuracy minus the policy's, over all samples;
- `gap_full`: the same over the fully kept samples. If the loss were all missing information it would
  be 0 there: what is left is loss that no kept-patch information explains (the policy's numbering, or
  the missing context around the referent);
- `explained`: the share of `gap` carried by the partly kept samples, sum over them of (unpruned hit -
  policy hit) over the same sum over all samples.

Each comes with a 95% percentile-bootstrap CI over samples. Merged tokens count as their host patch
only: a method's merge weights are not recorded, so the area a merged token summarises is not counted.

It writes OUT/coverage/: `samples.csv` (one row per sample and run), `coverage.csv` (the split, per
method, budget and policy), `coverage.json` (the settings), `coverage.png/.pdf`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from grounding.metrics import bootstrap_means, percentile_interval
from grounding.records import kept_indices, scored_records, write_atomic
from mllm.images import ImageFrame

SUMMARY_COLUMNS = ("method", "budget", "positions", "n", "n_full", "acc_unpruned", "acc", "gap", "gap_low",
                   "gap_high", "acc_unpruned_full", "acc_full", "gap_full", "gap_full_low", "gap_full_high",
                   "acc_unpruned_partial", "acc_partial", "gap_partial", "explained", "explained_low",
                   "explained_high", "mean_patch_coverage")


class CoverageError(ValueError):
    """A pruning directory this analysis cannot read: the message names the file and the field."""


def box_cells(box: Sequence[float], frame: ImageFrame, grid: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Raster indices of the grid cells a pixel box overlaps, and the share of the box's area in each.

    The grid tiles the frame the vision tower saw (`frame`, the image's `mllm.images.ImageFrame`: padded,
    original or cropped); the part of a box outside it (a cropped frame's sides) lies in no cell.
    """
    rows, cols = int(grid[0]), int(grid[1])
    x1, y1, x2, y2 = frame.to_normalized(box)
    area = (x2 - x1) * (y2 - y1)
    if area <= 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    edges_x, edges_y = np.arange(cols + 1) / cols, np.arange(rows + 1) / rows
    overlap_x = np.clip(np.minimum(edges_x[1:], x2) - np.maximum(edges_x[:-1], x1), 0, None)
    overlap_y = np.clip(np.minimum(edges_y[1:], y2) - np.maximum(edges_y[:-1], y1), 0, None)
    shares = (overlap_y[:, None] * overlap_x[None, :]).ravel() / area
    cells = np.flatnonzero(shares > 0)
    return cells, shares[cells]


def referent_coverage(record: dict, frame: str) -> dict[str, float]:
    """How the visual tokens a REC record's run kept cover its target: the share of the box's patches kept
    (`patch_coverage`), the share of its area in kept cells (`area_coverage`), the patches it overlaps
    (`box_patches`) and the tokens kept (`num_kept`). A box in no cell has NaN coverage."""
    rows, cols = record["visual_grid"]
    kept = np.zeros(rows * cols, dtype=bool)
    kept[kept_indices(record["visual_kept"], rows * cols)] = True
    width, height = record["image_size"]
    cells, shares = box_cells(record["target"], ImageFrame.for_image(frame, width, height), (rows, cols))
    covered = kept[cells]
    return {"patch_coverage": float(covered.mean()) if len(cells) else float("nan"),
            "area_coverage": float(shares[covered].sum()) if len(cells) else float("nan"),
            "box_patches": len(cells), "num_kept": int(kept.sum())}


def _run_records(run: Path) -> tuple[dict, dict[int, dict]]:
    config_file = run / "config.json"
    if not config_file.is_file():
        raise CoverageError(f"{config_file}: missing (not a grounding run directory)")
    config = json.loads(config_file.read_text())
    records = scored_records(run)
    for index, record in records.items():
        for name in ("visual_grid", "visual_kept"):
            if name not in record:
                raise CoverageError(f"{run}/samples.jsonl: sample {index} has no field {name!r} (written before "
                                    "records said which visual tokens were kept); rerun into a new --out")
        if record["visual_grid"] is None:
            raise CoverageError(f"{run}/samples.jsonl: sample {index} has 'visual_grid' null: its visual tokens are "
                                "no single grid (a base crop and tiles with newlines), which coverage cannot map yet")
    return config, records


def coverage_table(out: str | Path, *, threshold: float = 0.5) -> pd.DataFrame:
    """One row per (REC sample, pruned run) of `out`: the referent's coverage, the run's IoU and hit, the
    unpruned model's on the same sample."""
    out = Path(out)
    unpruned_dir = out / "rec" / "unpruned"
    if not unpruned_dir.is_dir():
        raise CoverageError(f"{unpruned_dir}: missing; give a pruning.evaluate directory with the rec task")
    _, unpruned = _run_records(unpruned_dir)
    rows = []
    for config_file in sorted((out / "rec").glob("*/*/*/config.json")):
        config, records = _run_records(config_file.parent)
        frame = config["prompt_style"]["image_frame"]
        for index, record in records.items():
            if index not in unpruned:
                continue
            base = unpruned[index]
            rows.append({"method": config["method"], "budget": config["budget"], "positions": config["positions"],
                         "index": index, "id": record["id"], "kind": (record.get("meta") or {}).get("kind"),
                         **referent_coverage(record, frame), "iou": record["iou"], "hit": record["iou"] >= threshold,
                         "iou_unpruned": base["iou"], "hit_unpruned": base["iou"] >= threshold})
    table = pd.DataFrame(rows)
    if table.empty:
        raise CoverageError(f"{out / 'rec'}: no finished pruned REC runs with records")
    return table.dropna(subset=["patch_coverage"]).reset_index(drop=True)


def explain_gap(table: pd.DataFrame, *, full: float = 1.0, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (method, budget, positions): the loss against the unpruned model, split by whether the referent
    was fully kept (see the module docstring), with bootstrap CIs."""
    rows = []
    for (method, budget, positions), group in table.groupby(["method", "budget", "positions"], sort=True):
        hit, base = group.hit.to_numpy(float), group.hit_unpruned.to_numpy(float)
        whole = (group.patch_coverage >= full).to_numpy(float)
        lost = base - hit
        columns = {"lost": lost, "lost_partial": lost * (1 - whole), "lost_full": lost * whole, "full": whole}
        draws = bootstrap_means(columns, resamples=resamples, seed=seed)
        lost_d, partial_d, full_lost_d, full_d = draws.T
        with np.errstate(invalid="ignore", divide="ignore"):
            explained_d = partial_d / lost_d
            gap_full_d = full_lost_d / full_d
        n_full = int(whole.sum())
        full_rows, partial_rows = whole == 1, whole == 0

        def mean(values: np.ndarray, rows: np.ndarray) -> float:
            return float(values[rows].mean()) if rows.any() else float("nan")

        gap_full = mean(lost, full_rows)
        explained = float(columns["lost_partial"].sum() / lost.sum()) if lost.sum() else float("nan")
        rows.append({"method": method, "budget": budget, "positions": positions, "n": len(group), "n_full": n_full,
                     "acc_unpruned": base.mean(), "acc": hit.mean(), "gap": lost.mean(),
                     **dict(zip(("gap_low", "gap_high"), percentile_interval(lost_d))),
                     "acc_unpruned_full": mean(base, full_rows), "acc_full": mean(hit, full_rows),
                     "gap_full": gap_full,
                     **dict(zip(("gap_full_low", "gap_full_high"), percentile_interval(gap_full_d))),
                     "acc_unpruned_partial": mean(base, partial_rows), "acc_partial": mean(hit, partial_rows),
                     "gap_partial": mean(lost, partial_rows), "explained": explained,
                     **dict(zip(("explained_low", "explained_high"), percentile_interval(explained_d))),
                     "mean_patch_coverage": float(group.patch_coverage.mean())})
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def run_coverage(out: str | Path, *, threshold: float = 0.5, full: float = 1.0, resamples: int = 1000,
                 seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-sample table and the split for every pruned REC run of `out`, written to OUT/coverage/."""
    out = Path(out)
    table = coverage_table(out, threshold=threshold)
    summary = explain_gap(table, full=full, resamples=resamples, seed=seed)
    target = out / "coverage"
    target.mkdir(parents=True, exist_ok=True)
    write_atomic(target / "samples.csv", table.to_csv(index=False))
    write_atomic(target / "coverage.csv", summary.to_csv(index=False))
    settings = {"source": str(out), "threshold": threshold, "full": full, "resamples": resamples, "seed": seed,
                "command": f"python -m pruning.coverage {out} --threshold {threshold} --full {full}"}
    write_atomic(target / "coverage.json", json.dumps(settings, indent=2) + "\n")
    return table, summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pruning.coverage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a pruning.evaluate output directory")
    parser.add_argument("--threshold", type=float, default=0.5, help="IoU for a hit (ACC@threshold)")
    parser.add_argument("--full", type=float, default=1.0, help="patch coverage counted as fully kept")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--positions", help="comma-separated policies to draw (default: all present)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from pruning.figures import plot_coverage

    try:
        table, summary = run_coverage(args.out, threshold=args.threshold, full=args.full, resamples=args.bootstrap)
    except CoverageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    positions = args.positions.split(",") if args.positions else None
    plot_coverage(table, args.out / "coverage" / "coverage.png", full=args.full, positions=positions)
    columns = ["method", "budget", "positions", "n", "n_full", "gap", "gap_full", "explained"]
    print(summary[columns].to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    print(f"wrote {args.out / 'coverage'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
