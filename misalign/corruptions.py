"""Position-ID corruptions with every visual token kept: misalignment without information loss.

Each kind is one registered class (as llmc registers token-reduction methods) that turns a strength
into a `Corruption`: the order in which the N visual tokens are fed, and the `mllm.PositionPolicy`
that numbers them. Every corruption keeps all N tokens, so whatever it does to REC comes from the
positions alone. Strength 0 is always the unablated model. Same seed, same IDs.

    corruption = make_corruption("permuted").at(0.5, num_visual=576, seed=0)
    model.generate(encoding, keep=corruption.order.expand(batch, -1), policy=corruption.policy)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch

from mllm import PositionPolicy
from mllm.positions import visual_position_ids
from mllm.specs import format_spec, parse_spec

CORRUPTIONS: dict[str, type[Misalignment]] = {}


def register_corruption(cls: type[Misalignment]) -> type[Misalignment]:
    CORRUPTIONS[cls.name] = cls
    return cls


def make_corruption(kind: str, **options: object) -> Misalignment:
    """The corruption registered as `kind`, e.g. `make_corruption("permuted", window=24)`."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {sorted(CORRUPTIONS)}")
    try:
        return CORRUPTIONS[kind](**options)
    except TypeError:
        accepted = [name for name in inspect.signature(CORRUPTIONS[kind]).parameters]
        raise ValueError(f"corruption {kind!r} takes options {accepted or 'none'}, got {sorted(options)}") from None


def parse_corruption(spec: str) -> Misalignment:
    """`kind[:name=value,...]`, e.g. `permuted:window=8` or `span-shift:start=32`."""
    kind, options = parse_spec(spec, "corruption", "option")
    return make_corruption(kind, **options)


def corruption_spec(misalignment: Misalignment) -> str:
    """The spec `parse_corruption` reads back into `misalignment`."""
    return format_spec(misalignment.name, {name: value for name, value in vars(misalignment).items()
                                           if value is not None})


@dataclass(frozen=True)
class Corruption:
    """What the LLM is fed: visual tokens in `order` (a permutation of 0..N-1), numbered by `policy`."""

    order: torch.Tensor
    policy: PositionPolicy


class Misalignment:
    """A family of corruptions indexed by a strength; subclasses say what the strength means."""

    name: ClassVar[str]
    strength_meaning: ClassVar[str]

    def at(self, strength: float, num_visual: int, seed: int = 0) -> Corruption:
        raise NotImplementedError

    @staticmethod
    def _all(num_visual: int) -> torch.Tensor:
        return torch.arange(num_visual)


@register_corruption
class Identity(Misalignment):
    """The control: original order, original IDs, whatever the strength."""

    name = "identity"
    strength_meaning = "ignored"

    def at(self, strength: float, num_visual: int, seed: int = 0) -> Corruption:
        return Corruption(self._all(num_visual), PositionPolicy("keep"))


@register_corruption
class Permuted(Misalignment):
    """A fraction `strength` of the visual tokens trade IDs among themselves (within `window`s of tokens if set)."""

    name = "permuted"
    strength_meaning = "fraction of visual tokens whose IDs are shuffled"

    def __init__(self, window: int | None = None, axis: int | None = None) -> None:
        self.window = window
        self.axis = axis  # multi-axis IDs (M-RoPE): shuffle this axis's values alone (0: t, 1: h, 2: w)

    def at(self, strength: float, num_visual: int, seed: int = 0) -> Corruption:
        policy = PositionPolicy("permute", fraction=float(strength), window=self.window, seed=seed, axis=self.axis)
        return Corruption(self._all(num_visual), policy)


@register_corruption
class Shifted(Misalignment):
    """Every visual ID moves by `strength` (an integer; negative moves them onto the prefix text's IDs)."""

    name = "shifted"
    strength_meaning = "offset added to every visual position ID"

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis  # multi-axis IDs (M-RoPE): shift this axis alone (0: t, 1: h, 2: w)

    def at(self, strength: float, num_visual: int, seed: int = 0) -> Corruption:
        return Corruption(self._all(num_visual), PositionPolicy("shift", offset=_integer(strength), axis=self.axis))


@register_corruption
class SpanShift(Misalignment):
    """Pruning-style: as if `strength` tokens from `start` were removed, the IDs after that span move down.

    No token is removed: the span keeps its IDs, and the tokens after it reuse them, which is what a
    renumbering pruner does to every token after each pruned span.
    """

    name = "span-shift"
    strength_meaning = "length of the span whose removal the later tokens' IDs assume"

    def __init__(self, start: int = 0) -> None:
        self.start = start

    def at(self, strength: float, num_visual: int, seed: int = 0) -> Corruption:
        span = _integer(strength)
        if span < 0 or self.start + span > num_visual:
            raise ValueError(f"span-shift: a span of {span} tokens from token {self.start} does not fit in "
                             f"{num_visual} visual tokens (need 0 <= start + span <= {num_visual})")
        policy = PositionPolicy("shift", offset=-span, start=self.start + span)
        return Corruption(self._all(num_visual), policy)


@register_corruption
class TokenPermutation(Misalignment):
    """A fraction `strength` of the visual tokens are reordered; IDs stay sequential (PruMerge-style output)."""

    name = "token-permutation"
    strength_meaning = "fraction of visual tokens moved to other slots"

    def at(self, strength: float, num_visual: int, seed: int = 0) -> Corruption:
        slots = PositionPolicy("permute", fraction=float(strength), seed=seed)
        # The same seeded shuffle the ID permutation uses, applied to the tokens instead of their IDs. Each
        # slot keeps its own IDs (`compact` with every token fed): sequential for LLaVA, the grid's for M-RoPE.
        order = visual_position_ids(self._all(num_visual), 0, num_visual, slots)
        return Corruption(order, PositionPolicy("compact"))


@register_corruption
class Transposed(Misalignment):
    """M-RoPE only: the h and w axes of every visual ID swapped (does the predicted box flip?)."""

    name = "transposed"
    strength_meaning = "0: original IDs, 1: h and w swapped"

    def at(self, strength: float, num_visual: int, seed: int = 0) -> Corruption:
        if float(strength) not in (0.0, 1.0):
            raise ValueError(f"transposed: strength is 0 (original IDs) or 1 (h and w swapped), got {strength}")
        return Corruption(self._all(num_visual), PositionPolicy("transpose" if strength else "keep"))


def _integer(strength: float) -> int:
    if float(strength) != int(strength):
        raise ValueError(f"this corruption's strength is a number of positions, got {strength}")
    return int(strength)
