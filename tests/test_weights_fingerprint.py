"""A run directory belongs to one checkpoint's weights: a retrained checkpoint saved to the same path is
another model, and its runs are refused rather than resumed from the old model's records."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest

import mllm
from grounding import RunConfigError
from grounding.runner import check_or_write_config, model_identity
from mllm.tiny import TinyLlavaConfig, build_tiny_llava
from probes.activations import StoreMismatchError, extract_activations
from pruning.evaluate import main as evaluate_pruning
from tests.test_probes import noise_images

EVAL = Path(__file__).resolve().parents[1] / "data" / "minillava" / "eval"


def test_the_fingerprint_follows_the_weights_not_the_path_or_the_other_files(tmp_path):
    first = build_tiny_llava(tmp_path / "a", TinyLlavaConfig(seed=0))
    moved = shutil.copytree(first, tmp_path / "moved")
    (moved / "README.md").write_text("a card written after training\n")
    retrained = build_tiny_llava(tmp_path / "b", TinyLlavaConfig(seed=1))
    fingerprint = mllm.weights_fingerprint(first)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert mllm.weights_fingerprint(moved) == fingerprint
    assert mllm.weights_fingerprint(retrained) != fingerprint
    assert mllm.load(first, device="cpu", dtype="float32").weights == fingerprint
    assert mllm.load(first, device="cpu", dtype="float32", random_weights=True).weights == "random"


def test_a_run_of_other_weights_at_the_same_path_is_refused_naming_the_field(tiny_model, tmp_path):
    check_or_write_config(tmp_path, {**model_identity(tiny_model), "task": "rec"})
    other = dataclasses.replace(tiny_model, weights="0123456789abcdef")
    with pytest.raises(RunConfigError, match=r"config\.json.*weights: '[0-9a-f]{16}' there, '0123456789abcdef' now"):
        check_or_write_config(tmp_path, {**model_identity(other), "task": "rec"})


def test_a_run_written_before_weights_were_recorded_resumes_with_a_warning(tiny_model, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": str(tiny_model.path), "task": "rec"}))
    with pytest.warns(UserWarning, match="written before runs recorded weights"):
        check_or_write_config(tmp_path, {**model_identity(tiny_model), "task": "rec"})
    with pytest.raises(RunConfigError, match="task"):  # what it did record still has to match
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_or_write_config(tmp_path, {**model_identity(tiny_model), "task": "vqa"})


def test_a_retrained_checkpoint_does_not_resume_the_old_ones_pruning_run(tmp_path, capsys):
    checkpoint, out = tmp_path / "model", tmp_path / "out"
    args = ["--data", str(EVAL), "--methods", "random", "--ratios", "0.5", "--limit", "4", "--tasks", "rec",
            "--no-progress", "--bootstrap", "10", "--out", str(out)]
    build_tiny_llava(checkpoint, TinyLlavaConfig(seed=0))
    assert evaluate_pruning(["--model", str(checkpoint), *args]) == 0
    build_tiny_llava(checkpoint, TinyLlavaConfig(seed=1))  # retrained, saved over the old one
    capsys.readouterr()
    assert evaluate_pruning(["--model", str(checkpoint), *args]) != 0
    assert "weights:" in capsys.readouterr().err


def test_an_activation_store_of_other_weights_is_refused_and_a_legacy_one_resumes(tiny_model, tmp_path):
    images = noise_images(4, seed=2)
    extract_activations(tiny_model, images, tmp_path, batch_size=2, dtype="float32", progress=False)
    other = dataclasses.replace(tiny_model, weights="0123456789abcdef")
    with pytest.raises(StoreMismatchError, match="another model or its weights"):
        extract_activations(other, images, tmp_path, batch_size=2, dtype="float32", progress=False)
    meta = json.loads((tmp_path / "store.json").read_text())
    del meta["spec"]["weights"]
    meta["done"] = 2  # written before the field existed, and cut off halfway
    (tmp_path / "store.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="before stores recorded the weights"):
        store = extract_activations(tiny_model, images, tmp_path, batch_size=2, dtype="float32", progress=False)
    assert store.complete and store.spec.weights == tiny_model.weights
