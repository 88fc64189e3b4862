"""Qwen2-VL and Qwen2.5-VL through `mllm`, with transformers' own classes as the oracle.

The oracle's 3-D M-RoPE IDs come from transformers' `get_rope_index`, never from the toolkit; pruned
prompts are fed to transformers' model with those IDs sliced to the kept tokens and an explicit mask.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import random_image

import mllm

PROMPTS = ["hi", "where is the red circle?", "a", "what colour is the square left of the cross?"]


def sized_images() -> list:
    """Four images of different sizes, so the rows carry different numbers of visual tokens."""
    return [random_image(seed, height, width) for seed, (height, width) in
            enumerate([(48, 64), (72, 40), (80, 80), (32, 56)])]


def oracle_inputs(model: mllm.MLLM, encoding: mllm.Encoding) -> dict:
    """The processor batch transformers' own generate reads for the same images and prompts."""
    shown, _ = model.adapter.prepare_images(model.processor, sized_images()[: encoding.batch_size], "original")
    return model.processor(images=shown, text=encoding.prompts, return_tensors="pt", padding=True)


def oracle_rope_index(model: mllm.MLLM, inputs: dict) -> torch.Tensor:
    """(3, B, L) M-RoPE IDs as transformers computes them."""
    ids, _ = model.model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"])
    return ids


def new_tokens(model: mllm.MLLM, output: torch.Tensor, prompt_length: int) -> list[list[int]]:
    """transformers' generated tokens per row, cut after the first EOS (it pads finished rows)."""
    eos = set(model.model.generation_config.eos_token_id)
    rows = []
    for row in output[:, prompt_length:].tolist():
        ends = [step for step, token in enumerate(row) if token in eos]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unpruned_generate_equals_transformers_generate(qwen_checkpoint, batch, dtype):
    model = mllm.load(qwen_checkpoint, device="cpu", dtype=dtype)
    encoding = model.encode(sized_images()[:batch], PROMPTS[:batch], frame="original")
    if batch > 1:
        assert len(set(encoding.visual_counts)) > 1  # ragged rows: the point of this test
    ours = model.generate(encoding, max_new_tokens=8)
    inputs = oracle_inputs(model, encoding)
    reference = model.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert ours.token_ids == new_tokens(model, reference, inputs["input_ids"].shape[1])


