"""The one box parser, the one IoU, and the mapping of a model's answer to image pixels.

A model answers with four numbers. `parse_box` takes the box of the first JSON `"bbox_2d": [a, b, c, d]`
(Qwen2.5-VL) when there is one, else the first `[a, b, c, d]`, `(a, b, c, d)`, Qwen2-VL's
`(a, b),(c, d)` or MiniGPT-v2's `{<a><b><c><d>}` in the text. The numbers are read by the model's box
format: `normalized` (0-1, LLaVA), `normalized100` (0-100, MiniGPT-v2), `normalized1000` (0-1000,
Qwen2-VL), `input_pixels` (pixels of the image the model saw after
its processor resized it, Qwen2.5-VL) or `pixels` (of the original image), in the model's answer
frame (`mllm.ImageFrame`: fractions of the padded square, of the image itself, or of the centre
crop). Every box is compared in pixels of the original image.

lmms-eval's rule (`refcoco_bbox_rec` tasks) is stricter: only `[a, b, c, d]` with `", "`-style
separators and plain decimals counts; anything else scores as [0, 0, 0, 0]. `ParsedBox.lmms_eval`
holds what that rule reads, so each disagreement is counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mllm.images import ImageFrame

Box = tuple[float, float, float, float]  # x1, y1, x2, y2
BoxFormat = Literal["normalized", "normalized100", "normalized1000", "input_pixels", "pixels"]
BOX_FORMATS: tuple[str, ...] = ("normalized", "normalized100", "normalized1000", "input_pixels", "pixels")

_LMMS_EVAL_NUMBER = r"(-?\d+(?:\.\d+)?)"
LMMS_EVAL_PATTERN = re.compile(r"\[\s*" + r",\s*".join([_LMMS_EVAL_NUMBER] * 4) + r"\s*\]")
_NUMBER = r"(-?(?:\d+(?:\.\d*)?|\.\d+))"
_SEP = r"\s*,\s*"
_PATTERNS = (
    re.compile(rf"[\[(]\s*{_NUMBER}{_SEP}{_NUMBER}{_SEP}{_NUMBER}{_SEP}{_NUMBER}\s*[\])]"),
    re.compile(rf"\(\s*{_NUMBER}{_SEP}{_NUMBER}\s*\){_SEP}\(\s*{_NUMBER}{_SEP}{_NUMBER}\s*\)"),
    re.compile(r"\{\s*" + r"\s*".join([rf"<\s*{_NUMBER}\s*>"] * 4) + r"\s*\}"),  # MiniGPT-v2's
)
# Qwen2.5-VL's JSON key; its box wins over any 4-tuple before it (say, in a label).
_BBOX_2D = re.compile(rf"""["']bbox_2d["']\s*:\s*\[\s*{_NUMBER}{_SEP}{_NUMBER}{_SEP}{_NUMBER}{_SEP}{_NUMBER}\s*\]""")


@dataclass(frozen=True)
class ParsedBox:
    """What was read from an answer: `values` (None when unparsed) and what lmms-eval's rule reads."""

    values: Box | None
    lmms_eval: Box | None

    @property
    def parsed(self) -> bool:
        return self.values is not None

    @property
    def agrees_with_lmms_eval(self) -> bool:
        return self.values == self.lmms_eval


def parse_box(text: str) -> ParsedBox:
    """The first `"bbox_2d"` box, else the first bracketed 4-tuple of numbers in `text`; `values` is None
    when there is none."""
    keyed = _BBOX_2D.search(text)
    matches = [keyed] if keyed else [match for pattern in _PATTERNS if (match := pattern.search(text))]
    first = min(matches, key=lambda match: match.start(), default=None)
    strict = LMMS_EVAL_PATTERN.search(text)
    return ParsedBox(
        values=tuple(float(v) for v in first.groups()) if first else None,
        lmms_eval=tuple(float(v) for v in strict.groups()) if strict else None,
    )


def answer_to_pixels(values: Box, box_format: BoxFormat, frame: ImageFrame) -> Box:
    """A parsed answer -> [x1, y1, x2, y2] in pixels of the original image."""
    if box_format == "pixels":
        return values
    if box_format == "normalized":
        return frame.to_pixels(values)
    if box_format == "normalized100":
        return frame.to_pixels(tuple(v / 100 for v in values))
    if box_format == "normalized1000":
        return frame.to_pixels(tuple(v / 1000 for v in values))
    if box_format == "input_pixels":
        return frame.input_pixels_to_pixels(values)
    raise ValueError(f"unknown box format {box_format!r}; choose one of {BOX_FORMATS}")


def xywh_to_xyxy(box: Box) -> Box:
    x, y, w, h = box
    return (x, y, x + w, y + h)


def area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: Box, b: Box) -> float:
    """Intersection over union; 0 when either box is empty or inverted (x2 <= x1 or y2 <= y1)."""
    if area(a) == 0 or area(b) == 0:
        return 0.0
    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    return inter / (area(a) + area(b) - inter)


def center_inside(target: Box, prediction: Box) -> bool:
    """lmms-eval's center accuracy: the centre of `prediction` lies in `target` (edges included)."""
    cx, cy = (prediction[0] + prediction[2]) / 2, (prediction[1] + prediction[3]) / 2
    return target[0] <= cx <= target[2] and target[1] <= cy <= target[3]
