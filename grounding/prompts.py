"""Prompt styles per model family: the REC and VQA instructions, and how the family writes boxes.

The default, `llava-1.5`, is lmms-eval's: its `refcoco_bbox_rec` prompt and its GQA post-prompt,
answers read as 0-1 fractions of the original image as lmms-eval scores them (whether LLaVA-1.5
means fractions of the padded square it saw is unsettled: `--answer-frame padded` reads them so).
Qwen2-VL (`qwen2-vl`) and Qwen2.5-VL (`qwen2.5-vl`) are asked in their own grounding formats, as
their makers document them; lmms-eval's `refcoco_bbox_rec` asks every model the LLaVA prompt and
reads only `[a, b, c, d]` fractions. Register another family with `register_prompt_style`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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

    def __post_init__(self) -> None:
        if self.box_format not in BOX_FORMATS:
            raise PromptStyleError(f"prompt style {self.name}: box format {self.box_format!r} not in {BOX_FORMATS}")
        for frame in (self.image_frame, self.answer_frame):
            if frame not in FRAME_KINDS:
                raise PromptStyleError(f"prompt style {self.name}: frame {frame!r} not in {FRAME_KINDS}")
        if "{expression}" not in self.rec or "{question}" not in self.vqa:
            raise PromptStyleError(f"prompt style {self.name}: the REC prompt needs {{expression}} and the VQA "
                             f"prompt {{question}}")

    def text(self, task: str, sample_text: str) -> str:
        if task == "rec":
            return self.rec.replace("{expression}", sample_text)
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


def default_style_for(model_type: str) -> PromptStyle:
    if model_type not in _FAMILY_OF_MODEL_TYPE:
        raise PromptStyleError(f"no prompt style registered for model type {model_type!r}; pass --prompt-style "
                         f"(one of {sorted(_STYLES)})")
    return _STYLES[_FAMILY_OF_MODEL_TYPE[model_type]]


# lmms-eval asks every model the same; its LLaVA wrappers stop generating at "ASSISTANT:".
register_prompt_style(PromptStyle("llava-1.5", LMMS_EVAL_REC_PROMPT, LMMS_EVAL_GQA_PROMPT, stop=("ASSISTANT:",)),
                      model_types=("llava",))

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
