"""MiniGPT-v2 through mllm: a tiny random one (mllm.tiny.build_tiny_minigptv2, the converter's layout) against
transformers' own generate and Llama forward, its 1 x 4 strips of patches, its prompt and box format as released,
and every analysis CLI on it."""

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
from grounding.boxes import answer_to_pixels, parse_box
from grounding.evaluate import main as grounding_main
from grounding.prompts import default_style_for
from misalign.ablate import main as misalign_main
from mllm.images import ImageFrame
from mllm.selfcheck import transformers_generate_tokens
from mllm.tiny import build_tiny_minigptv2
from probes.layerwise import main as probes_main
from pruning.attention import main as attention_main
from pruning.coverage import main as coverage_main
from pruning.evaluate import main as pruning_main

SIZES = [(64, 64), (90, 40), (30, 70), (100, 100)]  # (width, height): every one squashed to 64 x 64
QUESTIONS = ["[refer] give me the location of the red circle", "hi", "[vqa] what colour?", "where"]


@pytest.fixture(scope="module")
def minigpt_dir(tmp_path_factory):
    return build_tiny_minigptv2(tmp_path_factory.mktemp("minigptv2"))


@pytest.fixture(scope="module")
def minigpt(minigpt_dir):
    return mllm.load(minigpt_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for width, height in SIZES]


def test_unpruned_generate_equals_transformers_generate(minigpt, images):
    encoding = minigpt.encode(images, QUESTIONS, frame="original")  # squashed, as the processor and MiniGPT-v2 do
    ours = minigpt.generate(encoding, max_new_tokens=10)
    assert ours.token_ids == transformers_generate_tokens(minigpt, images, encoding.prompts, 10)


def test_each_visual_token_is_a_1x4_strip_of_patches_on_the_strips_grid(minigpt, images):
    """Token (r, c) of the 8 x 2 grid is llama_proj of ln_vision on patches (r, 4c) .. (r, 4c + 3) of the 8 x 8
    tower grid, concatenated: indexed here in two dimensions, not by the projector's reshape."""
    assert minigpt.adapter.grid == (8, 2) and minigpt.adapter.tower_grid == (8, 8)
    encoding = minigpt.encode(images[:2], QUESTIONS[:2])
    assert encoding.grids == [(8, 2)] * 2 and encoding.visual_counts == [16, 16]
    network = minigpt.model.model
    with torch.no_grad():
        hidden = network.vision_tower(encoding.pixel_values, output_hidden_states=True).hidden_states[-1]
        projector = network.multi_modal_projector
        patches = projector.ln_vision(hidden[:, 1:]).reshape(2, 8, 8, -1)  # (rows, cols) of the tower grid
        for row in range(8):
            for col in range(2):
                strip = torch.cat([patches[:, row, 4 * col + k] for k in range(4)], dim=-1)
                expected = projector.linear(strip)
                for image in range(2):
                    slot = int(encoding.visual_start[image]) + row * 2 + col
                    torch.testing.assert_close(encoding.inputs_embeds[image, slot], expected[image])


def test_pruned_prefill_equals_transformers_forward_on_the_kept_tokens(minigpt, images):
    encoding = minigpt.encode(images, QUESTIONS)
    keep = random_keep(4, encoding.num_visual, 6)
    for policy in ("keep", "reassign"):
        run = minigpt.generate(encoding, keep=keep, policy=policy, max_new_tokens=1, output_logits=True)
        for row in range(4):
            embeds, ids = kept_reference_inputs(encoding, row, keep[row], policy)
            reference = minigpt.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), position_ids=ids)
            mask = run.prefill_mask[row] == 1
            torch.testing.assert_close(run.prefill_logits[row][mask], reference.logits[0], atol=1e-5, rtol=1e-5)


def test_cls_visual_scores_a_strip_by_the_cls_attention_to_its_four_patches(minigpt_dir, images):
    """The CLS row of the penultimate layer's attention, recomputed here from transformers' hidden states and the
    layer's own qkv weights, summed over each token's patches 4j .. 4j + 3; the method keeps the top tokens."""
    from pruning.apply import select_tokens
    from pruning.budget import Budget
    from pruning.methods.cls_visual import cls_attention
    from pruning.registry import make_method

    minigpt = mllm.load(minigpt_dir, device="cpu", dtype="float32")  # this test's own: sharpened below
    with torch.no_grad():  # random init attends almost uniformly; larger queries and keys make the CLS row peak
        for layer in minigpt.model.model.vision_tower.encoder.layers:
            layer.self_attn.qkv.weight.mul_(20)
    method = make_method("cls-visual")
    encoding = minigpt.encode(images, QUESTIONS, **method.encode_options(minigpt))
    network = minigpt.model.model.vision_tower
    with torch.no_grad():
        hidden = network(encoding.pixel_values, output_hidden_states=True).hidden_states
        layer = network.encoder.layers[-2]
        qkv = layer.self_attn.qkv(layer.layer_norm1(hidden[-3]))  # the input of the penultimate block
        heads = minigpt.model.config.vision_config.num_attention_heads
        q, k, _ = (part.reshape(4, qkv.shape[1], heads, -1).transpose(1, 2) for part in qkv.chunk(3, dim=-1))
        attention = (q @ k.transpose(-1, -2) * layer.self_attn.scale).softmax(-1)
        per_patch = attention[:, :, 0, 1:].mean(dim=1)  # (4 images, 64 patches)
        expected = torch.stack([per_patch[:, 4 * j:4 * j + 4].sum(dim=1) for j in range(16)], dim=1)
    torch.testing.assert_close(cls_attention(minigpt, encoding, -2), expected)
    assert expected.std(dim=1).min() > 1e-3  # the scores differ, so the order below means something
    kept = select_tokens(minigpt, encoding, method, Budget(kept=5)).kept
    assert torch.equal(torch.as_tensor(kept), expected.topk(5, dim=1).indices)


