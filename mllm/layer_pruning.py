"""Pruning inside the LLM (FastV-style): score visual tokens from layer K-1, drop them for layers >= K.

Nothing about the model is changed: forward pre-hooks on the decoder layers slice what each layer
>= K receives (hidden states once, at layer K; the attention mask, rotary cos/sin and position IDs at
every layer) and are removed when generation ends. Under the ``keep`` policy the kept tokens keep
their rotary positions (cos/sin are sliced, not recomputed); under ``reassign`` layers >= K see
consecutive positions. Layers < K keep the full sequence in the KV cache, layers >= K only the
kept tokens, so decoding steps slice the key columns of the mask the same way.

Attention weights for scoring are recomputed for the query rows asked for (`LayerContext.attention`),
so the model keeps its SDPA / flash attention everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mllm.adapters import ModelAdapter
from mllm.errors import KeepSetError


@dataclass
class LayerContext:
    """What a selector sees when tokens are about to be dropped before layer `layer`."""

    layer: int
    hidden_states: torch.Tensor  # (B, L, D) entering layer `layer`
    visual_index: torch.Tensor  # (B, n) sequence positions of each row's visual tokens, in sequence order
    attention_mask: torch.Tensor  # (B, L) 2-D padding mask
    _adapter: ModelAdapter
    _previous: dict[str, Any] | None

    def attention(self, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention (B, H, Q, L) of layer `layer - 1` from the query rows `queries` (B, Q).

        Default: each row's last token, as FastV scores. Recomputed from that layer's inputs.
        """
        if self._previous is None:
            raise ValueError("no attention to score with at layer 0: prune at layer >= 1 to use attention")
        batch, length = self.attention_mask.shape
        if queries is None:
            queries = torch.full((batch, 1), length - 1, device=self.attention_mask.device)
        return self._adapter.llm_attention(self.layer - 1, queries=queries, **self._previous)


Selector = Callable[[LayerContext], torch.Tensor]


@dataclass
class LayerPruning:
    """Drop visual tokens for LLM layers >= `layer`; `select` returns the kept ones (B, n_keep).

    `select` returns, per row, indices into that row's visual tokens as the LLM received them
    (0..n-1, i.e. into `LayerContext.visual_index`). Every row must keep the same number.
    """

    layer: int
    select: Selector
    policy: Literal["keep", "reassign"] = "keep"

    def __post_init__(self) -> None:
        if self.policy not in ("keep", "reassign"):
            raise ValueError(f"in-LLM pruning supports policies 'keep' and 'reassign', not {self.policy!r}")


@dataclass
class _PruningState:
    pruning: LayerPruning
    adapter: ModelAdapter
    attention_mask: torch.Tensor  # (B, L) prefill mask
    visual_index: torch.Tensor  # (B, n)
    previous: dict[str, Any] | None = None
    sequence_keep: torch.Tensor | None = None  # (B, L') kept sequence positions, ascending
    kept_visual: torch.Tensor | None = None  # (B, n_keep) indices into visual_index
    reassigned: torch.Tensor | None = None  # (B, L') positions for layers >= K under reassign
    decoded: int = 0  # tokens fed after the prompt so far
    hooks: list[Any] = field(default_factory=list)

    @property
    def prefill_length(self) -> int:
        return self.attention_mask.shape[1]

    def prefill_tokens(self, num_layers: int) -> torch.Tensor:
        """(B, num_layers): the real (unpadded) prompt tokens each decoder layer processed at prefill."""
        full = self.attention_mask.sum(dim=1)
        kept = _gather(self.attention_mask, 1, self.sequence_keep).sum(dim=1)
        layers = torch.arange(num_layers, device=full.device)
        return torch.where(layers[None] < self.pruning.layer, full[:, None], kept[:, None])


