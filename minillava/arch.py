"""What differs between the miniature architectures; `minillava.train` runs one recipe over either.

- `llava`: CLIP ViT (learned absolute positions, CLS token) at one image size, penultimate-layer features, MLP
  projector, Llama with 1-D RoPE: `LlavaForConditionalGeneration`, the llava-hf layout.
- `qwen2-vl`: Qwen2-VL's native-resolution ViT (2-D RoPE, no position embedding, no CLS) whose 2x2 patch
  merger feeds a Qwen2 LLM numbered by 3-D M-RoPE: `Qwen2VLForConditionalGeneration`, the Hugging Face layout
  of `Qwen/Qwen2-VL-2B-Instruct`. Training scenes come at several sizes, so the LLM sees several grids.

Both train the same way: stage 1 trains the ViT contrastively against a small CLIP text tower (the Qwen ViT
pooled by its patches' mean, having no CLS), stage 2 freezes the ViT blocks and trains what LLaVA calls the
projector (Qwen's merger) and the LLM on precomputed ViT features. Each architecture says how to turn images
into the tower's input, the tower's output into stage-1 embeddings and stage-2 features, and features plus
token ids into the LLM's logits, using transformers' own modules throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from minillava import model as parts
from mllm.processors import ImageOnlyQwenProcessor
from mllm.tiny import CLIP_MEAN, CLIP_STD, TinyLlavaConfig, build_processor, save_llava_checkpoint
from mllm.tiny_qwen import (
    QWEN2_VL_CHAT_TEMPLATE,
    TinyQwenConfig,
    build_qwen_image_processor,
    save_qwen_checkpoint,
    set_qwen_generation_tokens,
    tiny_qwen_config,
)

QWEN_PRESETS = {
    # 4 px patches, so the shipped split's 64 px scenes give 8x8 = 64 visual tokens, as the LLaVA miniature's.
    "cpu": TinyQwenConfig(patch_size=4, vision_hidden=64, vision_layers=4, vision_heads=4, text_hidden=192,
                          text_layers=4, text_heads=6, text_kv_heads=2, mrope_section=(4, 6, 6),
                          max_position_embeddings=512, min_pixels=32 * 32, max_pixels=64 * 64),
    "gpu": TinyQwenConfig(patch_size=4, vision_hidden=192, vision_layers=8, vision_heads=6, text_hidden=384,
                          text_layers=6, text_heads=6, text_kv_heads=2, mrope_section=(8, 12, 12),
                          max_position_embeddings=1024, min_pixels=32 * 32, max_pixels=112 * 112),
    "test": TinyQwenConfig(patch_size=4, vision_hidden=32, vision_layers=2, vision_heads=4, text_hidden=48,
                           text_layers=2, text_heads=4, text_kv_heads=2, mrope_section=(2, 2, 2),
                           max_position_embeddings=256, min_pixels=16 * 16, max_pixels=32 * 32),
}
# Square scene sides drawn in training, in turn (`minillava.split` writes the evaluation's at 64 px): 6x6, 7x7 and
# 8x8 visual tokens on the CPU size, up to the processor's max_pixels.
QWEN_SCENE_SIZES = {"cpu": (48, 56, 64), "gpu": (64, 80, 96, 112), "test": (24, 32)}


class PositionHeads(nn.Module):
    """Linear read-outs of each patch's index from the tower's last two layers (LLaVA's spatial tower: one grid)."""

    def __init__(self, hidden: int, patches: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(hidden, patches) for _ in range(2)])

    def forward(self, patch_states: Sequence[torch.Tensor]) -> torch.Tensor:
        losses = []
        for head, patches in zip(self.heads, patch_states[-2:]):
            target = torch.arange(patches.shape[1], device=patches.device).expand(patches.shape[0], -1)
            losses.append(F.cross_entropy(head(patches).flatten(0, 1).float(), target.flatten()))
        return torch.stack(losses).mean()


