"""mllm.generate against transformers' own forward and generate, on a tiny random LLaVA."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

import mllm
from mllm.selfcheck import transformers_generate_tokens


def random_keep(batch: int, num_visual: int, count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_visual, generator=generator)[:count] for _ in range(batch)])


@pytest.mark.parametrize("policy", ["reassign", "keep"])
@pytest.mark.parametrize("batch", [1, 4])
def test_unpruned_generate_equals_transformers_generate(tiny_model, images, policy, batch):
    images, prompts = images[:batch], PROMPTS[:batch]
    encoding = tiny_model.encode(images, prompts, frame="cropped")
    ours = tiny_model.generate(encoding, policy=policy, max_new_tokens=12)
    assert ours.token_ids == transformers_generate_tokens(tiny_model, images, encoding.prompts, 12)
    assert all(len(ids) > 0 for ids in ours.token_ids)


def kept_reference_inputs(encoding: mllm.Encoding, row: int, kept: torch.Tensor, policy: str):
    """Row `row` after pruning, and its position IDs, computed here independently of mllm.positions."""
    padding, prefix, suffix = encoding.layout(row)
    start, count = int(encoding.visual_start[row]), encoding.num_visual
    embeds = encoding.inputs_embeds[row]
    sequence = torch.cat([embeds[padding:start], embeds[start + kept], embeds[start + count:]])
    if policy == "keep":
        suffix_ids = range(prefix + count, prefix + count + suffix)
        ids = list(range(prefix)) + [prefix + int(k) for k in kept] + list(suffix_ids)
    else:
        ids = list(range(len(sequence)))
    return sequence[None], torch.tensor([ids])


def test_pruned_prefill_logits_equal_transformers_forward(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)
    keep = random_keep(4, encoding.num_visual, 8)
    keep_run = tiny_model.generate(encoding, keep=keep, policy="keep", max_new_tokens=1, output_logits=True)
    reassign_run = tiny_model.generate(encoding, keep=keep, policy="reassign", max_new_tokens=1, output_logits=True)
    for row in range(4):
        mask = keep_run.prefill_mask[row] == 1
        for run, policy in ((keep_run, "keep"), (reassign_run, "reassign")):
            embeds, ids = kept_reference_inputs(encoding, row, keep[row], policy)
            reference = tiny_model.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                         position_ids=ids).logits[0]
            torch.testing.assert_close(run.prefill_logits[row][mask], reference, atol=1e-5, rtol=1e-5)
            assert torch.equal(run.position_ids[row][0], ids[0])
        gap = (keep_run.prefill_logits[row][mask] - reassign_run.prefill_logits[row][mask]).abs().max()
        assert gap > 1e-3, "keep and reassign must feed different positions to the LLM"


@pytest.mark.parametrize("policy", ["keep", "reassign"])
def test_decoding_continues_from_last_prompt_position(tiny_model, images, policy):
    """Each decoding step's logits equal a cache-free forward with the generated tokens at last+1, last+2, ..."""
    encoding = tiny_model.encode(images[:1], PROMPTS[1:2])
    keep = random_keep(1, encoding.num_visual, 6, seed=3)
    out = tiny_model.generate(encoding, keep=keep, policy=policy, max_new_tokens=6, output_logits=True)
    steps = len(out.token_ids[0])
    assert steps >= 3

    embeds, ids = kept_reference_inputs(encoding, 0, keep[0], policy)

    def logits_with_decode_start(first: int) -> torch.Tensor:
        new_tokens = torch.tensor([out.token_ids[0][: steps - 1]])
        full = torch.cat([embeds, tiny_model.model.get_input_embeddings()(new_tokens)], dim=1)
        positions = torch.cat([ids, first + torch.arange(steps - 1)[None]], dim=1)
        logits = tiny_model.model(inputs_embeds=full, attention_mask=torch.ones_like(positions),
                                  position_ids=positions).logits
        return logits[0, ids.shape[1] - 1:]

    expected_start = int(ids[0, -1]) + 1
    torch.testing.assert_close(out.step_logits[0, :steps], logits_with_decode_start(expected_start),
                               atol=1e-5, rtol=1e-5)
    wrong = logits_with_decode_start(expected_start + 5)
    assert (out.step_logits[0, 1:steps] - wrong[1:]).abs().max() > 1e-4, "the check must be able to fail"


