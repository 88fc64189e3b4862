"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP ViT + MLP projector + Llama, one fixed grid of visual tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import LlavaForConditionalGeneration, PretrainedConfig

from mllm.adapters.base import ModelAdapter, VisionOutput, register_adapter
from mllm.errors import UnsupportedModelError
from mllm.images import FrameKind, ImageFrame, to_model_square
from mllm.positions import VisualLayout
from mllm.visual_tokens import VisualTokens


def shown_side(image_processor: Any) -> int:
    """The side of the square a CLIP-style image processor hands the tower: its crop, or its resize where it
    does not crop (MiniGPT-v2 squashes)."""
    crop = getattr(image_processor, "crop_size", None)
    if crop and getattr(image_processor, "do_center_crop", True):
        return int(crop["height"])
    return int(image_processor.size["height"])


@register_adapter
class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 as `LlavaForConditionalGeneration`: CLIP ViT + MLP projector + Llama-style LLM."""

    model_types = ("llava",)
    model_class = LlavaForConditionalGeneration
    has_cls_token = True
    has_position_embedding = True
    processor_frame = "cropped"  # llava-hf's processor resizes and centre-crops

    @classmethod
    def check_config(cls, config: PretrainedConfig, source: str) -> None:
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise UnsupportedModelError(
                f"{source}: field 'vision_feature_select_strategy' is {strategy!r}; the toolkit needs "
                "'default' (patch tokens only, CLS dropped) so that visual tokens form a grid"
            )
        if not isinstance(getattr(config, "vision_feature_layer", -2), int):
            raise UnsupportedModelError(f"{source}: field 'vision_feature_layer' must be a single layer index")

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        # Some transformers versions nest the encoder under `vision_model`; 5.23 flattens it.
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def prepare_images(
        self, processor: Any, images: Sequence[Image.Image], frame: FrameKind
    ) -> tuple[list[Image.Image], list[ImageFrame]]:
        image_processor = processor.image_processor
        side = shown_side(image_processor)
        background = tuple(int(255 * channel) for channel in image_processor.image_mean)
        squares, frames = zip(*(to_model_square(image, frame, side, background) for image in images))
        return list(squares), list(frames)

    def encode_images(self, batch: Mapping[str, torch.Tensor], output_hidden_states: bool = False) -> VisionOutput:
        features, hidden = self.image_features(batch["pixel_values"], output_hidden_states)
        return VisionOutput(list(features), [self.grid] * features.shape[0], hidden)

    def input_size(self, tokens: VisualTokens) -> tuple[int, int]:
        side = int(self.model.config.vision_config.image_size)
        return side, side

    def visual_layout(self, prefix_len: int, tokens: VisualTokens, suffix_len: int) -> VisualLayout:
        return VisualLayout.sequential(prefix_len, tokens.count, suffix_len)

    def image_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        options = {"output_hidden_states": True} if output_hidden_states else {}
        outputs = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **options)
        features = torch.stack(list(outputs.pooler_output))
        return features, (tuple(outputs.hidden_states) if output_hidden_states else None)

    def vision_attention(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
        attention = self.vision_layers[layer].self_attn
        batch, length, _ = hidden_states.shape
        shape = (batch, length, attention.num_heads, attention.head_dim)
        queries, keys = (part.view(shape).transpose(1, 2) for part in self.vision_queries_keys(layer, hidden_states))
        scores = queries.float() @ keys.float().transpose(-1, -2) * attention.scale
        return scores.softmax(dim=-1)

    @property
    def vision_num_heads(self) -> int:
        return int(self.model.config.vision_config.num_attention_heads)

    def vision_queries_keys(self, layer: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder_layer = self.vision_layers[layer]
        normed = encoder_layer.layer_norm1(hidden_states)
        return encoder_layer.self_attn.q_proj(normed), encoder_layer.self_attn.k_proj(normed)

    def projector_inputs(self, vision_hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.vision_patch_tokens(vision_hidden_states[self.model.config.vision_feature_layer])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def vision_patch_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, 1:]  # CLIP puts its CLS token first

    def vision_patch_embeddings(self, pixel_values: torch.Tensor, with_position: bool) -> torch.Tensor:
        tower = self.vision_tower
        embeddings = getattr(tower, "vision_model", tower).embeddings
        weight = embeddings.patch_embedding.weight
        patches = embeddings.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        if not with_position:
            return patches
        # Position 0 belongs to the CLS token; the patches take positions 1..N in raster order.
        return patches + embeddings.position_embedding.weight[1:].to(patches.dtype)
