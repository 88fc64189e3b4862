"""Tiny random Qwen2-VL and Qwen2.5-VL checkpoints, built offline from config, in the Hugging Face layout.

The Qwen counterpart of `mllm.tiny.build_tiny_llava`: the directory holds what a downloaded
`Qwen/Qwen2-VL-2B-Instruct` holds (config, safetensors weights, tokenizer, image processor, chat template) and is
read back by `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`, by `AutoProcessor`
where torchvision is installed, and by `mllm.processors.load_qwen_processor` (what `mllm.load` uses)
everywhere. Unlike LLaVA-1.5 the image is not squashed to a fixed square: it keeps roughly its own size and
aspect ratio, so the number of visual tokens varies per image (`image_grid_thw`), and the LLM places them with
3-D multimodal RoPE (M-RoPE). The tokenizer is character-level, so any ASCII text round-trips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

# The default Qwen2-VL image processor needs torchvision, which this toolkit never installs.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mllm.tiny import CLIP_MEAN, CLIP_STD

# Qwen2-VL-Instruct's chat template (Qwen2.5-VL-Instruct ships the same one). A missing system turn gets the
# default one; each image becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor then expands
# to one <|image_pad|> per merged patch.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# In Qwen's own vocabulary order (151643 onwards there), so the ids keep their relative order here.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
UNK_TOKEN = "<unk>"  # Qwen's byte-level BPE needs none; without it a character-level BPE silently drops non-ASCII

MODELS: dict[str, tuple[type, type[PreTrainedModel], type[ProcessorMixin]]] = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
}


@dataclass(frozen=True)
class TinyQwenConfig:
    """Sizes of a tiny Qwen2-VL / Qwen2.5-VL: ViT with 2-D RoPE + 2x2 patch merger + Qwen2 LLM with M-RoPE."""

    patch_size: int = 8
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    # Qwen2.5-VL only: windows of window_size pixels (4x4 patches, 2x2 merged tokens), so a 64x64 image
    # (8x8 patches) splits into four windows; the last block attends over the whole image.
    window_size: int = 32
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    # Splits head_dim/2 = 8 rotary frequencies into temporal, height, width (Qwen2-VL-7B: 16, 24, 24 of 64).
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    max_position_embeddings: int = 512
    # Images are resized to multiples of patch*merge = 16 pixels with min_pixels <= h*w <= max_pixels:
    # 64x48 stays 64x48 (12 visual tokens); nothing gets more than 36 tokens or fewer than 4.
    min_pixels: int = 32 * 32
    max_pixels: int = 96 * 96
    seed: int = 0


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline, with Qwen's special tokens as single tokens.

    Like Qwen's tokenizer it prepends nothing; pad is `<|endoftext|>` and eos `<|im_end|>`.
    """
    chars = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate([*chars, UNK_TOKEN])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    # normalized=False: the template's "\n" right after a special token must stay a separate character.
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        padding_side="left",
    )


def tiny_qwen_config(sizes: TinyQwenConfig, tokenizer: PreTrainedTokenizerFast, model_type: str) -> Qwen2VLConfig:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    vision = {
        "depth": sizes.vision_layers,
        "num_heads": sizes.vision_heads,
        "patch_size": sizes.patch_size,
        "spatial_merge_size": sizes.spatial_merge_size,
        "temporal_patch_size": sizes.temporal_patch_size,
    }
    if model_type == "qwen2_vl":
        # Qwen2-VL calls the ViT width embed_dim and the merger's output (the LLM width) hidden_size.
        vision |= {"embed_dim": sizes.vision_hidden, "hidden_size": sizes.text_hidden, "mlp_ratio": 4}
    else:
        vision |= {
            "hidden_size": sizes.vision_hidden,
            "intermediate_size": 4 * sizes.vision_hidden,
            "out_hidden_size": sizes.text_hidden,
            "window_size": sizes.window_size,
            "fullatt_block_indexes": [sizes.vision_layers - 1],
        }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": sizes.text_hidden,
        "intermediate_size": 4 * sizes.text_hidden,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": sizes.text_heads,
        "num_key_value_heads": sizes.text_kv_heads,
        "max_position_embeddings": sizes.max_position_embeddings,
        "max_window_layers": sizes.text_layers,  # as Qwen2-VL ships it (sliding window is off anyway)
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(sizes.mrope_section)},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        # See mllm.tiny: HF's 0.02 suits a 4096-wide model; at these widths hidden^-1/2 keeps a trainable start.
        "initializer_range": sizes.text_hidden**-0.5,
    }
    config_class = MODELS[model_type][0]
    return config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_qwen_image_processor(sizes: TinyQwenConfig) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        min_pixels=sizes.min_pixels,
        max_pixels=sizes.max_pixels,
        patch_size=sizes.patch_size,
        temporal_patch_size=sizes.temporal_patch_size,
        merge_size=sizes.spatial_merge_size,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def build_tiny_qwen(directory: str | Path, model_type: str, sizes: TinyQwenConfig | None = None) -> Path:
    """Build a randomly initialised tiny `model_type` ("qwen2_vl" or "qwen2_5_vl") and save it to `directory`."""
    if model_type not in MODELS:
        raise ValueError(f"model_type must be one of {sorted(MODELS)}, got {model_type!r}")
    sizes = sizes or TinyQwenConfig()
    tokenizer = build_qwen_tokenizer()
    config = tiny_qwen_config(sizes, tokenizer, model_type)
    torch.manual_seed(sizes.seed)
    model = MODELS[model_type][1](config).eval()
    set_qwen_generation_tokens(model, tokenizer)
    return save_qwen_checkpoint(model, tokenizer, build_qwen_image_processor(sizes), directory, model_type)


def set_qwen_generation_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    """As Qwen2-VL-Instruct's generation_config: a turn ends at <|im_end|>, a document at <|endoftext|>."""
    model.generation_config.bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def save_qwen_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                         image_processor: Qwen2VLImageProcessorPil, directory: str | Path, model_type: str) -> Path:
    """Write `model` in the Hugging Face layout of a Qwen2-VL / Qwen2.5-VL checkpoint, which `mllm.load` reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    # Written part by part, as on the Hub (the processor itself cannot be built without torchvision, see
    # mllm.processors.ImageOnlyQwenProcessor): preprocessor_config.json names the processor class, so with
    # torchvision AutoProcessor builds the real one; the template goes to chat_template.jinja.
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    image_processor.processor_class = MODELS[model_type][2].__name__
    image_processor.save_pretrained(directory)
    return directory


def build_tiny_qwen2_vl(directory: str | Path, sizes: TinyQwenConfig | None = None) -> Path:
    """A tiny random Qwen2-VL checkpoint in `directory`."""
    return build_tiny_qwen(directory, "qwen2_vl", sizes)


def build_tiny_qwen2_5_vl(directory: str | Path, sizes: TinyQwenConfig | None = None) -> Path:
    """A tiny random Qwen2.5-VL checkpoint in `directory` (windowed ViT attention, SwiGLU ViT MLP)."""
    return build_tiny_qwen(directory, "qwen2_5_vl", sizes)
