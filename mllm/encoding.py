"""Encode images and prompts: input embeddings with the image features merged, before any pruning."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mllm.errors import KeepSetError, PromptError
from mllm.images import FRAME_KINDS, FrameKind, ImageFrame, ImageInput, load_image
from mllm.positions import VisualLayout, position_ids
from mllm.prompts import build_prompt, check_prompt, image_token
from mllm.visual_tokens import VisualTokens

if TYPE_CHECKING:
    from mllm.loading import MLLM


@dataclass
class Encoding:
    """A left-padded batch of prompts, each with one image's visual tokens merged in.

    Row r is `pad | prefix text | visual_counts[r] visual tokens | suffix text`; the visual tokens start
    at `visual_start[r]` and are in raster order over `grids[r]` (rows, cols). Rows may carry different
    numbers of visual tokens (Qwen2-VL keeps each image's native resolution); `num_visual` and `grid`
    are the common count and grid where every row has the same.
    """

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 0 on padding
    inputs_embeds: torch.Tensor  # (B, L, D)
    position_ids: torch.Tensor  # (axes, B, L), original IDs; padding gets 1 as in transformers' generate
    visual_start: torch.Tensor  # (B,)
    visual_counts: list[int]
    grids: list[tuple[int, int]]
    layouts: list[VisualLayout]  # per row: prefix, suffix and the visual tokens' original IDs
    frames: list[ImageFrame]
    prompts: list[str]
    pixel_values: torch.Tensor
    vision_inputs: dict[str, torch.Tensor] | None = None  # what else the vision tower read (image_grid_thw)
    # Each (B, 1 + N, D_vision), or, for Qwen2-VL, a list of per-image (rows, cols, D_vision) patch grids
    vision_hidden_states: tuple[torch.Tensor, ...] | None = None
    # layer -> (B, H, 1 + N, 1 + N), or, for Qwen2-VL, a list of per-image (H, N_i, N_i) in raster order
    vision_attentions: dict[int, torch.Tensor] | None = None
    messages: list[str] | None = None  # the user messages the chat template wrapped; None for raw prompts
    visual_tokens: list[VisualTokens] | None = None  # per row: what each visual token is (`mllm.visual_tokens`)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_visual(self) -> int:
        """Visual tokens per row, where every row has the same number."""
        if len(set(self.visual_counts)) > 1:
            raise KeepSetError(f"the rows carry different numbers of visual tokens ({self.visual_counts}); "
                               "read each row's from `visual_counts`")
        return self.visual_counts[0]

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of every row's visual tokens, where every row has the same grid."""
        if any(grid is None for grid in self.grids):
            kinds = next(tokens.counts() for tokens in self.visual_tokens if tokens.grid is None)
            raise KeepSetError(f"the visual tokens are not one grid ({kinds}: a base crop and tiles with newline "
                               "tokens); read what each is from `visual_tokens`")
        if len(set(self.grids)) > 1:
            raise KeepSetError(f"the rows' images have different grids ({self.grids}); read each row's from `grids`")
        return self.grids[0]

    def visual_slots(self, row: int) -> torch.Tensor:
        """(N_row,) sequence positions of row `row`'s visual tokens."""
        return int(self.visual_start[row]) + torch.arange(self.visual_counts[row], device=self.visual_start.device)

    def visual_index(self) -> torch.Tensor:
        """(B, N) sequence positions of each row's visual tokens (every row with the same count)."""
        offsets = torch.arange(self.num_visual, device=self.visual_start.device)
        return self.visual_start[:, None] + offsets[None, :]

    @property
    def visual_features(self) -> torch.Tensor:
        """(B, N, D) the projected visual tokens as the LLM receives them (every row with the same count)."""
        rows = torch.arange(self.batch_size, device=self.inputs_embeds.device)[:, None]
        return self.inputs_embeds[rows, self.visual_index().to(self.inputs_embeds.device)]

    def subset(self, rows: Sequence[int]) -> Encoding:
        """Rows `rows` as a batch of their own, the padding every one of them has trimmed off the left."""
        index = torch.tensor(list(rows), device=self.input_ids.device)
        mask = self.attention_mask[index]
        trim = int((mask == 0).all(dim=0).long().cumprod(dim=0).sum())
        pixel_values = self.pixel_values
        vision_inputs = self.vision_inputs
        if vision_inputs and "image_grid_thw" in vision_inputs:  # patches of every image in one flat tensor
            grid_thw = vision_inputs["image_grid_thw"]
            pieces = pixel_values.split(grid_thw.prod(dim=-1).tolist())
            pixel_values = torch.cat([pieces[row] for row in rows])
            vision_inputs = {**vision_inputs, "image_grid_thw": grid_thw[index]}
        else:
            pixel_values = pixel_values[index]
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[index, trim:],
            attention_mask=mask[:, trim:],
            inputs_embeds=self.inputs_embeds[index, trim:],
            position_ids=self.position_ids[:, index, trim:],
            visual_start=self.visual_start[index] - trim,
            visual_counts=[self.visual_counts[row] for row in rows],
            grids=[self.grids[row] for row in rows],
            visual_tokens=None if self.visual_tokens is None else [self.visual_tokens[row] for row in rows],
            layouts=[self.layouts[row] for row in rows],
            frames=[self.frames[row] for row in rows],
            prompts=[self.prompts[row] for row in rows],
            pixel_values=pixel_values,
            vision_inputs=vision_inputs,
            vision_hidden_states=None if self.vision_hidden_states is None else
            tuple(_rows_of(state, rows) for state in self.vision_hidden_states),
            vision_attentions=None if self.vision_attentions is None else
            {layer: _rows_of(attention, rows) for layer, attention in self.vision_attentions.items()},
            messages=None if self.messages is None else [self.messages[row] for row in rows],
        )

    def layout(self, row: int) -> tuple[int, int, int]:
        """(padding, prefix_len, suffix_len) of row `row`."""
        padding = int((self.attention_mask[row] == 0).sum())
        return padding, self.layouts[row].prefix_len, self.layouts[row].suffix_len