def test_the_prompt_and_the_box_format_are_minigptv2s(minigpt, images):
    style = default_style_for("minigptv2")
    assert style.name == "minigptv2" and style.box_format == "normalized100" and style.answer_frame == "original"
    question = style.text("rec", "the red cup")
    assert question == "[refer] give me the location of the red cup"
    encoding = minigpt.encode(images[:1], [question])
    assert encoding.prompts[0] == f"<s>[INST] <Img><unk> </Img> {question} [/INST]"  # <unk>: the 16 tokens' place
    assert (encoding.input_ids[0] == minigpt.model.config.image_token_id).sum() == 16
    assert encoding.input_ids[0, :2].tolist() == [minigpt.processor.tokenizer.bos_token_id] * 2
    # eval_ref.py: x / 100 * width, y / 100 * height of the original image
    box = parse_box("<p>the red cup</p> {<10><20><50><60>}").values
    frame = ImageFrame.for_image("original", 200, 100)
    assert answer_to_pixels(box, "normalized100", frame) == pytest.approx((20, 20, 100, 60))


def test_every_analysis_cli_runs_on_minigptv2(minigpt_dir, rec_data, tmp_path, capsys):
    out = tmp_path / "grounding"
    assert run_cli(grounding_main, "--model", minigpt_dir, "--dataset", "jsonl", "--data", rec_data, "--split",
                   "val", "--out", out) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(record["error"] is None for record in records)
    assert json.loads((out / "config.json").read_text())["prompt_style"]["name"] == "minigptv2"
    assert run_cli(misalign_main, "--model", minigpt_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
                   "--kind", "permuted", "--strength", "0,1", "--out", tmp_path / "misalign") == 0
    assert set(pd.read_csv(tmp_path / "misalign" / "ablation.csv").strength) == {0.0, 1.0}
    assert run_cli(pruning_main, "--model", minigpt_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
                   "--methods", "random,spatial,text-visual,fastv,cls-visual", "--ratios", "0.5", "--positions",
                   "reassign,keep", "--out", tmp_path / "pruning") == 0
    table = pd.read_csv(tmp_path / "pruning" / "pruning.csv")
    assert {("spatial", "keep"), ("fastv", "reassign")} <= set(zip(table.method, table.positions))
    assert (table[table.method == "spatial"].tokens_fed == 8).all()
    assert coverage_main([str(tmp_path / "pruning")]) == 0
    assert run_cli(attention_main, "--model", minigpt_dir, "--rec", f"jsonl:{rec_data}", "--methods", "random",
                   "--ratios", "0.5", "--positions", "reassign,keep", "--out", tmp_path / "attention") == 0
    assert run_cli(pruning_main, "--model", minigpt_dir, "--rec", f"jsonl:{rec_data}", "--tasks", "rec",
                   "--methods", "prumerge+", "--ratios", "0.5", "--out", tmp_path / "refused") == 2
    assert "4 patches per visual token" in capsys.readouterr().err
    assert probes_main(["--model", str(minigpt_dir), "--images", str(rec_data / "images"), "--out",
                        str(tmp_path / "probe"), "--no-progress", "--bootstrap", "20", "--test-fraction", "0.5"]) == 0
    assert json.loads((tmp_path / "probe" / "layerwise.json").read_text())["grid"] == [8, 8]
    assert probes_main(["--model", str(minigpt_dir), "--images", str(rec_data / "images"), "--features",
                        "visual-tokens", "--out", str(tmp_path / "probe-tokens"), "--no-progress", "--bootstrap", "20",
                        "--test-fraction", "0.5"]) == 0
    assert json.loads((tmp_path / "probe-tokens" / "layerwise.json").read_text())["grid"] == [8, 2]
    assert set(pd.read_csv(tmp_path / "probe-tokens" / "layerwise.csv").series) == {"visual tokens", "chance"}


def test_a_checkpoint_grouping_other_than_four_patches_is_refused_by_field(minigpt_dir, tmp_path):
    import shutil

    directory = shutil.copytree(minigpt_dir, tmp_path / "grouped")
    config = json.loads((directory / "config.json").read_text())
    config["tokens_per_group"] = 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(mllm.UnsupportedModelError, match=r"config\.json: field 'tokens_per_group' is 2"):
        mllm.load(directory, device="cpu", dtype="float32")
