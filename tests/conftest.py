"""Shared fixtures: a tiny random LLaVA checkpoint on disk, loaded once per test session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from PIL import Image

import mllm
from mllm.tiny import TinyLlavaConfig, build_tiny_llava
from mllm.tiny_qwen import build_tiny_qwen


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), TinyLlavaConfig())


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint) -> mllm.MLLM:
    return mllm.load(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_model_eager(tiny_checkpoint) -> mllm.MLLM:
    return mllm.load(tiny_checkpoint, device="cpu", dtype="float32", attn_implementation="eager")


@pytest.fixture(scope="session", params=("qwen2_vl", "qwen2_5_vl"))
def qwen_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Qwen2-VL, then Qwen2.5-VL checkpoint on disk (tests that take it run for both)."""
    return build_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def qwen(qwen_checkpoint) -> mllm.MLLM:
    return mllm.load(qwen_checkpoint, device="cpu", dtype="float32")


def random_image(seed: int, height: int = 32, width: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def images() -> list[Image.Image]:
    """Four images of different shapes (so the frame matters)."""
    return [random_image(seed, 32 + 4 * seed, 32 + 2 * (3 - seed)) for seed in range(4)]


PROMPTS = ["hi", "what is this thing?", "a", "where is the red circle left of the cross?"]


@pytest.fixture(scope="session")
def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


# The analysis CLIs on tiny checkpoints: few bootstrap resamples, small batches, no progress bars.
QUICK_CLI = ("--no-progress", "--bootstrap", "50", "--batch-size", "3")


def run_cli(main, *args: object) -> int:
    return main([*map(str, args), *QUICK_CLI])


@pytest.fixture(scope="session")
def next_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random LLaVA-NeXT checkpoint (`mllm.tiny.build_tiny_llava_next`)."""
    from mllm.tiny import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("llava-next"))


@pytest.fixture(scope="session")
def rec_data(tmp_path_factory: pytest.TempPathFactory):
    """Six REC samples in the JSONL layout the CLIs read (`grounding.fixtures`)."""
    from grounding.fixtures import write_jsonl_layout

    return write_jsonl_layout(tmp_path_factory.mktemp("rec"), count=6)

