"""Shikra (`mllm.shikra.ShikraForConditionalGeneration`, converted by `python -m mllm.convert shikra`).

LLaVA-1.5's layout with one linear projector, CLIP ViT-L/14 at 224 px (16 x 16 = 256 visual tokens) between
`<im_start>` and `<im_end>`, and the image padded to a square with white, as Shikra's `Expand2square` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from mllm.adapters.base import register_adapter
from mllm.adapters.llava import LlavaAdapter, shown_side
from mllm.images import FrameKind, ImageFrame, to_model_square
from mllm.shikra import ShikraForConditionalGeneration

WHITE = (255, 255, 255)


@register_adapter
class ShikraAdapter(LlavaAdapter):
    """Everything LLaVA's adapter does; only the padding colour differs (white, not CLIP's mean)."""

    model_types = ("shikra",)
    model_class = ShikraForConditionalGeneration

    def prepare_images(
        self, processor: Any, images: Sequence[Image.Image], frame: FrameKind
    ) -> tuple[list[Image.Image], list[ImageFrame]]:
        image_processor = processor.image_processor
        side = shown_side(image_processor)
        squares, frames = zip(*(to_model_square(image, frame, side, WHITE) for image in images))
        return list(squares), list(frames)