def test_batch_of_four_equals_four_single_calls(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)
    keep = random_keep(4, encoding.num_visual, 7, seed=1)
    batched = tiny_model.generate(encoding, keep=keep, policy="keep", max_new_tokens=8)
    for row in range(4):
        single = tiny_model.generate(tiny_model.encode(images[row], PROMPTS[row]), keep=keep[row:row + 1],
                                     policy="keep", max_new_tokens=8)
        assert single.token_ids[0] == batched.token_ids[row]


def test_ragged_keep_sets_and_token_order(tiny_model, images):
    """Rows may keep different numbers of tokens, in any order; `kept` reports what was fed."""
    encoding = tiny_model.encode(images[:2], PROMPTS[:2])
    keep = [torch.tensor([15, 0, 7]), torch.arange(16).flip(0)]
    out = tiny_model.generate(encoding, keep=keep, policy="keep", max_new_tokens=4)
    assert [k.tolist() for k in out.kept] == [[15, 0, 7], list(range(15, -1, -1))]
    prefix = encoding.layout(0)[1]
    assert out.position_ids[0][0, prefix:prefix + 3].tolist() == [prefix + 15, prefix, prefix + 7]


def test_stop_strings_and_max_new_tokens(tiny_model, images):
    encoding = tiny_model.encode(images[:1], PROMPTS[:1])
    free = tiny_model.generate(encoding, max_new_tokens=16)
    text = free.texts[0]
    assert len(free.token_ids[0]) <= 16
    stop = text[4:6]
    assert len(stop) == 2
    stopped = tiny_model.generate(encoding, max_new_tokens=16, stop=[stop])
    assert stopped.texts[0] == text[: text.index(stop)]
    assert len(stopped.token_ids[0]) < len(free.token_ids[0])
    assert len(tiny_model.generate(encoding, max_new_tokens=3).token_ids[0]) == 3


def test_bfloat16_matches_transformers_generate(tiny_checkpoint, images):
    model = mllm.load(tiny_checkpoint, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    encoding = model.encode(images[:2], PROMPTS[:2], frame="cropped")
    assert encoding.inputs_embeds.dtype == torch.bfloat16
    out = model.generate(encoding, max_new_tokens=8)
    assert out.token_ids == transformers_generate_tokens(model, images[:2], encoding.prompts, 8)


@pytest.mark.parametrize("policy", ["keep", "reassign"])
def test_an_extra_token_is_fed_after_the_kept_ones_at_its_anchor(tiny_model, images, policy):
    encoding = tiny_model.encode(images, PROMPTS)
    count, moved = encoding.num_visual, 5
    others = torch.tensor([index for index in range(count) if index != moved])
    # Token 5 fed as an extra token anchored at itself is token 5 fed last among the kept ones.
    extra = mllm.ExtraTokens(encoding.visual_features[:, moved : moved + 1], torch.full((len(images), 1), moved))
    as_extra = tiny_model.generate(encoding, keep=others.expand(len(images), -1), policy=policy, extra=extra,
                                   max_new_tokens=3, output_logits=True)
    as_kept = tiny_model.generate(encoding, keep=torch.cat([others, torch.tensor([moved])]).expand(len(images), -1),
                                  policy=policy, max_new_tokens=3, output_logits=True)
    assert as_extra.texts == as_kept.texts and as_extra.num_extra == 1
    assert all(torch.equal(a, b) for a, b in zip(as_extra.position_ids, as_kept.position_ids))
    torch.testing.assert_close(as_extra.prefill_logits, as_kept.prefill_logits, rtol=0, atol=0)
    with pytest.raises(mllm.KeepSetError, match="extra tokens need features"):
        tiny_model.generate(encoding, extra=mllm.ExtraTokens(extra.features, extra.anchors[:1]))


def test_the_prefill_mask_is_boolean_and_selects_the_real_rows(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)
    out = tiny_model.generate(encoding, max_new_tokens=1, output_logits=True)
    assert out.prefill_mask.dtype == torch.bool
    for row in range(len(images)):
        assert out.prefill_logits[row, out.prefill_mask[row]].shape[0] == int(encoding.attention_mask[row].sum())
