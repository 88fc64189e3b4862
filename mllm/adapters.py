"""Architecture adapters: one class per model family behind one interface (as TransformerLens does).

The rest of the toolkit never touches `model.model.language_model` and friends directly; it asks the
adapter. Supporting a new family (LLaVA-NeXT, Qwen2-VL, ...) means writing one adapter and
registering it with `@register_adapter`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from mllm.errors import CheckpointNotFoundError, ImageLoadError, UnsupportedModelError
from mllm.images import FRAME_KINDS, FrameKind, ImageFrame, to_model_square
from mllm.positions import VisualLayout
from mllm.processors import load_qwen_processor

_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make `cls` the adapter for each of its `model_types`."""
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_ADAPTERS))


def adapter_class_for(config: PretrainedConfig, source: str = "config.json") -> type[ModelAdapter]:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"{source}: field 'model_type' is {model_type!r}, which this toolkit has no adapter for; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return _ADAPTERS[model_type]


@dataclass
class VisionOutput:
    """What the vision side made of a batch of images: each image's visual tokens and their grid."""

    features: list[torch.Tensor]  # per image: (N_i, D_llm) projected visual tokens in raster order
    grids: list[tuple[int, int]]  # per image: (rows, cols) of those tokens
    hidden_states: tuple[torch.Tensor, ...] | None = None  # every vision-tower hidden state, on request


