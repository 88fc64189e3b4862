"""Run a pruning method on an encoded batch and generate, numbering the kept tokens by a position policy.

The three position policies a pruning run compares:

- ``reassign``: the kept tokens, in the order the method emits them, renumbered consecutively (what
  pruning methods do today; PruMerge, for one, emits in score order);
- ``reassign-raster``: the same tokens sorted back into raster order, then renumbered;
- ``keep`` (GAP): raster order, every kept token at its original position ID;
- ``compact``: raster order, the kept tokens at the image's first raster slots' IDs, text renumbered after
  them (what ports that slice Qwen2-VL's precomputed M-RoPE IDs to the kept count do; ``reassign`` for LLaVA).

Merged tokens sit at their host's position (see `pruning.registry.Selection`). Visual tokens of several
crops with newline tokens (LLaVA-NeXT) are selected crop by crop under a `pruning.crops.CropRule`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import mllm
from pruning.budget import Budget
from pruning.crops import CropRule, CropSelector
from pruning.registry import LayerPruningMethod, PruningMethod, Selection, VisionPruning, make_method, method_spec

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


def select_tokens(model: mllm.MLLM, encoding: mllm.Encoding, method: VisionPruning, budget: Budget,
                  crops: CropRule | None = None) -> Selection:
    """`method`'s checked selection at `budget` on a batch of one token map: one grid, or several crops with
    newlines, selected under `crops` (default `CropRule()`)."""
    num_fed = budget.num_kept(encoding.num_visual)
    with torch.no_grad():
        if encoding.grids[0] is None:
            selection = CropSelector(model, encoding, method, crops or CropRule()).select(num_fed)
        else:
            selection = method.select(model, encoding, num_fed)
    check_selection(selection, encoding, method)
    return selection


class BatchSelections:
    """Each (method, budget)'s selection on the batch at hand, made once: a sweep's runs that differ only in
    their position policy, and the keys that tell which of them feed the LLM the same tokens, share it."""

    def __init__(self) -> None:
        self._encoding: mllm.Encoding | None = None
        self._selections: dict[tuple[str, str], Selection] = {}

    def __call__(self, model: mllm.MLLM, encoding: mllm.Encoding, method: VisionPruning,
                 budget: Budget, crops: CropRule | None = None) -> Selection:
        if encoding is not self._encoding:  # a new batch: the old selections are of no use
            self._encoding, self._selections = encoding, {}
        key = (method_spec(method), str(budget), crops)
        if key not in self._selections:
            self._selections[key] = select_tokens(model, encoding, method, budget, crops)
        return self._selections[key]


def feed_order(selection: Selection, positions: str) -> list[torch.Tensor]:
    """Per row, the kept indices in the order they are fed: as emitted under reassign, else raster order.

    Merged features are written into their hosts' slots, so reordering the kept indices carries them along.
    """
    return [row.cpu() if positions == "reassign" else row.sort().values.cpu() for row in selection.kept]


@dataclass
class Feed:
    """What a pruned run feeds the LLM on a batch: `mllm.generate`'s encoding (merged features written in),
    kept tokens in feed order, position policy and extra tokens."""

    encoding: mllm.Encoding
    keep: list[torch.Tensor] | None
    policy: str
    extra: mllm.ExtraTokens | None = None


def pruned_feed(model: mllm.MLLM, encoding: mllm.Encoding, method: VisionPruning, budget: Budget, positions: str,
                *, selections: BatchSelections | None = None, crops: CropRule | None = None) -> Feed:
    """`method`'s selection on a batch of one token map at `budget`, laid out for the LLM under `positions`."""
    selection = (selections or select_tokens)(model, encoding, method, budget, crops)
    extra = None
    if selection.extra is not None:
        extra = mllm.ExtraTokens(selection.extra, selection.extra_anchors)
    return Feed(with_merged_features(encoding, selection), feed_order(selection, positions), mllm_policy(positions),
                extra)


def prune_generate(model: mllm.MLLM, encoding: mllm.Encoding, method: PruningMethod | str, budget: Budget | str,
                   positions: str = "keep", *, selections: BatchSelections | None = None,
                   crops: CropRule | None = None, **generate_options: object) -> mllm.Generation:
    """Prune `encoding`'s visual tokens with `method` to `budget`, number them by `positions`, generate.

    `encoding` must carry what the method reads (`method.encode_options(model)` passed to `encode`).
    `selections` lets runs on the same batch share a pre-LLM method's selection. `crops` says how visual
    tokens of several crops with newlines are pruned (`pruning.crops`; ignored on one grid).
    """
    method = make_method(method)
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    policy = mllm_policy(positions)
    groups = layout_groups(encoding)
    if len(groups) > 1:  # native-resolution or tiled images: each token map a batch of its own, on its own count
        parts = [(rows, prune_generate(model, encoding.subset(rows), method, budget, positions, crops=crops,
                                       **generate_options)) for rows in groups]
        return mllm.merge_generations(parts, encoding.batch_size)
    if isinstance(method, LayerPruningMethod):
        if encoding.grids[0] is None:
            raise ValueError(f"{NOT_ON_CROPS}: {method_spec(method)!r} prunes inside the LLM")
        pruning = method.layer_pruning(model, encoding, budget.num_kept(encoding.num_visual), policy)
        return mllm.generate(model, encoding, layer_pruning=pruning, **generate_options)
    if not isinstance(method, VisionPruning):
        raise TypeError(f"{method!r} is neither a VisionPruning nor a LayerPruningMethod")
    feed = pruned_feed(model, encoding, method, budget, positions, selections=selections, crops=crops)
    return mllm.generate(model, feed.encoding, keep=feed.keep, policy=feed.policy, extra=feed.extra,
                         **generate_options)


# Why an in-LLM method, or one that merges by the tower's hidden states, cannot prune several crops yet.
NOT_ON_CROPS = ("visual tokens of several crops with newlines (LLaVA-NeXT) are pruned by methods that select "
                "before the LLM from what it is fed or from the CLS attention (random, spatial, text-visual, "
                "cls-visual, your own); in-LLM methods and methods merging by the vision tower's hidden states "
                "are not implemented for them yet")


def layout_groups(encoding: mllm.Encoding) -> list[list[int]]:
    """The batch's rows grouped by their visual tokens' map (grid, or crops), in order of first appearance."""
    groups: dict[object, list[int]] = {}
    for row, grid in enumerate(encoding.grids):
        key = grid if grid is not None else encoding.visual_tokens[row].grids
        groups.setdefault(key, []).append(row)
    return list(groups.values())
