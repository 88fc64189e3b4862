"""Run a pruning method on an encoded batch and generate, numbering the kept tokens by a position policy.

The three position policies a pruning run compares:

- ``reassign``: the kept tokens, in the order the method emits them, renumbered consecutively (what
  pruning methods do today; PruMerge, for one, emits in score order);
- ``reassign-raster``: the same tokens sorted back into raster order, then renumbered;
- ``keep`` (GAP): raster order, every kept token at its original position ID.

Merged tokens sit at their host's position (see `pruning.registry.Selection`).
"""

from __future__ import annotations

import dataclasses

import torch

import mllm
from pruning.budget import Budget
from pruning.registry import LayerPruningMethod, PruningMethod, Selection, VisionPruning, make_method

POSITIONS = ("reassign", "reassign-raster", "keep")


def mllm_policy(positions: str) -> str:
    if positions not in POSITIONS:
        raise ValueError(f"unknown position policy {positions!r}; choose one of {', '.join(POSITIONS)}")
    return "keep" if positions == "keep" else "reassign"


def check_selection(selection: Selection, encoding: mllm.Encoding, method: PruningMethod) -> None:
    kept = selection.kept
    if kept.ndim != 2 or kept.shape[0] != encoding.batch_size:
        raise mllm.KeepSetError(f"{method!r} returned kept indices of shape {tuple(kept.shape)}; "
                                f"need (batch={encoding.batch_size}, n_keep)")
    if selection.features is not None and selection.features.shape[:2] != kept.shape:
        raise mllm.KeepSetError(f"{method!r} returned features of shape {tuple(selection.features.shape)} for "
                                f"kept indices of shape {tuple(kept.shape)}")


def with_merged_features(encoding: mllm.Encoding, selection: Selection) -> mllm.Encoding:
    """A copy of `encoding` whose kept visual tokens carry the method's merged features."""
    if selection.features is None:
        return encoding
    embeds = encoding.inputs_embeds.clone()
    rows = torch.arange(encoding.batch_size, device=embeds.device)[:, None]
    slots = encoding.visual_start.to(embeds.device)[:, None] + selection.kept.to(embeds.device)
    embeds[rows, slots] = selection.features.to(embeds.dtype)
    return dataclasses.replace(encoding, inputs_embeds=embeds)


def prune_generate(model: mllm.MLLM, encoding: mllm.Encoding, method: PruningMethod | str, budget: Budget | str,
                   positions: str = "keep", **generate_options: object) -> mllm.Generation:
    """Prune `encoding`'s visual tokens with `method` to `budget`, number them by `positions`, generate.

    `encoding` must carry what the method reads (`method.encode_options(model)` passed to `encode`).
    """
    method = make_method(method)
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    policy = mllm_policy(positions)
    num_kept = budget.num_kept(encoding.num_visual)
    if isinstance(method, LayerPruningMethod):
        pruning = method.layer_pruning(model, encoding, num_kept, policy)
        return mllm.generate(model, encoding, layer_pruning=pruning, **generate_options)
    if not isinstance(method, VisionPruning):
        raise TypeError(f"{method!r} is neither a VisionPruning nor a LayerPruningMethod")
    selection = method.select(model, encoding, num_kept)
    check_selection(selection, encoding, method)
    # Merged features are written into their hosts' slots, so reordering the kept indices carries them along.
    kept = selection.kept if positions == "reassign" else selection.kept.sort(dim=1).values
    return mllm.generate(model, with_merged_features(encoding, selection), keep=kept, policy=policy,
                         **generate_options)
