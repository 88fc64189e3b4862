"""Qwen2-VL / Qwen2.5-VL vision-tower internals through the adapter, and the layer-wise probes on them.

The adapter hands every hidden state back per image in raster order over the unmerged patch grid, though the
tower holds them in merge-block order (and, on Qwen2.5-VL, window by window). The un-permutation is proven by
routes that share none of the adapter's index arithmetic: hidden state 0 from the image's own pixels, every
later one from the blocks run on a sequence ordered by the test (raster order within each attention window,
which is not the tower's order), and attention weights against the weights transformers' eager attention
computes, placed by transformers' own RoPE position IDs and window index.

transformers 5.24 gives no attention weights for these towers: with `output_attentions=True` their vision
`attentions` are each attention block's *output* (T, D), since the attention module returns a tensor, and the
eager kernel's weights are dropped. The oracle therefore records what `eager_attention_forward` returns.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_image
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

import mllm
from mllm.encoding import encode_vision_inputs
from mllm.tiny import CLIP_MEAN, CLIP_STD
from probes.activations import PATCH, GridMismatchError, extract_activations
from probes.bridge import VisionHooks
from probes.layerwise import images_from_directory, main

# Sizes the tiny processor keeps as they are (multiples of 16 pixels within its pixel bounds), so the test knows
# each patch's pixels; of different sizes, so the batch is ragged: (rows, cols) patch grids (6, 8), (10, 10), (8, 4).
SIZES = [(48, 64), (80, 80), (64, 32)]


def images() -> list:
    return [random_image(seed, height, width) for seed, (height, width) in enumerate(SIZES)]


def pixel_patch_embeddings(model: mllm.MLLM, image) -> torch.Tensor:
    """(rows, cols, D): each 8x8 patch of the normalised image, shown twice in time, through the patch Conv3d."""
    pixels = (np.asarray(image, dtype=np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    side = model.model.config.vision_config.patch_size
    rows, cols = pixels.shape[0] // side, pixels.shape[1] // side
    patches = torch.tensor(pixels, dtype=torch.float32).reshape(rows, side, cols, side, 3).permute(0, 2, 4, 1, 3)
    clips = patches[:, :, :, None].expand(-1, -1, -1, 2, -1, -1)  # (rows, cols, C, T, P, P)
    weight = model.adapter.vision_tower.patch_embed.proj.weight  # (D, C, T, P, P), no bias
    return torch.einsum("rcktij,dktij->rcd", clips, weight)


def test_hidden_state_0_is_each_raster_patch_of_the_image(qwen):
    batch, _ = encode_vision_inputs(qwen, images(), frame="original")
    assert qwen.adapter.patch_grids(batch["image_grid_thw"]) == [(h // 8, w // 8) for h, w in SIZES]
    hidden = qwen.adapter.encode_images(batch, output_hidden_states=True).hidden_states
    assert len(hidden) == len(qwen.adapter.vision_layers) + 1
    for index, image in enumerate(images()):
        expected = pixel_patch_embeddings(qwen, image)
        torch.testing.assert_close(hidden[0][index], expected, atol=1e-4, rtol=1e-4)
        single = {key: value[index:index + 1] if key == "image_grid_thw" else value for key, value in batch.items()}
        pixels = single["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())[index]
        patches = qwen.adapter.vision_patch_embeddings(pixels, with_position=False, grid_thw=single["image_grid_thw"])
        torch.testing.assert_close(patches[0], expected.flatten(0, 1), atol=1e-4, rtol=1e-4)


def windows(model: mllm.MLLM, layer: int, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols,) the attention window of each raster patch in block `layer` (0 everywhere: the whole image)."""
    vision = model.model.config.vision_config
    if model.adapter.model_type == "qwen2_vl" or layer in vision.fullatt_block_indexes:
        return torch.zeros(rows * cols, dtype=torch.long)
    side = vision.window_size // vision.patch_size  # 4 patches: windows of 2x2 merged tokens
    row, col = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)
    return (row // side) * cols + col // side


@torch.no_grad()
def test_every_hidden_state_equals_the_blocks_run_in_an_order_of_the_tests_own(qwen):
    """Raster order within each window, windows in raster order of their first patch: not the tower's order."""
    batch, _ = encode_vision_inputs(qwen, images(), frame="original")
    hidden = qwen.adapter.encode_images(batch, output_hidden_states=True).hidden_states
    tower = qwen.adapter.vision_tower
    for index, image in enumerate(images()):
        state = pixel_patch_embeddings(qwen, image)
        rows, cols, width = state.shape
        positions = torch.stack([torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)], -1)
        for layer, block in enumerate(qwen.adapter.vision_layers):
            window = windows(qwen, layer, rows, cols)
            order = torch.argsort(window * rows * cols + torch.arange(rows * cols))
            lengths = torch.bincount(window[order]).tolist()
            cu_seqlens = torch.tensor([0, *np.cumsum([n for n in lengths if n])], dtype=torch.int32)
            sequence = state.reshape(-1, width)[order]
            embeddings = tower.rotary_pos_emb(sequence, positions[order])
            out = block(sequence, cu_seqlens=cu_seqlens, position_embeddings=embeddings)
            state = torch.empty_like(out)
            state[order] = out
            state = state.reshape(rows, cols, width)
            torch.testing.assert_close(hidden[layer + 1][index], state, atol=1e-4, rtol=1e-4)


