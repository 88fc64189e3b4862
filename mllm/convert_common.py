"""What every converter shares: the error that names the file and field, lazy checkpoint weights, config checks,
and the output directory written beside its place and renamed into it only once complete."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file and the field or tensor."""


class Weights:
    """The tensors of a Hugging Face checkpoint directory (safetensors or PyTorch .bin, sharded or not), read lazily."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: dict[str, Path] = {}
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = directory / index_name
            if index.is_file():
                mapping = json.loads(index.read_text())["weight_map"]
                self.files = {key: directory / name for key, name in mapping.items()}
                break
            if (directory / single).is_file():
                self.files = {key: directory / single for key in self._keys_of(directory / single)}
                break
        if not self.files:
            raise ConversionError(f"{directory}: no model.safetensors or pytorch_model.bin (nor their index.json)")
        self._open: dict[Path, object] = {}

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as handle:
                return list(handle.keys())
        return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self.files[key]
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as handle:
                return handle.get_tensor(key)
        if path not in self._open:  # memory-mapped: a shard costs address space, not memory
            self._open = {path: torch.load(path, map_location="cpu", weights_only=True, mmap=True)}
        if key not in self._open[path]:
            raise ConversionError(f"{path}: has no tensor {key!r}, though the checkpoint's index puts it there")
        return self._open[path][key]

    def file_of(self, key: str) -> str:
        return str(self.files[key])


def read_config(directory: Path, name: str) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: not found; --{name} must be a checkpoint directory")
    return json.loads(path.read_text())


def require(config: dict, path: Path, field: str, wanted: object, why: str) -> None:
    if config.get(field) != wanted:
        raise ConversionError(f"{path}: field '{field}' is {config.get(field)!r}, expected {wanted!r} ({why})")


def check_state(state: dict[str, torch.Tensor], model_class: type, config: object, *, vision_source: Path,
                other_source: Path, extra_source: Path) -> None:
    """Refuse `state` unless it holds exactly the tensors `model_class(config)` has, in its shapes: a missing one
    named with the file it should come from (`vision_source` for the tower's, `other_source` for the rest)."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {key: value.shape for key, value in model_class(config).state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            source = vision_source if key.startswith("model.vision_tower.") else other_source
            raise ConversionError(f"{source}: no tensor for {key!r}")
        if tuple(state[key].shape) != tuple(shape):
            raise ConversionError(f"{key}: shape {tuple(state[key].shape)}, the architecture needs {tuple(shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ConversionError(f"{extra_source}: tensor {extra[0]!r} has no place in the architecture")


def write_checkpoint(out: Path, write: Callable[[Path], None]) -> Path:
    """`write` into a directory beside `out`, renamed to `out` once it returns; nothing is left behind otherwise."""
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        partial.mkdir(parents=True)
        write(partial)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out
