"""The position-ID policy: which RoPE position each token of a (possibly pruned) prompt receives.

Every analysis in the toolkit goes through `sequence_position_ids`. A prompt is laid out as
`prefix text | N visual tokens | suffix text`; `kept` lists which visual tokens are fed to the LLM
and in which order (indices 0..N-1 into the original visual tokens). The policies:

- ``reassign``: consecutive renumbering 0..L'-1, what pruning methods do today.
- ``keep`` (GAP): every kept visual token and every text token keeps its original ID.
- ``permute``: like ``keep``, then the IDs of a ``fraction`` of the kept visual tokens are shuffled
  among themselves (within consecutive ``window``s of kept tokens when a window is given).
- ``shift``: like ``keep``, then visual IDs move by ``offset``; with ``start`` only the visual tokens
  whose original index is >= ``start`` move (the "pruning-style" shift of the tokens after a span).

Text IDs are never changed by ``permute`` or ``shift``; a shift may make visual IDs overlap text IDs
or go below the prefix, which is the point of the ablation. Decoding continues from the ID of the
last prompt token + 1 (`next_position_id`); LLaVA prompts end in text ("ASSISTANT:"), whose ID is
then the largest under ``keep`` and ``reassign``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from mllm.errors import KeepSetError

PolicyKind = Literal["reassign", "keep", "permute", "shift"]
POLICY_KINDS: tuple[str, ...] = ("reassign", "keep", "permute", "shift")


@dataclass(frozen=True)
class PositionPolicy:
    """A position-ID policy and its knobs. `PositionPolicy.parse("shift:offset=-8,start=100")`."""

    kind: PolicyKind = "keep"
    offset: int = 0
    start: int = 0
    fraction: float = 1.0
    window: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"unknown position policy {self.kind!r}; choose one of {POLICY_KINDS}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"position policy field 'fraction' must lie in [0, 1], got {self.fraction}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"position policy field 'window' must be >= 1, got {self.window}")

    @classmethod
    def parse(cls, spec: str | PositionPolicy) -> PositionPolicy:
        """Read `kind[:name=value,...]`, e.g. `keep`, `permute:fraction=0.5,seed=3`."""
        if isinstance(spec, PositionPolicy):
            return spec
        kind, _, arguments = spec.strip().partition(":")
        types = {field.name: field.type for field in fields(cls)}
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in arguments.split(","))):
            name, sep, raw = item.partition("=")
            if not sep or name not in types or name == "kind":
                raise ValueError(f"bad field {item!r} in position policy {spec!r}; fields: "
                                 f"offset, start, fraction, window, seed")
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


def _shuffled_ids(ids: torch.Tensor, policy: PositionPolicy) -> torch.Tensor:
    generator = torch.Generator().manual_seed(policy.seed)
    count = ids.numel()
    chosen = torch.randperm(count, generator=generator)[: round(policy.fraction * count)]
    chosen, _ = chosen.sort()
    window = policy.window or count
    out = ids.clone()
    for window_start in range(0, count, window):
        members = chosen[(chosen >= window_start) & (chosen < window_start + window)]
        out[members] = ids[members[torch.randperm(members.numel(), generator=generator)]]
    return out


def visual_position_ids(
    kept: torch.Tensor, prefix_len: int, num_visual: int, policy: PositionPolicy | str = "keep"
) -> torch.Tensor:
    """IDs of the kept visual tokens, in `kept` order, under `policy`."""
    policy = PositionPolicy.parse(policy)
    kept = validate_kept(kept, num_visual).cpu()
    if policy.kind == "reassign":
        return prefix_len + torch.arange(kept.numel())
    ids = prefix_len + kept
    if policy.kind == "permute":
        ids = _shuffled_ids(ids, policy)
    elif policy.kind == "shift":
        ids = torch.where(kept >= policy.start, ids + policy.offset, ids)
    return ids


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


def sequence_position_ids(
    kept: torch.Tensor,
    prefix_len: int,
    num_visual: int,
    suffix_len: int,
    policy: PositionPolicy | str = "keep",
    *,
    extra_anchors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position IDs of `prefix | kept visual tokens | extra tokens | suffix` under `policy` (1-D, long, on CPU).

    Extra tokens are visual tokens without a slot of their own (a merged summary of pruned tokens, a CLS
    token), fed after the kept ones. Each takes the original ID of its anchor, a visual-token index;
    under ``reassign`` they continue the consecutive numbering instead.
    """
    policy = PositionPolicy.parse(policy)
    visual = visual_position_ids(kept, prefix_len, num_visual, policy)
    anchors = validate_anchors(extra_anchors if extra_anchors is not None else torch.zeros(0, dtype=torch.long),
                               num_visual)
    if policy.kind == "reassign":
        extra = prefix_len + visual.numel() + torch.arange(anchors.numel())
        suffix_first = prefix_len + visual.numel() + anchors.numel()
    else:
        extra = prefix_len + anchors
        suffix_first = prefix_len + num_visual
    return torch.cat([
        torch.arange(prefix_len),
        visual,
        extra,
        suffix_first + torch.arange(suffix_len),
    ])


def next_position_id(position_ids: torch.Tensor) -> int:
    """Where decoding continues: the ID of the last prompt token + 1."""
    return int(position_ids[-1]) + 1
