"""The miniature's parts: a word-piece tokenizer for the synthetic world, a small CLIP, a small LLaVA.

The LLaVA side reuses `mllm.tiny`'s builders, so the miniature is a stock `LlavaForConditionalGeneration`
(CLIP ViT with learned absolute positions, penultimate-layer features, MLP projector, Llama with RoPE)
written in the llava-hf layout. The tokenizer is a BPE trained on the world's text with Llama's
conventions: "▁" marks a word start, every digit is its own token, `<s>` is prepended.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPModel, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from grounding.prompts import prompt_style
from minillava.world import (
    Description,
    box_answer,
    caption,
    make_scene,
    referring_expressions,
    vqa_questions,
    where_questions,
)
from mllm.tiny import IMAGE_TOKEN, SPECIAL_TOKENS, TinyLlavaConfig, tiny_llava_config
from mllm.tiny_qwen import QWEN_SPECIAL_TOKENS, UNK_TOKEN

PRESETS = {
    # The prototype's size, trainable on a 2-core CPU in under an hour per miniature.
    "cpu": TinyLlavaConfig(image_size=64, patch_size=8, vision_hidden=128, vision_layers=6, vision_heads=4,
                           text_hidden=192, text_layers=4, text_heads=6, text_kv_heads=6,
                           max_position_embeddings=512),
    # For a GPU: 112 px scenes, 196 visual tokens, a deeper tower and LLM.
    "gpu": TinyLlavaConfig(image_size=112, patch_size=8, vision_hidden=192, vision_layers=8, vision_heads=6,
                           text_hidden=384, text_layers=6, text_heads=6, text_kv_heads=6,
                           max_position_embeddings=1024),
    # Seconds on a CPU: for tests.
    "test": TinyLlavaConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, vision_heads=4,
                            text_hidden=48, text_layers=2, text_heads=4, text_kv_heads=4,
                            max_position_embeddings=256),
}


@dataclass(frozen=True)
class TextTowerConfig:
    """CLIP's text tower, used only for the contrastive stage and not shipped."""

    hidden: int = 128
    layers: int = 3
    heads: int = 4
    max_length: int = 48


CAPTION_PROMPT = "Provide a brief description of the given image."  # one of LLaVA's caption instructions
# LLaVA-1.5's region-description (REG) instruction, the converse of REC, from its RefCOCO/VG training data.
REGION_PROMPT = "Please provide a short description for this region:"
# Queries made for training only: never evaluated, so kept out of the tokenizer's corpus.
TRAINING_ONLY_TASKS = ("where", "region")


def instruction_texts(seed: int, size: int, style: str = "llava-1.5") -> list[tuple[str, str, str]]:
    """(task, user text, answer) for every query about one scene.

    REC and VQA are worded as prompt style `style` asks at evaluation, boxes in its format; captions, LLaVA's
    alignment data, name what the image holds and never where. "where" questions and region
    descriptions (a box in, "the red circle" out) are for training only: "where" is drawn from its own
    random stream and regions use none, so the other queries do not depend on them.
    """
    style = prompt_style(style)
    scene, rng = make_scene(seed, size), random.Random(seed)
    items = [("rec", style.text("rec", ref.text), box_answer(scene.objects[ref.target].box, size, style.box_format))
             for ref in referring_expressions(scene, rng)]
    items += [("vqa", style.text("vqa", q.text), q.answer) for q in vqa_questions(scene, rng)]
    items.append(("caption", CAPTION_PROMPT, caption(scene, rng)))
    items += [("where", style.text("vqa", q.text), q.answer) for q in where_questions(scene, random.Random(seed + 7))]
    items += [("region", f"{REGION_PROMPT} {box_answer(obj.box, size, style.box_format)}",
               Description(obj.color, obj.shape).text())
              for obj in scene.objects]
    return items


def world_corpus(count: int = 400, size: int = 64, seed: int = 10**7, style: str = "llava-1.5") -> list[str]:
    """Text the tokenizer is trained on: every evaluated instruction in the chat wording, with its answer.

    The training-only "where" and region queries are left out, so adding them did not change the vocabulary.
    Special tokens in the text (Qwen's box and reference markers) are dropped: they are tokens already.
    """
    if style == "llava-1.5":
        return [f"USER: \n{text} ASSISTANT: {answer}" for scene_seed in range(seed, seed + count)
                for task, text, answer in instruction_texts(scene_seed, size) if task not in TRAINING_ONLY_TASKS]
    return [_SPECIAL.sub("", f"user\n{text}\nassistant\n{answer}") for scene_seed in range(seed, seed + count)
            for task, text, answer in instruction_texts(scene_seed, size, style) if task not in TRAINING_ONLY_TASKS]


_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


def build_tokenizer(vocab_size: int = 384, style: str = "llava-1.5") -> PreTrainedTokenizerFast:
    """BPE over the world's text, worded as prompt style `style`; any printable ASCII still encodes.

    For `llava-1.5` it has Llama's conventions: "▁" marks a word start, every digit is its own token, `<s>` is
    prepended. For `qwen2-vl` it has Qwen's special tokens and prepends nothing; a newline is a token of its
    own, so a prompt's tokens stay a prefix of prompt + answer.
    """
    qwen = style != "llava-1.5"
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    splits = [pre_tokenizers.Split("\n", behavior="isolated")] if qwen else []
    prepend = "never" if qwen else "first"
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        *splits,
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend)
    alphabet = [chr(code) for code in range(32, 127)] + ["\n", "▁"]
    specials = [UNK_TOKEN, *QWEN_SPECIAL_TOKENS] if qwen else [*SPECIAL_TOKENS, IMAGE_TOKEN]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(world_corpus(style=style), trainer)
    if qwen:  # Qwen's conventions (mllm.tiny_qwen): pad <|endoftext|>, eos <|im_end|>, nothing prepended
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       unk_token=UNK_TOKEN, additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
                                       padding_side="left")
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def clip_text_config(tokenizer: PreTrainedTokenizerFast, text: TextTowerConfig, projection_dim: int) -> dict:
    return {"vocab_size": len(tokenizer), "hidden_size": text.hidden, "intermediate_size": 4 * text.hidden,
            "num_hidden_layers": text.layers, "num_attention_heads": text.heads,
            "max_position_embeddings": text.max_length, "projection_dim": projection_dim,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def build_clip(sizes: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast, text: TextTowerConfig) -> CLIPModel:
    """A CLIP whose vision tower is exactly the LLaVA's (same config), ready for contrastive training."""
    vision = tiny_llava_config(sizes, tokenizer).vision_config.to_dict()
    config = CLIPConfig(vision_config=vision, text_config=clip_text_config(tokenizer, text, sizes.vision_hidden),
                        projection_dim=sizes.vision_hidden)
    return CLIPModel(config)


def build_llava(sizes: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration(tiny_llava_config(sizes, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def trained_with_current_init(checkpoint: str | Path) -> bool:
    """Whether a miniature's LLM started at std hidden^-1/2 (the current recipe, `mllm.tiny`), as its
    `config.json` records, rather than Hugging Face's 0.02 (the first shipped `spatial` miniature)."""
    path = Path(checkpoint) / "config.json"
    text = json.loads(path.read_text())["text_config"]
    return math.isclose(text["initializer_range"], text["hidden_size"] ** -0.5, rel_tol=1e-6)
