"""pruning.attention: the answer's attention on the referent, on constructed cases and on the miniature."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mllm
from grounding.data import load_dataset
from grounding.prompts import prompt_style
from grounding.records import read_records, record_files
from mllm.images import ImageFrame
from pruning.attention import attention_shares, gains_table, main

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = ROOT / "data" / "minillava" / "contrastive"
EVAL = ROOT / "data" / "minillava" / "eval"


def test_shares_count_the_fed_tokens_in_the_referent_by_their_host_patch():
    # prompt: 2 text tokens, 3 fed visual tokens (patches 0, 9, 63 of an 8x8 grid, then one extra), 2 text tokens
    weights = torch.zeros(2, 2, 8)  # (layers, steps, prompt)
    weights[0, :, 2] = 0.5  # layer 0: half on patch 0, which the box covers
    weights[0, :, 0] = 0.5
    weights[1, 0, 3], weights[1, 0, 5] = 0.4, 0.6  # layer 1, step 0: patch 9 (outside) and the extra token
    weights[1, 1, 4] = 1.0  # layer 1, step 1: patch 63 (outside)
    attention = mllm.AnswerAttention(weights=weights, visual_index=torch.tensor([2, 3, 4, 5]),
                                     kept=torch.tensor([0, 9, 63]))
    shares = attention_shares(attention, [0, 0, 8, 8], ImageFrame.for_image("padded", 64, 64), (8, 8))
    assert shares == {"visual": [0.5, 1.0], "referent": [0.5, 0.0], "referent_tokens": 1, "visual_tokens": 4,
                      "steps": 2}


def test_gains_compare_the_samples_a_run_wins_with_the_unpruned_model_on_them():
    rows = []
    rng = np.random.default_rng(0)
    for index in range(200):
        unpruned_hit = index % 2 == 0
        gained = not unpruned_hit and index % 4 == 1  # a quarter: the run hits where unpruned missed
        for method, hit, share in (("unpruned", unpruned_hit, 0.3), ("random", unpruned_hit or gained,
                                                                     0.6 if gained else 0.3)):
            for layer in range(2):
                rows.append({"method": method, "budget": "0" if method == "unpruned" else "0.5",
                             "positions": "none" if method == "unpruned" else "keep", "index": index, "layer": layer,
                             "hit": hit, "referent_of_visual": share + rng.normal(0, 0.01), "referent_tokens": 2})
    gains = gains_table(pd.DataFrame(rows), resamples=200).set_index("group")
    assert gains.loc["gains", "n"] == 50 and gains.loc["others", "n"] == 150
    assert gains.loc["gains", "difference"] == pytest.approx(0.3, abs=0.01)
    assert gains.loc["gains", "difference_low"] > 0.25
    assert gains.loc["others", "difference_low"] < 0 < gains.loc["others", "difference_high"]


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attention") / "run"
    assert main(["--model", str(MINIATURE), "--data", str(EVAL), "--methods", "random,prumerge", "--ratios", "0.75",
                 "--limit", "12", "--batch-size", "12", "--out", str(out), "--no-progress", "--bootstrap", "50"]) == 0
    return out


def test_the_unpruned_runs_shares_are_transformers_eager_attention_on_the_referent(attention_run):
    model = mllm.load(MINIATURE, device="cpu", dtype="float32", attn_implementation="eager")
    records = read_records(record_files(attention_run / "rec" / "unpruned"))
    style = prompt_style("llava-1.5")
    sample = load_dataset("jsonl", EVAL / "rec", "val").samples[3]
    image = sample.image.load()
    encoding = model.encode([image], [style.text("rec", sample.text)], frame=style.image_frame)
    answer = model.generate(encoding, max_new_tokens=style.max_new_tokens("rec"), stop=style.stop).token_ids[0]
    inputs = model.processor(images=[image], text=encoding.prompts, return_tensors="pt")
    prompt = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer[:-1]])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        out = model.model(**inputs, output_attentions=True)
    image_slots = (inputs["input_ids"][0, :prompt] == model.model.config.image_token_id).nonzero().flatten()
    row, col = np.divmod(np.arange(64), 8)
    x1, y1, x2, y2 = sample.box  # 64 px square scenes: patch (row, col) covers [8 col, 8 col + 8) x [8 row, ...)
    inside = torch.from_numpy((8 * col < x2) & (8 * col + 8 > x1) & (8 * row < y2) & (8 * row + 8 > y1))
    queries = prompt - 1 + torch.arange(len(answer))
    record = records[sample.index]["attention"]
    for layer, weights in enumerate(out.attentions):
        steps = weights[0].mean(dim=0)[queries]  # (T, L)
        assert record["visual"][layer] == pytest.approx(float(steps[:, image_slots].sum(-1).mean()), abs=1e-5)
        assert record["referent"][layer] == pytest.approx(float(steps[:, image_slots[inside]].sum(-1).mean()), abs=1e-5)
    assert record["referent_tokens"] == int(inside.sum()) and record["visual_tokens"] == 64


def test_the_sweep_writes_per_layer_shares_for_every_run(attention_run):
    table = pd.read_csv(attention_run / "attention.csv")
    runs = set(zip(table.method, table.positions))
    assert runs == {("unpruned", "none")} | {(m, p) for m in ("random", "prumerge") for p in ("keep", "reassign")}
    assert set(table.layer) == {0, 1, 2, 3} and (table.n == 12).all()
    assert table.referent_of_visual.between(0, 1).all() and table.visual.between(0, 1).all()
    gains = pd.read_csv(attention_run / "attention_gains.csv")
    assert set(gains.group) == {"gains", "others"}
    for run in ("random/0.75/keep", "prumerge/0.75/reassign"):
        for record in read_records(record_files(attention_run / "rec" / run)).values():
            shares = record["attention"]
            assert record["num_visual_fed"] == shares["visual_tokens"]
            assert all(0 <= r <= v + 1e-6 <= 1 + 1e-5 for r, v in zip(shares["referent"], shares["visual"]))
    assert (attention_run / "attention.png").stat().st_size > 0


def test_the_gains_follow_the_hit_threshold_without_a_rerun(attention_run, tmp_path):
    from pruning.attention import write_attention_tables

    run = shutil.copytree(attention_run, tmp_path / "run")
    counts = {}
    for threshold in (0.1, 0.9):
        _, gains = write_attention_tables(run, resamples=50, threshold=threshold)
        counts[threshold] = gains[gains.group == "gains"].set_index(["method", "positions"]).n
        ious = {name: {index: record["iou"] for index, record in read_records(record_files(run / "rec" / name)).items()}
                for name in ("unpruned", "random/0.75/keep")}
        wins = sum(ious["random/0.75/keep"][i] >= threshold > ious["unpruned"][i] for i in ious["unpruned"])
        assert counts[threshold].get(("random", "keep"), 0) <= wins  # samples with no referent token are left out
    assert not counts[0.1].equals(counts[0.9])


def test_in_llm_methods_and_vqa_alone_are_refused(tmp_path, capsys):
    arguments = ["--model", str(MINIATURE), "--data", str(EVAL), "--ratios", "0.5", "--limit", "2", "--no-progress"]
    assert main([*arguments, "--methods", "fastv", "--out", str(tmp_path / "a")]) == 2
    assert "prunes inside the LLM" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*arguments, "--methods", "random", "--tasks", "vqa", "--out", str(tmp_path / "b")])
    assert "REC only" in capsys.readouterr().err


def test_records_without_attention_are_named_by_file_and_sample(tmp_path):
    from test_pruning_coverage import constructed_pruning_dir

    from pruning.attention import attention_records

    out = constructed_pruning_dir(tmp_path / "run", lambda rng, fully: False, samples=3)  # pruning records only
    with pytest.raises(ValueError, match=r"samples\.jsonl: sample 0 has no field 'attention'"):
        attention_records(out)
