"""The Qwen2-VL and Qwen2.5-VL prompt styles: their prompts, the one parser on their answers, and the
`input_pixels` box format (pixels of the resized input image) mapped back to the original image."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from grounding.boxes import BOX_FORMATS, answer_to_pixels, parse_box
from grounding.data.samples import ImageRef, Sample
from grounding.prompts import (
    LMMS_EVAL_GQA_PROMPT,
    QWEN2_5_VL_REC_PROMPT,
    QWEN2_VL_REC_PROMPT,
    default_style_for,
    prompt_style,
)
from grounding.scoring import score_rec
from mllm.images import ImageFrame


def rec_sample(box) -> Sample:
    return Sample(index=0, id="0", image=ImageRef(Path("x.jpg")), text="the red cup", box=box)


# --- the styles ---------------------------------------------------------------------------------------------------


def test_qwen_styles_are_the_defaults_for_their_model_types():
    assert default_style_for("qwen2_vl") is prompt_style("qwen2-vl")
    assert default_style_for("qwen2_5_vl") is prompt_style("qwen2.5-vl")
    assert default_style_for("llava") is prompt_style("llava-1.5")
    with pytest.raises(ValueError, match="qwen3_vl"):
        default_style_for("qwen3_vl")  # 0-1000 JSON boxes: not Qwen2.5-VL's format


def test_qwen2_vl_style():
    style = prompt_style("qwen2-vl")
    assert style.text("rec", "the red cup") == "Find <|object_ref_start|>the red cup<|object_ref_end|>"
    assert style.rec == QWEN2_VL_REC_PROMPT
    assert (style.box_format, style.image_frame, style.answer_frame) == ("normalized1000", "original", "original")
    assert style.stop == ()  # Qwen stops at its EOS, <|im_end|>; no LLaVA "ASSISTANT:"
    assert style.vqa == LMMS_EVAL_GQA_PROMPT


def test_qwen2_5_vl_style():
    style = prompt_style("qwen2.5-vl")
    assert style.text("rec", "the red cup") == (
        "Locate the red cup in this image and output the bbox coordinates in JSON format.")
    assert style.rec == QWEN2_5_VL_REC_PROMPT
    assert (style.box_format, style.image_frame, style.answer_frame) == ("input_pixels", "original", "original")
    assert style.stop == ()
    assert style.text("vqa", "What color is the cup?") == (
        "What color is the cup?\nAnswer the question using a single word or phrase.")
    assert "input_pixels" in BOX_FORMATS


# --- the one parser on Qwen answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "<|object_ref_start|>the red cup<|object_ref_end|><|box_start|>(120,340),(560,780)<|box_end|><|im_end|>",
    "the red cup(120,340),(560,780)",  # the same answer decoded with skip_special_tokens=True
    "<|box_start|>(120, 340), (560, 780)<|box_end|>",
    "(120,340),(560,780)",
])
def test_parse_qwen2_vl_answers(text):
    parsed = parse_box(text)
    assert parsed.values == (120.0, 340.0, 560.0, 780.0)
    assert parsed.lmms_eval is None  # lmms-eval's rule reads only [a, b, c, d]


def test_parse_qwen2_vl_expression_with_digits():
    assert parse_box("the 2nd cup from 3 cups(10,20),(30,40)").values == (10.0, 20.0, 30.0, 40.0)


@pytest.mark.parametrize("text", [
    '```json\n[\n\t{"bbox_2d": [135, 114, 385, 370], "label": "the red cup"}\n]\n```',
    '[{"bbox_2d": [135, 114, 385, 370], "label": "the red cup"}]',
    '```json\n[{"bbox_2d": [135,114,385,370], "label": "the red cup"}]\n```<|im_end|>',
])
def test_parse_qwen2_5_vl_json_answers(text):
    parsed = parse_box(text)
    assert parsed.values == (135.0, 114.0, 385.0, 370.0)
    assert parsed.agrees_with_lmms_eval  # lmms-eval's rule finds the same [a, b, c, d]


def test_parse_json_label_with_digits_before_the_bbox_key():
    parsed = parse_box('[{"label": "cup 2", "bbox_2d": [1, 2, 3, 4]}]')
    assert parsed.values == (1.0, 2.0, 3.0, 4.0)
    assert parsed.agrees_with_lmms_eval


def test_parse_json_bbox_key_wins_over_a_box_in_the_label():
    parsed = parse_box('[{"label": "the box (5, 6, 7, 8) or [9, 10, 11, 12]", "bbox_2d": [1, 2, 3, 4]}]')
    assert parsed.values == (1.0, 2.0, 3.0, 4.0)
    assert parsed.lmms_eval == (9.0, 10.0, 11.0, 12.0)  # lmms-eval's rule takes the first [a, b, c, d]
    assert not parsed.agrees_with_lmms_eval


def test_parse_json_first_of_several_objects():
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "cup"}, {"bbox_2d": [5, 6, 7, 8], "label": "cup"}]'
    assert parse_box(text).values == (1.0, 2.0, 3.0, 4.0)


# --- input_pixels: pixels of the resized input ----------------------------------------------------------------------


def test_input_pixels_map_back_to_the_original_exactly():
    # A 640x480 photo that Qwen2.5-VL's processor resized to 644x476 (23x17 patches of 28 px).
    frame = replace(ImageFrame.for_image("original", 640, 480), input_size=(644, 476))
    assert answer_to_pixels((161, 119, 483, 357), "input_pixels", frame) == (160.0, 120.0, 480.0, 360.0)
    assert answer_to_pixels((0, 0, 644, 476), "input_pixels", frame) == (0.0, 0.0, 640.0, 480.0)
    assert frame.input_pixels_to_pixels((322, 238, 644, 476)) == (320.0, 240.0, 640.0, 480.0)
    assert answer_to_pixels((100, 50, 300, 200), "input_pixels", frame) == pytest.approx(
        (100 * 640 / 644, 50 * 480 / 476, 300 * 640 / 644, 200 * 480 / 476))


def test_input_pixels_of_a_padded_square():
    # LLaVA-style: a 200x100 image padded to a square the model saw at 336x336.
    frame = replace(ImageFrame.for_image("padded", 200, 100), input_size=(336, 336))
    assert answer_to_pixels((0, 84, 336, 252), "input_pixels", frame) == pytest.approx((0, 0, 200, 100))


def test_input_pixels_without_input_size_names_the_format():
    frame = ImageFrame.for_image("original", 640, 480)
    assert frame.input_size is None
    with pytest.raises(ValueError, match="input_pixels") as error:
        answer_to_pixels((1, 2, 3, 4), "input_pixels", frame)
    assert "input_size" in str(error.value)
    with pytest.raises(ValueError, match="input_size"):
        frame.input_pixels_to_pixels((1, 2, 3, 4))


# --- scoring ------------------------------------------------------------------------------------------------------


def test_score_rec_qwen2_5_vl_answer():
    answer = '```json\n[\n\t{"bbox_2d": [161, 119, 483, 357], "label": "the red cup"}\n]\n```'
    record = score_rec(rec_sample((160, 120, 480, 360)), answer, (640, 480), prompt_style("qwen2.5-vl"),
                       input_size=(644, 476))
    assert record["input_size"] == [644, 476]
    assert list(record)[list(record).index("image_size") + 1] == "input_size"
    assert record["answer"] == [161, 119, 483, 357]
    assert record["box"] == [160, 120, 480, 360]
    assert record["iou"] == 1.0
    assert record["center_hit"]
    json.dumps(record)  # a JSONL line


def test_score_rec_qwen2_5_vl_without_input_size_raises():
    with pytest.raises(ValueError, match="input_pixels"):
        score_rec(rec_sample((0, 0, 10, 10)), '[{"bbox_2d": [1, 2, 3, 4]}]', (640, 480), prompt_style("qwen2.5-vl"))


def test_score_rec_qwen2_vl_answer_ignores_input_size():
    style = prompt_style("qwen2-vl")
    record = score_rec(rec_sample((64, 120, 320, 480)), "the red cup(100,250),(500,1000)", (640, 480), style,
                       input_size=(644, 476))
    assert record["box"] == pytest.approx([64, 120, 320, 480])
    assert record["iou"] == pytest.approx(1.0)
    assert "input_size" not in record  # only input_pixels records keep it


def test_llava_records_keep_their_keys_with_input_size():
    style = prompt_style("llava-1.5")
    sample = rec_sample((0, 0, 100, 50))
    without = score_rec(sample, "[0.5, 0.5, 1.0, 1.0]", (200, 100), style)
    with_size = score_rec(sample, "[0.5, 0.5, 1.0, 1.0]", (200, 100), style, input_size=(336, 336))
    assert json.dumps(with_size) == json.dumps(without)