def _rows_of(value: torch.Tensor | Sequence, rows: Sequence[int]) -> torch.Tensor | list:
    """Rows `rows` of a batched tensor, or of a per-image list (ragged vision states)."""
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(list(rows), device=value.device)]
    return [value[row] for row in rows]


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _shown_images(mllm: MLLM, images: Sequence[ImageInput], frame: FrameKind) -> tuple[list, list[ImageFrame]]:
    if frame not in FRAME_KINDS:
        raise ValueError(f"unknown coordinate frame {frame!r}; choose one of {FRAME_KINDS}")
    return mllm.adapter.prepare_images(mllm.processor, [load_image(image) for image in images], frame)


def _vision_inputs(mllm: MLLM, batch: dict) -> dict[str, torch.Tensor]:
    """What the vision tower reads from a processor batch: pixel_values (and where the processor gives it, the
    image_grid_thw that places a native-resolution model's patches, or the image_sizes LLaVA-NeXT unpads its tiles
    by), on the model's device."""
    inputs = {"pixel_values": batch["pixel_values"].to(mllm.device, mllm.dtype)}
    return inputs | {key: batch[key].to(mllm.device) for key in ("image_grid_thw", "image_sizes") if key in batch}


@torch.no_grad()
def encode_vision_inputs(
    mllm: MLLM, images: ImageInput | Sequence[ImageInput], *, frame: FrameKind = "padded"
) -> tuple[dict[str, torch.Tensor], list[ImageFrame]]:
    """({"pixel_values"[, "image_grid_thw"]} on the model's device, frames): the batch `adapter.encode_images`
    reads, without prompts. Native-resolution models (Qwen2-VL) need `image_grid_thw` to place the patches."""
    shown, frames = _shown_images(mllm, _as_list(images), frame)
    return _vision_inputs(mllm, mllm.processor.image_processor(images=shown, return_tensors="pt")), frames


def encode_pixels(
    mllm: MLLM, images: ImageInput | Sequence[ImageInput], *, frame: FrameKind = "padded"
) -> tuple[torch.Tensor, list[ImageFrame]]:
    """(pixel_values on the model's device and dtype, frames): what the vision tower reads, without prompts."""
    inputs, frames = encode_vision_inputs(mllm, images, frame=frame)
    return inputs["pixel_values"], frames


def _original_position_ids(layouts: Sequence[VisualLayout], attention_mask: torch.Tensor) -> torch.Tensor:
    """(axes, B, L): each row's IDs with every visual token kept, left-padded with 1 as transformers pads."""
    axes = layouts[0].num_axes
    ids = torch.ones(axes, *attention_mask.shape, dtype=torch.long)
    for row, layout in enumerate(layouts):
        real = position_ids(torch.arange(layout.num_visual), layout, "keep")
        ids[:, row, attention_mask.shape[1] - real.shape[1]:] = real
    return ids.to(attention_mask.device)


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

    shown, frames = _shown_images(mllm, images, frame)
    batch = mllm.processor(images=shown, text=prompts, return_tensors="pt", padding=True)

    device = mllm.device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    tower_inputs = _vision_inputs(mllm, batch)
    adapter = mllm.adapter
    want_hidden = vision_hidden_states or bool(vision_attentions)
    vision = adapter.encode_images(tower_inputs, output_hidden_states=want_hidden)

    is_visual = input_ids == adapter.image_token_id
    counts = is_visual.sum(dim=1).tolist()
    expected = [len(features) for features in vision.features]
    if counts != expected:
        raise PromptError(f"expected {expected} image tokens in the prompts (one image each), found {counts}")
    embeds = adapter.embed_tokens(input_ids)
    embeds = embeds.masked_scatter(is_visual[..., None], torch.cat(vision.features).to(embeds.dtype))

    attentions = None
    if vision_attentions:
        num_layers = len(adapter.vision_layers)
        attentions = {}
        for layer in vision_attentions:
            if not -num_layers <= layer < num_layers:
                raise ValueError(f"vision_attentions: layer {layer} out of range for a {num_layers}-layer vision tower")
            index = layer % num_layers
            attentions[index] = adapter.vision_attention(index, vision.hidden_states[index])

    visual_start = is_visual.long().argmax(dim=1)
    padding = (attention_mask == 0).sum(dim=1)
    length = input_ids.shape[1]
    tokens = vision.token_maps()
    layouts = [adapter.visual_layout(int(visual_start[row] - padding[row]), row_tokens,
                                     length - int(visual_start[row]) - counts[row])
               for row, row_tokens in enumerate(tokens)]
    return Encoding(
        input_ids=input_ids,
        attention_mask=attention_mask,
        inputs_embeds=embeds,
        position_ids=_original_position_ids(layouts, attention_mask.cpu()).to(device),
        visual_start=visual_start,
        visual_counts=counts,
        grids=list(vision.grids),
        layouts=layouts,
        frames=[dataclasses.replace(image_frame, input_size=adapter.input_size(row_tokens))
                for image_frame, row_tokens in zip(frames, tokens)],
        prompts=prompts,
        pixel_values=tower_inputs["pixel_values"],
        vision_inputs={key: value for key, value in tower_inputs.items() if key != "pixel_values"} or None,
        vision_hidden_states=vision.hidden_states if vision_hidden_states else None,
        vision_attentions=attentions,
        messages=None if raw_prompts else list(texts),
        visual_tokens=tokens,
    )
