"""The position-ID policy: which RoPE position each token of a (possibly pruned) prompt receives.

Every analysis in the toolkit goes through `position_ids`. A prompt is laid out as
`prefix text | N visual tokens | suffix text` (`VisualLayout`), and each token's original ID may have
several axes: one for LLaVA (the visual tokens numbered on after the prefix), three for Qwen2-VL's
M-RoPE (t, h, w: the prefix length on t, and the prefix length plus each token's grid row on h, plus
its column on w; the suffix continues at the largest visual ID + 1 on every axis). `kept` lists which
visual tokens are fed to the LLM and in which order (indices 0..N-1 into the original visual tokens,
in raster order). The policies:

- ``reassign``: consecutive renumbering 0..L'-1, the same value on every axis (what pruning methods,
  and 1-D ports of them to Qwen, do).
- ``keep`` (GAP): every kept visual token and every text token keeps its original IDs on every axis.
- ``compact``: the n fed visual tokens take the image's first n raster slots (their original IDs),
  and the suffix is renumbered from the largest of those + 1 (what ports that slice the image's
  precomputed IDs to the kept count do). With one axis this is ``reassign``.
- ``permute``: like ``keep``, then the IDs of a ``fraction`` of the kept visual tokens are shuffled
  among themselves (within consecutive ``window``s of kept tokens when a window is given); with
  ``axis`` only that axis's values are shuffled.
- ``shift``: like ``keep``, then visual IDs move by ``offset`` (on ``axis`` alone when given); with
  ``start`` only the visual tokens whose original index is >= ``start`` move (the "pruning-style" shift
  of the tokens after a span).
- ``transpose``: like ``keep``, with the h and w axes of the visual IDs swapped (M-RoPE only).

Text IDs are never changed by ``permute``, ``shift`` or ``transpose``; a shift may make visual IDs
overlap text IDs or go below the prefix, which is the point of the ablation. Decoding continues from
the IDs of the last prompt token + 1 on every axis (`next_position_ids`); prompts end in text, whose
IDs are then the largest under ``keep``, ``reassign`` and ``compact``, as transformers continues.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from mllm.errors import KeepSetError

PolicyKind = Literal["reassign", "keep", "compact", "permute", "shift", "transpose"]
POLICY_KINDS: tuple[str, ...] = ("reassign", "keep", "compact", "permute", "shift", "transpose")


@dataclass(frozen=True)
class PositionPolicy:
    """A position-ID policy and its knobs. `PositionPolicy.parse("shift:offset=-8,start=100")`."""

    kind: PolicyKind = "keep"
    offset: int = 0
    start: int = 0
    fraction: float = 1.0
    window: int | None = None
    seed: int = 0
    axis: int | None = None  # permute / shift one axis of multi-axis IDs only (0: t, 1: h, 2: w)

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"unknown position policy {self.kind!r}; choose one of {POLICY_KINDS}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"position policy field 'fraction' must lie in [0, 1], got {self.fraction}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"position policy field 'window' must be >= 1, got {self.window}")
        if self.axis is not None and (self.axis < 0 or self.kind not in ("permute", "shift")):
            raise ValueError(f"position policy field 'axis' ({self.axis}) needs kind permute or shift and a "
                             f"non-negative axis; got kind {self.kind!r}")

    @classmethod
    def parse(cls, spec: str | PositionPolicy) -> PositionPolicy:
        """Read `kind[:name=value,...]`, e.g. `keep`, `permute:fraction=0.5,seed=3`, `shift:offset=2,axis=2`."""
        if isinstance(spec, PositionPolicy):
            return spec
        kind, _, arguments = spec.strip().partition(":")
        names = [field.name for field in fields(cls) if field.name != "kind"]
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in arguments.split(","))):
            name, sep, raw = item.partition("=")
            if not sep or name not in names:
                raise ValueError(f"bad field {item!r} in position policy {spec!r}; fields: {', '.join(names)}")
            try:
                values[name] = float(raw) if name == "fraction" else int(raw)
            except ValueError:
                raise ValueError(f"position policy {spec!r}: field {name!r} needs a number, got {raw!r}") from None
        return cls(kind=kind, **values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        defaults = PositionPolicy(kind=self.kind)
        changed = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                   if f.name != "kind" and getattr(self, f.name) != getattr(defaults, f.name)]
        return self.kind + (":" + ",".join(changed) if changed else "")


@dataclass(frozen=True)
class VisualLayout:
    """One prompt as `prefix | N visual tokens | suffix`, and the visual tokens' original IDs."""

    prefix_len: int
    suffix_len: int
    visual_ids: torch.Tensor  # (axes, N) original position IDs of the visual tokens, in raster order

    @classmethod
    def sequential(cls, prefix_len: int, num_visual: int, suffix_len: int) -> VisualLayout:
        """One axis, the visual tokens numbered on after the prefix (LLaVA)."""
        return cls(prefix_len, suffix_len, (prefix_len + torch.arange(num_visual))[None])

    @classmethod
    def grid(cls, prefix_len: int, rows: int, cols: int, suffix_len: int) -> VisualLayout:
        """Three axes (t, h, w) over a rows x cols grid of one image, as Qwen2-VL's M-RoPE numbers it."""
        row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        ids = torch.stack([torch.zeros(rows * cols, dtype=torch.long), row.flatten(), col.flatten()])
        return cls(prefix_len, suffix_len, prefix_len + ids)

    @property
    def num_visual(self) -> int:
        return self.visual_ids.shape[1]

    @property
    def num_axes(self) -> int:
        return self.visual_ids.shape[0]

    @property
    def suffix_start(self) -> int:
        """The original ID (on every axis) of the first token after the image."""
        return int(self.visual_ids.max()) + 1 if self.num_visual else self.prefix_len


