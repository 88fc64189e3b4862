"""Encode images and prompts: input embeddings with the image features merged, before any pruning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mllm.errors import PromptError
from mllm.images import FRAME_KINDS, FrameKind, ImageFrame, ImageInput, load_image, to_model_square
from mllm.prompts import build_prompt, check_prompt, image_token

if TYPE_CHECKING:
    from mllm.loading import MLLM


@dataclass
class Encoding:
    """A left-padded batch of prompts, each with one image's visual tokens merged in.

    Row r is `pad | prefix text | num_visual visual tokens | suffix text`; the visual tokens start at
    `visual_start[r]` and are in raster order over `grid` (rows, cols).
    """

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 0 on padding
    inputs_embeds: torch.Tensor  # (B, L, D)
    position_ids: torch.Tensor  # (B, L), original IDs; padding gets 1 as in transformers' generate
    visual_start: torch.Tensor  # (B,)
    num_visual: int
    grid: tuple[int, int]
    frames: list[ImageFrame]
    prompts: list[str]
    pixel_values: torch.Tensor
    vision_hidden_states: tuple[torch.Tensor, ...] | None = None  # each (B, 1 + N, D_vision)
    vision_attentions: dict[int, torch.Tensor] | None = None  # layer -> (B, H, 1 + N, 1 + N)
    messages: list[str] | None = None  # the user messages the chat template wrapped; None for raw prompts

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def visual_index(self) -> torch.Tensor:
        """(B, N) sequence positions of each row's visual tokens."""
        offsets = torch.arange(self.num_visual, device=self.visual_start.device)
        return self.visual_start[:, None] + offsets[None, :]

    @property
    def visual_features(self) -> torch.Tensor:
        """(B, N, D) the projected visual tokens as the LLM receives them."""
        rows = torch.arange(self.batch_size, device=self.inputs_embeds.device)[:, None]
        return self.inputs_embeds[rows, self.visual_index().to(self.inputs_embeds.device)]

    def layout(self, row: int) -> tuple[int, int, int]:
        """(padding, prefix_len, suffix_len) of row `row`."""
        padding = int((self.attention_mask[row] == 0).sum())
        prefix = int(self.visual_start[row]) - padding
        suffix = self.input_ids.shape[1] - int(self.visual_start[row]) - self.num_visual
        return padding, prefix, suffix


def original_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers' convention for left-padded batches: cumsum of the mask - 1, padding set to 1."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def model_squares(mllm: MLLM, images: Sequence[ImageInput], frame: FrameKind) -> tuple[list, list[ImageFrame]]:
    """The square images the processor should see under coordinate frame `frame`, and their frames."""
    if frame not in FRAME_KINDS:
        raise ValueError(f"unknown coordinate frame {frame!r}; choose one of {FRAME_KINDS}")
    image_processor = mllm.processor.image_processor
    side = (getattr(image_processor, "crop_size", None) or image_processor.size)["height"]
    background = tuple(int(255 * channel) for channel in image_processor.image_mean)
    squares, frames = zip(*(to_model_square(load_image(image), frame, side, background) for image in images))
    return list(squares), list(frames)


@torch.no_grad()
def encode_pixels(
    mllm: MLLM, images: ImageInput | Sequence[ImageInput], *, frame: FrameKind = "padded"
) -> tuple[torch.Tensor, list[ImageFrame]]:
    """(pixel_values on the model's device and dtype, frames): what the vision tower reads, without prompts."""
    squares, frames = model_squares(mllm, _as_list(images), frame)
    pixels = mllm.processor.image_processor(images=squares, return_tensors="pt")["pixel_values"]
    return pixels.to(mllm.device, mllm.dtype), frames


@torch.no_grad()
def encode(
    mllm: MLLM,
    images: ImageInput | Sequence[ImageInput],
    texts: str | Sequence[str],
    *,
    frame: FrameKind = "padded",
    raw_prompts: bool = False,
    vision_hidden_states: bool = False,
    vision_attentions: Sequence[int] | None = None,
) -> Encoding:
    """Encode one image per prompt.

    `texts` are user messages wrapped by the chat template, or full prompts holding one image
    placeholder when `raw_prompts` is true. `frame` picks the coordinate frame (see `mllm.images`).
    `vision_attentions` lists vision layers (negative counts from the end) whose attention maps to
    recompute from their inputs, so SDPA models need not switch to eager attention.
    """
    images, texts = _as_list(images), _as_list(texts)
    if len(images) != len(texts):
        raise PromptError(f"got {len(images)} images but {len(texts)} prompts; give one image per prompt")
    token = image_token(mllm.processor)
    if raw_prompts:
        for index, prompt in enumerate(texts):
            check_prompt(prompt, token, index)
        prompts = list(texts)
    else:
        prompts = [build_prompt(mllm.processor, text) for text in texts]

    squares, frames = model_squares(mllm, images, frame)
    batch = mllm.processor(images=squares, text=prompts, return_tensors="pt", padding=True)

    device = mllm.device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    pixel_values = batch["pixel_values"].to(device, mllm.dtype)
    adapter = mllm.adapter
    want_hidden = vision_hidden_states or bool(vision_attentions)
    features, hidden = adapter.image_features(pixel_values, output_hidden_states=want_hidden)

    is_visual = input_ids == adapter.image_token_id
    counts = is_visual.sum(dim=1)
    if (counts != adapter.num_visual_tokens).any():
        raise PromptError(f"expected {adapter.num_visual_tokens} image tokens per prompt, found {counts.tolist()}")
    embeds = adapter.embed_tokens(input_ids)
    embeds = embeds.masked_scatter(is_visual[..., None], features.to(embeds.dtype))

    attentions = None
    if vision_attentions:
        num_layers = len(adapter.vision_layers)
        attentions = {}
        for layer in vision_attentions:
            if not -num_layers <= layer < num_layers:
                raise ValueError(f"vision_attentions: layer {layer} out of range for a {num_layers}-layer vision tower")
            index = layer % num_layers
            attentions[index] = adapter.vision_attention(index, hidden[index])

    return Encoding(
        input_ids=input_ids,
        attention_mask=attention_mask,
        inputs_embeds=embeds,
        position_ids=original_position_ids(attention_mask),
        visual_start=is_visual.long().argmax(dim=1),
        num_visual=adapter.num_visual_tokens,
        grid=adapter.grid,
        frames=list(frames),
        prompts=prompts,
        pixel_values=pixel_values,
        vision_hidden_states=hidden if vision_hidden_states else None,
        vision_attentions=attentions,
        messages=None if raw_prompts else list(texts),
    )
