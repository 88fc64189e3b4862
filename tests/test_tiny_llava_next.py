"""The tiny LLaVA-NeXT checkpoint (mllm.tiny.build_tiny_llava_next): it loads back offline without torchvision, and
its visual span has the layout LLaVA-NeXT's pack_image_features makes, re-derived here from its published rules."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

from mllm.tiny import LLAVA15_CHAT_TEMPLATE, build_tiny_llava_next, tiny_grid_pinpoints

SIZES = [(28, 28), (64, 32), (32, 64), (90, 30), (50, 61)]  # (width, height): squares, wide, tall, very wide


def best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """LLaVA-NeXT's choice of tile canvas: the most effective resolution, then the least waste, first listed."""
    best, best_key = None, None
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(canvas_h * canvas_w - effective))
        if best_key is None or key > best_key:
            best, best_key = (canvas_h, canvas_w), key
    return best


def expected_tokens(width: int, height: int, side: int = 28, patch: int = 14) -> int:
    """Base crop (side / patch)^2, then the tile canvas unpadded to the image's aspect, one newline per row."""
    canvas_h, canvas_w = best_resolution(height, width, tiny_grid_pinpoints(side))
    rows, cols = canvas_h // side * (side // patch), canvas_w // side * (side // patch)
    if width / height > cols / rows:  # wider than the canvas: padded above and below
        kept = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept) // 2)
    else:
        kept = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept) // 2)
    return (side // patch) ** 2 + rows * (cols + 1)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return build_tiny_llava_next(tmp_path_factory.mktemp("llava-next"))


def test_the_visual_span_has_llava_nexts_layout_and_generates(next_dir):
    model = LlavaNextForConditionalGeneration.from_pretrained(next_dir).eval()
    processor = LlavaNextProcessor.from_pretrained(next_dir)
    assert processor.chat_template == LLAVA15_CHAT_TEMPLATE
    images = [Image.new("RGB", size) for size in SIZES]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": "hi"}]}],
                                           add_generation_prompt=True)
    batch = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
    counts = (batch.input_ids == model.config.image_token_id).sum(dim=1).tolist()
    assert counts == [expected_tokens(*size) for size in SIZES]
    assert len(set(counts)) > 2  # aspect ratios give different token counts
    with torch.no_grad():  # transformers packs the span itself: each image's count of features fills its tokens
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(logits).all() and out.shape[0] == len(SIZES)