def validate_kept(kept: torch.Tensor, num_visual: int) -> torch.Tensor:
    """Check a keep set (1-D, integer, non-empty, unique, each in [0, num_visual)) and return it as long."""
    kept = torch.as_tensor(kept)
    if kept.ndim != 1:
        raise KeepSetError(f"a keep set must be 1-D visual-token indices, got shape {tuple(kept.shape)}")
    if kept.numel() == 0:
        raise KeepSetError("the keep set is empty: at least one visual token must be kept")
    if kept.dtype.is_floating_point or kept.dtype == torch.bool:
        raise KeepSetError(f"a keep set must hold integer indices, got dtype {kept.dtype}")
    low, high = int(kept.min()), int(kept.max())
    if low < 0 or high >= num_visual:
        raise KeepSetError(f"keep set index out of range: indices span [{low}, {high}] but the image "
                           f"has {num_visual} visual tokens (valid: 0..{num_visual - 1})")
    if torch.unique(kept).numel() != kept.numel():
        raise KeepSetError("the keep set repeats a visual-token index")
    return kept.long()


def validate_anchors(anchors: torch.Tensor, num_visual: int) -> torch.Tensor:
    """Check extra tokens' anchors (1-D integer visual-token indices in [0, num_visual); repeats allowed)."""
    anchors = torch.as_tensor(anchors)
    if anchors.ndim != 1 or anchors.dtype.is_floating_point or anchors.dtype == torch.bool:
        raise KeepSetError(f"extra-token anchors must be 1-D integer visual-token indices, got shape "
                           f"{tuple(anchors.shape)} of {anchors.dtype}")
    if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) >= num_visual):
        raise KeepSetError(f"extra-token anchor out of range: anchors span [{int(anchors.min())}, "
                           f"{int(anchors.max())}] but the image has {num_visual} visual tokens")
    return anchors.long().cpu()


def _shuffled_columns(ids: torch.Tensor, policy: PositionPolicy) -> torch.Tensor:
    """Shuffle a `fraction` of the columns of `ids` (axes, n) among themselves, within `window`s."""
    generator = torch.Generator().manual_seed(policy.seed)
    count = ids.shape[1]
    chosen = torch.randperm(count, generator=generator)[: round(policy.fraction * count)]
    chosen, _ = chosen.sort()
    window = policy.window or count
    out = ids.clone()
    for window_start in range(0, count, window):
        members = chosen[(chosen >= window_start) & (chosen < window_start + window)]
        out[:, members] = ids[:, members[torch.randperm(members.numel(), generator=generator)]]
    return out


def _axes(policy: PositionPolicy, num_axes: int) -> slice | list[int]:
    if policy.axis is None:
        return slice(None)
    if policy.axis >= num_axes:
        raise KeepSetError(f"position policy {policy} names axis {policy.axis}, but this model's position IDs "
                           f"have {num_axes} axis{'es' if num_axes > 1 else ''}")
    return [policy.axis]