def tower_raster_places(model: mllm.MLLM, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the tower positions of its patches in raster order, from transformers' own RoPE position IDs
    (the (row, col) the tower gives each position) and, on Qwen2.5-VL, its window index."""
    vision = model.model.config.vision_config
    merge = vision.spatial_merge_size
    row_col = get_vision_position_ids(grid_thw, merge)  # processor order
    image = torch.arange(len(grid_thw)).repeat_interleave(grid_thw.prod(-1))
    if model.adapter.model_type == "qwen2_5_vl":
        window_index, _ = get_vision_window_index(grid_thw, merge, vision.window_size, vision.patch_size)
        order = (window_index[:, None] * merge**2 + torch.arange(merge**2)).flatten()
        row_col, image = row_col[order], image[order]
    places = []
    for index, (_, _, cols) in enumerate(grid_thw.tolist()):
        mine = (image == index).nonzero().flatten()
        raster = row_col[mine, 0] * cols + row_col[mine, 1]
        places.append(mine[torch.argsort(raster)])
    return places


@torch.no_grad()
def test_attention_equals_the_weights_of_transformers_eager_attention(qwen, qwen_checkpoint, monkeypatch):
    """Recomputed on the SDPA model; the oracle is the same checkpoint run with attn_implementation='eager'."""
    import importlib

    eager = mllm.load(qwen_checkpoint, device="cpu", dtype="float32", attn_implementation="eager")
    module = importlib.import_module(type(eager.adapter.vision_tower).__module__)
    recorded: list[tuple[torch.nn.Module, torch.Tensor]] = []
    kernel = module.eager_attention_forward

    def recording(attention, *args, **kwargs):
        output, weights = kernel(attention, *args, **kwargs)
        recorded.append((attention, weights[0]))
        return output, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    batch, _ = encode_vision_inputs(eager, images(), frame="original")
    eager.adapter.vision_tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    total = int(batch["image_grid_thw"].prod(-1).sum())
    layers = {id(block.attn): layer for layer, block in enumerate(eager.adapter.vision_layers)}
    full = {layer: [] for layer in layers.values()}
    for attention, weights in recorded:  # chunks in tower order: images, or windows on windowed blocks
        full[layers[id(attention)]].append(weights)
    places = tower_raster_places(eager, batch["image_grid_thw"])

    hidden = qwen.adapter.encode_images(batch, output_hidden_states=True).hidden_states
    assert qwen.model.config._attn_implementation == "sdpa"
    for layer, chunks in full.items():
        heads = chunks[0].shape[0]
        matrix = torch.zeros(heads, total, total)
        start = 0
        for chunk in chunks:
            end = start + chunk.shape[-1]
            matrix[:, start:end, start:end] = chunk
            start = end
        assert start == total
        ours = qwen.adapter.vision_attention(layer, hidden[layer])
        for index, place in enumerate(places):
            torch.testing.assert_close(ours[index], matrix[:, place][:, :, place], atol=1e-5, rtol=1e-4)
    windowed = [layer for layer in full if len(full[layer]) > len(SIZES)]
    assert bool(windowed) == (qwen.adapter.model_type == "qwen2_5_vl")


def test_projector_inputs_projected_are_the_visual_tokens_and_batch_members_refuse_ragged_grids(qwen):
    batch, _ = encode_vision_inputs(qwen, images(), frame="original")
    vision = qwen.adapter.encode_images(batch, output_hidden_states=True)
    projected = qwen.adapter.project(qwen.adapter.projector_inputs(vision.hidden_states))
    for ours, theirs in zip(projected, vision.features, strict=True):  # transformers un-permutes the merger itself
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    queries, keys = qwen.adapter.vision_queries_keys(1, vision.hidden_states[1])
    assert [q.shape for q in queries] == [k.shape for k in keys] == [h.shape for h in vision.hidden_states[1]]
    assert qwen.adapter.vision_num_heads == 4
    with pytest.raises(mllm.KeepSetError, match="different grids"):
        qwen.adapter.vision_patch_tokens(vision.hidden_states[0])
    with pytest.raises(mllm.UnsupportedModelError, match=rf"{qwen.adapter.model_type}'s vision tower has no position"):
        qwen.adapter.vision_patch_embeddings(batch["pixel_values"], True, grid_thw=batch["image_grid_thw"])
    with pytest.raises(ValueError, match="grid_thw"):
        qwen.adapter.image_features(batch["pixel_values"])
    same, _ = encode_vision_inputs(qwen, [random_image(seed, 48, 64) for seed in range(2)], frame="original")
    features, hidden = qwen.adapter.image_features(same["pixel_values"], True, grid_thw=same["image_grid_thw"])
    assert features.shape == (2, 12, 64) and qwen.adapter.vision_patch_tokens(hidden[2]).shape == (2, 48, 32)


def test_encode_returns_per_image_vision_states_and_attentions(qwen):
    encoding = qwen.encode(images(), ["hi", "where?", "a"], frame="original", vision_hidden_states=True,
                           vision_attentions=[0, -1])
    assert [tuple(state.shape[:2]) for state in encoding.vision_hidden_states[-1]] == [(6, 8), (10, 10), (8, 4)]
    last = len(qwen.adapter.vision_layers) - 1
    assert set(encoding.vision_attentions) == {0, last}
    for attention in encoding.vision_attentions[last]:
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    part = encoding.subset([2, 0])
    assert [tuple(state.shape[:2]) for state in part.vision_hidden_states[0]] == [(8, 4), (6, 8)]


# ---------------------------------------------------------------------------------------------------- probes
def test_hooks_equal_output_hidden_states_and_leave_the_model_untouched(qwen, monkeypatch):
    import subprocess

    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"tried to run {args}")

    monkeypatch.setattr(subprocess, "check_call", no_subprocess)  # TransformerLens' torchvision installer
    check = ArchitectureAdapter._check_required_libraries
    attention = qwen.model.config._attn_implementation
    parameters = {name: p.clone() for name, p in qwen.model.named_parameters()}
    batch, _ = encode_vision_inputs(qwen, images(), frame="original")
    reference = qwen.adapter.encode_images(batch, output_hidden_states=True).hidden_states
    blocks = qwen.adapter.vision_layers
    installed = [(len(block._forward_hooks), len(block._forward_pre_hooks)) for block in blocks]  # transformers' own
    # TransformerLens 4.3 bridges Qwen2.5-VL's tower but has no adapter for Qwen2-VL.
    native = "transformer_lens" if qwen.adapter.model_type == "qwen2_5_vl" else "transformers"
    for backend in dict.fromkeys([native, "transformers"]):
        hooks = VisionHooks(qwen, backend=None if backend == native else backend)
        assert hooks.backend == backend and hooks.num_layers == len(reference)
        prefix = "vision_encoder" if backend == "transformer_lens" else "model.visual"
        assert hooks.hook_name(0) == f"{prefix}.blocks.0.hook_in"
        states = hooks.run(batch, range(hooks.num_layers))
        for layer, expected in enumerate(reference):
            for got, want in zip(states[layer], expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert hooks.max_difference_from_transformers(batch) < 1e-5
    assert [(len(block._forward_hooks), len(block._forward_pre_hooks)) for block in blocks] == installed
    assert ArchitectureAdapter._check_required_libraries is check  # lifted for the boot only
    assert qwen.model.config._attn_implementation == attention
    for name, parameter in qwen.model.named_parameters():
        assert torch.equal(parameter, parameters[name]), name


def test_layerwise_cli_runs_on_qwen(qwen_checkpoint, tmp_path):
    """Images of one size: the store holds one patch grid (8x8 patches of 64x64 images)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        random_image(i, 64, 64).save(folder / f"{i:02d}.png")
    out = tmp_path / "run"
    assert main(["--model", str(qwen_checkpoint), "--images", str(folder), "--out", str(out), "--layers", "0,-1",
                 "--bootstrap", "20", "--max-iter", "50", "--no-progress", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    metadata = json.loads((out / "layerwise.json").read_text())
    assert metadata["grid"] == [8, 8] and metadata["layers"] == [0, 3]
    assert metadata["hook_check"]["max_relative_difference"] < 1e-5
    table = (out / "layerwise.csv").read_text()
    assert "patch embedding," in table and "patch + position embedding" not in table
    assert any(line.startswith("chance,,accuracy,0.015625,") for line in table.splitlines())  # 1 / 64 patches
    for name in ("layerwise.png", "records.jsonl", "config.json"):
        assert (out / name).is_file(), name


def test_a_store_refuses_an_image_of_another_grid(qwen, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (height, width) in enumerate([(64, 64), (64, 64), (48, 48)]):
        random_image(i, height, width).save(folder / f"{i:02d}.png")
    with pytest.raises(GridMismatchError, match=r"'02.png': its patch grid is \(6, 6\), the store's \(8, 8\)"):
        extract_activations(qwen, images_from_directory(folder), tmp_path / "store", progress=False, batch_size=2)
    store = extract_activations(qwen, images_from_directory(folder, limit=2), tmp_path / "ok", progress=False)
    assert store.spec.embeddings == [PATCH] and store.features(PATCH).shape == (2, 64, 32)
    np.testing.assert_array_equal(store.features(PATCH), store.features(0))  # no position embedding to add
