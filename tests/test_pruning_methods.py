"""pruning: every method keeps what it is asked to, prunes nothing at ratio 0, and batches like single calls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mllm
from pruning import (
    METHODS,
    Budget,
    Selection,
    VisionPruning,
    make_method,
    method_spec,
    parse_budgets,
    prune_generate,
    register_method,
)
from pruning.methods.spatial import lattice
from tests.conftest import PROMPTS
from tests.test_layer_pruning import manual_reference

# trim needs a CLIP checkpoint directory: tests/test_pruning_trim.py runs these checks on it with a tiny one.
BUILT_IN = sorted(name for name in METHODS if name != "trim")
# Methods whose emit order is raster order, so that `reassign` at ratio 0 is the unpruned model too.
RASTER_EMITTERS = ("random", "spatial", "fastv", "sparsevlm")
# sparsevlm's budget is a layer average, not the tokens fed: tests/test_pruning_sparsevlm.py checks it.
FEED_THE_BUDGET = [name for name in BUILT_IN if name != "sparsevlm"]


def encode_for(model, method, images, prompts=PROMPTS):
    return model.encode(images, prompts, **method.encode_options(model))


def run(model, encoding, method, budget, positions, **options):
    return prune_generate(model, encoding, method, budget, positions, max_new_tokens=4, output_logits=True,
                          **options)


@pytest.mark.parametrize("name", BUILT_IN)
def test_ratio_zero_reproduces_the_unpruned_model(tiny_model, images, name):
    method = make_method(name)
    encoding = encode_for(tiny_model, method, images)
    plain = tiny_model.generate(encoding, max_new_tokens=4, output_logits=True)
    policies = ["keep", "reassign-raster"] + (["reassign"] if name in RASTER_EMITTERS else [])
    for positions in policies:
        pruned = run(tiny_model, encoding, method, Budget(pruned=0.0), positions)
        assert pruned.texts == plain.texts, positions
        torch.testing.assert_close(pruned.prefill_logits, plain.prefill_logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", FEED_THE_BUDGET)
@pytest.mark.parametrize("budget", ["0.25", "0.5", "0.9", "keep=3"])
def test_every_method_keeps_the_number_asked(tiny_model, images, name, budget):
    method = make_method(name)
    encoding = encode_for(tiny_model, method, images)
    expected = Budget.parse(budget).num_kept(tiny_model.num_visual_tokens)
    for positions in ("reassign", "keep"):
        generation = run(tiny_model, encoding, method, budget, positions)
        for kept in generation.kept:  # the budget counts every token fed, extra ones (a summary, a CLS) included
            assert len(kept) + generation.num_extra == expected and len(set(kept.tolist())) == len(kept)
        if positions == "keep":
            assert all(torch.equal(kept, kept.sort().values) for kept in generation.kept)


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_batch_of_four_equals_four_single_calls(tiny_model, images, name):
    method = make_method(name)
    batched = run(tiny_model, encode_for(tiny_model, method, images), method, "0.5", "reassign")
    for row, (image, prompt) in enumerate(zip(images, PROMPTS)):
        single = run(tiny_model, encode_for(tiny_model, method, [image], [prompt]), method, "0.5", "reassign")
        assert single.texts[0] == batched.texts[row]
        assert torch.equal(single.kept[0], batched.kept[row])
        real = batched.prefill_mask[row]
        torch.testing.assert_close(single.prefill_logits[0, -1], batched.prefill_logits[row, real][-1],
                                   rtol=1e-4, atol=1e-4)


def test_keep_feeds_original_ids_and_reassign_renumbers(tiny_model, images):
    method = make_method("cls-visual")
    encoding = encode_for(tiny_model, method, images)
    keep = run(tiny_model, encoding, method, "0.5", "keep")
    emitted = run(tiny_model, encoding, method, "0.5", "reassign")
    raster = run(tiny_model, encoding, method, "0.5", "reassign-raster")
    for row in range(len(images)):
        prefix = encoding.layout(row)[1]
        kept = keep.kept[row]
        visual = keep.position_ids[row][0, prefix : prefix + len(kept)]
        assert torch.equal(visual, prefix + kept)  # GAP: original IDs
        assert torch.equal(emitted.position_ids[row], raster.position_ids[row])  # both consecutive
        assert torch.equal(raster.kept[row], kept) and sorted(emitted.kept[row].tolist()) == kept.tolist()
    assert any(not torch.equal(e, k) for e, k in zip(emitted.kept, keep.kept))  # score order is not raster


class HalfAndMerge(VisionPruning):
    """Keeps the even tokens, each merged with the odd one after it (a test double for merging methods)."""

    name = "test-half-and-merge"

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = weight

    def select(self, model, encoding, num_kept):
        features = encoding.visual_features
        kept = torch.arange(0, encoding.num_visual, 2)
        merged = (1 - self.weight) * features[:, 0::2] + self.weight * features[:, 1::2]
        return Selection(kept.expand(encoding.batch_size, -1), merged)


def test_merged_features_are_fed_at_their_hosts(tiny_model, images, monkeypatch):
    monkeypatch.setitem(METHODS, HalfAndMerge.name, HalfAndMerge)
    encoding = tiny_model.encode(images, PROMPTS)
    merged = run(tiny_model, encoding, "test-half-and-merge:weight=0.25", "0.5", "keep")
    by_hand = encoding.inputs_embeds.clone()
    features = encoding.visual_features
    for row in range(len(images)):
        start = int(encoding.visual_start[row])
        by_hand[row, start : start + encoding.num_visual : 2] = 0.75 * features[row, 0::2] + 0.25 * features[row, 1::2]
    manual = tiny_model.generate(dataclasses.replace(encoding, inputs_embeds=by_hand), keep=merged.kept,
                                 policy="keep", max_new_tokens=4, output_logits=True)
    torch.testing.assert_close(merged.prefill_logits, manual.prefill_logits, rtol=0, atol=0)
    plain = run(tiny_model, encoding, "spatial", "0.5", "keep")
    real = plain.prefill_mask
    assert not torch.allclose(merged.prefill_logits[real], plain.prefill_logits[real])


def test_a_user_registered_scorer_is_addressable_by_name():
    @register_method
    class Corners(VisionPruning):
        name = "test-corners"

        def __init__(self, first: int = 0, flag: bool = False) -> None:
            self.first, self.flag = first, flag

        def select(self, model, encoding, num_kept):
            return Selection(torch.arange(self.first, self.first + num_kept).expand(encoding.batch_size, -1))

    try:
        method = make_method("test-corners:first=2,flag=true")
        assert isinstance(method, Corners) and method.first == 2 and method.flag is True
        assert method_spec(method) == "test-corners:first=2,flag=true"
    finally:
        METHODS.pop("test-corners")


def test_specs_round_trip_and_bad_ones_are_named():
    for spec in ("random:seed=3", "cls-visual:layer=-3", "text-visual:reduce=max", "spatial"):
        assert method_spec(make_method(spec)) == spec
    with pytest.raises(ValueError, match="unknown pruning method 'prune-it'"):
        make_method("prune-it")
    with pytest.raises(ValueError, match=r"'random' takes parameters \['seed'\], got \['sed'\]"):
        make_method("random:sed=1")
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'max'"):
        make_method("text-visual:reduce=median")


def test_budgets_parse_and_bound():
    assert [str(budget) for budget in parse_budgets("0,0.25,keep=64")] == ["0", "0.25", "keep=64"]
    assert Budget(pruned=0.5).num_kept(576) == 288 and Budget(pruned=0.9).num_kept(576) == 58
    assert Budget(kept=1000).num_kept(576) == 576 and Budget(pruned=0.999).num_kept(16) == 1
    for bad, needle in (("1", "must lie in"), ("keep=0", "must be >= 1"), ("half", "need a fraction pruned")):
        with pytest.raises(ValueError, match=needle):
            Budget.parse(bad)


def test_a_method_reading_vision_attention_says_how_to_encode(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)
    with pytest.raises(ValueError, match=r"encode with vision_attentions=\[-2\]"):
        prune_generate(tiny_model, encoding, "cls-visual", "0.5")


@pytest.mark.parametrize("grid", [(8, 8), (24, 24), (4, 6)])
def test_the_spatial_lattice_is_exact_and_spread(grid):
    rows, cols = grid
    for count in range(1, rows * cols + 1):
        cells = lattice(grid, count)
        assert len(set(cells.tolist())) == count
    quarter = lattice(grid, rows * cols // 4)
    assert len(set((quarter // cols).tolist())) >= rows // 2 and len(set((quarter % cols).tolist())) >= cols // 2


def test_pruning_reaches_generation_through_mllm_only(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)
    generation = prune_generate(tiny_model, encoding, "random:seed=1", "keep=5", "keep", max_new_tokens=2)
    assert isinstance(generation, mllm.Generation) and all(len(kept) == 5 for kept in generation.kept)


@pytest.mark.parametrize("positions", ["keep", "reassign"])
def test_fastv_keeps_rope_positions_against_an_eager_reference(tiny_model_eager, images, positions):
    model = tiny_model_eager
    encoding = model.encode(images[3], PROMPTS[3])
    out = prune_generate(model, encoding, "fastv:layer=2", "keep=6", positions, max_new_tokens=1, output_logits=True)
    kept = out.kept[0]
    assert len(kept) == 6
    reference = manual_reference(model, encoding, 2, kept, policy="keep" if positions == "keep" else "reassign")
    torch.testing.assert_close(out.prefill_logits[0], reference, atol=1e-5, rtol=1e-5)


def test_fastv_scores_by_the_last_token_or_by_every_token(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)
    last = prune_generate(tiny_model, encoding, "fastv", "0.5", max_new_tokens=1)
    every = prune_generate(tiny_model, encoding, "fastv:query=all", "0.5", max_new_tokens=1)
    assert any(not torch.equal(a, b) for a, b in zip(last.kept, every.kept))
