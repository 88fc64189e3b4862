"""Prompt styles per model family: the REC and VQA instructions, and how the family writes boxes.

The default, `llava-1.5`, is lmms-eval's: its `refcoco_bbox_rec` prompt and its GQA post-prompt,
answers read as 0-1 fractions of the original image as lmms-eval scores them (whether LLaVA-1.5
means fractions of the padded square it saw is unsettled: `--answer-frame padded` reads them so).
Register another family with `register_prompt_style`.
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
