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


def instruction_texts(seed: int, size: int) -> list[tuple[str, str, str]]:
    """(task, user text, answer) for every query about one scene.

    REC and VQA are worded as the llava-1.5 prompt style asks at evaluation; captions, LLaVA's
    alignment data, name what the image holds and never where. "where" questions and region
    descriptions (a box in, "the red circle" out) are for training only: "where" is drawn from its own
    random stream and regions use none, so the other queries do not depend on them.
    """
    style = prompt_style("llava-1.5")
    scene, rng = make_scene(seed, size), random.Random(seed)
    items = [("rec", style.text("rec", ref.text), box_answer(scene.objects[ref.target].box, size))
             for ref in referring_expressions(scene, rng)]
    items += [("vqa", style.text("vqa", q.text), q.answer) for q in vqa_questions(scene, rng)]
    items.append(("caption", CAPTION_PROMPT, caption(scene, rng)))
    items += [("where", style.text("vqa", q.text), q.answer) for q in where_questions(scene, random.Random(seed + 7))]
    items += [("region", f"{REGION_PROMPT} {box_answer(obj.box, size)}", Description(obj.color, obj.shape).text())
              for obj in scene.objects]
    return items


def world_corpus(count: int = 400, size: int = 64, seed: int = 10**7) -> list[str]:
    """Text the tokenizer is trained on: every evaluated instruction in the chat wording, with its answer.

    The training-only "where" and region queries are left out, so adding them did not change the vocabulary.
    """
    return [f"USER: \n{text} ASSISTANT: {answer}" for scene_seed in range(seed, seed + count)
            for task, text, answer in instruction_texts(scene_seed, size) if task not in TRAINING_ONLY_TASKS]


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """BPE over the world's text; any printable ASCII still encodes, character by character."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = [chr(code) for code in range(32, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, IMAGE_TOKEN],
                                  initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(world_corpus(), trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def build_clip(sizes: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast, text: TextTowerConfig) -> CLIPModel:
    """A CLIP whose vision tower is exactly the LLaVA's (same config), ready for contrastive training."""
    vision = tiny_llava_config(sizes, tokenizer).vision_config.to_dict()
    config = CLIPConfig(
        vision_config=vision,
        text_config={"vocab_size": len(tokenizer), "hidden_size": text.hidden, "intermediate_size": 4 * text.hidden,
                     "num_hidden_layers": text.layers, "num_attention_heads": text.heads,
                     "max_position_embeddings": text.max_length, "projection_dim": sizes.vision_hidden,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id},
        projection_dim=sizes.vision_hidden,
    )
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
