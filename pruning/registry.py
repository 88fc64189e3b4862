"""The registry of pruning methods: one class per method, addressable by name with parameters.

    method = make_method("fastv:layer=2")
    @register_method
    class MyScorer(VisionPruning): ...   # then `--methods my-scorer` works in the CLI, the package untouched

A method either selects visual tokens before the LLM (`VisionPruning.select`, possibly merging the
dropped ones into the kept ones) or inside it (`LayerPruningMethod.layer_pruning`, through `mllm`'s
in-LLM hook). Position IDs are never the method's business: the caller numbers whatever it keeps
with `mllm`'s one position-ID policy.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch

import mllm
from mllm.specs import format_spec, parse_spec

METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__}: a pruning method needs a class attribute `name`")
    METHODS[cls.name] = cls
    return cls


def make_method(spec: str | PruningMethod) -> PruningMethod:
    """`name[:param=value,...]`, e.g. `random:seed=3` or `prumerge:adaptive=false`."""
    if isinstance(spec, PruningMethod):
        return spec
    name, params = parse_spec(spec, "pruning method")
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; registered: {', '.join(sorted(METHODS))}")
    accepted = list(inspect.signature(METHODS[name]).parameters)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"pruning method {name!r} takes parameters {accepted or 'none'}, got {unknown}")
    return METHODS[name](**params)


def method_spec(method: PruningMethod) -> str:
    """The spec `make_method` reads back into `method` (parameters left at their defaults omitted)."""
    defaults = {key: parameter.default for key, parameter in inspect.signature(type(method)).parameters.items()}
    return format_spec(method.name, {key: value for key, value in method.params().items()
                                     if value != defaults.get(key)})


@dataclass
class Selection:
    """What a pre-LLM method keeps, per row, in the order it emits them.

    `kept`: (B, n) original visual-token indices (0..N-1), or one 1-D tensor per row when the method
    decides its own count per image. `features`: the tokens to feed instead of the originals when
    the method merged dropped tokens into kept ones, (B, n, D) or one (n, D) per row; None feeds the
    originals. A merged token sits at its host's position: the kept index it was merged into.
    `extra`: (B, m, D) tokens with no patch of their own (a summary of the pruned ones, a CLS token),
    fed after the kept ones; `extra_anchors` (B, m): the patches whose position IDs they take.
    """

    kept: torch.Tensor | list[torch.Tensor]
    features: torch.Tensor | list[torch.Tensor] | None = None
    extra: torch.Tensor | None = None
    extra_anchors: torch.Tensor | None = None

    def rows(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        features = [None] * len(self.kept) if self.features is None else list(self.features)
        return list(zip(list(self.kept), features))


class PruningMethod:
    """A pruning method: parameters in the constructor (as scikit-learn), nothing learned."""

    name: ClassVar[str]
    # Whether the method decides its own number of kept tokens (and reports it) instead of the budget's;
    # a method may make it a parameter (`prumerge:adaptive=true`).
    adaptive: bool = False

    def params(self) -> dict[str, object]:
        return {key: getattr(self, key) for key in inspect.signature(type(self)).parameters}

    def encode_options(self, model: mllm.MLLM) -> dict[str, object]:
        """Extra `mllm.encode` options the method reads (e.g. vision attentions)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({method_spec(self)!r})"


class VisionPruning(PruningMethod):
    """Selects (and maybe merges) visual tokens before the LLM sees them."""

    def select(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int) -> Selection:
        raise NotImplementedError


class LayerPruningMethod(PruningMethod):
    """Drops visual tokens inside the LLM, through `mllm.LayerPruning`."""

    def layer_pruning(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int,
                      policy: str) -> mllm.LayerPruning:
        raise NotImplementedError


def require_cls_token(method: PruningMethod, model: mllm.MLLM) -> None:
    """Refuse, by name, a method that scores patches by a CLS token the model's vision tower does not have."""
    if not model.adapter.has_cls_token:
        raise mllm.UnsupportedModelError(
            f"pruning method {method_spec(method)!r} scores patches by the vision tower's CLS token, and "
            f"{model.adapter.model_type}'s vision tower has none (see pruning/REFERENCES.md)")


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices of the k highest scores per row, best first; ties go to the lower index."""
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    return order[:, :k]
