"""Prompt styles per model family: the REC and VQA instructions, and how the family writes boxes.

The default, `llava-1.5`, is lmms-eval's: its `refcoco_bbox_rec` prompt and its GQA post-prompt,
answers read as 0-1 fractions of the original image as lmms-eval scores them (whether LLaVA-1.5
means fractions of the padded square it saw is unsettled: `--answer-frame padded` reads them so).
Qwen2-VL (`qwen2-vl`) and Qwen2.5-VL (`qwen2.5-vl`) are asked in their own grounding formats, as
their makers document them; lmms-eval's `refcoco_bbox_rec` asks every model the LLaVA prompt and
reads only `[a, b, c, d]` fractions. Shikra (`shikra`) is asked its own first REC template, MiniGPT-v2
(`minigptv2`) its `[refer]` and `[vqa]` prompts. Register another family with `register_prompt_style`.

A style may instead ask each REC sample one of several templates (`rec_templates`, read from a JSON list by
`load_rec_templates`, as Shikra's evaluation draws one of its 54): drawn per sample from its index and
`template_seed`, so a sample gets the same template in every run, batch and shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from grounding.boxes import BOX_FORMATS, BoxFormat
from grounding.errors import PromptStyleError
from mllm.images import FRAME_KINDS, FrameKind

LMMS_EVAL_REC_PROMPT = (
    "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
    "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide the "
    "bounding box coordinate of the region this sentence describes: {expression}"
)
LMMS_EVAL_GQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."
# Qwen2-VL's grounding format (as ms-swift's Qwen2-VL grounding data writes it): the expression between
# its reference tokens; it answers `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`, 0-1000 of the image.
QWEN2_VL_REC_PROMPT = "Find <|object_ref_start|>{expression}<|object_ref_end|>"
# The prompt the Qwen team gives for Qwen2.5-VL on RefCOCO (QwenLM/Qwen3-VL#991); it answers
# ```json [{"bbox_2d": [x1, y1, x2, y2], "label": ...}]``` in pixels of the resized input image.
QWEN2_5_VL_REC_PROMPT = "Locate {expression} in this image and output the bbox coordinates in JSON format."
# The first of Shikra's REC question templates (its config/_base_/dataset/template/REC.json); the image goes where
# the question says. Shikra answers "Answer: [x0,y0,x1,y1] ." in fractions of the white-padded square, 3 decimals.
SHIKRA_REC_PROMPT = "Where is {expression} <image>?"
# MiniGPT-v2's task-tagged prompts (its RefCOCOEvalData and GQA dataset): it answers "{<x1><y1><x2><y2>}",
# integers 0-100 of the original image (it squashes the image to 448 x 448).
MINIGPTV2_REC_PROMPT = "[refer] give me the location of {expression}"
MINIGPTV2_GQA_PROMPT = "[vqa] Based on the image, respond to this question with a short answer: {question}"


@dataclass(frozen=True)
class PromptStyle:
    """How to ask one family for a box or an answer, and how to read its box."""

    name: str
    rec: str  # format string with {expression}
    vqa: str  # format string with {question}
    box_format: BoxFormat = "normalized"
    image_frame: FrameKind = "padded"  # how the image is shown (mllm.encode's frame)
    answer_frame: FrameKind = "original"  # which frame the answer's coordinates are fractions of
    stop: tuple[str, ...] = ()
    rec_max_new_tokens: int = 64
    vqa_max_new_tokens: int = 16
    rec_templates: tuple[str, ...] = ()  # when given, each REC sample is asked one of these instead of `rec`
    template_seed: int = 0

    def __post_init__(self) -> None:
        if self.box_format not in BOX_FORMATS:
            raise PromptStyleError(f"prompt style {self.name}: box format {self.box_format!r} not in {BOX_FORMATS}")
        for frame in (self.image_frame, self.answer_frame):
            if frame not in FRAME_KINDS:
                raise PromptStyleError(f"prompt style {self.name}: frame {frame!r} not in {FRAME_KINDS}")
        if "{expression}" not in self.rec or "{question}" not in self.vqa:
            raise PromptStyleError(f"prompt style {self.name}: the REC prompt needs {{expression}} and the VQA "
                             f"prompt {{question}}")
        for number, template in enumerate(self.rec_templates):
            if "{expression}" not in template:
                raise PromptStyleError(f"prompt style {self.name}: REC template {number} ({template!r}) has no "
                                       "{expression}")

    def rec_template(self, index: int) -> str:
        """The REC prompt sample `index` is asked: `rec`, or its seeded draw from `rec_templates`."""
        if not self.rec_templates:
            return self.rec
        draw = np.random.default_rng([self.template_seed, index]).integers(len(self.rec_templates))
        return self.rec_templates[int(draw)]

    def text(self, task: str, sample_text: str, index: int = 0) -> str:
        """The user message for a sample (`index` picks its REC template when the style has several)."""
        if task == "rec":
            return self.rec_template(index).replace("{expression}", sample_text)
        return self.vqa.replace("{question}", sample_text)

    def max_new_tokens(self, task: str) -> int:
        return self.rec_max_new_tokens if task == "rec" else self.vqa_max_new_tokens

    def with_options(self, **changes: object) -> PromptStyle:
        return replace(self, **{key: value for key, value in changes.items() if value is not None})


_STYLES: dict[str, PromptStyle] = {}
_FAMILY_OF_MODEL_TYPE: dict[str, str] = {}


def register_prompt_style(style: PromptStyle, model_types: tuple[str, ...] = ()) -> PromptStyle:
    """Make `style` available by name, and the default for checkpoints whose config has `model_types`."""
    _STYLES[style.name] = style
    _FAMILY_OF_MODEL_TYPE.update(dict.fromkeys(model_types, style.name))
    return style


def prompt_style(name: str) -> PromptStyle:
    if name not in _STYLES:
        raise PromptStyleError(f"unknown prompt style {name!r}; registered: {sorted(_STYLES)}")
    return _STYLES[name]


def load_rec_templates(path: str | Path) -> tuple[str, ...]:
    """REC question templates from a JSON list of strings (Shikra's config/_base_/dataset/template/REC.json),
    its `<expr>` read as the toolkit's `{expression}`; `<image>` places the image (`mllm.prompts.IMAGE_SLOT`)."""
    path = Path(path)
    try:
        templates = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PromptStyleError(f"{path}: cannot read REC templates ({error})") from error
    if not isinstance(templates, list) or not templates:
        raise PromptStyleError(f"{path}: REC templates must be a non-empty JSON list of strings")
    read = []
    for number, entry in enumerate(templates):
        if not isinstance(entry, str):
            raise PromptStyleError(f"{path}: entry {number} is {type(entry).__name__}, not a string")
        template = entry.replace("<expr>", "{expression}")
        if template.count("{expression}") != 1:
            raise PromptStyleError(f"{path}: entry {number} ({entry!r}) needs exactly one <expr> or {{expression}}")
        read.append(template)
    return tuple(read)


def default_style_for(model_type: str) -> PromptStyle:
    if model_type not in _FAMILY_OF_MODEL_TYPE:
        raise PromptStyleError(f"no prompt style registered for model type {model_type!r}; pass --prompt-style "
                         f"(one of {sorted(_STYLES)})")
    return _STYLES[_FAMILY_OF_MODEL_TYPE[model_type]]


# lmms-eval asks every model the same; its LLaVA wrappers stop generating at "ASSISTANT:".
register_prompt_style(PromptStyle("llava-1.5", LMMS_EVAL_REC_PROMPT, LMMS_EVAL_GQA_PROMPT, stop=("ASSISTANT:",)),
                      model_types=("llava",))

# LLaVA-NeXT is asked as lmms-eval asks LLaVA, shown the image as it is: its processor tiles it at its own aspect
# ratio (the base crop squashes it), so the answer's fractions are of the original image.
register_prompt_style(PromptStyle("llava-next", LMMS_EVAL_REC_PROMPT, LMMS_EVAL_GQA_PROMPT, image_frame="original",
                                  stop=("ASSISTANT:",)),
                      model_types=("llava_next",))

# Qwen keeps the native resolution: its processor resizes each axis (within min/max pixels), so fractions
# of what it saw are fractions of the original image. It stops at its EOS, `<|im_end|>`: no stop string.
register_prompt_style(PromptStyle("qwen2-vl", QWEN2_VL_REC_PROMPT, LMMS_EVAL_GQA_PROMPT, box_format="normalized1000",
                                  image_frame="original", answer_frame="original", rec_max_new_tokens=128),
                      model_types=("qwen2_vl",))
register_prompt_style(PromptStyle("qwen2.5-vl", QWEN2_5_VL_REC_PROMPT, LMMS_EVAL_GQA_PROMPT,
                                  box_format="input_pixels", image_frame="original", answer_frame="original",
                                  rec_max_new_tokens=128),
                      model_types=("qwen2_5_vl",))
# Shikra's evaluation draws one of 54 REC templates at random, unseeded; the toolkit asks the first (pass another
# with the style's `rec`). Its VQA wording is lmms-eval's, after the image.
register_prompt_style(PromptStyle("shikra", SHIKRA_REC_PROMPT, "<image> " + LMMS_EVAL_GQA_PROMPT, image_frame="padded",
                                  answer_frame="padded"),
                      model_types=("shikra",))
# MiniGPT-v2's benchmark evaluation generates at most 20 tokens, greedily, and stops at EOS.
register_prompt_style(PromptStyle("minigptv2", MINIGPTV2_REC_PROMPT, MINIGPTV2_GQA_PROMPT, box_format="normalized100",
                                  image_frame="original", answer_frame="original", rec_max_new_tokens=20,
                                  vqa_max_new_tokens=20),
                      model_types=("minigptv2",))
