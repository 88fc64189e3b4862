"""Pruning inside the LLM (FastV-style hook point) on a tiny random LLaVA."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS
from test_generation import random_keep

import mllm
from mllm.layer_pruning import layer_pruning_hooks


def fixed(keep: torch.Tensor):
    return lambda context: keep


def last_token_topk(count: int):
    """FastV's rule: the last token's mean attention (layer K-1) to each visual token."""

    def select(context: mllm.LayerContext) -> torch.Tensor:
        scores = context.attention().mean(dim=1)[:, 0]
        return scores.gather(1, context.visual_index).topk(count, dim=1).indices

    return select


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_model_eager"])
@pytest.mark.parametrize("policy", ["keep", "reassign"])
def test_layer_zero_equals_pruning_before_the_llm(request, images, model_name, policy):
    model = request.getfixturevalue(model_name)
    encoding = model.encode(images, PROMPTS)  # prompts of different lengths: left padding in play
    keep = random_keep(4, encoding.num_visual, 8).sort(dim=1).values
    before = model.generate(encoding, keep=keep, policy=policy, max_new_tokens=8, output_logits=True)
    inside = model.generate(encoding, layer_pruning=mllm.LayerPruning(0, fixed(keep), policy=policy),
                            max_new_tokens=8, output_logits=True)
    assert inside.token_ids == before.token_ids
    torch.testing.assert_close(inside.step_logits, before.step_logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(inside.kept, before.kept))


def manual_reference(model: mllm.MLLM, encoding: mllm.Encoding, layer: int, kept: torch.Tensor, *,
                     policy: str = "keep", generated: list[int] = ()) -> torch.Tensor:
    """Logits of the kept tokens (and of `generated` tokens appended after the prompt), run by hand with no
    cache: the full sequence up to `layer`, then only the kept tokens with their original rotary positions
    ('keep') or renumbered ones, under a hand-built causal mask (batch of one, eager attention)."""
    lm = model.adapter.language_model
    new = torch.tensor([list(generated)], dtype=torch.long)
    embeds = torch.cat([encoding.inputs_embeds, model.adapter.embed_tokens(new)], dim=1)
    positions = torch.arange(embeds.shape[1])[None]
    hidden = lm(inputs_embeds=embeds, attention_mask=torch.ones_like(positions), position_ids=positions,
                output_hidden_states=True).hidden_states[layer]
    start = int(encoding.visual_start[0])
    index = torch.cat([torch.arange(start), start + kept, torch.arange(start + encoding.num_visual, embeds.shape[1])])
    hidden = hidden[:, index]
    positions = positions[:, index] if policy == "keep" else torch.arange(len(index))[None]
    length = len(index)
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    rotary = lm.rotary_emb(hidden, position_ids=positions)
    for decoder_layer in lm.layers[layer:]:
        hidden = decoder_layer(hidden, attention_mask=causal, position_embeddings=rotary, position_ids=positions)
    return model.adapter.lm_head(lm.norm(hidden))[0]


@pytest.mark.parametrize("policy", ["keep", "reassign"])
def test_in_llm_decoding_against_eager_reference(tiny_model_eager, images, policy):
    """Decoding steps: layers < K read the full cache, layers >= K only the kept tokens'."""
    model = tiny_model_eager
    encoding = model.encode(images[1], PROMPTS[1])
    out = model.generate(encoding, layer_pruning=mllm.LayerPruning(2, last_token_topk(5), policy=policy),
                         max_new_tokens=5, output_logits=True)
    steps = len(out.token_ids[0])
    assert steps >= 3
    reference = manual_reference(model, encoding, 2, out.kept[0], policy=policy,
                                 generated=out.token_ids[0][: steps - 1])
    torch.testing.assert_close(out.step_logits[0, :steps], reference[-steps:], atol=1e-5, rtol=1e-5)