class RowColumnHeads(nn.Module):
    """Linear read-outs of each patch's row and column from the tower's last two layers (Qwen's spatial tower:
    scenes of several sizes, so a patch's row and column rather than one grid's index)."""

    def __init__(self, hidden: int, side: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.ModuleList([nn.Linear(hidden, side), nn.Linear(hidden, side)])
                                    for _ in range(2)])

    def forward(self, patch_states: tuple[Sequence[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        states, positions = patch_states  # each (patches of every image, D); (patches, 2) rows and columns
        losses = [F.cross_entropy(head(layer).float(), positions[:, axis])
                  for pair, layer in zip(self.heads, states[-2:]) for axis, head in enumerate(pair)]
        return torch.stack(losses).mean()


class Architecture:
    """One miniature architecture: its sizes, tokenizer, processor, towers and the LLM's forward."""

    name: str
    prompt_style: str
    towers: tuple[str, ...]
    answer_separator: str  # between the prompt and the answer, as the chat template continues
    spatial_readout: str  # what the spatial tower's regulariser reads out, for the card

    def sizes(self, preset: str) -> TinyLlavaConfig | TinyQwenConfig:
        raise NotImplementedError

    def scene_size(self, preset: str, index: int) -> int:
        """The side of training scene (or stage-1 group of scenes) `index`."""
        raise NotImplementedError

    def num_visual(self, preset: str, size: int) -> int:
        """Visual tokens of a `size` x `size` scene."""
        raise NotImplementedError

    def tokenizer(self) -> PreTrainedTokenizerFast:
        return parts.build_tokenizer(style=self.prompt_style)

    def processor(self, preset: str, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        raise NotImplementedError

    def contrastive_model(self, preset: str, tokenizer: PreTrainedTokenizerFast,
                          text: parts.TextTowerConfig) -> nn.Module:
        """Stage 1's model: `vision_model` (exactly the full model's ViT), `visual_projection`, `text_model`,
        `text_projection`, `logit_scale`, as `CLIPModel` names them."""
        raise NotImplementedError

    def pixels(self, processor: ProcessorMixin | None, images: Sequence,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """What the tower reads for `images`, as the processor makes it at evaluation."""
        raise NotImplementedError

    def tower_outputs(self, vision: nn.Module, pixels: dict[str, torch.Tensor], *, patch_states: bool = False
                      ) -> tuple[torch.Tensor, Sequence[torch.Tensor] | None]:
        """Stage 1's view of the tower: one pooled vector per image and, when asked, every layer's patch states."""
        raise NotImplementedError

    def position_heads(self, preset: str) -> nn.Module:
        """The spatial tower's read-outs: called on `tower_outputs`' patch states, they return the regulariser."""
        raise NotImplementedError

    def build_model(self, preset: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
        raise NotImplementedError

    def load_tower(self, model: PreTrainedModel, vision: nn.Module) -> None:
        raise NotImplementedError

    def freeze_tower(self, model: PreTrainedModel, *, blocks: bool = True) -> None:
        """Freeze what stage 2 leaves as stage 1 trained it: the tower's blocks unless `blocks` is False."""
        raise NotImplementedError

    def features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The tower's output per image: what stage 2's projector reads."""
        raise NotImplementedError

    def logits(self, model: PreTrainedModel, features: Sequence[torch.Tensor], ids: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """The model's logits for `ids`, row i's image tokens filled from `features[i]` through the projector."""
        raise NotImplementedError

    def save(self, model: PreTrainedModel, processor: ProcessorMixin, out: Path) -> Path:
        raise NotImplementedError


class Llava(Architecture):
    name, prompt_style, towers, answer_separator = "llava", "llava-1.5", ("contrastive", "spatial"), " "
    spatial_readout = "each patch's index"

    def sizes(self, preset: str) -> TinyLlavaConfig:
        return parts.PRESETS[preset]

    def scene_size(self, preset: str, index: int) -> int:
        return self.sizes(preset).image_size

    def num_visual(self, preset: str, size: int) -> int:
        rows, cols = self.sizes(preset).grid
        return rows * cols

    def processor(self, preset: str, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        return build_processor(self.sizes(preset), tokenizer)

    def contrastive_model(self, preset: str, tokenizer: PreTrainedTokenizerFast,
                          text: parts.TextTowerConfig) -> nn.Module:
        return parts.build_clip(self.sizes(preset), tokenizer, text)

    def pixels(self, processor: ProcessorMixin | None, images: Sequence,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        # CLIP normalisation of square images already at the tower's size: what the processor does, faster
        array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0
        array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
        return {"pixel_values": torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)}

    def tower_outputs(self, vision: nn.Module, pixels: dict[str, torch.Tensor], *, patch_states: bool = False
                      ) -> tuple[torch.Tensor, Sequence[torch.Tensor] | None]:
        output = vision(pixel_values=pixels["pixel_values"], output_hidden_states=patch_states)
        patches = [states[:, 1:] for states in output.hidden_states] if patch_states else None  # CLS dropped
        return output.pooler_output, patches

    def position_heads(self, preset: str) -> nn.Module:
        sizes = self.sizes(preset)
        return PositionHeads(sizes.vision_hidden, (sizes.image_size // sizes.patch_size) ** 2)

    def build_model(self, preset: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
        return parts.build_llava(self.sizes(preset), tokenizer)

    def load_tower(self, model: PreTrainedModel, vision: nn.Module) -> None:
        model.model.vision_tower.load_state_dict(vision.state_dict())

    def freeze_tower(self, model: PreTrainedModel, *, blocks: bool = True) -> None:
        model.model.vision_tower.requires_grad_(not blocks).eval()  # eval either way: CLIP has no dropout

    def features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        layer = model.config.vision_feature_layer
        hidden = model.model.vision_tower(pixels["pixel_values"], output_hidden_states=True).hidden_states[layer]
        return list(hidden[:, 1:])  # CLS dropped, as vision_feature_select_strategy "default"

    def logits(self, model: PreTrainedModel, features: Sequence[torch.Tensor], ids: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        embeds = model.get_input_embeddings()(ids)
        projected = model.model.multi_modal_projector(torch.stack(list(features)).to(embeds.dtype))
        is_image = (ids == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(is_image, projected.to(embeds.dtype))
        return model(inputs_embeds=embeds, attention_mask=mask).logits

    def save(self, model: PreTrainedModel, processor: ProcessorMixin, out: Path) -> Path:
        return save_llava_checkpoint(model, processor, out)


class Qwen2VL(Architecture):
    name, prompt_style, towers, answer_separator = "qwen2-vl", "qwen2-vl", ("contrastive", "spatial"), ""
    spatial_readout = "each patch's row and column"

    def sizes(self, preset: str) -> TinyQwenConfig:
        return QWEN_PRESETS[preset]

    def scene_size(self, preset: str, index: int) -> int:
        sides = QWEN_SCENE_SIZES[preset]
        return sides[index % len(sides)]

    def num_visual(self, preset: str, size: int) -> int:
        sizes = self.sizes(preset)
        side = size // (sizes.patch_size * sizes.spatial_merge_size)
        return side * side

    def processor(self, preset: str, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        return ImageOnlyQwenProcessor(build_qwen_image_processor(self.sizes(preset)), tokenizer,
                                      chat_template=QWEN2_VL_CHAT_TEMPLATE)

    def contrastive_model(self, preset: str, tokenizer: PreTrainedTokenizerFast,
                          text: parts.TextTowerConfig) -> nn.Module:
        sizes = self.sizes(preset)
        vision = Qwen2VisionTransformerPretrainedModel._from_config(
            tiny_qwen_config(sizes, tokenizer, "qwen2_vl").vision_config)
        text_config = CLIPTextConfig(**parts.clip_text_config(tokenizer, text, sizes.vision_hidden))
        return QwenContrastive(vision, sizes.vision_hidden, text_config)

    def pixels(self, processor: ProcessorMixin | None, images: Sequence,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        batch = processor.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": batch["pixel_values"].to(device), "image_grid_thw": batch["image_grid_thw"].to(device)}

    @staticmethod
    def _per_image(vision: nn.Module, pixels: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The ViT blocks' output, before the merger, per image (the merge-block order the merger reads)."""
        grid = pixels["image_grid_thw"]
        output = vision(pixels["pixel_values"].to(vision.dtype), grid_thw=grid).last_hidden_state
        return list(output.split(grid.prod(-1).tolist()))

    def tower_outputs(self, vision: nn.Module, pixels: dict[str, torch.Tensor], *, patch_states: bool = False
                      ) -> tuple[torch.Tensor, tuple[Sequence[torch.Tensor], torch.Tensor] | None]:
        grid = pixels["image_grid_thw"]
        output = vision(pixels["pixel_values"].to(vision.dtype), grid_thw=grid, output_hidden_states=patch_states)
        pooled = torch.stack([patches.mean(0) for patches in output.last_hidden_state.split(grid.prod(-1).tolist())])
        if not patch_states:
            return pooled, None
        merge = vision.spatial_merge_size
        return pooled, (list(output.hidden_states), merge_order_positions(grid, merge).to(pooled.device))

    def position_heads(self, preset: str) -> nn.Module:
        sizes = self.sizes(preset)
        return RowColumnHeads(sizes.vision_hidden, max(QWEN_SCENE_SIZES[preset]) // sizes.patch_size)

    def build_model(self, preset: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
        model = Qwen2VLForConditionalGeneration(tiny_qwen_config(self.sizes(preset), tokenizer, "qwen2_vl"))
        set_qwen_generation_tokens(model, tokenizer)
        return model

    def load_tower(self, model: PreTrainedModel, vision: nn.Module) -> None:
        model.model.visual.load_state_dict(vision.state_dict())

    def freeze_tower(self, model: PreTrainedModel, *, blocks: bool = True) -> None:
        # The merger is Qwen's projector: stage 2 trains it, as LLaVA's stage 2 trains its MLP.
        visual = model.model.visual
        visual.requires_grad_(not blocks).eval()
        visual.merger.requires_grad_(True)

    def features(self, model: PreTrainedModel, pixels: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self._per_image(model.model.visual, pixels)

    def logits(self, model: PreTrainedModel, features: Sequence[torch.Tensor], ids: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        embeds = model.get_input_embeddings()(ids)
        merged = model.model.visual.merger(torch.cat(list(features)).to(embeds.dtype))
        is_image = ids == model.config.image_token_id
        embeds = embeds.masked_scatter(is_image[..., None], merged.to(embeds.dtype))
        sides = [math.isqrt(len(patches)) for patches in features]
        if any(side * side != len(patches) for side, patches in zip(sides, features)):
            raise ValueError("every feature map must come from a square scene (the world's are)")
        grid = torch.tensor([[1, side, side] for side in sides], device=ids.device)
        # transformers' own M-RoPE numbering, what the model's forward computes from input_ids at evaluation
        positions, _ = model.model.get_rope_index(ids, is_image.int(), image_grid_thw=grid, attention_mask=mask)
        return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits

    def save(self, model: PreTrainedModel, processor: ProcessorMixin, out: Path) -> Path:
        return save_qwen_checkpoint(model, processor.tokenizer, processor.image_processor, out, "qwen2_vl")


def merge_order_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(patches, 2): each ViT patch's (row, column) in the order Qwen2-VL's ViT holds them, merge block by merge
    block (its `rot_pos_emb`'s order), for every image of `grid_thw` in turn."""
    positions = []
    for frames, rows, cols in grid_thw.tolist():
        row = torch.arange(rows)[:, None].expand(rows, cols)
        col = torch.arange(cols)[None, :].expand(rows, cols)
        blocks = [axis.reshape(rows // merge, merge, cols // merge, merge).permute(0, 2, 1, 3).flatten()
                  for axis in (row, col)]
        positions.append(torch.stack(blocks, dim=1).repeat(frames, 1))
    return torch.cat(positions)


class QwenContrastive(nn.Module):
    """Stage 1 for a ViT without CLS: the mean of its patches, projected, against a CLIP text tower."""

    def __init__(self, vision: nn.Module, vision_hidden: int, text: CLIPTextConfig) -> None:
        super().__init__()
        self.vision_model = vision
        self.visual_projection = nn.Linear(vision_hidden, text.projection_dim, bias=False)
        self.text_model = CLIPTextModel(text)
        self.text_projection = nn.Linear(text.hidden_size, text.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature


ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (Llava(), Qwen2VL())}
_BY_MODEL_TYPE = {"llava": ARCHITECTURES["llava"], "qwen2_vl": ARCHITECTURES["qwen2-vl"]}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise SystemExit(f"--arch {name!r}: choose one of {tuple(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def of_model(model: PreTrainedModel) -> Architecture:
    return _BY_MODEL_TYPE[model.config.model_type]
