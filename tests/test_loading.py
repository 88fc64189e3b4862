"""Loading checkpoints as researchers have them on disk, and the selfcheck command."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import PROMPTS

import mllm
from mllm import selfcheck


def to_legacy_llava_hf_layout(directory):
    """Rewrite a checkpoint the way llava-hf/llava-1.5-7b-hf shipped it in 2024: preprocessor_config.json
    naming CLIPImageProcessor, a slim processor_config.json, chat_template.json, PreTrainedTokenizerFast."""
    processor = json.loads((directory / "processor_config.json").read_text())
    image_processor = processor.pop("image_processor")
    image_processor.update(image_processor_type="CLIPImageProcessor", processor_class="LlavaProcessor")
    (directory / "preprocessor_config.json").write_text(json.dumps(image_processor))
    processor.pop("image_token", None)
    (directory / "processor_config.json").write_text(json.dumps(processor))
    template = (directory / "chat_template.jinja").read_text()
    (directory / "chat_template.jinja").unlink()
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tokenizer = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer.update(tokenizer_class="PreTrainedTokenizerFast", padding_side="right")
    tokenizer.pop("backend", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer))


def test_legacy_llava_hf_layout_loads_and_answers_the_same(tiny_checkpoint, tiny_model, images, tmp_path):
    legacy_dir = tmp_path / "llava-legacy"
    shutil.copytree(tiny_checkpoint, legacy_dir)
    to_legacy_llava_hf_layout(legacy_dir)
    legacy = mllm.load(legacy_dir, device="cpu", dtype="float32")
    assert legacy.processor.chat_template  # read from chat_template.json
    assert legacy.tokenizer.padding_side == "left"  # forced: batched generation pads on the left
    assert legacy.prompt("hi") == tiny_model.prompt("hi") == "USER: <image>\nhi ASSISTANT:"
    ours = legacy.generate(legacy.encode(images, PROMPTS), max_new_tokens=6)
    reference = tiny_model.generate(tiny_model.encode(images, PROMPTS), max_new_tokens=6)
    assert ours.token_ids == reference.token_ids


def test_checkpoint_without_chat_template_uses_llava15_format(tiny_checkpoint, tmp_path):
    directory = tmp_path / "no-template"
    shutil.copytree(tiny_checkpoint, directory)
    (directory / "chat_template.jinja").unlink()
    model = mllm.load(directory, device="cpu")
    assert model.prompt("where?") == "USER: <image>\nwhere? ASSISTANT:"


@pytest.mark.parametrize("batch", [2, 5])
def test_selfcheck_passes_and_writes_its_files(tmp_path, capsys, batch):
    assert selfcheck.main(["--out", str(tmp_path), "--batch", str(batch), "--max-new-tokens", "4"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["checks"] and all(check["passed"] for check in summary["checks"])
    assert summary["checks"][0]["batch"] == batch  # more rows than the built-in image shapes and questions
    assert summary["versions"]["transformers"]
    rows = (tmp_path / "position_ids.csv").read_text().splitlines()
    assert rows[0] == "policy,token,position_id"
    policies = {row.split(",")[0] for row in rows[1:]}
    assert policies == set(selfcheck.POLICIES)
    assert "[ok]" in capsys.readouterr().out


def test_tiny_llm_starts_at_an_init_scaled_to_its_width():
    """At HF's 0.02 a narrow Llama trained from scratch never learns to retrieve by content; see mllm.tiny."""
    from transformers import LlavaForConditionalGeneration

    from mllm.tiny import TinyLlavaConfig, build_char_tokenizer, tiny_llava_config

    sizes = TinyLlavaConfig(text_hidden=128)
    model = LlavaForConditionalGeneration(tiny_llava_config(sizes, build_char_tokenizer()))
    expected = sizes.text_hidden**-0.5
    layer = model.model.language_model.layers[0]
    for weight in (layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight, model.lm_head.weight,
                   model.model.multi_modal_projector.linear_1.weight):
        assert weight.std().item() == pytest.approx(expected, rel=0.1)


def test_random_weights_build_the_same_architecture_without_reading_the_weights(tiny_checkpoint, tiny_model,
                                                                                tmp_path):
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "no-weights")
    for weights in directory.glob("*.safetensors"):
        weights.unlink()  # nothing to read: the model comes from config.json alone
    random = mllm.load(directory, device="cpu", dtype="float32", random_weights=True)
    trained = tiny_model.model.state_dict()
    built = random.model.state_dict()
    assert {key: value.shape for key, value in built.items()} == {key: value.shape for key, value in trained.items()}
    assert any(not bool((built[key] == trained[key]).all()) for key in trained)
    assert type(random.adapter) is type(tiny_model.adapter)
    with pytest.raises(OSError, match="no-weights"):  # without random_weights, the missing file is named
        mllm.load(directory, device="cpu", dtype="float32")
