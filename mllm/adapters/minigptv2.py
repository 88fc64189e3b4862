"""MiniGPT-v2 (`mllm.minigptv2.MiniGPTv2ForConditionalGeneration`, converted by `python -m mllm.convert minigptv2`).

EVA ViT-g/14 at 448 px (32 x 32 patches, CLS dropped), every four consecutive patches in raster order one LLM
token: 256 visual tokens on a 32 x 8 grid, each covering a 1 x 4 horizontal strip of patches (14 x 56 px). The
image is squashed to the tower's square (Blip2ImageEvalProcessor), so boxes are fractions of the original image.
Probes read the tower's 32 x 32 patches (`tower_grid`); everything that prunes or numbers visual tokens reads
the strips' 32 x 8 grid (`grid`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mllm.adapters.base import register_adapter
from mllm.adapters.llava import LlavaAdapter
from mllm.errors import UnsupportedModelError
from mllm.minigptv2 import MiniGPTv2ForConditionalGeneration


@register_adapter
class MiniGPTv2Adapter(LlavaAdapter):
    """LLaVA's adapter on an EVA tower (`Blip2VisionModel`) whose patches reach the LLM four to a token."""

    model_types = ("minigptv2",)
    model_class = MiniGPTv2ForConditionalGeneration
    processor_frame = "original"  # the processor squashes the image to the tower's square
    patches_per_token = 4  # MiniGPTv2Config.tokens_per_group, as released; checked against the config on load

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layers

    @property
    def tower_grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    @classmethod
    def check_config(cls, config: PretrainedConfig, source: str) -> None:
        super().check_config(config, source)
        if getattr(config, "tokens_per_group", cls.patches_per_token) != cls.patches_per_token:
            raise UnsupportedModelError(f"{source}: field 'tokens_per_group' is {config.tokens_per_group}; "
                                        f"MiniGPT-v2 concatenates {cls.patches_per_token} patches per LLM token")

    @property
    def grid(self) -> tuple[int, int]:
        rows, cols = self.tower_grid
        return rows, cols // self.patches_per_token  # a token is a 1 x 4 strip of one patch row

    def vision_queries_keys(self, layer: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder_layer = self.vision_layers[layer]
        qkv = encoder_layer.self_attn.qkv(encoder_layer.layer_norm1(hidden_states))  # bias: [q_bias, 0, v_bias]
        queries, keys, _ = qkv.chunk(3, dim=-1)
        return queries, keys

    def vision_patch_embeddings(self, pixel_values: torch.Tensor, with_position: bool) -> torch.Tensor:
        embeddings = self.vision_tower.embeddings
        weight = embeddings.patch_embedding.weight
        patches = embeddings.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        if not with_position:
            return patches
        return patches + embeddings.position_embedding[0, 1:].to(patches.dtype)  # position 0 is the CLS token's
