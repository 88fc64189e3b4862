"""Pruning LLaVA-NeXT's base crop and tiles with newline tokens (pruning.crops) on a tiny random LLaVA-NeXT: each
newline rule feeds what it says within the budget, each crop is its own grid, GAP feeds the kept tokens at their
original IDs (checked against transformers' own forward), and what is not implemented is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from PIL import Image

import mllm
from pruning.apply import prune_generate, select_tokens
from pruning.budget import Budget
from pruning.crops import CropRule, place_newlines, split_budget
from pruning.evaluate import main as pruning_main
from pruning.methods.spatial import lattice
from pruning.registry import make_method

SIZES = [(64, 32), (32, 64), (90, 30), (50, 61)]  # (width, height): each another tile canvas


@pytest.fixture(scope="module")
def model(next_dir):
    return mllm.load(next_dir, device="cpu", dtype="float32")


RNG = np.random.default_rng(1)
IMAGES = {(width, height): Image.fromarray(RNG.integers(0, 255, (height, width, 3), dtype=np.uint8))
          for width, height in SIZES}


@pytest.fixture(scope="module")
def encodings(model):
    return [model.encode([IMAGES[size]], ["Where is the red circle?"], frame="original") for size in SIZES]


def span(encoding):
    """Per token kind, its span indices, and each canvas cell's span index, from the layout rule: the base crop
    in raster order, then each canvas row's tiles and its newline."""
    (base_rows, base_cols), (rows, cols) = encoding.visual_tokens[0].grids
    base = base_rows * base_cols
    cell = {(r, c): base + r * (cols + 1) + c for r in range(rows) for c in range(cols)}
    newline = {r: base + r * (cols + 1) + cols for r in range(rows)}
    return base, cell, newline


@pytest.mark.parametrize("newlines", ["keep", "row", "drop"])
@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_each_newline_rule_feeds_what_it_says_within_the_budget(model, encodings, newlines, ratio):
    for encoding in encodings:
        base, cell, newline = span(encoding)
        total = Budget(pruned=ratio).num_kept(encoding.num_visual)
        kept = select_tokens(model, encoding, make_method("random"), Budget(pruned=ratio),
                             CropRule(newlines)).kept[0].tolist()
        assert len(set(kept)) == len(kept) and kept == sorted(kept)  # random emits raster order: so it stays
        rows_kept = {r for (r, _), index in cell.items() if index in kept}
        fed_newlines = {r for r, index in newline.items() if index in kept}
        expected = {"keep": set(newline), "row": rows_kept, "drop": set()}[newlines]
        assert fed_newlines == expected
        content = len(kept) - len(fed_newlines)
        if newlines == "keep":
            assert len(kept) == max(total, len(newline) + 1)  # every newline, however small the budget
        else:
            assert len(kept) <= total or content == 1  # one token and its row's newline, at the least
            assert content >= min(total, base + len(cell)) - len(newline)
        if newlines == "drop":
            assert len(kept) == total


def test_per_crop_each_crop_is_its_own_grid_with_its_share_of_the_budget(model, encodings):
    for encoding in encodings:
        base, cell, _ = span(encoding)
        grids = encoding.visual_tokens[0].grids
        total = Budget(pruned=0.5).num_kept(encoding.num_visual)
        kept = select_tokens(model, encoding, make_method("spatial"), Budget(pruned=0.5),
                             CropRule("drop", "per-crop")).kept[0].tolist()
        shares = split_budget(total, [base, len(cell)])
        assert sum(shares) == total and abs(shares[0] / total - base / (base + len(cell))) <= 1 / total
        cols = grids[1][1]
        tiles = [cell[divmod(int(index), cols)] for index in lattice(grids[1], shares[1])]
        assert kept == lattice(grids[0], shares[0]).tolist() + tiles


def test_budget_scope_all_ranks_every_crop_together_and_a_grid_method_refuses_it(model, encodings):
    encoding = encodings[2]
    base, cell, _ = span(encoding)
    content = list(range(base)) + sorted(cell.values())
    total = Budget(pruned=0.5).num_kept(encoding.num_visual)
    kept = select_tokens(model, encoding, make_method("random:seed=3"), Budget(pruned=0.5),
                         CropRule("drop", "all")).kept[0]
    draw = torch.randperm(len(content), generator=torch.Generator().manual_seed(3))[:total].sort().values
    assert kept.tolist() == [content[i] for i in draw]
    with pytest.raises(ValueError, match=r"'spatial' with budget scope 'all'.*per-crop"):
        select_tokens(model, encoding, make_method("spatial"), Budget(pruned=0.5), CropRule("row", "all"))


def test_a_newline_follows_the_last_emitted_token_before_it():
    assert place_newlines(torch.tensor([5, 1, 7]), torch.tensor([3, 8])).tolist() == [5, 1, 3, 7, 8]
    assert place_newlines(torch.tensor([5, 6]), torch.tensor([2, 4])).tolist() == [2, 4, 5, 6]


