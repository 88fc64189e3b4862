"""Qwen2-VL and Qwen2.5-VL: native-resolution ViTs with 2-D RoPE and a 2x2 merger, a Qwen2 LLM with M-RoPE."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    apply_rotary_pos_emb_vision as qwen2_5_vl_rotary_vision,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision as qwen2_vl_rotary_vision
from transformers.vision_utils import get_vision_window_index

from mllm.adapters.base import ModelAdapter, VisionOutput, register_adapter
from mllm.errors import CheckpointNotFoundError, ImageLoadError, KeepSetError, UnsupportedModelError
from mllm.images import FrameKind, ImageFrame, at_own_aspect
from mllm.positions import VisualLayout
from mllm.processors import load_qwen_processor
from mllm.visual_tokens import VisualTokens


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL as `Qwen2VLForConditionalGeneration`: a native-resolution ViT (2-D RoPE, no CLS token, no
    absolute position embedding) whose 2x2 patch merger feeds a Qwen2 LLM numbered by 3-axis M-RoPE.

    Vision-tower internals. The tower reads every image of a batch as one flat sequence of patches (in the
    processor's merge-block order: each 2x2 block of patches that merges into one visual token is contiguous;
    Qwen2.5-VL's tower further reorders the blocks window by window before its first block), and images differ
    in size. The adapter hands every internal back per image, in raster order over that image's *unmerged*
    patch grid (rows, cols) = (grid_h, grid_w) of `image_grid_thw`, as a list with one tensor per image:

    - a hidden state (`encode_images(..., output_hidden_states=True).hidden_states[k]`, the input of block k,
      k = 0 being the patch embeddings, k >= 1 the output of block k - 1): `[(rows_i, cols_i, D_vision), ...]`;
    - `vision_queries_keys`: two such lists, queries and keys after the 2-D RoPE;
    - `vision_attention`: `[(heads, rows_i * cols_i, rows_i * cols_i), ...]`, both axes in raster order,
      0 where the layer does not attend (outside the query's window on Qwen2.5-VL's windowed layers);
    - `projector_inputs` / `project`: that list of grids in, `[(rows_i * cols_i / 4, D_llm), ...]` out, raster
      order over the merged grid (what `encode_images` feeds the LLM).

    Members whose contract is one (B, N, D) tensor (`vision_patch_tokens`, `vision_patch_embeddings`,
    `image_features`) stack the images and refuse a batch whose images have different grids. The members that
    read pixels take the processor's `pixel_values` with `grid_thw=` (its `image_grid_thw`), as the tower does.
    """

    has_position_embedding = False  # position enters only as 2-D RoPE inside attention
    _rotary_vision = staticmethod(qwen2_vl_rotary_vision)

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
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.blocks

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
        background = tuple(int(255 * channel) for channel in processor.image_processor.image_mean)
        shown, frames = at_own_aspect(images, frame, background, self.model_type)
        side = self.merged_patch_size
        for index, square in enumerate(shown):
            if min(square.size) < side:
                raise ImageLoadError(f"image {index} is {square.width}x{square.height} pixels, smaller than one "
                                     f"merged patch ({side}x{side} pixels) of {self.model_type}")
        return shown, frames

    def encode_images(self, batch: Mapping[str, torch.Tensor], output_hidden_states: bool = False) -> VisionOutput:
        """Visual tokens per image and, on request, every hidden state as per-image raster grids (class docstring)."""
        grid_thw = batch["image_grid_thw"]
        self.patch_grids(grid_thw)  # refuses videos before any work
        options = {"output_hidden_states": True} if output_hidden_states else {}
        outputs = self.model.model.get_image_features(pixel_values=batch["pixel_values"], image_grid_thw=grid_thw,
                                                      return_dict=True, **options)
        merge = self.spatial_merge_size
        grids = [(height // merge, width // merge) for _, height, width in grid_thw.tolist()]
        hidden = None
        if output_hidden_states:
            hidden = tuple(self.raster_patch_states(state, grid_thw) for state in outputs.hidden_states)
        return VisionOutput(list(outputs.pooler_output), grids, hidden)

    def input_size(self, tokens: VisualTokens) -> tuple[int, int]:
        rows, cols = tokens.grids[0]
        return cols * self.merged_patch_size, rows * self.merged_patch_size

    def visual_layout(self, prefix_len: int, tokens: VisualTokens, suffix_len: int) -> VisualLayout:
        rows, cols = tokens.grids[0]
        return VisualLayout.grid(prefix_len, rows, cols, suffix_len)

    # --- vision-tower internals, per image in raster order (see the class docstring) ---------------------
    @property
    def spatial_merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    @property
    def vision_num_heads(self) -> int:
        return int(self.model.config.vision_config.num_heads)

    def patch_grids(self, grid_thw: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's unmerged patch grid (rows, cols) = (grid_h, grid_w); refuses video entries (grid_t > 1)."""
        grids = []
        for index, (frames, height, width) in enumerate(grid_thw.tolist()):
            if frames != 1:
                raise UnsupportedModelError(f"image_grid_thw[{index}] has grid_t = {frames}: the vision internals of "
                                            f"{self.model_type} are exposed for still images only, not videos")
            grids.append((int(height), int(width)))
        return grids

    def processor_patch_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(total patches,): for each image in turn, each of its patches in raster order, that patch's place in
        the processor's `pixel_values` (merge-block order: the merge x merge patches of one visual token are
        contiguous, the blocks in raster order over the merged grid)."""
        merge = self.spatial_merge_size
        places, offset = [], 0
        for height, width in self.patch_grids(grid_thw):
            rows = torch.arange(height)[:, None]
            cols = torch.arange(width)[None, :]
            block = (rows // merge) * (width // merge) + cols // merge
            within = (rows % merge) * merge + cols % merge
            places.append(offset + (block * merge * merge + within).flatten())
            offset += height * width
        return torch.cat(places).to(grid_thw.device)

    def block_patch_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(total patches,): as `processor_patch_index`, but each patch's place in the sequence the tower's blocks
        process (the same order on Qwen2-VL; window by window on Qwen2.5-VL)."""
        return self.processor_patch_index(grid_thw)

    def raster_patch_states(self, states: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """(total patches, D) in the order the tower's blocks see them -> [(rows_i, cols_i, D), ...] in raster order."""
        grids = self.patch_grids(grid_thw)
        index = self.block_patch_index(grid_thw).to(states.device)
        pieces = states[index].split([height * width for height, width in grids])
        return [piece.reshape(height, width, -1) for piece, (height, width) in zip(pieces, grids)]

    def image_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, *, grid_thw: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[list[torch.Tensor], ...] | None]:
        """(B, N, D_llm) visual tokens of images that share one grid and, on request, the per-image hidden states."""
        if grid_thw is None:
            raise ValueError(f"{self.model_type}'s vision tower needs grid_thw (the processor's image_grid_thw) "
                             "beside pixel_values")
        vision = self.encode_images({"pixel_values": pixel_values, "image_grid_thw": grid_thw}, output_hidden_states)
        return self._stack(vision.features, vision.grids, "visual tokens"), vision.hidden_states

    def _stack(self, pieces: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], what: str) -> torch.Tensor:
        if len(set(grids)) > 1:
            raise KeepSetError(f"the images have different grids ({list(grids)}), so their {what} form no (B, N, D) "
                               f"tensor; read {self.model_type}'s per-image lists instead")
        return torch.stack([piece.reshape(-1, piece.shape[-1]) for piece in pieces])

    def _raster_positions(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """(rows * cols, 2) (row, col) of each patch in raster order: the tower's 2-D RoPE position IDs."""
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
        return grid.reshape(-1, 2).to(device)

    def _queries_keys(self, layer: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's (rows, cols, D) input of block `layer` -> queries and keys (N, heads, head_dim) after RoPE."""
        block = self.vision_layers[layer]
        rows, cols, width = state.shape
        normed = block.norm1(state.reshape(rows * cols, width))
        qkv = block.attn.qkv(normed).reshape(rows * cols, 3, block.attn.num_heads, -1)
        cos, sin = self.vision_tower.rotary_pos_emb(normed, self._raster_positions(rows, cols, state.device))
        return self._rotary_vision(qkv[:, 0], qkv[:, 1], cos, sin)

    def vision_queries_keys(
        self, layer: int, hidden_states: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image, queries and keys (rows, cols, D_vision each, heads side by side, unscaled) of block `layer`
        on its input, after the 2-D RoPE: per head, q . k * head_dim^-0.5 are the layer's attention logits."""
        queries, keys = [], []
        for state in hidden_states:
            query, key = self._queries_keys(layer, state)
            queries.append(query.reshape(*state.shape[:-1], -1))
            keys.append(key.reshape(*state.shape[:-1], -1))
        return queries, keys

    def _attends(self, layer: int, rows: int, cols: int, device: torch.device) -> torch.Tensor | None:
        """(N, N) which keys each query of block `layer` attends to, raster order; None for the whole image."""
        return None

    def vision_attention(self, layer: int, hidden_states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, block `layer`'s attention weights (heads, N, N) in raster order, recomputed from its input
        (a list of (rows, cols, D) grids): qkv projection, 2-D RoPE, softmax over the keys the tower lets each
        query see (the image's own patches; on Qwen2.5-VL's windowed blocks, its window's), in float32."""
        scaling = self.vision_layers[layer].attn.scaling
        weights = []
        for state in hidden_states:
            rows, cols, _ = state.shape
            query, key = self._queries_keys(layer, state)
            scores = torch.einsum("qhd,khd->hqk", query.float(), key.float()) * scaling
            allowed = self._attends(layer, rows, cols, state.device)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            weights.append(scores.softmax(dim=-1))
        return weights

    def projector_inputs(self, vision_hidden_states: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """The merger reads the last block's output: that hidden state's per-image (rows, cols, D_vision) grids."""
        return list(vision_hidden_states[-1])

    def project(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, a (rows, cols, D_vision) patch grid -> (rows / 2 * cols / 2, D_llm) visual tokens through the
        2x2 merger, raster order over the merged grid. Only whole grids merge (each token reads 2x2 patches)."""
        merge = self.spatial_merge_size
        tokens = []
        for grid in features:
            rows, cols, width = grid.shape
            if rows % merge or cols % merge:
                raise ValueError(f"a {rows}x{cols} patch grid does not split into {merge}x{merge} merge blocks")
            blocks = grid.reshape(rows // merge, merge, cols // merge, merge, width).transpose(1, 2)
            tokens.append(self.vision_tower.merger(blocks.reshape(-1, width)))
        return tokens

    def vision_patch_tokens(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, rows * cols, D): a hidden state's per-image grids flattened in raster order and stacked (no CLS token
        to drop); the images must share one grid."""
        return self._stack(hidden_states, [tuple(state.shape[:2]) for state in hidden_states], "patch tokens")

    def vision_patch_embeddings(
        self, pixel_values: torch.Tensor, with_position: bool, *, grid_thw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, rows * cols, D): the patch embeddings (the input of the first block, hidden state 0) in raster order.

        The tower has no position embedding to add (position enters only inside attention, as 2-D RoPE on
        queries and keys), so `with_position=True` is refused rather than answered with the bare embeddings.
        """
        if with_position:
            raise UnsupportedModelError(f"{self.model_type}'s vision tower has no position embedding (it rotates "
                                        "queries and keys by 2-D RoPE inside attention): there are no patch + position "
                                        "embeddings; ask with_position=False")
        if grid_thw is None:
            raise ValueError(f"{self.model_type}'s patch embeddings need grid_thw (the processor's image_grid_thw) "
                             "to place the patches")
        embeddings = self.vision_tower.patch_embed(pixel_values)
        grids = self.patch_grids(grid_thw)
        pieces = embeddings[self.processor_patch_index(grid_thw).to(embeddings.device)].split(
            [height * width for height, width in grids])
        return self._stack(pieces, grids, "patch embeddings")


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL as `Qwen2_5_VLForConditionalGeneration`: Qwen2-VL's layout, with window attention in the ViT."""

    model_types = ("qwen2_5_vl",)
    model_class = Qwen2_5_VLForConditionalGeneration
    _rotary_vision = staticmethod(qwen2_5_vl_rotary_vision)

    @property
    def window_side(self) -> int:
        """Patches per side of an attention window (windows tile the merged grid, as `get_vision_window_index`)."""
        vision = self.model.config.vision_config
        merge = self.spatial_merge_size
        return merge * (int(vision.window_size) // merge // int(vision.patch_size))

    def block_patch_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Each patch's place after the tower's window reordering: it moves whole merge blocks, the blocks of one
        window becoming contiguous (`get_vision_window_index`), before its first block; only the merger's output
        is moved back, so every hidden state the blocks see is in this window order."""
        vision = self.model.config.vision_config
        merge = self.spatial_merge_size
        window_index, _ = get_vision_window_index(grid_thw.cpu(), spatial_merge_size=merge,
                                                  window_size=int(vision.window_size),
                                                  patch_size=int(vision.patch_size))
        unit = merge * merge
        # The blocks' sequence holds, at position j * unit + i, patch i of the processor's block window_index[j].
        order = (window_index[:, None] * unit + torch.arange(unit)).flatten()
        place = torch.empty_like(order)
        place[order] = torch.arange(len(order))
        return place[self.processor_patch_index(grid_thw).cpu()].to(grid_thw.device)

    def _attends(self, layer: int, rows: int, cols: int, device: torch.device) -> torch.Tensor | None:
        if layer in self.model.config.vision_config.fullatt_block_indexes:
            return None
        side = self.window_side
        positions = self._raster_positions(rows, cols, device)
        window = (positions[:, 0] // side) * (cols // side + 1) + positions[:, 1] // side
        return window[:, None] == window[None, :]