def _gather(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Gather along `dim` with a (B, n) index, broadcasting over every other dimension."""
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    shape = [index.shape[0]] + [1] * (tensor.ndim - 1)
    shape[dim] = index.shape[1]
    expanded = index.view(shape).expand(*[s if d != dim else index.shape[1] for d, s in enumerate(tensor.shape)])
    return tensor.gather(dim, expanded.to(tensor.device))


def _choose(state: _PruningState, hidden: torch.Tensor) -> None:
    context = LayerContext(state.pruning.layer, hidden, state.visual_index, state.attention_mask,
                           state.adapter, state.previous)
    kept = torch.as_tensor(state.pruning.select(context)).to(state.visual_index.device)
    batch, count = state.visual_index.shape
    if kept.ndim != 2 or kept.shape[0] != batch:
        raise KeepSetError(f"in-LLM selector must return (batch={batch}, n_keep) indices, got {tuple(kept.shape)}")
    if kept.numel() == 0 or kept.shape[1] == 0:
        raise KeepSetError("in-LLM selector kept no visual token")
    if int(kept.min()) < 0 or int(kept.max()) >= count:
        raise KeepSetError(f"in-LLM selector index out of range [0, {count})")
    kept = kept.sort(dim=1).values
    if (kept[:, 1:] == kept[:, :-1]).any():
        raise KeepSetError("in-LLM selector repeated a visual-token index")
    length = state.prefill_length
    keep_mask = torch.ones(batch, length, dtype=torch.bool, device=kept.device)
    keep_mask.scatter_(1, state.visual_index, False)
    keep_mask.scatter_(1, state.visual_index.gather(1, kept), True)
    state.kept_visual = kept
    state.sequence_keep = keep_mask.nonzero()[:, 1].view(batch, -1)
    if state.pruning.policy == "reassign":
        kept_mask = _gather(state.attention_mask, 1, state.sequence_keep)
        state.reassigned = (kept_mask.long().cumsum(-1) - 1).masked_fill(kept_mask == 0, 1)


def _decode_mask(state: _PruningState, hidden: torch.Tensor) -> torch.Tensor | None:
    """The mask of a decoding step for layers >= K, whose cache holds only the kept prompt tokens.

    Built here rather than sliced from transformers' mask: transformers sizes the mask by layer 0's
    cache, which is the pruned one when K = 0.
    """
    if bool(state.attention_mask.all()):
        return None  # no padding: a single query may attend to every cached key
    keep = state.sequence_keep
    prompt = _gather(state.attention_mask, 1, keep).bool()
    valid = torch.cat([prompt, prompt.new_ones(keep.shape[0], state.decoded)], dim=1)
    allowed = valid[:, None, None, :].expand(-1, 1, hidden.shape[1], -1)
    if state.adapter.model.config._attn_implementation != "eager":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
    return additive.masked_fill(~allowed, torch.finfo(hidden.dtype).min)


def _slice_layer_inputs(state: _PruningState, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    hidden = args[0] if args else kwargs["hidden_states"]
    cos, _ = kwargs["position_embeddings"]
    prefill = cos.shape[1] == state.prefill_length
    if prefill and state.sequence_keep is None:
        _choose(state, hidden)
    keep = state.sequence_keep
    mask = kwargs.get("attention_mask")
    if prefill:
        if hidden.shape[1] == state.prefill_length:
            hidden = _gather(hidden, 1, keep)
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            mask = _gather(_gather(mask, 2, keep), 3, keep)
        positions = state.reassigned if state.reassigned is not None else _gather(kwargs["position_ids"], 1, keep)
    else:
        if layer == state.pruning.layer:
            state.decoded += hidden.shape[1]
        mask = _decode_mask(state, hidden)
        positions = kwargs["position_ids"]
        if state.reassigned is not None:  # continue the renumbered sequence: last kept ID + tokens decoded
            positions = state.reassigned[:, -1:] + state.decoded
    if state.reassigned is not None:
        kwargs["position_embeddings"] = state.adapter.rotary_embeddings(hidden, positions)
    elif prefill:  # keep: the kept tokens' own rotary positions, sliced from the full sequence's
        kwargs["position_embeddings"] = tuple(_gather(part, 1, keep) for part in kwargs["position_embeddings"])
    kwargs["position_ids"] = positions
    kwargs["attention_mask"] = mask
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs["hidden_states"] = hidden
    return args, kwargs


@contextmanager
def layer_pruning_hooks(
    pruning: LayerPruning,
    adapter: ModelAdapter,
    attention_mask: torch.Tensor,
    visual_index: torch.Tensor,
) -> Iterator[_PruningState]:
    """Attach the hooks for one generation call; they are removed on exit, whatever happens."""
    layers = adapter.decoder_layers
    implementation = adapter.model.config._attn_implementation
    if implementation not in ("eager", "sdpa"):
        raise ValueError(f"in-LLM pruning supports eager and sdpa attention, not {implementation!r}")
    if not 0 <= pruning.layer < len(layers):
        raise ValueError(f"in-LLM pruning layer {pruning.layer} out of range: the LLM has {len(layers)} layers")
    state = _PruningState(pruning, adapter, attention_mask, visual_index)

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if state.sequence_keep is None and hidden.shape[1] == state.prefill_length:
            state.previous = {
                "normed_hidden": hidden,
                "position_embeddings": kwargs["position_embeddings"],
                "attention_mask": kwargs.get("attention_mask"),
            }

    try:
        if pruning.layer > 0:
            state.hooks.append(layers[pruning.layer - 1].self_attn.register_forward_pre_hook(capture, with_kwargs=True))
        for index in range(pruning.layer, len(layers)):
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict, index: int = index) -> tuple[tuple, dict]:
                return _slice_layer_inputs(state, index, args, kwargs)

            state.hooks.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        yield state
    finally:
        for handle in state.hooks:
            handle.remove()
