"""Tiny random LLaVA checkpoints, built offline from config, in the llava-hf directory layout.

They exercise every code path of the toolkit in seconds on a CPU: the directory they write is read by
`mllm.load` exactly like a downloaded `llava-hf/llava-1.5-7b-hf` (config, safetensors weights,
tokenizer, image processor, chat template). The tokenizer is character-level, so any ASCII text
(prompts, box coordinates) round-trips without a trained vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import (
    Blip2VisionConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mllm.minigptv2 import MINIGPTV2_CHAT_TEMPLATE, MiniGPTv2Config, MiniGPTv2ForConditionalGeneration
from mllm.shikra import SHIKRA_CHAT_TEMPLATE, SHIKRA_TOKENS, ShikraConfig, ShikraForConditionalGeneration

try:  # later transformers 5.x split image processors into torchvision and PIL backends
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # earlier 5.x: the plain processor is the PIL/numpy one
    from transformers import CLIPImageProcessor

# The chat template shipped with llava-hf/llava-1.5-*-hf: "USER: <image>\n{text} ASSISTANT:".
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyLlavaConfig:
    """Sizes of a tiny LLaVA-1.5: CLIP ViT (learned absolute positions) + MLP projector + Llama (RoPE)."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    max_position_embeddings: int = 512
    vision_feature_layer: int = -2
    seed: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline, with Llama's special tokens.

    Like Llama's tokenizer it prepends `<s>`, and `<image>` is a special token that is never split.
    """
    chars = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def tiny_llava_config(sizes: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=4 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.text_hidden,
        intermediate_size=4 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Hugging Face's Llama default (0.02) suits a 4096-wide model, where hidden^-1/2 is 0.016. At our
        # widths it is several times smaller than hidden^-1/2; query-key products then start so small that a
        # model trained from scratch stays on a content-free plateau and never learns to retrieve by content
        # ("the red circle" lands on a random object). The same init also reaches the projector and lm_head.
        initializer_range=sizes.text_hidden**-0.5,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=sizes.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=sizes.grid[0] * sizes.grid[1],
    )


def build_processor(sizes: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=sizes.patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA15_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def save_llava_checkpoint(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, directory: str | Path
) -> Path:
    """Write `model` and `processor` in the llava-hf layout that `mllm.load` reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_llava(directory: str | Path, sizes: TinyLlavaConfig | None = None) -> Path:
    """Build a randomly initialised tiny LLaVA-1.5 and save it as a local checkpoint directory."""
    sizes = sizes or TinyLlavaConfig()
    tokenizer = build_char_tokenizer()
    config = tiny_llava_config(sizes, tokenizer)
    torch.manual_seed(sizes.seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return save_llava_checkpoint(model, build_processor(sizes, tokenizer), directory)


def build_tiny_shikra(directory: str | Path, sizes: TinyLlavaConfig | None = None) -> Path:
    """A randomly initialised tiny Shikra (`mllm.shikra`) in the layout `python -m mllm.convert shikra` writes."""
    sizes = sizes or TinyLlavaConfig()
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *SHIKRA_TOKENS]})
    patch, start, end = (tokenizer.convert_tokens_to_ids(token) for token in SHIKRA_TOKENS)
    llava = tiny_llava_config(sizes, tokenizer)
    config = ShikraConfig(vision_config=llava.vision_config.to_dict(), text_config=llava.text_config.to_dict(),
                          image_token_id=patch, im_start_token_id=start, im_end_token_id=end,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_seq_length=sizes.grid[0] * sizes.grid[1], projector_hidden_act="linear")
    torch.manual_seed(sizes.seed)
    model = ShikraForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = build_processor(sizes, tokenizer)
    processor = LlavaProcessor(image_processor=processor.image_processor, tokenizer=tokenizer,
                               patch_size=sizes.patch_size, vision_feature_select_strategy="default",
                               image_token=SHIKRA_TOKENS[0], num_additional_image_tokens=1,
                               chat_template=SHIKRA_CHAT_TEMPLATE)
    return save_llava_checkpoint(model, processor, directory)