def _visual_ids(kept: torch.Tensor, layout: VisualLayout, policy: PositionPolicy, fed: int) -> torch.Tensor:
    """(axes, len(kept)) IDs of the kept visual tokens, in `kept` order; `fed` counts extra tokens too."""
    if policy.kind == "reassign":
        return (layout.prefix_len + torch.arange(kept.numel())).expand(layout.num_axes, -1)
    if policy.kind == "compact":
        if fed > layout.num_visual:
            raise KeepSetError(f"compact positions: {fed} visual tokens fed but the image has only "
                               f"{layout.num_visual} slots")
        return layout.visual_ids[:, : kept.numel()]
    ids = layout.visual_ids[:, kept]
    axes = _axes(policy, layout.num_axes)
    if policy.kind == "permute":
        ids = ids.clone()
        ids[axes] = _shuffled_columns(ids, policy)[axes]
    elif policy.kind == "shift":
        ids = ids.clone()
        moved = (kept >= policy.start).nonzero().flatten()
        ids[axes, moved[:, None] if isinstance(axes, list) else moved] += policy.offset
    elif policy.kind == "transpose":
        if layout.num_axes != 3:
            raise KeepSetError(f"position policy 'transpose' swaps the h and w axes of M-RoPE IDs; this model's "
                               f"position IDs have {layout.num_axes} axis")
        ids = ids[[0, 2, 1]]
    return ids


def position_ids(
    kept: torch.Tensor,
    layout: VisualLayout,
    policy: PositionPolicy | str = "keep",
    *,
    extra_anchors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position IDs (axes, L) of `prefix | kept visual tokens | extra tokens | suffix` under `policy` (long, CPU).

    Extra tokens are visual tokens without a slot of their own (a merged summary of pruned tokens, a CLS
    token), fed after the kept ones. Each takes the original IDs of its anchor, a visual-token index;
    under ``reassign`` they continue the consecutive numbering, under ``compact`` the raster slots.
    """
    policy = PositionPolicy.parse(policy)
    kept = validate_kept(kept, layout.num_visual).cpu()
    anchors = validate_anchors(extra_anchors if extra_anchors is not None else torch.zeros(0, dtype=torch.long),
                               layout.num_visual)
    fed = kept.numel() + anchors.numel()
    visual = _visual_ids(kept, layout, policy, fed)
    if policy.kind == "reassign":
        extra = (layout.prefix_len + kept.numel() + torch.arange(anchors.numel())).expand(layout.num_axes, -1)
        suffix_first = layout.prefix_len + fed
    elif policy.kind == "compact":
        extra = layout.visual_ids[:, kept.numel():fed]
        suffix_first = int(layout.visual_ids[:, :fed].max()) + 1
    else:
        extra = layout.visual_ids[:, anchors]
        suffix_first = layout.suffix_start
    axes = layout.num_axes
    return torch.cat([
        torch.arange(layout.prefix_len).expand(axes, -1),
        visual,
        extra,
        (suffix_first + torch.arange(layout.suffix_len)).expand(axes, -1),
    ], dim=1)


def check_policy(policy: PositionPolicy | str, num_axes: int) -> None:
    """Raise `KeepSetError` where `policy` cannot number position IDs of `num_axes` axes (e.g. transpose on LLaVA)."""
    position_ids(torch.zeros(1, dtype=torch.long), VisualLayout(0, 0, torch.zeros(num_axes, 1, dtype=torch.long)),
                 policy)


def sequence_position_ids(
    kept: torch.Tensor,
    prefix_len: int,
    num_visual: int,
    suffix_len: int,
    policy: PositionPolicy | str = "keep",
    *,
    extra_anchors: torch.Tensor | None = None,
) -> torch.Tensor:
    """`position_ids` for one-axis IDs numbered on after the prefix (LLaVA's layout), as a 1-D tensor."""
    layout = VisualLayout.sequential(prefix_len, num_visual, suffix_len)
    return position_ids(kept, layout, policy, extra_anchors=extra_anchors)[0]


def visual_position_ids(
    kept: torch.Tensor, prefix_len: int, num_visual: int, policy: PositionPolicy | str = "keep"
) -> torch.Tensor:
    """The 1-D IDs of the kept visual tokens alone, in `kept` order, in LLaVA's layout."""
    ids = sequence_position_ids(kept, prefix_len, num_visual, 0, policy)
    return ids[prefix_len:]


def next_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Where decoding continues: the IDs of the last prompt token + 1, per axis (`position_ids` (axes, L))."""
    return position_ids[..., -1] + 1


def next_position_id(position_ids: torch.Tensor) -> int:
    """`next_position_ids` of 1-D IDs, as an int."""
    return int(position_ids[-1]) + 1
