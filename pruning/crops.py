"""Pruning visual tokens that are several crops with newline tokens (LLaVA-NeXT): the crop rule.

LLaVA-NeXT feeds a base crop and an unpadded tile canvas with an `image_newline` token after each canvas
row (`mllm.visual_tokens`). A method never sees that layout: it selects on a *crop view*, the batch as if
the image had fed one crop's tokens in raster order over that crop's grid, so a method that selects from
what the LLM is fed (`random`, `spatial`, `text-visual`, your own) runs unchanged, and so does `cls-visual`:
the view carries each token's CLS attention from its own crop's tower pass. Methods that merge by the tower's
hidden states, and in-LLM methods, are not implemented for crops yet.
The newline tokens are never a method's: the rule decides them afterwards.
Two documented choices, where pruning code for LLaVA-NeXT disagrees:

- `newlines`: `keep` feeds every newline (LLaVA-NeXT's own layout, rows left empty included); `row` feeds
  the newline of each canvas row that keeps a token (HoliTom's re-insertion); `drop` feeds none (what
  VisionZip, CDPruner and VisPruner feed).
- `scope`: `per-crop` splits the budget over the crops in proportion to their tokens and selects on each
  crop alone (as VisionZip compresses each crop); `all` shows the method every crop's tokens at once, one
  budget over them all (a method that needs one grid, such as `spatial`, refuses it by name).

The budget counts every token fed, newlines included: under `row` the method's share is the largest count
bisection finds whose tokens and their rows' newlines fit (one token at the least, with its newline if it has one). A
newline is fed after the token, among those the method emitted before it in raster order, that it emitted
last (raster order stays raster order).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import mllm
from mllm.visual_tokens import NEWLINE, TILE, VisualTokens
from pruning.registry import Selection, VisionPruning, method_spec

NEWLINE_RULES = ("keep", "row", "drop")
BUDGET_SCOPES = ("per-crop", "all")


@dataclass(frozen=True)
class CropRule:
    """How a method's budget and the newline tokens are dealt with on visual tokens of several crops."""

    newlines: str = "row"
    scope: str = "per-crop"

    def __post_init__(self) -> None:
        if self.newlines not in NEWLINE_RULES:
            raise ValueError(f"newline rule {self.newlines!r}: choose one of {', '.join(NEWLINE_RULES)}")
        if self.scope not in BUDGET_SCOPES:
            raise ValueError(f"budget scope {self.scope!r}: choose one of {', '.join(BUDGET_SCOPES)}")

    def config(self) -> dict[str, str]:
        """What a run's config records of the rule."""
        return {"newlines": self.newlines, "budget_scope": self.scope}


def crop_view(encoding: mllm.Encoding, tokens: torch.Tensor, grid: tuple[int, int] | None) -> mllm.Encoding:
    """`encoding` as if each row's image had fed only its visual tokens `tokens` (span indices, the same for
    every row), in that order, over `grid` (None: no one grid). Text and padding are untouched."""
    count = encoding.num_visual
    length = encoding.input_ids.shape[1]
    index = torch.stack([torch.cat([torch.arange(start), start + tokens.cpu(), torch.arange(start + count, length)])
                         for start in encoding.visual_start.tolist()])
    rows = torch.arange(encoding.batch_size)[:, None]
    source = encoding.visual_tokens[0]
    shown = (VisualTokens.raster(*grid) if grid is not None else
             VisualTokens(source.kind[tokens], source.crop[tokens], source.row[tokens], source.col[tokens],
                          source.grids))
    layouts = [mllm.VisualLayout(layout.prefix_len, layout.suffix_len, layout.visual_ids[:, tokens])
               for layout in encoding.layouts]
    attentions = None
    if encoding.vision_attentions:  # each token's CLS attention from its own tower pass (crop): a CLS row per view
        passes, patches = source.tower_pass[tokens.cpu()], source.tower_patch[tokens.cpu()]
        attentions = {}
        for layer, per_image in encoding.vision_attentions.items():
            cls_rows = []
            for image in per_image:  # (passes, H, T, T)
                picked = image[:, :, 0, 1:][passes, :, patches]  # (n, H): pass p's CLS query on its patch
                cls_rows.append(torch.cat([picked.new_zeros(1, picked.shape[1]), picked]).T[:, None, :])
            attentions[layer] = torch.stack(cls_rows)  # (B, H, 1, 1 + n): only the CLS query's row

    device = encoding.input_ids.device
    return dataclasses.replace(
        encoding, input_ids=encoding.input_ids[rows.to(device), index.to(device)],
        attention_mask=encoding.attention_mask[rows.to(device), index.to(device)],
        inputs_embeds=encoding.inputs_embeds[rows.to(encoding.inputs_embeds.device),
                                             index.to(encoding.inputs_embeds.device)],
        position_ids=encoding.position_ids[:, rows.to(device), index.to(device)],
        visual_counts=[len(tokens)] * encoding.batch_size, grids=[grid] * encoding.batch_size,
        layouts=layouts, visual_tokens=[shown] * encoding.batch_size,
        vision_hidden_states=None, vision_attentions=attentions)


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """`total` split over parts of `sizes` tokens in proportion to them (largest remainders), none over its size."""
    exact = [total * size / sum(sizes) for size in sizes]
    shares = [min(int(value), size) for value, size in zip(exact, sizes)]
    for part in sorted(range(len(sizes)), key=lambda part: shares[part] - exact[part]):
        if sum(shares) >= total:
            break
        if shares[part] < sizes[part]:
            shares[part] += 1
    return shares


