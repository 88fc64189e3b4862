"""The adapter interface, its registry, and what the Llama-style LLMs of every adapter share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, PretrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from mllm.errors import UnsupportedModelError
from mllm.images import FrameKind, ImageFrame
from mllm.positions import VisualLayout
from mllm.visual_tokens import VisualTokens

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

    features: list[torch.Tensor]  # per image: (N_i, D_llm) projected visual tokens in the order the LLM reads them
    grids: list[tuple[int, int] | None]  # per image: (rows, cols) of those tokens in raster order; None when no grid
    hidden_states: tuple[torch.Tensor, ...] | None = None  # every vision-tower hidden state, on request
    tokens: list[VisualTokens] | None = None  # per image: what each token is; None means raster over `grids`

    def token_maps(self) -> list[VisualTokens]:
        return self.tokens if self.tokens is not None else [VisualTokens.raster(*grid) for grid in self.grids]


class ModelAdapter:
    """How the toolkit reaches into one multimodal architecture. Subclasses fill in every member."""

    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[type[PreTrainedModel]]
    position_axes: ClassVar[int] = 1  # axes of the LLM's position IDs (3 for M-RoPE)
    has_cls_token: ClassVar[bool] = False  # whether the vision tower's sequence starts with a CLS token
    has_position_embedding: ClassVar[bool] = False  # whether the tower adds an absolute position embedding
    processor_frame: ClassVar[FrameKind] = "original"  # the frame that shows the processor the image as given
    tokens_on_one_grid: ClassVar[bool] = True  # each image's visual tokens tile one grid in raster order
    # Tower patches the projector concatenates into one visual token (MiniGPT-v2: a 1 x 4 strip); where it is 1,
    # the vision states the adapter gives (attentions, hidden states) are one per visual token.
    patches_per_token: ClassVar[int] = 1

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

    # --- parts of the model (defaults: the layout transformers 5 gives its VLMs) ---------------
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
        raise NotImplementedError

    @property
    def vision_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the visual tokens of one image, in raster order."""
        raise NotImplementedError

    @property
    def tower_grid(self) -> tuple[int, int]:
        """(rows, cols) of the patches one vision-tower pass of `tower_inputs` gives per image (fixed-size towers)."""
        return self.grid

    def tower_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the vision tower itself runs on for a processor batch, one pass per image: what probes hook.
        The batch itself, except where an image is several crops (LLaVA-NeXT: its base crop)."""
        return dict(batch)

    def tower_hidden_states(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """transformers' `output_hidden_states` of the vision tower on `tower_inputs`' batch."""
        return self.encode_images(batch, output_hidden_states=True).hidden_states

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
        """Rotary cos/sin for (B, L) position IDs, the same ID on every axis of multi-axis (M-RoPE) IDs."""
        if position_ids.ndim == 2 and self.position_axes > 1:  # transformers < 5.19 reads only (axes, B, L)
            position_ids = position_ids.expand(self.position_axes, -1, -1)
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

    def input_size(self, tokens: VisualTokens) -> tuple[int, int]:
        """(width, height) in pixels of the image the vision tower saw, for these visual tokens."""
        raise NotImplementedError

    def visual_layout(self, prefix_len: int, tokens: VisualTokens, suffix_len: int) -> VisualLayout:
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

    def token_scores(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(B, patches) scores of the tower's patches in raster order -> (B, N) per visual token: the sum over the
        `patches_per_token` consecutive patches each token concatenates (the scores themselves where it is 1)."""
        if self.patches_per_token == 1:
            return patch_scores
        return patch_scores.reshape(patch_scores.shape[0], -1, self.patches_per_token).sum(dim=-1)

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


def _allowed(attention_mask: torch.Tensor | None, queries: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean (B, 1, Q, L): which keys each query row may attend to, from the layer's 4-D mask."""
    if attention_mask is None:  # SDPA's causal shortcut: no padding, plain causal
        keys = torch.arange(length, device=queries.device)
        return (keys[None, None, None, :] <= queries[:, None, :, None])
    rows = torch.arange(queries.shape[0], device=queries.device)[:, None]
    mask = attention_mask[:, 0].expand(queries.shape[0], -1, -1)[rows, queries][:, None]
    return mask if mask.dtype == torch.bool else mask == 0
