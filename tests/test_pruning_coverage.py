"""pruning.coverage: which of the referent's patches a run kept, and how much of the loss that explains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mllm
from grounding.data import load_dataset
from grounding.prompts import prompt_style
from grounding.records import kept_indices, kept_mask, read_records, record_files
from mllm.images import ImageFrame
from pruning.apply import select_tokens
from pruning.budget import Budget
from pruning.coverage import box_cells, explain_gap, main, referent_coverage, run_coverage
from pruning.evaluate import main as evaluate_main
from pruning.registry import make_method

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = ROOT / "data" / "minillava" / "contrastive"
EVAL = ROOT / "data" / "minillava" / "eval"


def test_kept_masks_round_trip_and_refuse_tokens_outside_the_row():
    rng = np.random.default_rng(0)
    for count in (1, 7, 64, 576, 1001):
        kept = sorted(rng.choice(count, size=rng.integers(0, count + 1), replace=False).tolist())
        mask = kept_mask(kept, count)
        assert len(mask) == -(-count // 4) and kept_indices(mask, count) == kept
    assert kept_mask([0, 5], 8) == "21"  # bit i is token i
    with pytest.raises(ValueError, match=r"outside 0\.\.7"):
        kept_mask([8], 8)
    with pytest.raises(ValueError, match="beyond the row's 4"):
        kept_indices("1f", 4)


frame = ImageFrame.for_image


def test_box_cells_share_the_box_among_the_cells_it_overlaps():
    cells, shares = box_cells([0, 0, 8, 8], frame("padded", 64, 64), (8, 8))  # exactly cell 0
    assert cells.tolist() == [0] and shares.tolist() == [1.0]
    cells, shares = box_cells([4, 8, 12, 16], frame("original", 64, 64), (8, 8))  # half of cells 8 and 9
    assert cells.tolist() == [8, 9] and np.allclose(shares, [0.5, 0.5])
    # A 64x32 image padded to 64x64 sits 16 px down: its top-left 8x8 pixels are the top of row 2.
    cells, shares = box_cells([0, 0, 8, 8], frame("padded", 64, 32), (8, 8))
    assert cells.tolist() == [16] and shares.tolist() == [1.0]
    # Cropped to its centre 32x32, a 64x32 image loses its sides: a box on the left edge lies in no cell.
    assert box_cells([0, 0, 8, 8], frame("cropped", 64, 32), (8, 8))[0].size == 0
    assert np.isclose(box_cells([3, 5, 50, 61], frame("padded", 64, 64), (8, 8))[1].sum(), 1.0)


def test_referent_coverage_counts_patches_and_area():
    record = {"visual_grid": [8, 8], "visual_kept": kept_mask([8], 64), "target": [4, 8, 12, 16],
              "image_size": [64, 64]}
    coverage = referent_coverage(record, "original")
    assert coverage == {"patch_coverage": 0.5, "area_coverage": 0.5, "box_patches": 2, "num_kept": 1}


def write_run(directory: Path, config: dict, records: list[dict]) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "samples.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def constructed_pruning_dir(root: Path, fails, *, samples: int = 400, seed: int = 0) -> Path:
    """A pruning directory in `pruning.evaluate`'s layout on an 8x8 grid: the unpruned model always hits;
    under `keep` a sample is hit unless `fails(rng, fully_kept)`; `reassign` misses everything."""
    rng = np.random.default_rng(seed)
    style = {"image_frame": "padded"}
    everything = kept_mask(range(64), 64)
    base, keep, reassign = [], [], []
    for index in range(samples):
        x, y = (int(v) for v in rng.integers(0, 6, size=2))
        target = [8 * x, 8 * y, 8 * x + 16, 8 * y + 16]  # a 2x2-cell referent
        box = {8 * (y + dy) + x + dx for dy in (0, 1) for dx in (0, 1)}
        others = rng.permutation([cell for cell in range(64) if cell not in box])
        kept = (np.array(sorted(box | set(others[:28].tolist()))) if index % 3 == 0  # a third fully kept
                else rng.choice(64, size=32, replace=False))
        fully = box <= set(kept.tolist())
        common = {"index": index, "id": f"s{index}", "text": "x", "target": target, "image_size": [64, 64],
                  "error": None, "visual_grid": [8, 8]}
        base.append({**common, "iou": 1.0, "visual_kept": everything})
        mask = kept_mask(kept.tolist(), 64)
        keep.append({**common, "iou": 0.0 if fails(rng, fully) else 1.0, "visual_kept": mask})
        reassign.append({**common, "iou": 0.0, "visual_kept": mask})
    write_run(root / "rec" / "unpruned", {"method": "unpruned", "prompt_style": style}, base)
    for policy, records in (("keep", keep), ("reassign", reassign)):
        config = {"method": "random", "budget": "0.5", "positions": policy, "prompt_style": style}
        write_run(root / "rec" / "random" / "0.5" / policy, config, records)
    return root


def test_a_predictor_that_fails_exactly_when_the_referent_was_cut_is_explained_by_coverage(tmp_path):
    out = constructed_pruning_dir(tmp_path / "run", lambda rng, fully: not fully)
    table, summary = run_coverage(out, resamples=200)
    keep = summary.set_index("positions").loc["keep"]
    assert 0 < keep.n_full < keep.n and keep.gap > 0.3
    assert keep.gap_full == 0 and keep.gap_full_low == keep.gap_full_high == 0  # no loss on fully kept referents
    assert keep.explained == 1 and keep.explained_low == keep.explained_high == 1
    assert keep.acc_full == 1 and keep.acc_partial == 0
    # reassign misses everything: its loss is as large on fully kept referents, coverage explains only its share
    reassign = summary.set_index("positions").loc["reassign"]
    assert reassign.gap_full == 1
    assert reassign.explained == pytest.approx(1 - keep.n_full / keep.n)
    assert set(table.columns) >= {"patch_coverage", "area_coverage", "iou", "hit", "iou_unpruned", "hit_unpruned"}
    for name in ("samples.csv", "coverage.csv", "coverage.json"):
        assert (out / "coverage" / name).is_file()


def test_a_loss_blind_to_coverage_is_not_explained_by_it(tmp_path):
    out = constructed_pruning_dir(tmp_path / "run", lambda rng, fully: rng.random() < 0.4, samples=2000)
    _, summary = run_coverage(out, resamples=200)
    keep = summary.set_index("positions").loc["keep"]
    assert keep.gap_full == pytest.approx(keep.gap, abs=0.06)  # as large where the referent was fully kept
    share_partial = 1 - keep.n_full / keep.n
    assert keep.explained_low < share_partial < keep.explained_high  # only the partial samples' share


def test_records_written_before_kept_masks_are_refused_by_file_and_field(tmp_path, capsys):
    out = constructed_pruning_dir(tmp_path / "run", lambda rng, fully: False, samples=5)
    run = out / "rec" / "random" / "0.5" / "keep" / "samples.jsonl"
    records = [json.loads(line) for line in run.read_text().splitlines()]
    del records[2]["visual_kept"]
    run.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main([str(out)]) == 2
    error = capsys.readouterr().err
    assert str(run) in error and "'visual_kept'" in error and "sample 2" in error


def test_records_of_tokens_on_no_single_grid_are_refused_by_file_and_field(tmp_path, capsys):
    out = constructed_pruning_dir(tmp_path / "run", lambda rng, fully: False, samples=5)
    run = out / "rec" / "random" / "0.5" / "keep" / "samples.jsonl"
    records = [json.loads(line) for line in run.read_text().splitlines()]
    records[1]["visual_grid"] = None  # what grounding writes for LLaVA-NeXT's base crop and tiles
    run.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main([str(out)]) == 2
    error = capsys.readouterr().err
    assert str(run) in error and "'visual_grid' null" in error and "sample 1" in error


@pytest.fixture(scope="module")
def miniature_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coverage") / "run"
    assert evaluate_main(["--model", str(MINIATURE), "--data", str(EVAL), "--methods", "random,cls-visual",
                          "--ratios", "0.75", "--limit", "24", "--batch-size", "24", "--tasks", "rec",
                          "--out", str(out), "--no-progress", "--bootstrap", "50"]) == 0
    return out


def test_the_miniatures_records_say_which_tokens_the_method_kept(miniature_run):
    model = mllm.load(MINIATURE, device="cpu", dtype="float32")
    dataset = load_dataset("jsonl", EVAL / "rec", "val")
    samples = dataset.samples[:24]
    style = prompt_style("llava-1.5")
    method = make_method("cls-visual")
    encoding = model.encode([sample.image.load() for sample in samples], [style.text("rec", s.text) for s in samples],
                            frame=style.image_frame, **method.encode_options(model))
    selection = select_tokens(model, encoding, method, Budget(pruned=0.75))
    for policy in ("keep", "reassign"):
        records = read_records(record_files(miniature_run / "rec" / "cls-visual" / "0.75" / policy))
        for row, sample in enumerate(samples):
            assert records[sample.index]["visual_grid"] == [8, 8]
            assert kept_indices(records[sample.index]["visual_kept"], 64) == sorted(selection.kept[row].tolist())
    unpruned = read_records(record_files(miniature_run / "rec" / "unpruned"))
    assert all(kept_indices(record["visual_kept"], 64) == list(range(64)) for record in unpruned.values())


def test_the_cli_splits_the_miniatures_loss_by_coverage(miniature_run, capsys):
    assert main([str(miniature_run), "--bootstrap", "100"]) == 0
    summary = pd.read_csv(miniature_run / "coverage" / "coverage.csv")
    assert set(zip(summary.method, summary.positions)) == {(m, p) for m in ("random", "cls-visual")
                                                           for p in ("keep", "reassign")}
    assert (summary.n == 24).all()
    samples = pd.read_csv(miniature_run / "coverage" / "samples.csv")
    assert samples.patch_coverage.between(0, 1).all() and (samples.num_kept == 16).all()
    # the split adds up: the loss is the fully kept samples' share of it plus the rest's
    for row in summary.itertuples():
        parts = (row.n_full * np.nan_to_num(row.gap_full) + (row.n - row.n_full) * np.nan_to_num(row.gap_partial))
        assert parts / row.n == pytest.approx(row.gap)
        expected = explain_gap(samples[(samples.method == row.method) & (samples.positions == row.positions)],
                               resamples=100).iloc[0]
        assert expected.explained == pytest.approx(row.explained, nan_ok=True)
    assert (miniature_run / "coverage" / "coverage.png").stat().st_size > 0
    assert "explained" in capsys.readouterr().out


def test_a_directory_without_the_unpruned_run_or_a_runs_config_is_named(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'rec' / 'unpruned'}: missing" in capsys.readouterr().err
    out = constructed_pruning_dir(tmp_path / "run", lambda rng, fully: False, samples=5)
    (out / "rec" / "unpruned" / "config.json").unlink()
    assert main([str(out)]) == 2
    assert f"{out / 'rec' / 'unpruned' / 'config.json'}: missing" in capsys.readouterr().err
