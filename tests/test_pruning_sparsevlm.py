"""sparsevlm: DPC-kNN against a loop from the reference's description, budgets as layer averages, raters' scores."""

from __future__ import annotations

import math

import pytest
import torch

import mllm
from pruning import Budget, make_method, method_spec, prune_generate
from pruning.methods.sparsevlm import (
    cluster_means,
    default_layers,
    dpc_knn,
    recycling_rule,
    split_count,
    stage_counts,
)
from tests.conftest import PROMPTS
from tests.test_layer_pruning import prefill_state


def reference_dpc_knn(x: torch.Tensor, clusters: int) -> tuple[list[int], list[int], torch.Tensor]:
    """One row, written token by token from `cluster_and_merge`'s description (no tie-breaking noise)."""
    n, width = x.shape
    x = x.double()
    distance = [[math.dist(x[i].tolist(), x[j].tolist()) / math.sqrt(width) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:clusters]) / clusters) for row in distance]
    farthest = max(max(row) for row in distance)
    delta = [min([distance[i][j] for j in range(n) if density[j] > density[i]], default=farthest) for i in range(n)]
    score = [delta[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:clusters]
    assign = [min(range(clusters), key=lambda c: distance[centres[c]][i]) for i in range(n)]
    for c, centre in enumerate(centres):
        assign[centre] = c
    means = torch.stack([x[[i for i in range(n) if assign[i] == c]].mean(dim=0) for c in range(clusters)])
    return centres, assign, means


def test_dpc_knn_matches_the_reference_loop():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 23, 8, generator=generator)
    x[1, 5:9] = x[1, 4] + 0.01 * torch.randn(4, 8, generator=generator)  # a dense clump
    for clusters in (1, 3, 5):
        centres, assign = dpc_knn(x, clusters)
        means = cluster_means(x, assign, clusters)
        for row in range(3):
            expected_centres, expected_assign, expected_means = reference_dpc_knn(x[row], clusters)
            assert centres[row].tolist() == expected_centres
            assert assign[row].tolist() == expected_assign
            torch.testing.assert_close(means[row], expected_means.float(), atol=1e-5, rtol=1e-5)


def test_recycling_splits_each_stage_count_as_the_reference_rule():
    assert recycling_rule(276) == (83, 9)  # top 30% (+1) of the pruned, one cluster per 10 (+1)
    for present in (16, 100, 576):
        for count in range(1, present):
            kept, recycled = split_count(present, count, recycle=True)
            assert kept + recycled == count and recycled >= 1
            if count >= recycling_rule(present)[1]:  # enough room for the rule's clusters
                assert recycled == recycling_rule(present - kept)[1]
        assert split_count(present, present, recycle=True) == (present, 0)
        assert split_count(present, 7, recycle=False) == (7, 0)


@pytest.mark.parametrize("budget", [64, 128, 192, 400])
def test_stage_counts_average_to_the_budget_in_the_reference_proportions(budget):
    layers = default_layers(32)
    assert layers == (3, 7, 16)
    counts = stage_counts(layers, 32, 576, budget)
    average = (3 * 576 + 4 * counts[0] + 9 * counts[1] + 16 * counts[2]) / 32
    assert abs(average - budget) <= 0.5
    assert counts == sorted(counts, reverse=True) and all(1 <= count <= 576 for count in counts)
    # One factor f rounds to every count not capped at 576: the intervals of f each count allows overlap.
    free = [(count, share) for count, share in zip(counts, (300, 200, 110)) if count < 576]
    assert max((count - 0.5) / share for count, share in free) <= min((count + 0.5) / share for count, share in free)


def test_default_layers_scale_to_small_llms():
    assert default_layers(4) == (1, 2) and default_layers(3) == (1, 2) and default_layers(2) == (1,)
    assert default_layers(40) == (4, 9, 20)
    with pytest.raises(ValueError, match="at least 2 layers"):
        default_layers(1)


@pytest.mark.parametrize("policy", ["keep", "reassign"])
def test_ratio_zero_is_the_unpruned_model(tiny_model, images, policy):
    encoding = tiny_model.encode(images, PROMPTS)
    plain = tiny_model.generate(encoding, max_new_tokens=4, output_logits=True)
    pruned = prune_generate(tiny_model, encoding, "sparsevlm", "0", policy, max_new_tokens=4, output_logits=True)
    assert pruned.token_ids == plain.token_ids
    assert torch.equal(pruned.prefill_logits, plain.prefill_logits)
    assert make_method("sparsevlm").stages(3, 16, 16) == [(1, 16, 0), (2, 16, 0)]


