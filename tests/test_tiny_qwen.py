"""The tiny random Qwen2-VL / Qwen2.5-VL checkpoints: they read back offline and behave like the real layout."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import random_image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.vision_utils import get_vision_window_index

from mllm.processors import load_qwen_processor
from mllm.tiny_qwen import (
    MODELS,
    QWEN_SPECIAL_TOKENS,
    TinyQwenConfig,
    build_qwen_image_processor,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
)

BUILDERS = {"qwen2_vl": build_tiny_qwen2_vl, "qwen2_5_vl": build_tiny_qwen2_5_vl}
PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where is the cat?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def qwen(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model_type = request.param
    directory = BUILDERS[model_type](tmp_path_factory.mktemp(model_type))
    model, info = MODELS[model_type][1].from_pretrained(directory, local_files_only=True, output_loading_info=True)
    return model_type, directory, model.eval(), info, load_qwen_processor(directory)


def two_images() -> list:
    # PIL sizes are (width, height): 64 wide x 48 high, then 40 wide x 72 high.
    return [random_image(0, height=48, width=64), random_image(1, height=72, width=40)]


def batch(processor, images: list, texts: list[str]) -> dict:
    prompts = [processor.apply_chat_template(user_turn(text), add_generation_prompt=True) for text in texts]
    return processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")


def test_checkpoint_reads_back_offline(qwen):
    model_type, directory, model, info, processor = qwen
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    assert type(config) is MODELS[model_type][0]
    assert type(model) is MODELS[model_type][1]
    assert type(AutoModelForImageTextToText.from_config(config)) is MODELS[model_type][1]
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    assert config.image_token_id == ids["<|image_pad|>"] == processor.image_token_id
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert model.generation_config.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert model.generation_config.pad_token_id == ids["<|endoftext|>"] == tokenizer.pad_token_id
    assert not config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)
    text = config.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert text.vocab_size == len(tokenizer)


def test_processor_loads_back_with_the_same_pixels(qwen):
    model_type, directory, model, _, processor = qwen
    image = random_image(2, height=48, width=64)
    expected = build_qwen_image_processor(TinyQwenConfig())(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(processor.image_processor(images=[image], return_tensors="pt")["pixel_values"], expected)
    vision = model.config.vision_config
    assert processor.image_processor.patch_size == vision.patch_size
    assert processor.image_processor.merge_size == vision.spatial_merge_size
    assert processor.image_processor.temporal_patch_size == vision.temporal_patch_size
    assert expected.shape[1] == 3 * vision.temporal_patch_size * vision.patch_size**2
    try:
        auto = AutoProcessor.from_pretrained(directory, local_files_only=True)
    except ImportError as error:
        # transformers 5.x builds Qwen's video processor eagerly, and it needs torchvision.
        assert importlib.util.find_spec("torchvision") is None
        assert "Torchvision" in str(error)
    else:
        assert type(auto) is MODELS[model_type][2]
        assert torch.equal(auto.image_processor(images=[image], return_tensors="pt")["pixel_values"], expected)


def test_chat_template_renders_the_qwen_format(qwen):
    processor = qwen[4]
    messages = user_turn("Where is the cat?")
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == PROMPT
    assert processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == PROMPT
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert processor.apply_chat_template(system) == expected


def test_processor_expands_image_pad_per_image_and_pads_left(qwen):
    processor = qwen[4]
    inputs = batch(processor, two_images(), ["Where is the cat?", "hi"])
    merge = processor.image_processor.merge_size
    grids = inputs["image_grid_thw"]
    assert grids.tolist() == [[1, 6, 8], [1, 8, 4]]  # pixels rounded to multiples of patch*merge = 16
    expected = (grids.prod(-1) // merge**2).tolist()
    image_pad = processor.image_token_id
    assert (inputs["input_ids"] == image_pad).sum(-1).tolist() == expected == [12, 8]
    assert inputs["pixel_values"].shape[0] == grids.prod(-1).sum()
    # The shorter row is padded on the left with <|endoftext|>, the longer one not at all.
    tokenizer = processor.tokenizer
    short = inputs["attention_mask"][1] == 0
    assert short.any() and short[: int(short.sum())].all() and inputs["attention_mask"][0].all()
    assert (inputs["input_ids"][1][short] == tokenizer.pad_token_id).all()
    # M-RoPE needs to know which tokens are image tokens; the processor says so in mm_token_type_ids.
    assert torch.equal(inputs["mm_token_type_ids"] == 1, inputs["input_ids"] == image_pad)
    for row, count in zip(inputs["input_ids"], expected):
        text = tokenizer.decode(row[row != tokenizer.pad_token_id])
        assert "<|vision_start|>" + "<|image_pad|>" * count + "<|vision_end|>" in text


def test_generate_on_a_left_padded_batch_matches_each_row_alone(qwen):
    model, processor = qwen[2], qwen[4]
    images, texts = two_images(), ["Where is the cat?", "hi"]
    inputs = batch(processor, images, texts)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape == (2, 5)
    for row in range(2):
        alone = batch(processor, [images[row]], [texts[row]])
        with torch.no_grad():
            single = model.generate(**alone, max_new_tokens=5, do_sample=False)
        assert torch.equal(single[0, alone["input_ids"].shape[1] :], new[row])


def test_special_tokens_are_single_ids_and_round_trip(qwen):
    tokenizer = qwen[4].tokenizer
    ids = [tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids) and tokenizer.unk_token_id not in ids
    for token, index in zip(QWEN_SPECIAL_TOKENS, ids):
        assert tokenizer(token)["input_ids"] == [index]  # and no BOS prepended
        assert tokenizer.decode([index]) == token
    assert tokenizer("ab")["input_ids"] == tokenizer.convert_tokens_to_ids(["a", "b"])
    encoded = tokenizer(PROMPT)["input_ids"]
    assert tokenizer.decode(encoded) == PROMPT
    assert tokenizer.decode(encoded, skip_special_tokens=True) == (
        "system\nYou are a helpful assistant.\nuser\nWhere is the cat?\nassistant\n"
    )


def test_qwen2_5_vl_window_attention_splits_an_image(qwen):
    model_type, _, model, _, processor = qwen
    if model_type != "qwen2_5_vl":
        pytest.skip("only Qwen2.5-VL's ViT attends within windows")
    vision = model.config.vision_config
    assert vision.fullatt_block_indexes == [vision.depth - 1]
    pixels = processor.image_processor(images=[random_image(3, height=64, width=64)], return_tensors="pt")
    grid = pixels["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]
    merge, window, patch = vision.spatial_merge_size, vision.window_size, vision.patch_size
    _, cu_window_seqlens = get_vision_window_index(grid, merge, window, patch)
    assert cu_window_seqlens.tolist() == [0, 16, 32, 48, 64]  # four windows of 4x4 patches
    visual = model.model.visual
    with torch.no_grad():
        windowed = visual(pixels["pixel_values"], grid_thw=grid).pooler_output
        visual.window_size = 64  # one window over the whole image: the windows must have mattered
        try:
            whole = visual(pixels["pixel_values"], grid_thw=grid).pooler_output
        finally:
            visual.window_size = vision.window_size
    assert windowed.shape == whole.shape == (16, model.config.text_config.hidden_size)
    assert not torch.allclose(windowed, whole, atol=1e-5)
