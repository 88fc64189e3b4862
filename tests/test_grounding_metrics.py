"""Box parsing, IoU, answer frames, REC/VQA scoring, bootstrap CIs, summaries and prompt styles.

Expected numbers are worked out by hand. `test_score_rec_matches_lmms_eval` re-implements lmms-eval's
`refcoco_bbox_rec` rule (parse, GT normalisation, IoU, centre accuracy) here, independently of `grounding`.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest

from grounding import prompts
from grounding.boxes import LMMS_EVAL_PATTERN, answer_to_pixels, center_inside, iou, parse_box
from grounding.data.samples import ImageRef, Sample
from grounding.metrics import THRESHOLDS, bootstrap_intervals, exact_match, normalize_answer, summarize_scores
from grounding.prompts import (
    LMMS_EVAL_REC_PROMPT,
    PromptStyle,
    default_style_for,
    prompt_style,
    register_prompt_style,
)
from grounding.scoring import error_record, score_rec, score_vqa
from grounding.summary import metrics_csv, summarize
from mllm.images import ImageFrame


def rec_sample(box, index: int = 0) -> Sample:
    return Sample(index=index, id=str(index), image=ImageRef(Path("x.jpg")), text="t", box=box)


# --- IoU and centre accuracy -------------------------------------------------------------------------------------


def test_iou_identical_boxes_is_one():
    assert iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert iou((1.5, 2.5, 7.25, 9.0), (1.5, 2.5, 7.25, 9.0)) == pytest.approx(1.0)


def test_iou_disjoint_and_touching_boxes_is_zero():
    assert iou((0, 0, 1, 1), (5, 5, 6, 6)) == 0.0
    assert iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # shared vertical edge
    assert iou((0, 0, 1, 1), (0, 1, 1, 2)) == 0.0  # shared horizontal edge
    assert iou((0, 0, 1, 1), (1, 1, 2, 2)) == 0.0  # shared corner


def test_iou_partial_overlap():
    # intersection (1,1)-(2,2) = 1; union 4 + 4 - 1 = 7
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    # intersection 1 x 2 = 2; union 4 + 4 - 2 = 6
    assert iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)


def test_iou_box_inside_another():
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)


def test_iou_zero_area_or_inverted_box_is_zero():
    assert iou((0, 0, 0, 4), (0, 0, 4, 4)) == 0.0  # zero width
    assert iou((0, 0, 4, 0), (0, 0, 4, 4)) == 0.0  # zero height
    assert iou((4, 4, 0, 0), (0, 0, 4, 4)) == 0.0  # inverted, would have "area" 16 if not clamped
    assert iou((0, 4, 4, 0), (0, 0, 4, 4)) == 0.0  # inverted in y only
    assert iou((4, 4, 0, 0), (4, 4, 0, 0)) == 0.0  # inverted box with itself


@pytest.mark.parametrize(("a", "b"), [
    ((0, 0, 2, 2), (1, 1, 3, 3)),
    ((0, 0, 4, 4), (1, 1, 3, 3)),
    ((0.1, 0.2, 0.7, 0.9), (0.3, 0.1, 0.8, 0.5)),
    ((0, 0, 1, 1), (5, 5, 6, 6)),
    ((4, 4, 0, 0), (0, 0, 4, 4)),
])
def test_iou_is_symmetric(a, b):
    assert iou(a, b) == pytest.approx(iou(b, a), abs=1e-15)


def test_center_inside_includes_edges():
    target = (0, 0, 10, 10)
    assert center_inside(target, (2, 2, 4, 4))  # centre (3, 3)
    assert center_inside(target, (8, 8, 12, 12))  # centre (10, 10): the corner counts
    assert center_inside(target, (-2, 4, 2, 6))  # centre (0, 5): on the left edge
    assert center_inside(target, (4, 8, 6, 12))  # centre (5, 10): on the bottom edge


def test_center_outside_is_a_miss():
    target = (0, 0, 10, 10)
    assert not center_inside(target, (9, 9, 12, 12))  # centre (10.5, 10.5)
    assert not center_inside(target, (-4, 2, 2, 4))  # centre (-1, 3)
    assert not center_inside(target, (4, 10, 6, 10.5))  # centre (5, 10.25)
    # A large box that covers the target but whose centre lies outside it.
    assert not center_inside(target, (5, 5, 30, 30))


# --- parse_box -----------------------------------------------------------------------------------------------------


def test_parse_box_square_brackets():
    parsed = parse_box("[0.1, 0.2, 0.3, 0.4]")
    assert parsed.values == (0.1, 0.2, 0.3, 0.4)
    assert parsed.lmms_eval == (0.1, 0.2, 0.3, 0.4)
    assert parsed.parsed
    assert parsed.agrees_with_lmms_eval


def test_parse_box_parentheses_not_read_by_lmms_eval():
    parsed = parse_box("(0.1, 0.2, 0.3, 0.4)")
    assert parsed.values == (0.1, 0.2, 0.3, 0.4)
    assert parsed.parsed
    assert parsed.lmms_eval is None
    assert not parsed.agrees_with_lmms_eval


def test_parse_box_integers_and_negatives():
    assert parse_box("[10,20,30,40]").values == (10.0, 20.0, 30.0, 40.0)
    assert parse_box("[10,20,30,40]").agrees_with_lmms_eval
    parsed = parse_box("[-0.1, -2, 3.5, 4]")
    assert parsed.values == (-0.1, -2.0, 3.5, 4.0)
    assert parsed.lmms_eval == (-0.1, -2.0, 3.5, 4.0)


def test_parse_box_first_of_two_boxes_wins():
    parsed = parse_box("[0.1, 0.2, 0.3, 0.4] or maybe [0.5, 0.6, 0.7, 0.8]")
    assert parsed.values == (0.1, 0.2, 0.3, 0.4)
    assert parsed.lmms_eval == (0.1, 0.2, 0.3, 0.4)


def test_parse_box_first_box_wins_across_forms():
    # Our parser takes the earlier parenthesised box; lmms-eval only sees the bracketed one.
    parsed = parse_box("(0.5, 0.6, 0.7, 0.8) then [0.1, 0.2, 0.3, 0.4]")
    assert parsed.values == (0.5, 0.6, 0.7, 0.8)
    assert parsed.lmms_eval == (0.1, 0.2, 0.3, 0.4)
    assert not parsed.agrees_with_lmms_eval


def test_parse_box_first_box_wins_between_four_number_and_two_point_forms():
    assert parse_box("(1,2),(3,4) then [0.1, 0.2, 0.3, 0.4]").values == (1.0, 2.0, 3.0, 4.0)
    assert parse_box("[0.1, 0.2, 0.3, 0.4] then (1,2),(3,4)").values == (0.1, 0.2, 0.3, 0.4)


def test_parse_box_with_text_around():
    parsed = parse_box("The box is [0.25, 0.5, 0.75, 1.0].")
    assert parsed.values == (0.25, 0.5, 0.75, 1.0)
    assert parsed.agrees_with_lmms_eval


def test_parse_box_qwen2_vl_two_points():
    parsed = parse_box("(100,200),(300,400)")
    assert parsed.values == (100.0, 200.0, 300.0, 400.0)
    assert parsed.lmms_eval is None
    assert parse_box("<|box_start|>(12, 34), (560, 780)<|box_end|>").values == (12.0, 34.0, 560.0, 780.0)


def test_parse_box_space_before_comma_only_ours():
    parsed = parse_box("[0.1 , 0.2, 0.3, 0.4]")
    assert parsed.values == (0.1, 0.2, 0.3, 0.4)
    assert parsed.lmms_eval is None


@pytest.mark.parametrize("text", ["", "no box", "[0.1, 0.2, 0.3]", "[a, b, c, d]", "[1, 2, 3, 4, 5]", "[]",
                                  "(0.1, 0.2)", "[0.1, 0.2, 0.3, ", "1, 2, 3, 4"])
def test_parse_box_malformed(text):
    parsed = parse_box(text)
    assert parsed.values is None
    assert not parsed.parsed
    assert parsed.lmms_eval is None


# --- lmms-eval's refcoco_bbox_rec rule, written out here ----------------------------------------------------------

LMMS_EVAL_REGEX = (r"\[\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),"
                   r"\s*(-?\d+(?:\.\d+)?)\s*\]")


def lmms_eval_parse(text: str) -> list[float]:
    match = re.search(LMMS_EVAL_REGEX, text)
    return [float(value) for value in match.groups()] if match else [0.0, 0.0, 0.0, 0.0]


def lmms_eval_gt(xywh, width: int, height: int) -> list[float]:
    x, y, w, h = xywh
    return [x / width, y / height, (x + w) / width, (y + h) / height]


def lmms_eval_iou(box1, box2) -> float:
    x_left, y_top = max(box1[0], box2[0]), max(box1[1], box2[1])
    x_right, y_bottom = min(box1[2], box2[2]), min(box1[3], box2[3])
    inter = max(0, x_right - x_left) * max(0, y_bottom - y_top)
    area1 = (box1[2] - box1[0]) * (box1[3] - box1[1])
    area2 = (box2[2] - box2[0]) * (box2[3] - box2[1])
    return inter / (area1 + area2 - inter)


def lmms_eval_center_hit(gt, pred) -> bool:
    cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3]


LMMS_ANSWERS = [
    "[0.1, 0.1, 0.4, 0.4]",
    "The box is [0.2, 0.15, 0.55, 0.6].",
    "[0.0, 0.0, 1.0, 1.0]",
    "[0.5,0.5,0.9,0.95]",
    "[-0.05, 0.1, 0.3, 0.35]",
    "[0.12, 0.3, 0.13, 0.31]",
    "[ 0.3, 0.2, 0.45, 0.7 ]",
    "[0.35, 0.25, 0.7, 0.8] and [0.1, 0.1, 0.2, 0.2]",
    "[1, 0, 2, 1]",
    "no box here",
    "",
    "[0.1, 0.2, 0.3]",
    "[a, b, c, d]",
]
IMAGE_SIZES = [(640, 480), (333, 500), (500, 333), (1000, 750)]
GT_XYWH = [(64, 48, 200, 150), (10.5, 20.25, 100.0, 80.0), (100, 40, 120, 200), (150, 90, 30, 250)]


def test_lmms_eval_pattern_is_lmms_evals_regex():
    assert LMMS_EVAL_PATTERN.pattern == LMMS_EVAL_REGEX


def test_score_rec_matches_lmms_eval():
    style = prompt_style("llava-1.5")
    assert (style.answer_frame, style.box_format) == ("original", "normalized")
    decisions, hits = set(), set()
    index = 0
    for width, height in IMAGE_SIZES:
        for x, y, w, h in GT_XYWH:
            sample = rec_sample((x, y, x + w, y + h), index)
            gt = lmms_eval_gt((x, y, w, h), width, height)
            for answer in LMMS_ANSWERS:
                record = score_rec(sample, answer, (width, height), style)
                pred = lmms_eval_parse(answer)
                expected_iou = lmms_eval_iou(gt, pred)
                case = (answer, (width, height), (x, y, w, h))
                assert record["iou"] == pytest.approx(expected_iou, abs=1e-9), case
                assert (record["iou"] >= 0.5) == (expected_iou >= 0.5), case
                assert record["center_hit"] == lmms_eval_center_hit(gt, pred), case
                assert record["lmms_eval_agrees"], case
                decisions.add(expected_iou >= 0.5)
                hits.add(record["center_hit"])
                index += 1
    # The grid has hits and misses on both metrics, so the comparison is not vacuous.
    assert decisions == {True, False}
    assert hits == {True, False}


def test_parse_box_lmms_eval_field_matches_lmms_eval_regex():
    for answer in [*LMMS_ANSWERS, "(0.1, 0.2, 0.3, 0.4)", "(1,2),(3,4)", "[0.1 , 0.2, 0.3, 0.4]"]:
        match = re.search(LMMS_EVAL_REGEX, answer)
        expected = tuple(lmms_eval_parse(answer)) if match else None
        assert parse_box(answer).lmms_eval == expected, answer


def test_unparsed_answer_center_differs_from_lmms_eval_at_origin():
    """Documented difference: lmms-eval scores an unparsed answer as [0, 0, 0, 0], whose centre (0, 0) is
    'inside' a GT box touching the origin; we count an unparsed answer as a centre miss."""
    width, height = 100, 100
    sample = rec_sample((0, 0, 50, 50))
    gt = lmms_eval_gt((0, 0, 50, 50), width, height)
    record = score_rec(sample, "I cannot tell", (width, height), prompt_style("llava-1.5"))
    assert lmms_eval_center_hit(gt, lmms_eval_parse("I cannot tell"))
    assert not record["center_hit"]
    assert not record["parsed"]
    # The IoU agrees: both give 0.
    assert record["iou"] == 0.0 == lmms_eval_iou(gt, [0, 0, 0, 0])


# --- answer frames and box formats -------------------------------------------------------------------------------


def test_padded_answer_frame_wide_image():
    style = prompt_style("llava-1.5").with_options(answer_frame="padded")
    record = score_rec(rec_sample((0, 0, 200, 100)), "[0, 0.25, 1, 0.75]", (200, 100), style)
    assert record["box"] == pytest.approx([0, 0, 200, 100])
    assert record["iou"] == pytest.approx(1.0)
    assert record["center_hit"]
    # Read in the original frame instead, the same answer is a band across the middle: y 25..75.
    original = score_rec(rec_sample((0, 0, 200, 100)), "[0, 0.25, 1, 0.75]", (200, 100), prompt_style("llava-1.5"))
    assert original["box"] == pytest.approx([0, 25, 200, 75])
    assert original["iou"] == pytest.approx(0.5)


def test_padded_answer_frame_tall_image():
    frame = ImageFrame.for_image("padded", 100, 200)
    assert frame.to_pixels((0.25, 0, 0.75, 1)) == pytest.approx((0, 0, 100, 200))
    # square 201 wide: the image is pasted 50 rows down (integer offset, like expand2square)
    frame = ImageFrame.for_image("padded", 201, 100)
    assert frame.to_pixels((0, 0, 1, 1)) == pytest.approx((0, -50, 201, 151))


def test_cropped_answer_frame():
    frame = ImageFrame.for_image("cropped", 200, 100)
    assert frame.to_pixels((0, 0, 1, 1)) == pytest.approx((50, 0, 150, 100))
    assert frame.to_pixels((0.5, 0.5, 1, 1)) == pytest.approx((100, 50, 150, 100))


def test_answer_to_pixels_box_formats():
    frame = ImageFrame.for_image("original", 200, 100)
    assert answer_to_pixels((0.1, 0.25, 0.9, 0.75), "normalized", frame) == pytest.approx((20, 25, 180, 75))
    assert answer_to_pixels((100, 250, 900, 750), "normalized1000", frame) == pytest.approx((20, 25, 180, 75))
    assert answer_to_pixels((10, 20, 30, 40), "pixels", frame) == (10, 20, 30, 40)
    padded = ImageFrame.for_image("padded", 200, 100)
    assert answer_to_pixels((0, 250, 1000, 750), "normalized1000", padded) == pytest.approx((0, 0, 200, 100))
    # pixels ignore the frame
    assert answer_to_pixels((10, 20, 30, 40), "pixels", padded) == (10, 20, 30, 40)
    with pytest.raises(ValueError, match="unknown box format"):
        answer_to_pixels((0, 0, 1, 1), "percent", frame)


def test_score_rec_normalized1000_and_pixels_styles():
    base = prompt_style("llava-1.5")
    qwen = base.with_options(box_format="normalized1000")
    record = score_rec(rec_sample((20, 40, 60, 80)), "(100,200),(300,400)", (200, 200), qwen)
    assert record["answer"] == [100, 200, 300, 400]
    assert record["box"] == pytest.approx([20, 40, 60, 80])
    assert record["iou"] == pytest.approx(1.0)

    pixels = base.with_options(box_format="pixels")
    record = score_rec(rec_sample((10, 20, 30, 40)), "[10, 20, 50, 40]", (640, 480), pixels)
    assert record["box"] == [10, 20, 50, 40]
    assert record["iou"] == pytest.approx(0.5)  # 20x20 inside 40x20
    assert record["center_hit"]  # centre (30, 30) lies on the target's right edge


def test_score_rec_record_fields():
    sample = Sample(index=7, id="ann-7", image=ImageRef(Path("img/x.jpg")), text="the red cup", box=(0, 0, 100, 50))
    record = score_rec(sample, "[0.5, 0.5, 1.0, 1.0]", (200, 100), prompt_style("llava-1.5"))
    assert record["index"] == 7
    assert record["id"] == "ann-7"
    assert record["text"] == "the red cup"
    assert record["image"] == str(Path("img/x.jpg"))
    assert record["target"] == [0, 0, 100, 50]
    assert record["image_size"] == [200, 100]
    assert record["answer"] == [0.5, 0.5, 1.0, 1.0]
    assert record["box"] == pytest.approx([100, 50, 200, 100])
    assert record["iou"] == 0.0  # touches the target only at its corner
    assert record["center_hit"] is False
    assert record["parsed"] is True
    assert record["error"] is None


def test_score_rec_unparsed_answer():
    record = score_rec(rec_sample((0, 0, 10, 10)), "somewhere on the left", (10, 10), prompt_style("llava-1.5"))
    assert record["parsed"] is False
    assert record["answer"] is None
    assert record["box"] is None
    assert record["iou"] == 0.0
    assert record["center_hit"] is False
    assert record["lmms_eval_agrees"] is True  # neither rule reads a box


def test_error_record():
    sample = rec_sample((0, 0, 1, 1), index=3)
    record = error_record(sample, "image", "cannot decode image x.jpg")
    assert record["error"] == "cannot decode image x.jpg"
    assert record["error_kind"] == "image"
    assert (record["index"], record["id"], record["image"]) == (3, "3", "x.jpg")


# --- VQA exact match ----------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("Yes.") == "yes"
    assert normalize_answer("  The Cat ") == "the cat"
    assert normalize_answer("the   big\tdog!") == "the big dog"
    assert normalize_answer("t-shirt's, \"red\"") == "tshirts red"
    assert normalize_answer("") == ""


def test_exact_match():
    assert exact_match("Yes.", ["yes"])
    assert exact_match("  The Cat ", ["the cat"])
    assert exact_match("left!", ["left"])
    assert not exact_match("no", ["yes"])
    assert not exact_match("the cat", ["the dog"])
    assert not exact_match("cat", ["the cat"])  # articles are kept: lmms-eval's GQA match
    assert exact_match("Blue", ["red", "blue", "navy"])
    assert not exact_match("green", ["red", "blue", "navy"])
    assert not exact_match("anything", [])


def test_score_vqa():
    sample = Sample(index=0, id="q0", image=ImageRef(Path("x.jpg")), text="Is it red?", answers=("yes", "yeah"))
    record = score_vqa(sample, "Yes.")
    assert record["correct"] is True
    assert record["answers"] == ["yes", "yeah"]
    assert record["error"] is None
    assert score_vqa(sample, "No.")["correct"] is False


# --- bootstrap ----------------------------------------------------------------------------------------------------


def bernoulli(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < 0.5).astype(float)


def test_bootstrap_is_deterministic_for_a_seed():
    columns = {"a": bernoulli(200, 1), "b": np.linspace(0, 1, 200)}
    first = bootstrap_intervals(columns, seed=3)
    assert bootstrap_intervals(columns, seed=3) == first
    assert bootstrap_intervals(columns, seed=4) != first


def test_bootstrap_interval_contains_the_mean():
    for seed in range(3):
        values = bernoulli(300, seed)
        low, high = bootstrap_intervals({"a": values})["a"]
        assert low < values.mean() < high


def test_bootstrap_constant_column_has_zero_width():
    low, high = bootstrap_intervals({"c": np.full(50, 0.3)})["c"]
    assert low == pytest.approx(0.3, abs=1e-12)
    assert high == pytest.approx(0.3, abs=1e-12)
    assert bootstrap_intervals({"ones": np.ones(17)})["ones"] == (1.0, 1.0)


def test_bootstrap_smaller_sample_gives_wider_interval():
    low_small, high_small = bootstrap_intervals({"a": bernoulli(20, 0)})["a"]
    low_large, high_large = bootstrap_intervals({"a": bernoulli(2000, 0)})["a"]
    assert high_small - low_small > 3 * (high_large - low_large)
    # 95% CI of a mean of 2000 fair coin flips: about +-1.96 * 0.5 / sqrt(2000) = +-0.022
    assert high_large - low_large == pytest.approx(2 * 1.96 * 0.5 / math.sqrt(2000), rel=0.15)


def test_bootstrap_resamples_columns_jointly():
    values = bernoulli(100, 5)
    intervals = bootstrap_intervals({"a": values, "not_a": 1 - values})
    low, high = intervals["a"]
    assert intervals["not_a"] == pytest.approx((1 - high, 1 - low), abs=1e-12)


def test_bootstrap_empty_input_gives_nan():
    low, high = bootstrap_intervals({"a": np.array([])})["a"]
    assert math.isnan(low)
    assert math.isnan(high)
    summary = summarize_scores({"a": np.array([])})
    assert math.isnan(summary["a"]["value"])
    assert summary["a"]["n"] == 0


# --- summaries ----------------------------------------------------------------------------------------------------


def rec_record(iou_value: float, center_hit: bool, parsed: bool = True, agrees: bool = True) -> dict:
    return {"iou": iou_value, "center_hit": center_hit, "parsed": parsed, "lmms_eval_agrees": agrees, "error": None}


REC_RECORDS = [
    rec_record(0.9, True),
    {"error": "cannot decode image a.jpg", "error_kind": "image"},
    rec_record(0.5, True, agrees=False),
    rec_record(0.2, False),
    {"error": "file not found", "error_kind": "image"},
    rec_record(0.0, False, parsed=False),
    {"error": "CUDA out of memory", "error_kind": "generation"},
]


def test_summarize_rec_counts():
    summary = summarize(REC_RECORDS, "rec", resamples=200)
    assert summary["task"] == "rec"
    assert summary["n_samples"] == 7
    assert summary["n_scored"] == 4
    assert summary["n_errors"] == 3
    assert summary["errors_by_kind"] == {"generation": 1, "image": 2}
    assert summary["n_unparsed"] == 1
    assert summary["lmms_eval_parse_disagreements"] == 1


def test_summarize_rec_metrics_over_scored_only():
    metrics = summarize(REC_RECORDS, "rec", resamples=200)["metrics"]
    assert set(metrics) == {*(f"acc@{t}" for t in THRESHOLDS), "mean_iou", "center_acc", "parse_failure_rate"}
    expected = {
        "acc@0.1": 3 / 4,  # 0.9, 0.5, 0.2
        "acc@0.3": 2 / 4,
        "acc@0.5": 2 / 4,  # 0.5 itself counts (>=)
        "acc@0.7": 1 / 4,
        "acc@0.9": 1 / 4,
        "mean_iou": (0.9 + 0.5 + 0.2 + 0.0) / 4,
        "center_acc": 2 / 4,
        "parse_failure_rate": 1 / 4,
    }
    for name, value in expected.items():
        assert metrics[name]["value"] == pytest.approx(value), name
        assert metrics[name]["n"] == 4
        low, high = metrics[name]["ci95"]
        assert 0.0 <= low <= value <= high <= 1.0, name


def test_metrics_csv():
    summary = summarize(REC_RECORDS, "rec", resamples=200)
    rows = list(csv.reader(io.StringIO(metrics_csv(summary))))
    assert rows[0] == ["metric", "value", "ci95_low", "ci95_high", "n"]
    assert len(rows) == 1 + len(summary["metrics"]) == 9
    by_name = {row[0]: row for row in rows[1:]}
    assert by_name["acc@0.5"][1] == "0.500000"
    assert by_name["mean_iou"][1] == "0.400000"
    assert by_name["parse_failure_rate"][1] == "0.250000"
    assert by_name["mean_iou"][4] == "4"
    low, high = summary["metrics"]["mean_iou"]["ci95"]
    assert by_name["mean_iou"][2:4] == [f"{low:.6f}", f"{high:.6f}"]


def test_summarize_vqa():
    records = [
        {"correct": True, "error": None},
        {"correct": False, "error": None},
        {"error": "boom", "error_kind": "generation"},
        {"correct": True, "error": None},
        {"correct": True, "error": None},
    ]
    summary = summarize(records, "vqa", resamples=200)
    assert summary["n_samples"] == 5
    assert summary["n_scored"] == 4
    assert summary["n_errors"] == 1
    assert summary["errors_by_kind"] == {"generation": 1}
    assert list(summary["metrics"]) == ["accuracy"]
    assert summary["metrics"]["accuracy"]["value"] == pytest.approx(0.75)
    assert summary["metrics"]["accuracy"]["n"] == 4
    assert "n_unparsed" not in summary


def test_summarize_with_only_errors():
    summary = summarize([{"error": "x", "error_kind": "image"}], "rec", resamples=50)
    assert summary["n_scored"] == 0
    assert summary["n_errors"] == 1
    assert math.isnan(summary["metrics"]["acc@0.5"]["value"])
    assert "nan" in metrics_csv(summary)


# --- prompt styles ------------------------------------------------------------------------------------------------


def test_llava_rec_prompt_is_lmms_evals():
    style = prompt_style("llava-1.5")
    assert style.text("rec", "the red cup") == LMMS_EVAL_REC_PROMPT.replace("{expression}", "the red cup")
    assert style.text("rec", "the red cup").endswith("this sentence describes: the red cup")
    assert LMMS_EVAL_REC_PROMPT.startswith(
        "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
        "bottom-right y)."
    )
    assert "{" not in style.text("rec", "the red cup")


def test_llava_vqa_prompt():
    text = prompt_style("llava-1.5").text("vqa", "What color is the cup?")
    assert text == "What color is the cup?\nAnswer the question using a single word or phrase."
    assert text.endswith("\nAnswer the question using a single word or phrase.")


def test_default_style_for_llava():
    assert default_style_for("llava") is prompt_style("llava-1.5")
    assert default_style_for("llava").name == "llava-1.5"


def test_unknown_model_type_and_style_name_raise():
    with pytest.raises(ValueError, match=re.escape("llava-1.5")) as error:
        default_style_for("qwen2_vl_unknown")
    assert "qwen2_vl_unknown" in str(error.value)
    with pytest.raises(ValueError, match=re.escape("llava-1.5")) as error:
        prompt_style("no-such-style")
    assert "no-such-style" in str(error.value)


def test_invalid_prompt_style_raises():
    with pytest.raises(ValueError, match="box format"):
        PromptStyle("bad", "{expression}", "{question}", box_format="foo")
    with pytest.raises(ValueError, match="expression"):
        PromptStyle("bad", "Where is it?", "{question}")
    with pytest.raises(ValueError, match="question"):
        PromptStyle("bad", "{expression}", "Answer.")
    with pytest.raises(ValueError, match="frame"):
        PromptStyle("bad", "{expression}", "{question}", answer_frame="stretched")
    with pytest.raises(ValueError, match="box format"):
        prompt_style("llava-1.5").with_options(box_format="foo")


def test_with_options_ignores_none():
    style = prompt_style("llava-1.5")
    changed = style.with_options(answer_frame="padded", box_format=None)
    assert changed.answer_frame == "padded"
    assert changed.box_format == style.box_format
    assert style.answer_frame == "original"  # the registered style is unchanged


def test_register_prompt_style(monkeypatch):
    monkeypatch.setattr(prompts, "_STYLES", dict(prompts._STYLES))
    monkeypatch.setattr(prompts, "_FAMILY_OF_MODEL_TYPE", dict(prompts._FAMILY_OF_MODEL_TYPE))
    style = PromptStyle("qwen-test", "Locate {expression}.", "{question} Answer briefly.", box_format="normalized1000")
    assert register_prompt_style(style, model_types=("qwen2_vl",)) is style
    assert prompt_style("qwen-test") is style
    assert default_style_for("qwen2_vl") is style
    assert default_style_for("llava").name == "llava-1.5"
    assert style.text("rec", "the dog") == "Locate the dog."


def test_prompt_fills_only_its_own_placeholder():
    style = prompt_style("llava-1.5")
    assert style.text("rec", "a {question} b").endswith("describes: a {question} b")
    assert style.text("vqa", "is {expression} here?").startswith("is {expression} here?\n")
