"""mllm.answer_attention against transformers' eager attention weights, on LLaVA (pruned, GAP and renumbered)
and Qwen2-VL / Qwen2.5-VL (M-RoPE, through transformers' own multimodal forward)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS
from test_generation import kept_reference_inputs, random_keep
from test_qwen import oracle_inputs, sized_images

import mllm
from mllm.attention import answer_attention


def eager_weights(language_model: torch.nn.Module, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(layers, L, L) head-mean attention of one unpadded row, from transformers' eager attention."""
    out = language_model(inputs_embeds=embeds, attention_mask=torch.ones(ids.shape[-2:], dtype=torch.long),
                         position_ids=ids, output_attentions=True)
    return torch.stack([layer[0].mean(dim=0) for layer in out.attentions])


@pytest.mark.parametrize("policy", ["keep", "reassign"])
def test_llava_answer_attention_is_transformers_eager_attention(tiny_model, tiny_model_eager, images, policy):
    encoding = tiny_model.encode(images, PROMPTS)
    keep = random_keep(4, encoding.num_visual, 8)
    answers = tiny_model.generate(encoding, keep=keep, policy=policy, max_new_tokens=5).token_ids
    rows = answer_attention(tiny_model, encoding, answers, keep=keep, policy=policy)  # SDPA model: recomputed
    language_model = tiny_model_eager.adapter.language_model
    for row, answer in enumerate(answers):
        embeds, ids = kept_reference_inputs(encoding, row, keep[row], policy)
        prompt = ids.shape[1]
        fed = tiny_model.adapter.embed_tokens(torch.tensor([answer[:-1]]))
        ids = torch.cat([ids, ids[:, -1:] + 1 + torch.arange(len(answer) - 1)], dim=1)
        reference = eager_weights(language_model, torch.cat([embeds, fed], dim=1), ids)
        queries = prompt - 1 + torch.arange(len(answer))
        torch.testing.assert_close(rows[row].weights, reference[:, queries, :prompt], atol=1e-5, rtol=1e-5)
        prefix = encoding.layout(row)[1]
        assert rows[row].visual_index.tolist() == list(range(prefix, prefix + 8))
        assert torch.equal(rows[row].kept, keep[row])
    # the weights are each query's whole distribution: what is not on the prompt is on earlier answer tokens
    first = rows[0].weights[:, 0].sum(dim=-1)
    torch.testing.assert_close(first, torch.ones_like(first))


def test_qwen_answer_attention_is_transformers_multimodal_eager_attention(qwen, qwen_checkpoint):
    eager = mllm.load(qwen_checkpoint, device="cpu", dtype="float32", attn_implementation="eager")
    encoding = qwen.encode(sized_images()[:1], PROMPTS[:1], frame="original")
    answers = qwen.generate(encoding, max_new_tokens=4).token_ids
    (row,) = answer_attention(qwen, encoding, answers)
    inputs = oracle_inputs(eager, encoding)
    prompt = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answers[0][:-1]])], dim=1)
    for name, value in (("attention_mask", 1), ("mm_token_type_ids", 0)):  # the answer: real text tokens
        if name in inputs:
            appended = torch.full((1, len(answers[0]) - 1), value, dtype=inputs[name].dtype)
            inputs[name] = torch.cat([inputs[name], appended], dim=1)
    out = eager.model(**inputs, output_attentions=True)
    reference = torch.stack([layer[0].mean(dim=0) for layer in out.attentions])
    queries = prompt - 1 + torch.arange(len(answers[0]))
    torch.testing.assert_close(row.weights, reference[:, queries, :prompt], atol=1e-5, rtol=1e-5)
    start = int((inputs["input_ids"][0] == eager.model.config.image_token_id).nonzero()[0])
    assert row.visual_index.tolist() == list(range(start, start + encoding.visual_counts[0]))


def test_answer_attention_refuses_empty_answers_and_wrong_batches(tiny_model, images):
    encoding = tiny_model.encode(images[:2], PROMPTS[:2])
    with pytest.raises(mllm.KeepSetError, match="at least one answer token"):
        answer_attention(tiny_model, encoding, [[5], []])
    with pytest.raises(mllm.KeepSetError, match="3 answers for a batch of 2"):
        answer_attention(tiny_model, encoding, [[5], [5], [5]])
    hooks = [len(layer.self_attn._forward_pre_hooks) for layer in tiny_model.adapter.decoder_layers]
    answer_attention(tiny_model, encoding, [[5, 6], [7]])
    assert [len(layer.self_attn._forward_pre_hooks) for layer in tiny_model.adapter.decoder_layers] == hooks
