"""Loading and input errors: each is a clear exception whose message names the thing at fault."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from conftest import random_image

import mllm


def test_load_tiny_checkpoint(tiny_checkpoint, tiny_model):
    assert isinstance(tiny_model, mllm.MLLM)
    assert tiny_model.path == tiny_checkpoint
    assert tiny_model.grid == (4, 4)
    assert tiny_model.num_visual_tokens == 16
    assert tiny_model.device.type == "cpu"
    assert tiny_model.dtype == torch.float32


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "missing"
    with pytest.raises(mllm.CheckpointNotFoundError, match="checkpoint not found") as info:
        mllm.load(path)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, mllm.MLLMError)
    assert str(path) in str(info.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(mllm.CheckpointNotFoundError, match=r"config\.json") as info:
        mllm.load(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unsupported_model_type(tmp_path):
    transformers.BertConfig().save_pretrained(tmp_path)
    with pytest.raises(mllm.UnsupportedModelError, match="'model_type' is 'bert'") as info:
        mllm.load(tmp_path)
    assert "llava" in str(info.value)
    assert "config.json" in str(info.value)
    assert isinstance(info.value, ValueError)


def _copy_with_config(source, target, **changes):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_unsupported_feature_select_strategy(tiny_checkpoint, tmp_path):
    path = _copy_with_config(tiny_checkpoint, tmp_path / "full", vision_feature_select_strategy="full")
    with pytest.raises(mllm.UnsupportedModelError, match="'vision_feature_select_strategy' is 'full'"):
        mllm.load(path, device="cpu", dtype="float32")


def test_unsupported_feature_layer_list(tiny_checkpoint, tmp_path):
    path = _copy_with_config(tiny_checkpoint, tmp_path / "layers", vision_feature_layer=[-2, -1])
    with pytest.raises(mllm.UnsupportedModelError, match="'vision_feature_layer'"):
        mllm.load(path, device="cpu", dtype="float32")


def test_encode_undecodable_image(tiny_model, tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(mllm.ImageLoadError, match=r"broken\.jpg"):
        tiny_model.encode([path], ["hi"])


def test_encode_missing_image(tiny_model, tmp_path):
    with pytest.raises(mllm.ImageLoadError, match=r"absent\.png"):
        tiny_model.encode([tmp_path / "absent.png"], ["hi"])


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("USER: hi ASSISTANT:", "prompt 0 has no image placeholder"),
        ("USER: <image>\n<image>\nhi ASSISTANT:", "prompt 0 has 2 image placeholders"),
    ],
)
def test_raw_prompt_placeholder_count(tiny_model, prompt, match):
    with pytest.raises(mllm.PromptError, match=match):
        tiny_model.encode([random_image(0)], [prompt], raw_prompts=True)


def test_raw_prompt_error_names_its_index(tiny_model):
    prompts = ["USER: <image>\nhi ASSISTANT:", "no placeholder here"]
    with pytest.raises(mllm.PromptError, match="prompt 1 has no image placeholder"):
        tiny_model.encode([random_image(0), random_image(1)], prompts, raw_prompts=True)


def test_raw_prompt_with_one_placeholder_works(tiny_model):
    encoding = tiny_model.encode([random_image(0)], ["USER: <image>\nhi ASSISTANT:"], raw_prompts=True)
    assert encoding.num_visual == 16
    assert encoding.prompts == ["USER: <image>\nhi ASSISTANT:"]


def test_more_images_than_prompts(tiny_model, images):
    with pytest.raises(mllm.PromptError, match="2 images but 1 prompts"):
        tiny_model.encode(images[:2], ["hi"])


@pytest.fixture(scope="module")
def encoding(tiny_model):
    return tiny_model.encode([random_image(0)], ["hi"])


@pytest.mark.parametrize(
    ("keep", "match"),
    [
        ([torch.tensor([], dtype=torch.long)], "empty"),
        ([torch.tensor([0, 16])], "out of range.*16 visual tokens"),
        ([torch.tensor([-1, 3])], "out of range"),
        ([torch.tensor([2, 2])], "repeats"),
        ([torch.tensor([0, 1]), torch.tensor([2, 3])], r"one keep set per prompt \(1\), got 2"),
        (torch.tensor([0, 1, 2]), r"one keep set per prompt \(1\), got \(3,\)"),
        ([[0.5, 1.0]], "integer"),
    ],
)
def test_generate_bad_keep(tiny_model, encoding, keep, match):
    assert tiny_model.num_visual_tokens == 16
    with pytest.raises(mllm.KeepSetError, match=match):
        tiny_model.generate(encoding, keep=keep, max_new_tokens=1)


def test_generate_valid_keep(tiny_model, encoding):
    out = tiny_model.generate(encoding, keep=[torch.tensor([15, 0, 7])], max_new_tokens=1)
    assert out.kept[0].tolist() == [15, 0, 7]
    assert len(out.token_ids[0]) == 1