class ModelAdapter:
    """How the toolkit reaches into one multimodal architecture. Subclasses fill in every member."""

    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[type[PreTrainedModel]]
    position_axes: ClassVar[int] = 1  # axes of the LLM's position IDs (3 for M-RoPE)
    has_cls_token: ClassVar[bool] = False  # whether the vision tower's sequence starts with a CLS token
    processor_frame: ClassVar[FrameKind] = "original"  # the frame that shows the processor the image as given

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    @classmethod
    def check_config(cls, config: PretrainedConfig, source: str) -> None:
        """Raise `UnsupportedModelError` for settings the adapter cannot honour."""

    @classmethod
    def load_processor(cls, directory: Path, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
        """The checkpoint's processor, offline; `min_pixels` / `max_pixels` bound a native-resolution image."""
        if min_pixels is not None or max_pixels is not None:
            raise ValueError(f"min_pixels / max_pixels apply to native-resolution models; {cls.model_types[0]} "
                             "resizes every image to one fixed square")
        return AutoProcessor.from_pretrained(directory, local_files_only=True)

    # --- parts of the model -------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        raise NotImplementedError

    @property
    def vision_tower(self) -> nn.Module:
        raise NotImplementedError

    @property
    def vision_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the visual tokens of one image, in raster order."""
        raise NotImplementedError

    @property
    def num_visual_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def fixed_grid(self) -> tuple[int, int] | None:
        """`grid` where every image gets the same one; None for native-resolution models."""
        return self.grid

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids)

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    # --- images and positions -----------------------------------------------------------------
    def prepare_images(
        self, processor: Any, images: Sequence[Image.Image], frame: FrameKind
    ) -> tuple[list[Image.Image], list[ImageFrame]]:
        """The images the processor should see under coordinate frame `frame`, and their frames."""
        raise NotImplementedError

    def encode_images(self, batch: Mapping[str, torch.Tensor], output_hidden_states: bool = False) -> VisionOutput:
        """Run the vision tower and projector on a processor batch (already on the model's device and dtype)."""
        raise NotImplementedError

    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(width, height) in pixels of the image the vision tower saw, for a `grid` of visual tokens."""
        raise NotImplementedError

    def visual_layout(self, prefix_len: int, grid: tuple[int, int], suffix_len: int) -> VisualLayout:
        """A prompt's layout, with the original position IDs this architecture gives its visual tokens."""
        raise NotImplementedError

    def llm_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(axes, B, L) position IDs -> what the language model's `position_ids` argument takes."""
        return position_ids[0] if self.position_axes == 1 else position_ids

    # --- computations -------------------------------------------------------------------------
    def image_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Projected visual tokens (B, N, D_llm) and, on request, every vision-tower hidden state."""
        raise NotImplementedError

    def vision_attention(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, H, T, T) of vision layer `layer`, recomputed from its input."""
        raise NotImplementedError

    @property
    def vision_num_heads(self) -> int:
        """Attention heads per vision layer (the width of `vision_queries_keys` splits into these)."""
        raise NotImplementedError

    def vision_queries_keys(self, layer: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys (B, T, D_vision each, heads side by side, unscaled) of vision layer `layer` on its input."""
        raise NotImplementedError

    def projector_inputs(self, vision_hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, N, D_vision): the patch tokens the projector reads, picked from the tower's hidden states."""
        raise NotImplementedError

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n, D_vision) vision features -> (B, n, D_llm) visual tokens, through the projector."""
        raise NotImplementedError

    def vision_patch_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, rows * cols, D): a vision hidden state's patch tokens in raster order (CLS and the like dropped)."""
        raise NotImplementedError

    def vision_patch_embeddings(self, pixel_values: torch.Tensor, with_position: bool) -> torch.Tensor:
        """(B, rows * cols, D): the patch embeddings before any block, with or without the position embedding added."""
        raise NotImplementedError

    def llm_attention(
        self,
        layer: int,
        normed_hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        queries: torch.Tensor,
    ) -> torch.Tensor:
        """Attention weights (B, H, Q, L) of LLM layer `layer` for the query rows `queries` only.

        Written for Llama-style attention (q/k projections, rotary cos/sin laid out per token, grouped KV
        heads), which LLaVA's Llama and Qwen2-VL's LLM share: M-RoPE's cos/sin also arrive per token.
        """
        attention = self.decoder_layers[layer].self_attn
        batch, length, _ = normed_hidden.shape
        head_dim = attention.head_dim
        cos, sin = (part.expand(batch, -1, -1) for part in position_embeddings)
        rows = torch.arange(batch, device=normed_hidden.device)[:, None]
        query_hidden = normed_hidden[rows, queries]
        q = attention.q_proj(query_hidden).view(batch, queries.shape[1], -1, head_dim).transpose(1, 2)
        k = attention.k_proj(normed_hidden).view(batch, length, -1, head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos[rows, queries], sin[rows, queries])
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        k = repeat_kv(k, attention.num_key_value_groups)
        scores = q.float() @ k.float().transpose(-1, -2) * attention.scaling
        scores = scores.masked_fill(~_allowed(attention_mask, queries, length), float("-inf"))
        return scores.softmax(dim=-1)


@register_adapter
class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 as `LlavaForConditionalGeneration`: CLIP ViT + MLP projector + Llama-style LLM."""

    model_types = ("llava",)
    model_class = LlavaForConditionalGeneration
    has_cls_token = True
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
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        # Some transformers versions nest the encoder under `vision_model`; 5.23 flattens it.
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def prepare_images(
        self, processor: Any, images: Sequence[Image.Image], frame: FrameKind
    ) -> tuple[list[Image.Image], list[ImageFrame]]:
        if frame not in FRAME_KINDS:
            raise ValueError(f"unknown coordinate frame {frame!r}; choose one of {FRAME_KINDS}")
        image_processor = processor.image_processor
        side = (getattr(image_processor, "crop_size", None) or image_processor.size)["height"]
        background = tuple(int(255 * channel) for channel in image_processor.image_mean)
        squares, frames = zip(*(to_model_square(image, frame, side, background) for image in images))
        return list(squares), list(frames)

    def encode_images(self, batch: Mapping[str, torch.Tensor], output_hidden_states: bool = False) -> VisionOutput:
        features, hidden = self.image_features(batch["pixel_values"], output_hidden_states)
        return VisionOutput(list(features), [self.grid] * features.shape[0], hidden)

    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        side = int(self.model.config.vision_config.image_size)
        return side, side

    def visual_layout(self, prefix_len: int, grid: tuple[int, int], suffix_len: int) -> VisualLayout:
        return VisualLayout.sequential(prefix_len, grid[0] * grid[1], suffix_len)

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


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL as `Qwen2VLForConditionalGeneration`: a native-resolution ViT (2-D RoPE, no CLS token, no
    absolute position embedding) whose 2x2 patch merger feeds a Qwen2 LLM numbered by 3-axis M-RoPE."""

    model_types = ("qwen2_vl",)
    model_class = Qwen2VLForConditionalGeneration
    position_axes = 3

    @classmethod
    def load_processor(cls, directory: Path, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
        for name in ("preprocessor_config.json", "tokenizer_config.json"):
            if not (directory / name).is_file():
                raise CheckpointNotFoundError(f"{directory / name}: not found; a Qwen2-VL checkpoint needs its "
                                              "processor files (preprocessor_config.json, tokenizer files)")
        processor = load_qwen_processor(directory)
        size = dict(processor.image_processor.size)
        for key, value in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)):
            if value is not None:  # Qwen's image processor keeps min_pixels / max_pixels under these names
                size[key] = int(value)
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"min_pixels ({size['shortest_edge']}) exceeds max_pixels ({size['longest_edge']})")
        processor.image_processor.size = size
        return processor

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def grid(self) -> tuple[int, int]:
        raise UnsupportedModelError(f"{self.model_type} keeps each image's native resolution, so it has no fixed "
                                    "grid of visual tokens: read each row's from `Encoding.grids`")

    @property
    def fixed_grid(self) -> tuple[int, int] | None:
        return None

    @property
    def merged_patch_size(self) -> int:
        """Pixels per side of the image square one visual token covers (patch size x spatial merge size)."""
        vision = self.model.config.vision_config
        return int(vision.patch_size) * int(vision.spatial_merge_size)

    def prepare_images(
        self, processor: Any, images: Sequence[Image.Image], frame: FrameKind
    ) -> tuple[list[Image.Image], list[ImageFrame]]:
        if frame not in ("original", "padded"):
            raise ValueError(f"coordinate frame {frame!r} does not apply to {self.model_type}, which shows each "
                             "image at its native aspect ratio: choose 'original' or 'padded'")
        background = tuple(int(255 * channel) for channel in processor.image_processor.image_mean)
        side = self.merged_patch_size
        shown, frames = [], []
        for index, image in enumerate(images):
            if frame == "padded":  # to a square, never resized: the processor sizes it
                square, image_frame = to_model_square(image, "padded", max(image.size), background)
            else:
                square, image_frame = image, ImageFrame.for_image("original", image.width, image.height)
            if min(square.size) < side:
                raise ImageLoadError(f"image {index} is {square.width}x{square.height} pixels, smaller than one "
                                     f"merged patch ({side}x{side} pixels) of {self.model_type}")
            shown.append(square)
            frames.append(image_frame)
        return shown, frames

    def encode_images(self, batch: Mapping[str, torch.Tensor], output_hidden_states: bool = False) -> VisionOutput:
        if output_hidden_states:
            raise UnsupportedModelError(f"vision-tower hidden states of {self.model_type} are not exposed yet")
        grid_thw = batch["image_grid_thw"]
        outputs = self.model.model.get_image_features(pixel_values=batch["pixel_values"], image_grid_thw=grid_thw,
                                                      return_dict=True)
        merge = int(self.model.config.vision_config.spatial_merge_size)
        grids = [(height // merge, width // merge) for _, height, width in grid_thw.tolist()]
        return VisionOutput(list(outputs.pooler_output), grids)

    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid[1] * self.merged_patch_size, grid[0] * self.merged_patch_size

    def visual_layout(self, prefix_len: int, grid: tuple[int, int], suffix_len: int) -> VisualLayout:
        return VisualLayout.grid(prefix_len, grid[0], grid[1], suffix_len)


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL as `Qwen2_5_VLForConditionalGeneration`: Qwen2-VL's layout, with window attention in the ViT."""

    model_types = ("qwen2_5_vl",)
    model_class = Qwen2_5_VLForConditionalGeneration


def _allowed(attention_mask: torch.Tensor | None, queries: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean (B, 1, Q, L): which keys each query row may attend to, from the layer's 4-D mask."""
    if attention_mask is None:  # SDPA's causal shortcut: no padding, plain causal
        keys = torch.arange(length, device=queries.device)
        return (keys[None, None, None, :] <= queries[:, None, :, None])
    rows = torch.arange(queries.shape[0], device=queries.device)[:, None]
    mask = attention_mask[:, 0].expand(queries.shape[0], -1, -1)[rows, queries][:, None]
    return mask if mask.dtype == torch.bool else mask == 0
