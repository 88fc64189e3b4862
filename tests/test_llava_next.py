"""LLaVA-NeXT through mllm, against transformers' own LlavaNextForConditionalGeneration, on a tiny random one
(mllm.tiny.build_tiny_llava_next) and images of four aspect ratios, so every row carries another token count."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from PIL import Image
from test_tiny_llava_next import expected_tokens

import mllm
from grounding.evaluate import main as grounding_main
from misalign.ablate import main as misalign_main
from mllm.selfcheck import transformers_generate_tokens
from mllm.visual_tokens import BASE, NEWLINE, TILE
from pruning.attention import main as attention_main

SIZES = [(28, 28), (64, 32), (32, 64), (90, 30)]  # (width, height)
PROMPTS = ["Where is the red circle?", "hi", "What colour is the square?", "x"]


@pytest.fixture(scope="module")
def llava_next(next_dir):
    return mllm.load(next_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for width, height in SIZES]


def test_unpruned_generate_equals_transformers_generate(llava_next, images):
    encoding = llava_next.encode(images, PROMPTS, frame="original")
    assert len(set(encoding.visual_counts)) == 4
    ours = llava_next.generate(encoding, max_new_tokens=10)
    assert ours.token_ids == transformers_generate_tokens(llava_next, images, encoding.prompts, 10)


def test_every_visual_token_knows_what_it_is(llava_next, images):
    encoding = llava_next.encode(images, PROMPTS, frame="original")
    newline = llava_next.model.model.image_newline
    for row, (width, height) in enumerate(SIZES):
        tokens = encoding.visual_tokens[row]
        assert tokens.count == encoding.visual_counts[row] == expected_tokens(width, height)
        assert encoding.grids[row] is None and tokens.grid is None
        assert (tokens.kind[:4] == BASE).all() and tokens.grids[0] == (2, 2)
        rows, cols = tokens.grids[1]
        assert tokens.counts() == {"base": 4, "tile": rows * cols, "newline": rows}
        embeds = encoding.inputs_embeds[row, encoding.visual_slots(row)]
        is_newline = torch.tensor([torch.equal(token, newline) for token in embeds])
        assert torch.equal(is_newline, tokens.kind == NEWLINE)  # the newlines sit where the map says
        tiles = tokens.kind == TILE
        assert (tokens.row[tiles] < rows).all() and (tokens.col[tiles] < cols).all()
        assert (tokens.col[tokens.kind == NEWLINE] == cols).all()
    with pytest.raises(mllm.KeepSetError, match="not one grid"):
        _ = encoding.grid


def test_gap_keeps_each_kept_tokens_original_id(llava_next, images):
    encoding = llava_next.encode(images, PROMPTS, frame="original")
    generator = torch.Generator().manual_seed(0)
    keep = [torch.randperm(count, generator=generator)[: count // 2].sort().values for count in encoding.visual_counts]
    for policy in ("keep", "reassign"):
        run = llava_next.generate(encoding, keep=keep, policy=policy, max_new_tokens=1, output_logits=True)
        for row, kept in enumerate(keep):
            padding, prefix, suffix = encoding.layout(row)
            start, count = int(encoding.visual_start[row]), encoding.visual_counts[row]
            embeds = encoding.inputs_embeds[row]
            sequence = torch.cat([embeds[padding:start], embeds[start + kept], embeds[start + count:]])[None]
            if policy == "keep":  # written here from the layout, not from mllm.positions
                after = range(prefix + count, prefix + count + suffix)
                ids = [*range(prefix), *(prefix + int(k) for k in kept), *after]
            else:
                ids = list(range(sequence.shape[1]))
            ids = torch.tensor([ids])
            reference = llava_next.model(inputs_embeds=sequence, attention_mask=torch.ones_like(ids), position_ids=ids)
            mask = run.prefill_mask[row] == 1
            torch.testing.assert_close(run.prefill_logits[row][mask], reference.logits[0], atol=1e-5, rtol=1e-5)


def test_grounding_and_misalign_run_and_the_attention_sweep_is_refused_by_name(next_dir, rec_data, tmp_path, capsys):
    data, out = rec_data, tmp_path / "grounding"
    assert run_cli(grounding_main, "--model", next_dir, "--dataset", "jsonl", "--data", data, "--split", "val",
                   "--out", out) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(record["error"] is None and record["visual_grid"] is None for record in records)
    assert json.loads((out / "config.json").read_text())["prompt_style"]["image_frame"] == "original"
    assert run_cli(misalign_main, "--model", next_dir, "--rec", f"jsonl:{data}", "--tasks", "rec", "--kind",
                   "permuted", "--strength", "0,1", "--out", tmp_path / "misalign") == 0
    assert set(pd.read_csv(tmp_path / "misalign" / "ablation.csv").strength) == {0.0, 1.0}
    assert run_cli(attention_main, "--model", next_dir, "--rec", f"jsonl:{data}", "--methods", "random",
                   "--ratios", "0.5", "--out", tmp_path / "attention") == 2
    assert "newlines" in capsys.readouterr().err


def test_the_token_map_of_one_grid_and_of_a_base_crop_with_tiles():
    plain = mllm.VisualTokens.raster(2, 3)
    assert plain.grid == (2, 3) and plain.row.tolist() == [0, 0, 0, 1, 1, 1] and plain.col.tolist() == [0, 1, 2] * 2
    tiled = mllm.VisualTokens.llava_next((2, 2), (2, 3))
    assert tiled.count == 4 + 2 * (3 + 1) and tiled.grid is None and tiled.grids == ((2, 2), (2, 3))
    assert tiled.kind.tolist() == [BASE] * 4 + ([TILE] * 3 + [NEWLINE]) * 2
    assert tiled.row[4:].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and tiled.crop.tolist() == [0] * 4 + [1] * 8


def test_the_image_is_shown_at_its_own_aspect_or_padded_and_a_crop_is_refused(llava_next, images):
    padded = llava_next.encode(images[1:2], PROMPTS[:1], frame="padded")  # 64x32 padded to 64x64: a square's tiles
    square = llava_next.encode([Image.new("RGB", (64, 64))], PROMPTS[:1], frame="original")
    assert padded.visual_counts == square.visual_counts != llava_next.encode(images[1:2], PROMPTS[:1],
                                                                             frame="original").visual_counts
    with pytest.raises(ValueError, match="frame 'cropped' does not apply to llava_next"):
        llava_next.encode(images[:1], PROMPTS[:1], frame="cropped")


def test_the_probe_reads_the_base_crop_as_transformers_computes_it(llava_next, next_dir, images, rec_data, tmp_path):
    """The probe hooks the tower on each image's base crop (the processor's first crop: the whole image at the
    tower's square); its stored patch states are transformers' CLIPVisionModel hidden states there, CLS dropped."""
    from transformers import LlavaNextProcessor

    from probes.activations import ImageList, extract_activations
    from probes.layerwise import main as probes_main

    shown = [image.resize((28, 28)) for image in images]  # one size: a store holds one grid
    store = extract_activations(llava_next, ImageList([str(i) for i in range(4)], lambda i: shown[i]),
                                tmp_path / "store", frame="original", progress=False)
    assert tuple(store.grid) == (2, 2) and store.hook_check["max_relative_difference"] <= 1e-4
    pixels = LlavaNextProcessor.from_pretrained(next_dir)(images=shown, text=["<image>"] * 4,
                                                          return_tensors="pt").pixel_values
    with torch.no_grad():
        hidden = llava_next.model.model.vision_tower(pixels[:, 0], output_hidden_states=True).hidden_states
    for layer in (0, len(hidden) - 2):  # the store's layer L is hidden_states[L], as output_hidden_states counts
        np.testing.assert_allclose(np.asarray(store.features(layer), dtype=np.float32), hidden[layer][:, 1:].numpy(),
                                   rtol=2e-3, atol=2e-3)
    assert probes_main(["--model", str(next_dir), "--images", str(rec_data / "images"), "--out",
                        str(tmp_path / "probe"), "--no-progress", "--bootstrap", "20", "--test-fraction", "0.5"]) == 0
    assert (tmp_path / "probe" / "layerwise.csv").is_file()
