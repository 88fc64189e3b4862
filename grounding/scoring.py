"""Turn one model answer into one JSONL record: the parsed box and its IoU, or the VQA match."""

from __future__ import annotations

from dataclasses import replace

from grounding.boxes import answer_to_pixels, center_inside, iou, parse_box
from grounding.data.samples import Sample
from grounding.metrics import exact_match
from grounding.prompts import PromptStyle
from mllm.images import ImageFrame


def _base(sample: Sample) -> dict:
    record = {"index": sample.index, "id": sample.id, "text": sample.text, "image": str(sample.image)}
    return {**record, "meta": sample.meta} if sample.meta else record


def score_rec(sample: Sample, prediction: str, image_size: tuple[int, int], style: PromptStyle,
              input_size: tuple[int, int] | None = None) -> dict:
    """IoU of the first box in `prediction` with the sample's box; an unparsed answer scores 0.

    `input_size` is (width, height) of the image the model saw (`ImageFrame.input_size`); box format
    `input_pixels` needs it, and its records keep it.
    """
    parsed = parse_box(prediction)
    seen = (int(input_size[0]), int(input_size[1])) if input_size is not None else None
    frame = replace(ImageFrame.for_image(style.answer_frame, *image_size), input_size=seen)
    box = answer_to_pixels(parsed.values, style.box_format, frame) if parsed.parsed else None
    return {
        **_base(sample), "target": list(sample.box), "image_size": list(image_size),
        **({"input_size": list(seen) if seen else None} if style.box_format == "input_pixels" else {}),
        "prediction": prediction,
        "parsed": parsed.parsed, "answer": list(parsed.values) if parsed.parsed else None,
        "box": list(box) if box else None, "iou": iou(sample.box, box) if box else 0.0,
        "center_hit": bool(box) and center_inside(sample.box, box),
        "lmms_eval_agrees": parsed.agrees_with_lmms_eval, "error": None,
    }


def score_vqa(sample: Sample, prediction: str) -> dict:
    return {**_base(sample), "answers": list(sample.answers), "prediction": prediction,
            "correct": exact_match(prediction, sample.answers), "error": None}


def error_record(sample: Sample, kind: str, message: str) -> dict:
    """A sample that could not be scored, kept in the results and counted in the summary."""
    return {**_base(sample), "error": message, "error_kind": kind}
