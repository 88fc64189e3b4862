"""The analysis CLIs end to end on a tiny Qwen2.5-VL: images of different sizes, so rows carry different
numbers of visual tokens; and what does not apply to Qwen (a CLS token) or to LLaVA (transpose) is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

from grounding.evaluate import main as grounding_main
from misalign.ablate import main as misalign_main
from mllm.tiny_qwen import build_tiny_qwen
from pruning.evaluate import main as pruning_main


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen(tmp_path_factory.mktemp("qwen2_5_vl"), "qwen2_5_vl")




def test_grounding_evaluate_runs_on_qwen(qwen_dir, rec_data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(grounding_main, "--model", qwen_dir, "--dataset", "jsonl", "--data", rec_data, "--split", "val",
               "--out", out, "--max-pixels", 64 * 64) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(record["error"] is None for record in records)
    fed = {record["num_visual_fed"] for record in records}
    assert len(fed) > 1 and max(fed) <= 16  # native resolution, within --max-pixels (64x64: 16 tokens)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["image_pixels"]["max"] == 64 * 64


def test_misalign_ablate_runs_every_kind_on_qwen(qwen_dir, rec_data, tmp_path):
    for kind, strengths in (("transposed", "0,1"), ("shifted:axis=2", "3"), ("permuted:axis=1", "1"),
                            ("token-permutation", "1"), ("span-shift:start=2", "2")):
        out = tmp_path / kind.replace(":", "_")
        assert run_cli(misalign_main, "--model", qwen_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
                   "--kind", kind, "--strength", strengths, "--out", out) == 0
        table = pd.read_csv(out / "ablation.csv")
        assert set(table.strength) == {float(s) for s in strengths.split(",")}


def test_misalign_refuses_transpose_on_llava(tiny_checkpoint, rec_data, tmp_path, capsys):
    assert run_cli(misalign_main, "--model", tiny_checkpoint, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
               "--kind", "transposed", "--strength", "1", "--out", tmp_path / "out") == 2
    assert "transpose" in capsys.readouterr().err


def test_pruning_evaluate_runs_on_qwen_under_every_policy(qwen_dir, rec_data, tmp_path):
    out = tmp_path / "pruning"
    assert run_cli(pruning_main, "--model", qwen_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
               "--methods", "random,spatial,text-visual", "--ratios", "0.5",
               "--positions", "reassign,keep,compact", "--out", out) == 0
    assert run_cli(pruning_main, "--model", qwen_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
               "--methods", "fastv:layer=1,sparsevlm", "--ratios", "0.5", "--positions", "reassign,keep",
               "--out", out) == 0
    table = pd.read_csv(out / "pruning.csv")
    rec = table[table.metric == "acc@0.5"]
    assert {("random", "compact"), ("spatial", "keep"), ("fastv:layer=1", "keep"), ("sparsevlm", "reassign")} <= \
        set(zip(rec.method, rec.positions))
    unpruned = rec[rec.method == "unpruned"].tokens_fed.iloc[0]
    assert (rec.num_visual == unpruned).all()  # no fixed count: the unpruned run's mean stands in
    random_keep = rec[(rec.method == "random") & (rec.positions == "keep")].tokens_fed.iloc[0]
    assert 0.4 * unpruned <= random_keep <= 0.6 * unpruned


def test_pruning_refuses_cls_methods_and_compact_inside_the_llm_on_qwen(qwen_dir, rec_data, tmp_path, capsys):
    assert run_cli(pruning_main, "--model", qwen_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
               "--methods", "visionzip", "--ratios", "0.5", "--out", tmp_path / "a") == 2
    assert "'visionzip'" in (err := capsys.readouterr().err) and "qwen2_5_vl" in err and "CLS" in err
    assert run_cli(pruning_main, "--model", qwen_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
               "--methods", "fastv", "--ratios", "0.5", "--positions", "compact", "--out", tmp_path / "b") == 2
    assert "compact" in capsys.readouterr().err


def test_a_qwen2_5_vl_pixel_answer_is_read_in_the_resized_inputs_frame(qwen_dir, rec_data):
    """The encoding's frame knows the size the ViT saw, so an answer in those pixels maps back to the image's."""
    import mllm
    from grounding import prompt_style
    from grounding.data import load_dataset
    from grounding.runner import evaluate_batch

    model = mllm.load(qwen_dir, device="cpu", dtype="float32", max_pixels=48 * 48)
    samples = list(load_dataset("jsonl", rec_data, "val"))[:2]
    style = prompt_style("qwen2.5-vl")
    answers = []

    def predict(model: mllm.MLLM, encoding: mllm.Encoding, **options: object) -> mllm.Generation:
        out = mllm.generate(model, encoding, **{**options, "max_new_tokens": 1})
        sizes = [frame.input_size for frame in encoding.frames]
        out.texts = [f'[{{"bbox_2d": [0, 0, {width}, {height}], "label": "x"}}]' for width, height in sizes]
        answers.extend(sizes)
        return out

    records = evaluate_batch(model, samples, "rec", style, predict)
    for record, (width, height) in zip(records, answers):
        assert width * height <= 48 * 48 and width % 16 == 0 and height % 16 == 0
        assert record["input_size"] == [width, height]
        assert record["box"] == [0.0, 0.0, *map(float, record["image_size"])]  # the whole input: the whole image


def test_coverage_and_attention_run_on_qwen_with_rows_of_different_grids(qwen_dir, rec_data, tmp_path):
    from grounding.records import kept_indices, read_records, record_files
    from pruning.attention import main as attention_main
    from pruning.coverage import main as coverage_main

    out = tmp_path / "attention"
    assert run_cli(attention_main, "--model", qwen_dir, "--rec", f"jsonl:{rec_data}", "--methods", "random,spatial",
               "--ratios", "0.5", "--positions", "reassign,compact,keep", "--out", out, "--max-pixels", 64 * 64) == 0
    config = json.loads((qwen_dir / "config.json").read_text())
    layers = config.get("text_config", config)["num_hidden_layers"]
    grids = set()
    for run_dir in ("unpruned", "random/0.5/keep", "spatial/0.5/compact"):
        for record in read_records(record_files(out / "rec" / run_dir)).values():
            rows, cols = record["visual_grid"]
            grids.add((rows, cols))
            kept = kept_indices(record["visual_kept"], rows * cols)
            assert record["num_visual_fed"] == len(kept) == record["attention"]["visual_tokens"]
            assert len(record["attention"]["visual"]) == layers
    assert len(grids) > 1  # rows of one batch on different grids, each pruned and measured on its own
    assert coverage_main([str(out)]) == 0
    summary = pd.read_csv(out / "coverage" / "coverage.csv")
    assert set(summary.positions) == {"reassign", "compact", "keep"} and (summary.n == 6).all()
    assert pd.read_csv(out / "attention.csv").referent_of_visual.notna().any()