def build_tiny_minigptv2(directory: str | Path, sizes: TinyLlavaConfig | None = None) -> Path:
    """A randomly initialised tiny MiniGPT-v2 (`mllm.minigptv2`) in the layout `python -m mllm.convert minigptv2`
    writes: an EVA-shaped tower (`Blip2VisionModel`, q and v biases), 4 patches per LLM token, Llama."""
    sizes = sizes or TinyLlavaConfig(image_size=64, patch_size=8)  # 8 x 8 patches: 16 tokens on an 8 x 2 grid
    tokenizer = build_char_tokenizer()
    llava = tiny_llava_config(sizes, tokenizer)
    vision = Blip2VisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=4 * sizes.vision_hidden,
                               num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                               image_size=sizes.image_size, patch_size=sizes.patch_size, hidden_act="gelu",
                               layer_norm_eps=1e-6, qkv_bias=True,
                               initializer_range=0.02)  # Blip2VisionConfig's default, 1e-10, gives a blank tower
    rows, cols = sizes.grid
    config = MiniGPTv2Config(vision_config=vision.to_dict(), text_config=llava.text_config.to_dict(),
                             image_token_id=tokenizer.unk_token_id, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_seq_length=rows * cols // 4,
                             tokens_per_group=4, tie_word_embeddings=False)
    torch.manual_seed(sizes.seed)
    model = MiniGPTv2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random q and v biases, a zero k bias, as EVA's
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.qkv.bias[sizes.vision_hidden:2 * sizes.vision_hidden] = 0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = build_minigptv2_processor(tokenizer, sizes.image_size, sizes.patch_size, tokens_per_group=4)
    return save_llava_checkpoint(model, processor, directory)


def build_minigptv2_processor(tokenizer: PreTrainedTokenizerFast, side: int, patch_size: int, *,
                              tokens_per_group: int) -> LlavaProcessor:
    """MiniGPT-v2's processor (the converter's and the tiny one's): the image squashed to `side` bicubically with
    CLIP's mean and std (Blip2ImageEvalProcessor), `<unk>` as the image placeholder, its chat template."""
    image_processor = CLIPImageProcessor(size={"height": side, "width": side}, do_center_crop=False, resample=3,
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    # LlavaProcessor counts (side / patch)^2 placeholders: a patch of sqrt(group) x 14 px gives one per 1 x 4 strip
    # of the tower's grid (256 at 448 px); the strips' own layout is the adapter's business.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=int(patch_size * tokens_per_group ** 0.5),
                          vision_feature_select_strategy="default", image_token=tokenizer.unk_token,
                          num_additional_image_tokens=1, chat_template=MINIGPTV2_CHAT_TEMPLATE)


# LLaVA-NeXT's anyres tile grids at the tiny tower's size: LLaVA-NeXT's own (336, 672, 1008 px) scaled by side / 336.
def tiny_grid_pinpoints(side: int) -> list[list[int]]:
    return [[side * rows, side * cols] for rows, cols in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]


def build_tiny_llava_next(directory: str | Path, sizes: TinyLlavaConfig | None = None) -> Path:
    """A randomly initialised tiny LLaVA-NeXT (`LlavaNextForConditionalGeneration`) in the llava-hf v1.6 layout:
    anyres tiles on LLaVA-NeXT's grid shapes, unpadded, an `image_newline` after each tile row, the base crop
    first; the processor is the PIL one, so it loads without torchvision."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    sizes = sizes or TinyLlavaConfig(image_size=28, patch_size=14)
    tokenizer = build_char_tokenizer()
    llava = tiny_llava_config(sizes, tokenizer)
    pinpoints = tiny_grid_pinpoints(sizes.image_size)
    config = LlavaNextConfig(vision_config=llava.vision_config.to_dict(), text_config=llava.text_config.to_dict(),
                             image_token_id=llava.image_token_id, image_grid_pinpoints=pinpoints,
                             vision_feature_layer=sizes.vision_feature_layer,
                             vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(sizes.seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    side = sizes.image_size
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": side},
                                                 crop_size={"height": side, "width": side},
                                                 image_grid_pinpoints=pinpoints, image_mean=list(CLIP_MEAN),
                                                 image_std=list(CLIP_STD))
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=sizes.patch_size,
                                   vision_feature_select_strategy="default", chat_template=LLAVA15_CHAT_TEMPLATE,
                                   num_additional_image_tokens=1)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
