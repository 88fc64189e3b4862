"""Load a multimodal checkpoint from a local directory (or the local Hugging Face cache), offline."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel, ProcessorMixin

from mllm.adapters import ModelAdapter, adapter_class_for
from mllm.encoding import Encoding, encode, encode_pixels
from mllm.errors import CheckpointNotFoundError
from mllm.generation import Generation, generate
from mllm.images import ImageFrame
from mllm.prompts import build_prompt

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK's, under torchrun / accelerate), else the CPU."""
    if str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # More processes than GPUs (LOCAL_RANK past the count) share them in turn.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def _checkpoint_directory(path_or_name: str | os.PathLike) -> Path:
    """A local directory, or a model name already in the local Hugging Face cache."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(f"{path / 'config.json'}: not found; {path} is not a checkpoint "
                                          "directory (expected config.json, weights, tokenizer, processor)")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_name), local_files_only=True))
    except Exception as error:
        raise CheckpointNotFoundError(
            f"checkpoint not found: {path_or_name} is not a directory and is not in the local "
            "Hugging Face cache (the toolkit never downloads; copy the checkpoint to disk)"
        ) from error


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WINDOW_BYTES = 1 << 20


def weights_fingerprint(directory: str | os.PathLike) -> str:
    """16 hex digits that change when a checkpoint directory's weights do, read in well under a second.

    Each weight file's name, size and three 1 MiB windows (start, middle, end) are hashed, not the whole
    file: a retrained or re-saved checkpoint differs in all of them, and a 7B checkpoint reads in milliseconds.
    A run directory records it, so results of one checkpoint are never resumed under another at the same path.
    """
    digest = hashlib.sha256()
    files = sorted(path for path in Path(directory).rglob("*") if path.is_file() and path.suffix in WEIGHT_SUFFIXES)
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(directory).as_posix()}\0{size}\0".encode())
        with path.open("rb") as handle:
            for start in sorted({0, max(0, size // 2 - WINDOW_BYTES // 2), max(0, size - WINDOW_BYTES)}):
                handle.seek(start)
                digest.update(handle.read(WINDOW_BYTES))
    return digest.hexdigest()[:16]


@dataclass
class MLLM:
    """A loaded multimodal LLM: the transformers model (never modified), its processor and adapter."""

    model: PreTrainedModel
    processor: ProcessorMixin
    adapter: ModelAdapter
    path: Path
    weights: str = ""  # `weights_fingerprint(path)`, or "random" for a model built with random weights

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def grid(self) -> tuple[int, int]:
        return self.adapter.grid

    @property
    def num_visual_tokens(self) -> int:
        return self.adapter.num_visual_tokens

    @property
    def fixed_grid(self) -> tuple[int, int] | None:
        """The grid every image is encoded to, or None where it depends on the image (native resolution)."""
        return self.adapter.fixed_grid

    def prompt(self, text: str) -> str:
        """The model's prompt for one user message about one image."""
        return build_prompt(self.processor, text)

    def encode(self, images: Any, texts: Any, **options: Any) -> Encoding:
        """`mllm.encode(self, ...)`."""
        return encode(self, images, texts, **options)

    def encode_pixels(self, images: Any, **options: Any) -> tuple[torch.Tensor, list[ImageFrame]]:
        """`mllm.encode_pixels(self, ...)`."""
        return encode_pixels(self, images, **options)

    def generate(self, encoding: Encoding, **options: Any) -> Generation:
        """`mllm.generate(self, ...)`."""
        return generate(self, encoding, **options)


def load(
    path_or_name: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    random_weights: bool = False,
) -> MLLM:
    """Load a checkpoint offline. Raises `CheckpointNotFoundError` or `UnsupportedModelError`.

    `min_pixels` / `max_pixels` bound the resized image of a native-resolution model (Qwen2-VL): each
    image is resized to between that many pixels, as the checkpoint's processor does with its defaults.
    `random_weights` builds the model its config describes on the device, randomly initialised, without
    reading weights (what a timing needs: `benchmarks/pruned_inference.py` at 7B size).
    """
    directory = _checkpoint_directory(path_or_name)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    adapter_class = adapter_class_for(config, source=str(directory / "config.json"))
    adapter_class.check_config(config, source=str(directory / "config.json"))
    processor = adapter_class.load_processor(directory, min_pixels, max_pixels)  # before the slow weights
    processor.tokenizer.padding_side = "left"  # batched generation pads on the left
    target = resolve_device(device)
    if random_weights:
        with torch.device(target):
            model = adapter_class.model_class._from_config(config, dtype=resolve_dtype(dtype, target),
                                                            attn_implementation=attn_implementation)
    else:
        model = adapter_class.model_class.from_pretrained(
            directory,
            config=config,
            dtype=resolve_dtype(dtype, target),
            attn_implementation=attn_implementation,
            local_files_only=True,
        )
    model = model.to(target).eval()
    weights = "random" if random_weights else weights_fingerprint(directory)
    return MLLM(model=model, processor=processor, adapter=adapter_class(model), path=directory, weights=weights)
