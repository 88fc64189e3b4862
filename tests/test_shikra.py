"""Shikra through mllm: a tiny random one (mllm.tiny.build_tiny_shikra, the converter's layout) against
transformers' own generate and forward, its prompt and padding as released, and every analysis CLI on it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from PIL import Image
from test_generation import kept_reference_inputs, random_keep

import mllm
from grounding.evaluate import main as grounding_main
from grounding.prompts import default_style_for
from misalign.ablate import main as misalign_main
from mllm.selfcheck import transformers_generate_tokens
from mllm.tiny import CLIP_MEAN, CLIP_STD, build_tiny_shikra
from probes.layerwise import main as probes_main
from pruning.evaluate import main as pruning_main

QUESTIONS = ["Where is the red circle <image>?", "Where is <image> the cup?", "<image> How many?", "count them"]


@pytest.fixture(scope="module")
def shikra_dir(tmp_path_factory):
    return build_tiny_shikra(tmp_path_factory.mktemp("shikra"))


@pytest.fixture(scope="module")
def shikra(shikra_dir):
    return mllm.load(shikra_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def squares():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]


def test_unpruned_generate_equals_transformers_generate(shikra, squares):
    encoding = shikra.encode(squares, QUESTIONS)
    ours = shikra.generate(encoding, max_new_tokens=10)
    assert ours.token_ids == transformers_generate_tokens(shikra, squares, encoding.prompts, 10)


def test_the_image_sits_between_im_start_and_im_end_where_the_question_puts_it(shikra, squares):
    encoding = shikra.encode(squares, QUESTIONS)
    config = shikra.model.config
    assert "USER: Where is the red circle <im_start><im_patch><im_end>? ASSISTANT:" in encoding.prompts[0]
    assert encoding.prompts[2].endswith("USER: <im_start><im_patch><im_end> How many? ASSISTANT:")
    assert encoding.prompts[0].startswith("A chat between a curious user and an artificial intelligence assistant.")
    for row in range(4):
        start, count = int(encoding.visual_start[row]), encoding.visual_counts[row]
        assert int(encoding.input_ids[row, start - 1]) == config.im_start_token_id
        assert int(encoding.input_ids[row, start + count]) == config.im_end_token_id
        assert count == 16


def test_pruned_prefill_equals_transformers_forward_on_the_kept_tokens(shikra, squares):
    encoding = shikra.encode(squares, QUESTIONS)
    keep = random_keep(4, encoding.num_visual, 6)
    for policy in ("keep", "reassign"):
        run = shikra.generate(encoding, keep=keep, policy=policy, max_new_tokens=1, output_logits=True)
        for row in range(4):
            embeds, ids = kept_reference_inputs(encoding, row, keep[row], policy)
            reference = shikra.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), position_ids=ids)
            mask = run.prefill_mask[row] == 1
            torch.testing.assert_close(run.prefill_logits[row][mask], reference.logits[0], atol=1e-5, rtol=1e-5)


def test_the_image_is_padded_to_a_square_with_white(shikra):
    wide = Image.new("RGB", (32, 16), (0, 0, 0))
    encoding = shikra.encode([wide], ["Where is it <image>?"], frame="padded")
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    pixels = encoding.pixel_values[0]
    torch.testing.assert_close(pixels[:, 0, 0], white, atol=1e-4, rtol=0)  # the band above the image
    torch.testing.assert_close(pixels[:, 16, 16], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD), atol=1e-4,
                               rtol=0)  # the black image in the middle


def test_shikra_answers_are_read_as_fractions_of_the_padded_square():
    style = default_style_for("shikra")
    assert style.name == "shikra" and style.answer_frame == "padded" and style.box_format == "normalized"
    assert style.text("rec", "the red cup") == "Where is the red cup <image>?"




def test_every_analysis_cli_runs_on_shikra(shikra_dir, rec_data, tmp_path):
    out = tmp_path / "grounding"
    assert run_cli(grounding_main, "--model", shikra_dir, "--dataset", "jsonl", "--data", rec_data, "--split", "val",
               "--out", out) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(record["error"] is None for record in records)
    assert json.loads((out / "config.json").read_text())["prompt_style"]["name"] == "shikra"
    assert run_cli(misalign_main, "--model", shikra_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
               "--kind", "permuted", "--strength", "0,1", "--out", tmp_path / "misalign") == 0
    assert set(pd.read_csv(tmp_path / "misalign" / "ablation.csv").strength) == {0.0, 1.0}
    assert run_cli(pruning_main, "--model", shikra_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
               "--methods", "random,cls-visual,prumerge+,fastv", "--ratios", "0.5", "--positions", "reassign,keep",
               "--out", tmp_path / "pruning") == 0
    table = pd.read_csv(tmp_path / "pruning" / "pruning.csv")
    assert {("cls-visual", "keep"), ("prumerge+", "reassign"), ("fastv", "keep")} <= set(zip(table.method,
                                                                                              table.positions))
    from pruning.attention import main as attention_main
    from pruning.coverage import main as coverage_main

    assert coverage_main([str(tmp_path / "pruning")]) == 0
    assert set(pd.read_csv(tmp_path / "pruning" / "coverage" / "coverage.csv").positions) == {"reassign", "keep"}
    assert run_cli(attention_main, "--model", shikra_dir, "--rec", f"jsonl:{rec_data}", "--methods",
                   "random,cls-visual", "--ratios", "0.5", "--positions", "reassign,keep",
                   "--out", tmp_path / "attention") == 0
    assert pd.read_csv(tmp_path / "attention" / "attention.csv").visual.between(0, 1).all()
    images = rec_data / "images"
    assert probes_main(["--model", str(shikra_dir), "--images", str(images), "--out", str(tmp_path / "probe"),
                        "--no-progress", "--bootstrap", "20", "--test-fraction", "0.5"]) == 0
    assert (tmp_path / "probe" / "layerwise.csv").is_file()


def write_templates(path, templates):
    path.write_text(json.dumps(templates))
    return path


def test_rec_templates_in_shikras_format_are_drawn_per_sample_and_seeded(tmp_path):
    from grounding.prompts import load_rec_templates

    shikra_format = ["Where is <expr> <image>?", "<image> Locate <expr>.", "Find <expr> in <image>, please."]
    templates = load_rec_templates(write_templates(tmp_path / "REC.json", shikra_format))
    assert templates[0] == "Where is {expression} <image>?"
    style = default_style_for("shikra").with_options(rec_templates=templates, template_seed=3)
    asked = [style.text("rec", "the cup", index) for index in range(60)]
    assert asked == [style.text("rec", "the cup", index) for index in range(60)]  # a sample's draw is its own
    assert {text.replace("the cup", "{expression}") for text in asked} == set(templates)
    reseeded = style.with_options(template_seed=4)
    assert asked != [reseeded.text("rec", "the cup", index) for index in range(60)]
    assert style.text("vqa", "how many?", 5) == "<image> how many?\nAnswer the question using a single word or phrase."
    for bad, message in (([1], r"entry 0 is int"), (["no placeholder"], r"entry 0 \('no placeholder'\) needs"),
                         ([], "non-empty JSON list")):
        with pytest.raises(ValueError, match=message):
            load_rec_templates(write_templates(tmp_path / "bad.json", bad))


def test_the_clis_ask_the_templates_given_and_record_them(shikra_dir, rec_data, tmp_path):
    templates = write_templates(tmp_path / "REC.json", ["Where is <expr> <image>?", "<image> Locate <expr>."])
    out = tmp_path / "run"
    assert run_cli(grounding_main, "--model", shikra_dir, "--dataset", "jsonl", "--data", rec_data, "--split", "val",
               "--out", out, "--rec-templates", templates, "--template-seed", 7) == 0
    style = json.loads((out / "config.json").read_text())["prompt_style"]
    assert style["rec_templates"] == ["Where is {expression} <image>?", "<image> Locate {expression}."]
    assert style["template_seed"] == 7
    assert run_cli(grounding_main, "--model", shikra_dir, "--dataset", "jsonl", "--data", rec_data, "--split", "val",
               "--out", tmp_path / "one", "--rec-templates", templates, "--rec-template-index", 1) == 0
    assert json.loads((tmp_path / "one" / "config.json").read_text())["prompt_style"]["rec_templates"] == \
        ["<image> Locate {expression}."]
    assert run_cli(grounding_main, "--model", shikra_dir, "--dataset", "jsonl", "--data", rec_data, "--split", "val",
               "--out", tmp_path / "bad", "--rec-templates", templates, "--rec-template-index", 2) == 2