def place_newlines(kept: torch.Tensor, newlines: torch.Tensor) -> torch.Tensor:
    """`kept` (emission order) with each of `newlines` (span indices) after the last-emitted kept token that
    precedes it in raster order, or first when none does."""
    order = kept.tolist()
    for newline in sorted(newlines.tolist(), reverse=True):  # the later newline first: ties keep raster order
        before = [slot for slot, index in enumerate(order) if index < newline]
        order.insert(max(before) + 1 if before else 0, newline)
    return torch.tensor(order, dtype=torch.long)


class CropSelector:
    """A method's selection on one batch whose rows share one token map of several crops, under `rule`."""

    def __init__(self, model: mllm.MLLM, encoding: mllm.Encoding, method: VisionPruning, rule: CropRule) -> None:
        self.model, self.encoding, self.method, self.rule = model, encoding, method, rule
        self.tokens = encoding.visual_tokens[0]
        content = self.tokens.kind != NEWLINE
        self.crops = [torch.nonzero(content & (self.tokens.crop == crop)).flatten()
                      for crop in range(len(self.tokens.grids))]
        self.newline_of_row = {int(self.tokens.row[index]): int(index)
                               for index in torch.nonzero(self.tokens.kind == NEWLINE).flatten()}

    def select(self, num_fed: int) -> Selection:
        """The kept tokens (newlines placed by the rule) of at most `num_fed` fed, as few over as the rule
        allows (`keep` feeds every newline however small the budget)."""
        newlines = len(self.newline_of_row)
        if self.rule.newlines == "drop":
            return self._with_newlines(self._content(num_fed))
        if self.rule.newlines == "keep":
            return self._with_newlines(self._content(max(1, num_fed - newlines)))
        low, high = max(1, num_fed - newlines), num_fed  # `low` always fits: at most one newline per row
        best = self._with_newlines(self._content(low))
        while low < high:  # the largest share that fits with its rows' newlines
            middle = (low + high + 1) // 2
            candidate = self._with_newlines(self._content(middle))
            if max(len(row) for row in candidate.kept) <= num_fed:
                low, best = middle, candidate
            else:
                high = middle - 1
        return best

    def _content(self, count: int) -> Selection:
        """The method's selection of `count` content tokens (span indices) under the rule's scope."""
        count = min(count, sum(len(crop) for crop in self.crops))
        if self.rule.scope == "all":
            tokens = torch.cat(self.crops)
            view = crop_view(self.encoding, tokens, None)
            try:
                return _in_span(self.method.select(self.model, view, count), tokens)
            except mllm.KeepSetError as error:
                raise ValueError(f"{method_spec(self.method)!r} with budget scope 'all' sees every crop's tokens "
                                 f"at once, not one grid ({error}); use budget scope 'per-crop'") from None
        parts = []
        shares = split_budget(count, [len(crop) for crop in self.crops])
        for tokens, grid, share in zip(self.crops, self.tokens.grids, shares):
            if share:
                parts.append(_in_span(self.method.select(self.model, crop_view(self.encoding, tokens, grid), share),
                                      tokens))
        return _joined(parts)

    def _with_newlines(self, selection: Selection) -> Selection:
        if self.rule.newlines == "drop":
            return selection
        kept = []
        for row in selection.kept:
            if self.rule.newlines == "keep":
                rows = sorted(self.newline_of_row)
            else:
                tiles = row[self.tokens.kind[row.cpu()] == TILE].cpu()
                rows = sorted(set(self.tokens.row[tiles].tolist()))
            kept.append(place_newlines(row.cpu(), torch.tensor([self.newline_of_row[r] for r in rows],
                                                               dtype=torch.long)))
        return dataclasses.replace(selection, kept=kept)


def _in_span(selection: Selection, tokens: torch.Tensor) -> Selection:
    """A view's selection with its indices (and extra tokens' anchors) as span indices."""
    if selection.features is not None:
        raise NotImplementedError("a method that merges tokens on a view of crops: not supported yet (its merged "
                                  "features would need re-placing around the newlines)")
    tokens = tokens.cpu()
    kept = [tokens[row.cpu()] for row in selection.kept]
    anchors = None if selection.extra_anchors is None else tokens[selection.extra_anchors.cpu()]
    return dataclasses.replace(selection, kept=kept, extra_anchors=anchors)


def _joined(parts: list[Selection]) -> Selection:
    """The crops' selections as one, crop after crop."""
    rows = len(parts[0].kept)
    kept = [torch.cat([part.kept[row] for part in parts]) for row in range(rows)]
    extras = [part for part in parts if part.extra is not None]
    extra = torch.cat([part.extra for part in extras], dim=1) if extras else None
    anchors = torch.cat([part.extra_anchors for part in extras], dim=1) if extras else None
    return Selection(kept, None, extra, anchors)