@pytest.mark.parametrize("positions", ["keep", "reassign"])
def test_pruned_prefill_is_transformers_forward_on_the_kept_tokens(model, encodings, positions):
    for encoding in encodings:
        run = prune_generate(model, encoding, "text-visual", "0.5", positions, crops=CropRule("row", "per-crop"),
                             max_new_tokens=1, output_logits=True)
        selection = select_tokens(model, encoding, make_method("text-visual"), Budget(pruned=0.5),
                                  CropRule("row", "per-crop"))
        kept = selection.kept[0] if positions == "reassign" else selection.kept[0].sort().values
        padding, prefix, suffix = encoding.layout(0)
        start, count = int(encoding.visual_start[0]), encoding.visual_counts[0]
        embeds = encoding.inputs_embeds[0]
        sequence = torch.cat([embeds[padding:start], embeds[start + kept], embeds[start + count:]])[None]
        if positions == "keep":  # the original IDs, from the layout: every visual token took the next ID
            ids = [*range(prefix), *(prefix + int(k) for k in kept), *range(prefix + count, prefix + count + suffix)]
        else:
            ids = list(range(sequence.shape[1]))
        ids = torch.tensor([ids])
        reference = model.model(inputs_embeds=sequence, attention_mask=torch.ones_like(ids), position_ids=ids)
        mask = run.prefill_mask[0] == 1
        torch.testing.assert_close(run.prefill_logits[0][mask], reference.logits[0], atol=1e-5, rtol=1e-5)


def test_the_pruning_cli_runs_on_llava_next_and_records_its_crop_rule(next_dir, rec_data, tmp_path, capsys):
    out = tmp_path / "pruning"
    assert run_cli(pruning_main, "--model", next_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec", "--methods",
                   "random,spatial,text-visual", "--ratios", "0.5,0.9", "--positions", "reassign,keep,compact",
                   "--newlines", "keep", "--out", out) == 0
    config = json.loads((out / "rec" / "spatial" / "0.5" / "keep" / "config.json").read_text())
    assert config["newlines"] == "keep" and config["budget_scope"] == "per-crop"
    table = pd.read_csv(out / "pruning.csv")
    fed = table[(table.method == "random") & (table.metric == "acc@0.5")].set_index(["budget", "positions"])
    unpruned = table[table.method == "unpruned"].tokens_fed.iloc[0]
    assert fed.loc[(0.9, "keep")].tokens_fed < fed.loc[(0.5, "keep")].tokens_fed < unpruned
    assert fed.loc[(0.5, "keep")].tokens_fed == fed.loc[(0.5, "reassign")].tokens_fed
    records = [json.loads(line) for line in (out / "rec" / "random" / "0.9" / "keep" / "samples.jsonl").open()]
    assert all(record["error"] is None for record in records)
    for method, refused in (("fastv", "fastv"), ("prumerge+", "prumerge+")):
        assert run_cli(pruning_main, "--model", next_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
                       "--methods", method, "--ratios", "0.5", "--out", tmp_path / method) == 2
        message = capsys.readouterr().err
        assert refused in message and "not implemented" in message


def test_cls_visual_scores_each_token_by_its_own_crops_cls_attention(next_dir):
    """cls-visual on LLaVA-NeXT, per crop: the base crop by its pass's CLS row, each canvas cell by the CLS row of
    the tile it was cut from (transformers' own attentions, output_attentions on an eager model), the cell's
    tile and patch re-derived here from the unpadding rule."""
    from test_tiny_llava_next import best_resolution

    from mllm.tiny import tiny_grid_pinpoints

    eager = mllm.load(next_dir, device="cpu", dtype="float32", attn_implementation="eager")
    method = make_method("cls-visual")
    layer = len(eager.adapter.vision_layers) - 2
    for width, height in SIZES:
        encoding = eager.encode([IMAGES[(width, height)]], ["Where is the red circle?"], frame="original",
                                **method.encode_options(eager))
        kept = select_tokens(eager, encoding, method, Budget(pruned=0.5), CropRule("drop", "per-crop")).kept[0]
        pixels = encoding.pixel_values[0]
        canvas_h, canvas_w = best_resolution(height, width, tiny_grid_pinpoints(28))
        passes = 1 + (canvas_h // 28) * (canvas_w // 28)  # the base crop, then the 28 px tiles
        with torch.no_grad():
            attention = eager.model.model.vision_tower(pixels[:passes], output_attentions=True).attentions[layer]
        cls = attention[:, :, 0, 1:].mean(dim=1)  # (passes, 4 patches)
        assert len(set(cls.flatten().tolist())) == cls.numel()  # no ties: the orders below mean something
        base, cell, _ = span(encoding)
        (_, _), (rows, cols) = encoding.visual_tokens[0].grids
        padded_rows, padded_cols, tiles_w = canvas_h // 14, canvas_w // 14, canvas_w // 28
        top, left = (padded_rows - rows) // 2, (padded_cols - cols) // 2
        cell_scores = {}
        for (r, c), index in cell.items():
            pr, pc = r + top, c + left
            cell_scores[index] = float(cls[1 + (pr // 2) * tiles_w + pc // 2, (pr % 2) * 2 + pc % 2])
        total = Budget(pruned=0.5).num_kept(encoding.num_visual)
        base_share, tile_share = split_budget(total, [base, len(cell)])
        base_order = torch.sort(cls[0], descending=True, stable=True).indices[:base_share].tolist()
        cells = sorted(cell.values())  # span indices, in the canvas view's raster order
        scores = torch.tensor([cell_scores[index] for index in cells])
        tile_order = [cells[i] for i in torch.sort(scores, descending=True, stable=True).indices[:tile_share]]
        assert kept.tolist() == base_order + tile_order


def test_an_unknown_crop_rule_is_refused_by_name():
    with pytest.raises(ValueError, match="newline rule 'sideways'"):
        CropRule("sideways")
    with pytest.raises(ValueError, match="budget scope 'half'"):
        CropRule("row", "half")
