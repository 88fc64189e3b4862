"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, llava-hf/llava-v1.6-*): anyres tiles with newline tokens.

Each image is fed as its base crop (the whole image squashed to the tower's square, 24 x 24 tokens at 336 px)
and then its tiles: the best canvas of `image_grid_pinpoints` for the image's aspect ratio, cut into tower-sized
crops, stitched back into one feature grid, unpadded to the image's aspect ratio, and read row by row with an
`image_newline` token after each row. Every token, newlines included, takes the next 1-D position ID. The token
map (`mllm.visual_tokens.VisualTokens.llava_next`) says which each token is; transformers' own `pack_image_features`
makes the features, and the map is built from transformers' own tile-shape and unpadding functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from mllm.adapters.base import VisionOutput, register_adapter
from mllm.adapters.llava import LlavaAdapter
from mllm.errors import UnsupportedModelError
from mllm.images import FrameKind, ImageFrame, at_own_aspect
from mllm.visual_tokens import VisualTokens


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: LLaVA-1.5's tower, projector and LLM, fed a base crop and unpadded tiles with newlines."""

    model_types = ("llava_next",)
    model_class = LlavaNextForConditionalGeneration
    processor_frame = "original"  # the processor keeps the aspect ratio (tiles) and squashes the base crop
    tokens_on_one_grid = False

    @property
    def grid(self) -> tuple[int, int]:
        raise UnsupportedModelError("llava_next feeds a base crop and tiles with newline tokens, not one grid: read "
                                    "each row's tokens from `Encoding.visual_tokens`")

    @property
    def fixed_grid(self) -> tuple[int, int] | None:
        return None

    @property
    def crop_grid(self) -> tuple[int, int]:
        """(rows, cols) of one tower crop's patch tokens (the base crop's, and each tile's)."""
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return side, side

    @property
    def tower_grid(self) -> tuple[int, int]:
        return self.crop_grid

    def tower_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The base crop: the whole image at the tower's square, as LLaVA-1.5 shows it; every tile passes the same
        # tower with the same position embedding, so a probe of the base crop asks what one of LLaVA-1.5 asks.
        return {"pixel_values": batch["pixel_values"][:, 0]}

    def tower_hidden_states(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(self.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states)

    def prepare_images(
        self, processor: Any, images: Sequence[Image.Image], frame: FrameKind
    ) -> tuple[list[Image.Image], list[ImageFrame]]:
        background = tuple(int(255 * channel) for channel in processor.image_processor.image_mean)
        return at_own_aspect(images, frame, background, self.model_type)  # the processor tiles what it is shown

    def token_map(self, image_size: Sequence[int]) -> VisualTokens:
        """The tokens of an image of (height, width) `image_size`: the base crop, then the unpadded tile canvas."""
        config = self.model.config
        rows, cols = self.crop_grid
        tiles_h, tiles_w = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints,
                                                       config.vision_config.image_size)
        canvas = torch.empty(1, tiles_h * rows, tiles_w * cols)
        unpadded = unpad_image(canvas, list(image_size))
        height, width = int(unpadded.shape[1]), int(unpadded.shape[2])
        # unpad_image crops the padding symmetrically: what it removed above and to the left
        offset = ((tiles_h * rows - height) // 2, (tiles_w * cols - width) // 2)
        return VisualTokens.llava_next((rows, cols), (height, width), (tiles_h, tiles_w), offset)

    def encode_images(self, batch: Mapping[str, torch.Tensor], output_hidden_states: bool = False) -> VisionOutput:
        config = self.model.config
        sizes = batch["image_sizes"]
        outputs = self.model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=sizes, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True,
            **({"output_hidden_states": True} if output_hidden_states else {}))
        tokens = [self.token_map(size) for size in sizes.tolist()]
        packed = outputs.pooler_output  # one tensor, or (transformers >= 5.2x) one per image
        features = list(packed) if isinstance(packed, (list, tuple)) else packed.split([row.count for row in tokens])
        if any(len(part) != row.count for part, row in zip(features, tokens)):
            raise RuntimeError("llava_next: the packed features do not match the token map")
        hidden = None
        if output_hidden_states:  # per layer, per image: (its tower passes, 1 + patches, D), base crop first
            passes = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                      for size in sizes.tolist()]
            hidden = tuple(list(state.split(passes)) for state in outputs.hidden_states)
        return VisionOutput(list(features), [None] * len(tokens), hidden, tokens)

    def vision_attention(self, layer: int, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, (its tower passes, H, T, T): each crop's own attention, recomputed from its pass's input."""
        return [super(LlavaNextAdapter, self).vision_attention(layer, passes) for passes in hidden_states]

    def input_size(self, tokens: VisualTokens) -> tuple[int, int]:
        side = int(self.model.config.vision_config.image_size)
        return side, side  # the base crop's; boxes are read in the original image's frame

    def image_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        raise UnsupportedModelError("llava_next: its visual tokens are per image (base crop and tiles), not one "
                                    "(B, N, D) tensor")