def test_in_llm_pruning_batch_equals_single_rows(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)  # left padding: decode masks are built, not skipped
    pruning = mllm.LayerPruning(2, last_token_topk(5))
    batched = tiny_model.generate(encoding, layer_pruning=pruning, max_new_tokens=6)
    for row in range(4):
        single = tiny_model.generate(tiny_model.encode(images[row], PROMPTS[row]), layer_pruning=pruning,
                                     max_new_tokens=6)
        assert single.token_ids[0] == batched.token_ids[row]
        assert torch.equal(single.kept[0], batched.kept[row])


@pytest.mark.parametrize("policy", ["keep", "reassign"])
def test_in_llm_pruning_against_eager_reference(tiny_model_eager, images, policy):
    model = tiny_model_eager
    encoding = model.encode(images[3], PROMPTS[3])
    layer = 2
    out = model.generate(encoding, layer_pruning=mllm.LayerPruning(layer, last_token_topk(6), policy=policy),
                         max_new_tokens=1, output_logits=True)
    kept = out.kept[0]
    assert len(kept) == 6 and torch.equal(kept, kept.sort().values)
    reference = manual_reference(model, encoding, layer, kept, policy=policy)
    assert out.prefill_logits.shape[1] == reference.shape[0] == encoding.input_ids.shape[1] - 10
    torch.testing.assert_close(out.prefill_logits[0], reference, atol=1e-5, rtol=1e-5)
    other = manual_reference(model, encoding, layer, kept, policy="reassign" if policy == "keep" else "keep")
    assert (out.prefill_logits[0] - other).abs().max() > 1e-3


def test_recomputed_llm_attention_equals_eager_attention(tiny_model_eager, images):
    model = tiny_model_eager
    encoding = model.encode(images, PROMPTS)
    captured = {}

    def select(context: mllm.LayerContext) -> torch.Tensor:
        captured["attention"] = context.attention()
        captured["all_rows"] = context.attention(torch.arange(context.attention_mask.shape[1]).expand(4, -1))
        return torch.arange(4).expand(4, -1)

    model.generate(encoding, layer_pruning=mllm.LayerPruning(2, select), max_new_tokens=1)
    eager = model.adapter.language_model(inputs_embeds=encoding.inputs_embeds, attention_mask=encoding.attention_mask,
                                         position_ids=encoding.position_ids[0], output_attentions=True).attentions[1]
    torch.testing.assert_close(captured["attention"], eager[:, :, -1:].float(), atol=1e-5, rtol=1e-5)
    real = encoding.attention_mask.bool()
    rows = real[:, None, :, None].expand_as(eager)  # padded query rows are undefined in both
    torch.testing.assert_close(captured["all_rows"][rows], eager[rows].float(), atol=1e-5, rtol=1e-5)


def test_recomputed_vision_attention_equals_eager_attention(tiny_model_eager, images):
    encoding = tiny_model_eager.encode(images[:2], PROMPTS[:2], vision_hidden_states=True, vision_attentions=[0, -2])
    tower = tiny_model_eager.adapter.vision_tower
    eager = tower(encoding.pixel_values, output_attentions=True).attentions
    num_layers = len(eager)
    assert set(encoding.vision_attentions) == {0, num_layers - 2}
    for layer, attention in encoding.vision_attentions.items():
        torch.testing.assert_close(attention, eager[layer].float(), atol=1e-5, rtol=1e-5)
    assert len(encoding.vision_hidden_states) == num_layers + 1
    with pytest.raises(ValueError, match="vision_attentions: layer 9"):
        tiny_model_eager.encode(images[:1], PROMPTS[:1], vision_attentions=[9])


def _hook_count(model: mllm.MLLM) -> int:
    modules = list(model.model.modules())
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)


