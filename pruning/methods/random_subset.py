"""`random`: a uniformly random subset of the visual tokens, the same draw for every image of a run."""

from __future__ import annotations

import torch

import mllm
from pruning.registry import Selection, VisionPruning, register_method


@register_method
class RandomPruning(VisionPruning):
    """Keeps a seeded random subset, emitted in raster order."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def select(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int) -> Selection:
        generator = torch.Generator().manual_seed(self.seed)
        kept = torch.randperm(encoding.num_visual, generator=generator)[:num_kept].sort().values
        return Selection(kept.expand(encoding.batch_size, -1))
