"""The shipped miniatures: stock Hugging Face checkpoints (llava-hf's layout, Qwen2-VL's) that load through `mllm`
and really ground.

The full measurement (every sample of the shipped split) is in each checkpoint's card; here a subset
checks that the weights on disk are the ones that were measured, through the same path a user takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mllm
from grounding.data import load_dataset
from grounding.prompts import default_style_for
from grounding.runner import run_evaluation
from minillava.model import trained_with_current_init

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "minillava"
MINIATURES = sorted(path.name for path in SHIPPED.iterdir() if (path / "config.json").is_file())
SUBSET = 96
# model_type -> (architectures, text model_type, vision model_type, the processor's file), as each maker ships them
LAYOUTS = {
    "llava": (["LlavaForConditionalGeneration"], "llama", "clip_vision_model", "processor_config.json"),
    "qwen2_vl": (["Qwen2VLForConditionalGeneration"], "qwen2_vl_text", "qwen2_vl_vision", "preprocessor_config.json"),
}


def test_the_shipped_miniatures_are_all_found():
    assert {"spatial", "contrastive"} <= set(MINIATURES)


@pytest.fixture(scope="module", params=MINIATURES)
def shipped(request):
    return SHIPPED / request.param


def test_checkpoint_is_in_its_makers_layout(shipped):
    config = json.loads((shipped / "config.json").read_text())
    architectures, text_type, vision_type, processor_file = LAYOUTS[config["model_type"]]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", processor_file,
                 "chat_template.jinja", "README.md", "evaluation.json", "training.json"):
        assert (shipped / name).is_file(), name
    assert config["architectures"] == architectures
    assert config["text_config"]["model_type"] == text_type
    assert config["vision_config"]["model_type"] == vision_type
    size = sum(path.stat().st_size for path in shipped.rglob("*") if path.is_file())
    assert size < 40 * 2**20


def test_card_reports_the_measured_evaluation(shipped):
    evaluation = json.loads((shipped / "evaluation.json").read_text())
    card = (shipped / "README.md").read_text()
    rec = evaluation["rec"]["summary"]
    vqa = evaluation["vqa"]["summary"]
    assert rec["n_samples"] >= 1000
    assert f"{rec['metrics']['acc@0.5']['value']:.3f}" in card
    assert f"{vqa['metrics']['accuracy']['value']:.3f}" in card
    assert rec["metrics"]["acc@0.5"]["value"] >= 0.7
    assert vqa["metrics"]["accuracy"]["value"] >= 0.9


def test_shipped_miniature_was_trained_with_the_current_init(shipped):
    # The card's reproduce command rebuilds the shipped weights only if they came from today's recipe.
    assert trained_with_current_init(shipped)
    training = json.loads((shipped / "training.json").read_text())
    assert training["config"]["stage2_steps"] == 16000


@pytest.mark.parametrize("task", ["rec", "vqa"])
def test_miniature_grounds_on_a_subset_of_the_shipped_split(shipped, task, tmp_path):
    model = mllm.load(shipped, device="cpu", dtype="float32")
    dataset = load_dataset("jsonl", SHIPPED / "eval" / task, "val")
    summary = run_evaluation(model, dataset, tmp_path / task, default_style_for(model.model.config.model_type),
                             batch_size=32, limit=SUBSET, progress=False, resamples=10)
    measured = json.loads((shipped / "evaluation.json").read_text())[task]["summary"]["metrics"]
    metric = "acc@0.5" if task == "rec" else "accuracy"
    # A subset of 96 has a standard error of ~0.045 around the full split's value.
    assert summary["metrics"][metric]["value"] >= measured[metric]["value"] - 0.15
    assert summary["metrics"][metric]["value"] >= (0.6 if task == "rec" else 0.8)