def test_hooks_are_removed_and_model_is_unchanged(tiny_model, images):
    before_state = {name: tensor.clone() for name, tensor in tiny_model.model.state_dict().items()}
    encoding = tiny_model.encode(images, PROMPTS)
    hooks_before = _hook_count(tiny_model)
    tiny_model.generate(encoding, layer_pruning=mllm.LayerPruning(1, last_token_topk(5)), max_new_tokens=3)
    assert _hook_count(tiny_model) == hooks_before

    def broken(context):
        raise RuntimeError("selector failed")

    with pytest.raises(RuntimeError, match="selector failed"):
        tiny_model.generate(encoding, layer_pruning=mllm.LayerPruning(1, broken), max_new_tokens=3)
    assert _hook_count(tiny_model) == hooks_before
    for name, tensor in tiny_model.model.state_dict().items():
        assert torch.equal(tensor, before_state[name]), name
    assert tiny_model.model.config._attn_implementation == "sdpa"
    # And the unpruned model still answers as before.
    plain = tiny_model.generate(encoding, max_new_tokens=3)
    assert plain.token_ids == tiny_model.generate(encoding, max_new_tokens=3).token_ids


def test_in_llm_pruning_errors(tiny_model, images):
    encoding = tiny_model.encode(images[:2], PROMPTS[:2])
    with pytest.raises(mllm.KeepSetError, match="same number"):
        tiny_model.generate(encoding, keep=[torch.arange(5), torch.arange(6)],
                            layer_pruning=mllm.LayerPruning(1, fixed(torch.zeros(2, 1, dtype=torch.long))))
    with pytest.raises(mllm.KeepSetError, match="out of range"):
        tiny_model.generate(encoding, layer_pruning=mllm.LayerPruning(1, fixed(torch.full((2, 3), 16))))
    with pytest.raises(mllm.KeepSetError, match="batch=2"):
        tiny_model.generate(encoding, layer_pruning=mllm.LayerPruning(1, fixed(torch.arange(3))))
    with pytest.raises(ValueError, match="layer 0"):
        tiny_model.generate(encoding, layer_pruning=mllm.LayerPruning(0, last_token_topk(3)))
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.generate(encoding, layer_pruning=mllm.LayerPruning(99, fixed(torch.zeros(2, 1))))
    with pytest.raises(ValueError, match="policies"):
        mllm.LayerPruning(1, fixed(torch.zeros(2, 1)), policy="permute")


def test_the_projector_inputs_projected_are_the_visual_tokens(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS, vision_hidden_states=True)
    adapter = tiny_model.adapter
    projected = adapter.project(adapter.projector_inputs(encoding.vision_hidden_states))
    torch.testing.assert_close(projected, encoding.visual_features, rtol=0, atol=0)
    layer = len(adapter.vision_layers) - 1
    queries, keys = adapter.vision_queries_keys(layer, encoding.vision_hidden_states[layer])
    assert queries.shape == keys.shape == encoding.vision_hidden_states[layer].shape


# --- several stages, with recycled tokens -------------------------------------------------------------------

# Two stages on the tiny LLM (16 visual tokens, 3 layers): (layer, kept, [(members averaged, anchor), ...]),
# indices into the visual tokens present at that stage. Stage 1 recycles two tokens (10 present after it);
# stage 2 keeps one of them (index 8) and recycles a recycled token with an original one, anchored at the
# recycled one (so at original token 10's position under keep).
PLAN = [
    (1, [0, 2, 5, 7, 8, 11, 13, 15], [([1, 3, 4], 3), ([9, 10], 10)]),
    (2, [0, 3, 4, 8], [([1, 9], 9)]),
]


def planned(plan):
    """A selector that keeps and recycles what `plan` says, recycled tokens being means of hidden states."""

    def select(context: mllm.LayerContext):
        _, kept, recycle = plan[context.stage]
        batch = context.visual_index.shape[0]
        kept = torch.tensor(kept).expand(batch, -1)
        if not recycle:
            return kept
        rows = torch.arange(batch)[:, None]
        merged = torch.stack([context.hidden_states[rows, context.visual_index[:, members]].mean(dim=1)
                              for members, _ in recycle], dim=1)
        anchors = torch.tensor([anchor for _, anchor in recycle]).expand(batch, -1)
        return mllm.LayerSelection(kept, merged, anchors)

    return select


