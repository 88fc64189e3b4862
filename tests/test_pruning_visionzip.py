"""visionzip against a loop written from the reference, on the tiny random LLaVA (16 patches, 3 vision layers)."""

from __future__ import annotations

import torch

from pruning import make_method, prune_generate
from tests.conftest import PROMPTS


@torch.no_grad()
def test_dominant_and_contextual_tokens_match_the_reference_loop(tiny_model, images):
    method = make_method("visionzip:contextual_share=0.25")
    encoding = tiny_model.encode(images, PROMPTS, **method.encode_options(tiny_model))
    selection = method.select(tiny_model, encoding, 8)  # 1 CLS + 5 dominant + 2 contextual
    layer = len(tiny_model.adapter.vision_layers) - 2
    vision_layer = tiny_model.adapter.vision_layers[layer]
    hidden = encoding.vision_hidden_states
    for row in range(len(images)):
        scores = encoding.vision_attentions[layer][row, :, 0, 1:].sum(dim=0)
        dominant = sorted(scores.topk(5).indices.tolist())
        rest = [index for index in range(16) if index not in dominant]
        step = max(1, len(rest) // 2)
        targets = [rest[i] for i in range(0, len(rest), step)][:2]
        keys = vision_layer.self_attn.k_proj(vision_layer.layer_norm1(hidden[layer][row]))[1:]
        keys = torch.nn.functional.normalize(keys.view(16, 4, -1).mean(dim=1), dim=-1)
        features = hidden[-2][row, 1:]
        merged = []
        for target in targets:
            members = [m for m in rest if m not in targets
                       and max(targets, key=lambda t: float(keys[m] @ keys[t])) == target]
            mean = torch.stack([features[m] for m in members]).mean(dim=0) if members else 0
            merged.append(features[target] + mean)
        assert selection.kept[row].tolist() == dominant + targets
        expected = tiny_model.adapter.project(torch.stack([features[d] for d in dominant] + merged)[None])[0]
        torch.testing.assert_close(selection.features[row], expected, rtol=1e-5, atol=1e-5)
        cls = tiny_model.adapter.project(hidden[-2][row, :1][None])[0]
        torch.testing.assert_close(selection.extra[row], cls, rtol=1e-6, atol=1e-6)


def test_the_cls_token_sits_at_its_documented_position(tiny_model, images):
    method = make_method("visionzip:cls_position=last")
    encoding = tiny_model.encode(images, PROMPTS, **method.encode_options(tiny_model))
    out = prune_generate(tiny_model, encoding, method, "0.5", "keep", max_new_tokens=1)
    for row in range(len(images)):
        prefix, kept = encoding.layout(row)[1], len(out.kept[row])
        assert out.num_extra == 1 and kept == 7
        assert int(out.position_ids[row][0, prefix + kept]) == prefix + encoding.num_visual - 1