def test_original_position_ids_are_transformers_rope_index(qwen):
    encoding = qwen.encode(sized_images(), PROMPTS, frame="original")
    reference = oracle_rope_index(qwen, oracle_inputs(qwen, encoding))
    real = encoding.attention_mask.bool()
    for row in range(4):
        assert torch.equal(encoding.position_ids[:, row, real[row]], reference[:, row, real[row]])
    grid_thw = oracle_inputs(qwen, encoding)["image_grid_thw"]
    assert encoding.grids == [(int(h) // 2, int(w) // 2) for _, h, w in grid_thw]
    assert encoding.visual_counts == [rows * cols for rows, cols in encoding.grids]


def random_keeps(counts: list[int], fraction: float = 0.5, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(count, generator=generator)[: max(1, round(fraction * count))].sort().values
            for count in counts]


def kept_oracle(qwen: mllm.MLLM, encoding: mllm.Encoding, reference_ids: torch.Tensor, row: int,
                kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row `row`'s unpadded prompt with only `kept` visual tokens, and transformers' IDs sliced to them."""
    real = encoding.attention_mask[row].bool()
    is_visual = encoding.input_ids[row][real] == qwen.adapter.image_token_id
    slots = is_visual.nonzero().flatten()
    keep = ~is_visual
    keep[slots[kept]] = True
    embeds = encoding.inputs_embeds[row][real][keep]
    return embeds[None], reference_ids[:, row][:, real][:, keep][:, None]


def test_pruned_keep_equals_transformers_on_sliced_ids(qwen):
    encoding = qwen.encode(sized_images(), PROMPTS, frame="original")
    reference_ids = oracle_rope_index(qwen, oracle_inputs(qwen, encoding))
    keeps = random_keeps(encoding.visual_counts)
    steps = 3
    run = qwen.generate(encoding, keep=keeps, policy="keep", max_new_tokens=steps, output_logits=True)
    for row in range(4):
        embeds, ids = kept_oracle(qwen, encoding, reference_ids, row, keeps[row])
        mask = torch.ones(ids.shape[1:], dtype=torch.long)
        logits = qwen.model(inputs_embeds=embeds, position_ids=ids, attention_mask=mask).logits[0]
        torch.testing.assert_close(run.prefill_logits[row][run.prefill_mask[row]], logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(run.position_ids[row], ids[:, 0])
        # Each decoding step: a cache-free forward with the generated tokens at the largest ID + 1, + 2, ...
        generated = run.token_ids[row]
        for step in range(1, len(generated)):
            tokens = torch.tensor(generated[:step])
            step_embeds = torch.cat([embeds, qwen.adapter.embed_tokens(tokens)[None]], dim=1)
            step_ids = torch.cat([ids, (ids.max() + 1 + torch.arange(step)).expand(3, 1, -1)], dim=2)
            logits = qwen.model(inputs_embeds=step_embeds, position_ids=step_ids,
                                attention_mask=torch.ones(step_ids.shape[1:], dtype=torch.long)).logits[0, -1]
            torch.testing.assert_close(run.step_logits[row, step], logits, atol=1e-4, rtol=1e-4)


def test_reassign_and_compact_feed_other_ids_and_logits(qwen):
    encoding = qwen.encode(sized_images(), PROMPTS, frame="original")
    keeps = random_keeps(encoding.visual_counts)
    runs = {policy: qwen.generate(encoding, keep=keeps, policy=policy, max_new_tokens=1, output_logits=True)
            for policy in ("keep", "reassign", "compact")}
    for row in range(4):
        prefix = encoding.layouts[row].prefix_len
        fed = len(keeps[row])
        reassign = runs["reassign"].position_ids[row]
        assert torch.equal(reassign, torch.arange(reassign.shape[1]).expand(3, -1))  # one value on every axis
        compact = runs["compact"].position_ids[row]
        original = encoding.layouts[row].visual_ids
        assert torch.equal(compact[:, prefix:prefix + fed], original[:, :fed])  # the first raster slots
        assert int(compact[0, prefix + fed]) == int(original[:, :fed].max()) + 1  # text renumbered after them
    logits = {policy: run.prefill_logits[:, -1] for policy, run in runs.items()}
    assert not torch.allclose(logits["keep"], logits["reassign"])
    assert not torch.allclose(logits["keep"], logits["compact"])
    assert not torch.allclose(logits["reassign"], logits["compact"])


def test_transpose_swaps_h_and_w_and_is_refused_for_llava(qwen, tiny_model, images):
    encoding = qwen.encode(sized_images()[:1], PROMPTS[:1], frame="original")
    out = qwen.generate(encoding, policy="transpose", max_new_tokens=1)
    prefix, count = encoding.layouts[0].prefix_len, encoding.visual_counts[0]
    original = encoding.layouts[0].visual_ids
    assert torch.equal(out.position_ids[0][:, prefix:prefix + count], original[[0, 2, 1]])
    llava = tiny_model.encode(images[:1], ["hi"])
    with pytest.raises(mllm.KeepSetError, match="transpose"):
        tiny_model.generate(llava, policy="transpose", max_new_tokens=1)


def test_shift_on_one_axis_moves_only_that_axis(qwen):
    encoding = qwen.encode(sized_images()[:1], PROMPTS[:1], frame="original")
    out = qwen.generate(encoding, policy="shift:offset=3,axis=2", max_new_tokens=1)
    prefix, count = encoding.layouts[0].prefix_len, encoding.visual_counts[0]
    moved = out.position_ids[0][:, prefix:prefix + count] - encoding.layouts[0].visual_ids
    assert moved[2].eq(3).all() and moved[:2].eq(0).all()


def test_layer_pruning_at_layer_0_equals_pruning_before_the_llm(qwen):
    images = [random_image(seed, 48, 64) for seed in range(3)]  # in-LLM pruning needs equal counts per row
    encoding = qwen.encode(images, PROMPTS[:3], frame="original")
    keeps = torch.stack(random_keeps(encoding.visual_counts, seed=1))
    for policy in ("keep", "reassign"):
        before = qwen.generate(encoding, keep=keeps, policy=policy, max_new_tokens=4, output_logits=True)
        inside = qwen.generate(encoding, policy=policy, max_new_tokens=4, output_logits=True,
                               layer_pruning=mllm.LayerPruning(0, lambda context: keeps, policy=policy))
        assert inside.token_ids == before.token_ids
        torch.testing.assert_close(inside.step_logits, before.step_logits, atol=1e-5, rtol=1e-5)


def test_layer_pruning_under_keep_equals_a_reference_after_layer_k(qwen):
    """FastV-style pruning before layer 1: layers >= 1 see only the kept tokens, at their original M-RoPE IDs."""
    images = [random_image(seed, 48, 64) for seed in range(2)]
    encoding = qwen.encode(images, PROMPTS[:2], frame="original")
    count = encoding.num_visual
    keeps = torch.stack(random_keeps([count, count], seed=2))
    seen = {}

    def select(context: mllm.LayerContext) -> torch.Tensor:
        seen["attention"] = context.attention()
        return keeps

    out = qwen.generate(encoding, layer_pruning=mllm.LayerPruning(1, select), max_new_tokens=1, output_logits=True)
    assert seen["attention"].shape[-1] == encoding.inputs_embeds.shape[1]
    torch.testing.assert_close(seen["attention"].sum(-1), torch.ones_like(seen["attention"].sum(-1)))
    # Reference: run layer 0 on the whole prompt, then layers >= 1 on the kept rows with their sliced cos/sin.
    language = qwen.adapter.language_model
    ids = encoding.position_ids
    hidden = encoding.inputs_embeds
    cos_sin = language.rotary_emb(hidden, ids)
    mask = encoding.attention_mask
    full = language(inputs_embeds=hidden, position_ids=ids, attention_mask=mask, output_hidden_states=True)
    after_first = full.hidden_states[1]
    for row in range(2):
        real = mask[row].bool()
        slots = encoding.visual_slots(row)
        keep = real.clone()
        keep[slots] = False
        keep[slots[keeps[row]]] = True
        states = after_first[row][keep][None]
        embeddings = tuple(part[row][keep][None] for part in cos_sin)
        for layer in qwen.adapter.decoder_layers[1:]:
            states = layer(states, attention_mask=None, position_embeddings=embeddings)
        logits = qwen.adapter.lm_head(language.norm(states))[0, -1]
        torch.testing.assert_close(out.prefill_logits[row, -1], logits, atol=1e-5, rtol=1e-5)


def test_bad_input_is_named(qwen, qwen_checkpoint, tmp_path):
    with pytest.raises(mllm.ImageLoadError, match=r"image 1 is 12x40 pixels, smaller than one merged patch"):
        qwen.encode([random_image(0, 48, 64), random_image(1, 40, 12)], PROMPTS[:2], frame="original")
    encoding = qwen.encode(sized_images()[:2], PROMPTS[:2], frame="original")
    too_far = encoding.visual_counts[1]
    with pytest.raises(mllm.KeepSetError, match=rf"row 1: .*{too_far - 1}\]|row 1: keep set index out of range"):
        qwen.generate(encoding, keep=[torch.arange(2), torch.tensor([0, too_far])], max_new_tokens=1)
    with pytest.raises(ValueError, match="cropped"):
        qwen.encode(sized_images()[:1], PROMPTS[:1], frame="cropped")


def test_selfcheck_passes_on_qwen(qwen_checkpoint, tmp_path):
    from mllm import selfcheck

    assert selfcheck.main(["--model", str(qwen_checkpoint), "--out", str(tmp_path), "--device", "cpu",
                           "--dtype", "float32", "--max-new-tokens", "4"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["checks"]) == 3 and all(check["passed"] for check in summary["checks"])
    rows = (tmp_path / "position_ids.csv").read_text().splitlines()
    assert rows[0] == "policy,token,position_id_t,position_id_h,position_id_w"
    assert {row.split(",")[0] for row in rows[1:]} == {*selfcheck.POLICIES, "compact", "transpose"}


def test_a_qwen_directory_without_its_processor_files_is_named(qwen_checkpoint, tmp_path):
    directory = tmp_path / "no-processor"
    shutil.copytree(qwen_checkpoint, directory)
    (directory / "preprocessor_config.json").unlink()
    with pytest.raises(mllm.CheckpointNotFoundError, match=r"preprocessor_config.json: not found"):
        mllm.load(directory, device="cpu")


def test_min_and_max_pixels_bound_the_visual_tokens(qwen_checkpoint):
    small = mllm.load(qwen_checkpoint, device="cpu", max_pixels=48 * 48)
    encoding = small.encode([random_image(0, 96, 96)], PROMPTS[:1], frame="original")
    assert encoding.grids == [(3, 3)] and encoding.frames[0].width == 96
    with pytest.raises(ValueError, match="min_pixels"):
        mllm.load(qwen_checkpoint, device="cpu", min_pixels=96 * 96, max_pixels=48 * 48)
