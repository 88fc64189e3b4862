"""Run a pruning method on an encoded batch and generate, numbering the kept tokens by a position policy.

The three position policies a pruning run compares:

- ``reassign``: the kept tokens, in the order the method emits them, renumbered consecutively (what
  pruning methods do today; PruMerge, for one, emits in score order);
- ``reassign-raster``: the same tokens sorted back into raster order, then renumbered;
- ``keep`` (GAP): raster order, every kept token at its original position ID;
- ``compact``: raster order, the kept tokens at the image's first raster slots' IDs, text renumbered after
  them (what ports that slice Qwen2-VL's precomputed M-RoPE IDs to the kept count do; ``reassign`` for LLaVA).

Merged tokens sit at their host's position (see `pruning.registry.Selection`).
"""

from __future__ import annotations

import dataclasses

import torch

import mllm
from pruning.budget import Budget
from pruning.registry import LayerPruningMethod, PruningMethod, Selection, VisionPruning, make_method

POSITIONS = ("reassign", "reassign-raster", "keep", "compact")


def mllm_policy(positions: str) -> str:
    if positions not in POSITIONS:
        raise ValueError(f"unknown position policy {positions!r}; choose one of {', '.join(POSITIONS)}")
    return positions if positions in ("keep", "compact") else "reassign"


def check_selection(selection: Selection, encoding: mllm.Encoding, method: PruningMethod) -> None:
    if len(selection.kept) != encoding.batch_size:
        raise mllm.KeepSetError(f"{method!r} returned keep sets for {len(selection.kept)} rows; the batch has "
                                f"{encoding.batch_size}")
    for row, (kept, features) in enumerate(selection.rows()):
        if kept.ndim != 1:
            raise mllm.KeepSetError(f"{method!r} returned a keep set of shape {tuple(kept.shape)} for row {row}")
        if features is not None and features.shape[0] != kept.shape[0]:
            raise mllm.KeepSetError(f"{method!r} returned {features.shape[0]} merged features for {kept.shape[0]} "
                                    f"kept tokens in row {row}")
    if (selection.extra is None) != (selection.extra_anchors is None):
        raise mllm.KeepSetError(f"{method!r} returned extra tokens without anchors, or anchors without tokens")


def with_merged_features(encoding: mllm.Encoding, selection: Selection) -> mllm.Encoding:
    """A copy of `encoding` whose kept visual tokens carry the method's merged features."""
    if selection.features is None:
        return encoding
    embeds = encoding.inputs_embeds.clone()
    for row, (kept, features) in enumerate(selection.rows()):
        slots = int(encoding.visual_start[row]) + kept.to(embeds.device)
        embeds[row, slots] = features.to(embeds.dtype)
    return dataclasses.replace(encoding, inputs_embeds=embeds)


def prune_generate(model: mllm.MLLM, encoding: mllm.Encoding, method: PruningMethod | str, budget: Budget | str,
                   positions: str = "keep", **generate_options: object) -> mllm.Generation:
    """Prune `encoding`'s visual tokens with `method` to `budget`, number them by `positions`, generate.

    `encoding` must carry what the method reads (`method.encode_options(model)` passed to `encode`).
    """
    method = make_method(method)
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    policy = mllm_policy(positions)
    groups: dict[tuple[int, int], list[int]] = {}
    for row, grid in enumerate(encoding.grids):
        groups.setdefault(grid, []).append(row)
    if len(groups) > 1:  # native-resolution images: each grid is a batch of its own, budgeted on its own count
        parts = [(rows, prune_generate(model, encoding.subset(rows), method, budget, positions, **generate_options))
                 for rows in groups.values()]
        return mllm.merge_generations(parts, encoding.batch_size)
    num_kept = budget.num_kept(encoding.num_visual)
    if isinstance(method, LayerPruningMethod):
        pruning = method.layer_pruning(model, encoding, num_kept, policy)
        return mllm.generate(model, encoding, layer_pruning=pruning, **generate_options)
    if not isinstance(method, VisionPruning):
        raise TypeError(f"{method!r} is neither a VisionPruning nor a LayerPruningMethod")
    with torch.no_grad():
        selection = method.select(model, encoding, num_kept)
    check_selection(selection, encoding, method)
    # Merged features are written into their hosts' slots, so reordering the kept indices carries them along.
    kept = [row.cpu() if positions == "reassign" else row.sort().values.cpu() for row in selection.kept]
    extra = None
    if selection.extra is not None:
        extra = mllm.ExtraTokens(selection.extra, selection.extra_anchors)
    return mllm.generate(model, with_merged_features(encoding, selection), keep=kept, policy=policy, extra=extra,
                         **generate_options)