def staged_reference(model: mllm.MLLM, encoding: mllm.Encoding, plan, *, policy: str = "keep",
                     generated: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the prompt's last-layer tokens and of `generated` tokens appended, run by hand layer by layer
    with no cache (batch of one): at each stage layer the kept visual tokens stay, the recycled ones (means of
    the layer's input states) are inserted after them, at their anchors' original positions ('keep') or all
    renumbered ('reassign'). Also returns the position IDs the last layer used."""
    lm = model.adapter.language_model
    new = torch.tensor([list(generated)], dtype=torch.long)
    hidden = torch.cat([encoding.inputs_embeds, model.adapter.embed_tokens(new)], dim=1)
    original = torch.arange(hidden.shape[1])  # each token's original position ID
    start = int(encoding.visual_start[0])
    visual = list(range(start, start + encoding.num_visual))  # sequence positions of the visual tokens present
    stages = {layer: (kept, recycle) for layer, kept, recycle in plan}
    for index, decoder_layer in enumerate(lm.layers):
        if index in stages:
            kept, recycle = stages[index]
            rows = list(range(visual[0])) + [visual[i] for i in kept]
            merged = [hidden[:, [visual[i] for i in members]].mean(dim=1, keepdim=True) for members, _ in recycle]
            anchors = torch.tensor([int(original[visual[anchor]]) for _, anchor in recycle], dtype=torch.long)
            after = visual[-1] + 1
            hidden = torch.cat([hidden[:, rows], *merged, hidden[:, after:]], dim=1)
            original = torch.cat([original[rows], anchors, original[after:]])
            visual = list(range(visual[0], visual[0] + len(kept) + len(recycle)))
        positions = original[None] if policy == "keep" else torch.arange(hidden.shape[1])[None]
        length = hidden.shape[1]
        causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        rotary = lm.rotary_emb(hidden, position_ids=positions)
        hidden = decoder_layer(hidden, attention_mask=causal, position_embeddings=rotary, position_ids=positions)
    return model.adapter.lm_head(lm.norm(hidden))[0], positions[0]


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_model_eager"])
@pytest.mark.parametrize("policy", ["keep", "reassign"])
def test_two_stages_with_recycling_against_a_hand_run_reference(request, images, model_name, policy):
    """A left-padded batch of four prompts of different lengths, prefill and decoding steps with the cache,
    each row against the hand-run reference on that row alone."""
    model = request.getfixturevalue(model_name)
    encoding = model.encode(images, PROMPTS)
    out = model.generate(encoding, layer_pruning=mllm.LayerPruning((1, 2), planned(PLAN), policy=policy),
                         max_new_tokens=4, output_logits=True)
    for row in range(4):
        single = model.encode(images[row], PROMPTS[row])
        steps = len(out.token_ids[row])
        assert steps >= 3
        generated = out.token_ids[row][: steps - 1]
        reference, _ = staged_reference(model, single, PLAN, policy=policy, generated=generated)
        torch.testing.assert_close(out.step_logits[row, :steps], reference[-steps:], atol=1e-5, rtol=1e-5)
        prompt = out.prefill_logits[row][out.prefill_mask[row]]
        assert prompt.shape[0] == single.input_ids.shape[1] - 16 + 5  # 4 kept + 1 recycled visual tokens
        torch.testing.assert_close(prompt, reference[: prompt.shape[0]], atol=1e-5, rtol=1e-5)
        # The last layer saw original tokens 0, 7 and 8 (stage 2 kept 0, 3, 4 of stage 1's 0, 2, 5, 7, 8, ...).
        assert out.kept[row].tolist() == [0, 7, 8]


def test_recycled_tokens_sit_at_their_anchors_positions_under_keep(tiny_model, images):
    encoding = tiny_model.encode(images[3], PROMPTS[3])
    fed = {}

    def capture(module, args, kwargs):
        fed.setdefault("positions", kwargs["position_ids"][0].clone())  # the prefill's, not the decoding steps'
        fed.setdefault("cos", kwargs["position_embeddings"][0][0].clone())

    handle = tiny_model.adapter.decoder_layers[2].self_attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        tiny_model.generate(encoding, layer_pruning=mllm.LayerPruning((1, 2), planned(PLAN)), max_new_tokens=2)
    finally:
        handle.remove()
    _, expected = staged_reference(tiny_model, encoding, PLAN)
    start = int(encoding.visual_start[0])
    # Kept: original tokens 0, 7, 8; recycled twice: stage 1's token at 10, then one anchored at it.
    assert fed["positions"][start: start + 5].tolist() == [start + 0, start + 7, start + 8, start + 3, start + 10]
    assert torch.equal(fed["positions"], expected)
    rotary = tiny_model.adapter.rotary_embeddings(encoding.inputs_embeds, expected[None])[0][0]
    torch.testing.assert_close(fed["cos"], rotary, rtol=0, atol=0)


def prefill_state(model: mllm.MLLM, encoding: mllm.Encoding, pruning: mllm.LayerPruning):
    """The in-LLM pruning state after a prefill of `encoding` (what `generate` reads)."""
    prompt = mllm.build_prompt_batch(model, encoding)
    with layer_pruning_hooks(pruning, model.adapter, prompt.attention_mask, torch.stack(prompt.visual_index)) as state:
        model.adapter.language_model(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
                                     position_ids=prompt.position_ids[0], use_cache=True)
    return state


def test_prefill_tokens_count_each_stage_recycled_tokens_included(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)
    real = encoding.attention_mask.sum(dim=1)
    state = prefill_state(tiny_model, encoding, mllm.LayerPruning((1, 2), planned(PLAN)))
    expected = torch.stack([real, real - 16 + 10, real - 16 + 5], dim=1)  # 8 + 2 recycled, then 4 + 1
    assert torch.equal(state.prefill_tokens(3), expected)
    single = prefill_state(tiny_model, encoding, mllm.LayerPruning(2, fixed(torch.arange(6).expand(4, -1))))
    assert torch.equal(single.prefill_tokens(3), torch.stack([real, real, real - 10], dim=1))


def test_a_stage_that_keeps_everything_changes_nothing(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)
    plain = tiny_model.generate(encoding, max_new_tokens=3, output_logits=True)
    for policy in ("keep", "reassign"):
        everything = mllm.LayerPruning((1, 2), fixed(torch.arange(16).expand(4, -1)), policy=policy)
        out = tiny_model.generate(encoding, layer_pruning=everything, max_new_tokens=3, output_logits=True)
        assert torch.equal(out.prefill_logits, plain.prefill_logits) and out.token_ids == plain.token_ids


def test_multi_stage_errors(tiny_model, images):
    encoding = tiny_model.encode(images[:2], PROMPTS[:2])
    for layers in [(2, 1), (1, 1), ()]:
        with pytest.raises(ValueError, match="strictly increasing"):
            mllm.LayerPruning(layers, fixed(torch.zeros(2, 1)))
    with pytest.raises(ValueError, match="layer 3 out of range"):
        tiny_model.generate(encoding, layer_pruning=mllm.LayerPruning((1, 3), fixed(torch.zeros(2, 1))))
    keep = torch.arange(3).expand(2, -1)
    bad = [
        (mllm.LayerSelection(keep, torch.zeros(2, 1, 64)), "anchors"),
        (mllm.LayerSelection(keep, torch.zeros(2, 2, 64), torch.zeros(2, 1, dtype=torch.long)), "2 recycled"),
        (mllm.LayerSelection(keep, torch.zeros(2, 1, 64), torch.full((2, 1), 16)), "anchor index out of range"),
        (mllm.LayerSelection(keep, torch.zeros(2, 1, 8), torch.zeros(2, 1, dtype=torch.long)), "hidden states"),
        (mllm.LayerSelection(torch.zeros(2, 0, dtype=torch.long)), "kept no visual token"),
    ]
    for selection, message in bad:
        with pytest.raises(mllm.KeepSetError, match=message):
            tiny_model.generate(encoding, layer_pruning=mllm.LayerPruning(1, lambda context, s=selection: s))
