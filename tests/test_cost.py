"""Cost accounting: analytic prefill FLOPs against torch's own FLOP counter, per-layer token counts, timings."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS
from torch.utils.flop_counter import FlopCounterMode

import mllm
from mllm.cost import peak_memory, prefill_flops


def counted_prefill_flops(model: mllm.MLLM, encoding: mllm.Encoding) -> int:
    """What torch counts for the LLM on one unpadded prompt plus the LM head on its last token."""
    adapter = model.adapter
    positions = torch.arange(encoding.inputs_embeds.shape[1])[None]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hidden = adapter.language_model(inputs_embeds=encoding.inputs_embeds, position_ids=positions,
                                        attention_mask=torch.ones_like(positions)).last_hidden_state
        adapter.lm_head(hidden[:, -1])
    return counter.get_total_flops()


def test_analytic_prefill_flops_equal_torch_flop_counter(tiny_model_eager, images):
    encoding = tiny_model_eager.encode(images[:1], PROMPTS[:1])
    generation = tiny_model_eager.generate(encoding, max_new_tokens=2)
    length = encoding.inputs_embeds.shape[1]
    assert generation.layer_tokens.tolist() == [[length] * len(tiny_model_eager.adapter.decoder_layers)]
    analytic = prefill_flops(tiny_model_eager.adapter, generation.layer_tokens)
    assert int(analytic[0]) == counted_prefill_flops(tiny_model_eager, encoding)


def test_pruned_rows_cost_what_their_layers_saw(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)  # different prompt lengths: padding must not be counted
    lengths = encoding.attention_mask.sum(dim=1)
    num_layers = len(tiny_model.adapter.decoder_layers)
    full = tiny_model.generate(encoding, max_new_tokens=2)
    assert full.layer_tokens.tolist() == [[int(n)] * num_layers for n in lengths]

    keep = torch.arange(6).expand(len(images), -1)
    before = tiny_model.generate(encoding, keep=keep, max_new_tokens=2)
    dropped = encoding.num_visual - 6
    assert before.layer_tokens.tolist() == [[int(n) - dropped] * num_layers for n in lengths]

    inside = tiny_model.generate(encoding, layer_pruning=mllm.LayerPruning(2, lambda context: keep), max_new_tokens=2)
    assert inside.layer_tokens.tolist() == [[int(n)] * 2 + [int(n) - dropped] * (num_layers - 2) for n in lengths]

    batch, visual = len(images), encoding.num_visual
    assert full.visual_layer_tokens.tolist() == [[visual] * num_layers] * batch
    assert before.visual_layer_tokens.tolist() == [[6] * num_layers] * batch
    assert inside.visual_layer_tokens.tolist() == [[visual] * 2 + [6] * (num_layers - 2)] * batch

    flops = [prefill_flops(tiny_model.adapter, run.layer_tokens) for run in (full, inside, before)]
    assert bool((flops[0] > flops[1]).all() and (flops[1] > flops[2]).all())


def test_generation_times_its_prefill_and_decoding(tiny_model, images):
    encoding = tiny_model.encode(images[:2], PROMPTS[:2])
    generation = tiny_model.generate(encoding, max_new_tokens=5)
    assert generation.prefill_seconds > 0 and generation.decode_seconds > 0
    assert generation.decode_steps == max(len(ids) for ids in generation.token_ids) - 1


def test_peak_memory_is_none_off_cuda():
    with peak_memory(torch.device("cpu")) as memory:
        torch.ones(1000)
    assert memory["bytes"] is None


def test_layer_tokens_of_the_wrong_shape_are_refused(tiny_model):
    layers = len(tiny_model.adapter.decoder_layers)
    expected = f"layer_tokens must be \\(batch, {layers} layers\\), got \\(2, {layers + 1}\\)"
    with pytest.raises(ValueError, match=expected):
        prefill_flops(tiny_model.adapter, torch.ones(2, layers + 1))