@pytest.mark.parametrize("budget", range(7, 16))
def test_the_layers_see_the_budget_on_average(tiny_model, images, budget):
    """Each layer's visual tokens, read off the tokens it processed at prefill, average to the budget."""
    method = make_method("sparsevlm")
    encoding = tiny_model.encode(images, PROMPTS)
    stages = method.stages(3, 16, budget)
    state = prefill_state(tiny_model, encoding, method.layer_pruning(tiny_model, encoding, budget, "keep"))
    real = encoding.attention_mask.sum(dim=1, keepdim=True)
    visual = state.prefill_tokens(3) - (real - 16)  # (B, layers)
    expected = [16] + [count for _, count, _ in stages]  # layers 0 | 1 | 2 with stages at 1 and 2
    assert visual.tolist() == [expected] * 4
    assert abs(sum(expected) / 3 - budget) <= 0.5
    assert any(recycled for _, _, recycled in stages)
    recycled = [int(row.sum()) for row in state.sequences[-1].recycled]
    kept = [len(row) for row in state.kept_visual]
    assert [a + b for a, b in zip(kept, recycled)] == [stages[-1][1]] * 4


def reference_scores(model: mllm.MLLM, encoding: mllm.Encoding, layer: int) -> list[torch.Tensor]:
    """Per row alone: raters from the input embeddings, their head-mean attention in `layer` to each visual token."""
    scores = []
    for row in range(encoding.batch_size):
        real = encoding.attention_mask[row].bool()
        embeds = encoding.inputs_embeds[row][real]
        start = int(encoding.visual_start[row]) - int((~real).sum())
        visual, text = embeds[start:start + encoding.num_visual], embeds[start + encoding.num_visual:]
        relevance = (visual @ text.T).softmax(dim=1).mean(dim=0)
        raters = start + encoding.num_visual + (relevance > relevance.mean()).nonzero()[:, 0]
        attention = model.adapter.language_model(inputs_embeds=embeds[None], output_attentions=True).attentions[layer]
        scores.append(attention[0].mean(dim=0)[raters][:, start:start + encoding.num_visual].mean(dim=0))
    return scores


def test_one_stage_keeps_the_tokens_the_raters_attend_to_most(tiny_model_eager, images):
    model = tiny_model_eager
    encoding = model.encode(images, PROMPTS)
    method = make_method("sparsevlm:layers=1,recycle=false")
    [(layer, count, recycled)] = method.stages(3, 16, 10)
    assert (layer, count, recycled) == (1, 7, 0)  # (16 + 7 + 7) / 3 = 10
    out = prune_generate(model, encoding, method, "keep=10", "keep", max_new_tokens=1)
    for row, scores in enumerate(reference_scores(model, encoding, 0)):
        assert out.kept[row].tolist() == sorted(scores.topk(count).indices.tolist())


@pytest.mark.parametrize("policy", ["keep", "reassign"])
def test_a_batch_equals_its_rows_alone(tiny_model, images, policy):
    encoding = tiny_model.encode(images, PROMPTS)
    batched = prune_generate(tiny_model, encoding, "sparsevlm", "0.25", policy, max_new_tokens=4, output_logits=True)
    for row in range(4):
        single = prune_generate(tiny_model, tiny_model.encode(images[row], PROMPTS[row]), "sparsevlm", "0.25",
                                policy, max_new_tokens=4, output_logits=True)
        assert single.token_ids[0] == batched.token_ids[row]
        assert torch.equal(single.kept[0], batched.kept[row])
        real = batched.prefill_mask[row]
        torch.testing.assert_close(single.prefill_logits[0], batched.prefill_logits[row, real], rtol=1e-4, atol=1e-4)


def test_layers_parameter_round_trips_and_bad_layers_are_named(tiny_model, images):
    assert method_spec(make_method("sparsevlm:layers=1/2,recycle=false")) == "sparsevlm:layers=1/2,recycle=false"
    assert make_method("sparsevlm:layers=2").stage_layers(3) == (2,)
    for spec, needle in [("layers=2/1", "strictly increasing"), ("layers=1/1", "strictly increasing"),
                         ("layers=0/1", "out of range"), ("layers=1/2/3/4", "one to 3 layers"),
                         ("layers=first", "'auto' or such as 3/7/16")]:
        with pytest.raises(ValueError, match=needle):
            make_method(f"sparsevlm:{spec}")
    encoding = tiny_model.encode(images[:1], PROMPTS[:1])
    with pytest.raises(ValueError, match=r"out of range: each must lie in \[1, 2\]"):
        prune_generate(tiny_model, encoding, "sparsevlm:layers=1/3", Budget(pruned=0.5))
