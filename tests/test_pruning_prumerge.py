"""prumerge / prumerge+ against a loop written from the reference code, on the tiny random LLaVA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruning import make_method, prune_generate
from pruning.methods.prumerge import cls_scores_and_keys
from tests.conftest import PROMPTS


@pytest.fixture
def encoding(tiny_model, images):
    return tiny_model.encode(images, PROMPTS, vision_hidden_states=True)


def reference_merge(kept, scores, keys, features, neighbours):
    """The reference's per-token loop: each kept token's `rest` is every other kept token, then every pruned one."""
    pruned = [index for index in range(len(scores)) if index not in kept.tolist()]
    out = []
    for position, index in enumerate(kept.tolist()):
        rest = [other for other in kept.tolist() if other != index] + pruned
        unit = torch.nn.functional.normalize(keys, dim=-1)
        similarity = unit[index] @ unit[rest].T
        nearest = [rest[i] for i in similarity.topk(min(neighbours, len(rest))).indices.tolist()]
        out.append(features[index] + sum(scores[j] * features[j] for j in nearest))
        assert position == len(out) - 1
    return torch.stack(out)


def test_merged_tokens_match_the_reference_loop(tiny_model, encoding):
    method = make_method("prumerge:neighbours=5")
    selection = method.select(tiny_model, encoding, 7)  # 6 patches and the summary token
    scores, keys = cls_scores_and_keys(tiny_model, encoding)
    features = tiny_model.adapter.projector_inputs(encoding.vision_hidden_states).float()
    for row, (kept, merged) in enumerate(selection.rows()):
        assert torch.equal(kept, scores[row].topk(6).indices)  # best score first
        expected = reference_merge(kept, scores[row], keys[row], features[row], 5)
        torch.testing.assert_close(merged, tiny_model.adapter.project(expected[None])[0], rtol=1e-5, atol=1e-5)
        dropped = [index for index in range(encoding.num_visual) if index not in kept.tolist()]
        summary = sum(scores[row, j] * features[row, j] for j in dropped)
        torch.testing.assert_close(selection.extra[row, 0], tiny_model.adapter.project(summary[None, None])[0, 0],
                                   rtol=1e-5, atol=1e-5)


def test_adaptive_keeps_the_iqr_outliers(tiny_model, encoding):
    selection = make_method("prumerge:adaptive=true").select(tiny_model, encoding, 16)
    scores, _ = cls_scores_and_keys(tiny_model, encoding)
    for row, kept in enumerate(selection.kept):
        values = scores[row].numpy()
        low, high = np.percentile(values, [25, 75])
        assert len(kept) == max(1, int((values > high + 1.5 * (high - low)).sum()))


def test_the_summary_token_is_fed_at_its_anchor(tiny_model, encoding):
    out = prune_generate(tiny_model, encoding, "prumerge:extra_position=last", "0.5", "keep", max_new_tokens=1)
    assert out.num_extra == 1
    for row in range(encoding.batch_size):
        prefix, kept = encoding.layout(row)[1], len(out.kept[row])
        assert int(out.position_ids[row][0, prefix + kept]) == prefix + encoding.num_visual - 1
    without = prune_generate(tiny_model, encoding, "prumerge:global_token=false", "0.5", "keep", max_new_tokens=1)
    assert without.num_extra == 0


def test_prumerge_plus_adds_spatial_samples(tiny_model, encoding):
    plain = make_method("prumerge").select(tiny_model, encoding, 9)
    plus = make_method("prumerge+").select(tiny_model, encoding, 9)
    for kept_plain, kept_plus in zip(plain.kept, plus.kept):
        assert len(kept_plus) == 8 and len(set(kept_plus.tolist())) == 8
        assert torch.equal(kept_plus[:2], kept_plain[:2])  # a quarter by score, then the samples
    adaptive = make_method("prumerge+:adaptive=true").select(tiny_model, encoding, 8)
    outliers = make_method("prumerge:adaptive=true").select(tiny_model, encoding, 8)
    for kept_plus, kept_outliers in zip(adaptive.kept, outliers.kept):
        step = max(1, encoding.num_visual // len(kept_outliers))
        samples = [i for i in range(step // 6, encoding.num_visual - 1, max(1, step // 3))
                   if i not in kept_outliers.tolist()]
        assert kept_plus.tolist() == kept_outliers.tolist() + samples
