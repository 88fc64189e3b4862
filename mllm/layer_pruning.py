"""Pruning inside the LLM: score visual tokens from layer K-1, drop them for layers >= K, once or in stages.

    LayerPruning(2, select)              # FastV: one stage, before layer 2
    LayerPruning((3, 7, 16), select)     # SparseVLM: three stages; `select` sees `context.stage`

Nothing about the model is changed: forward pre-hooks on the decoder layers slice what each layer from
the first stage on receives (the hidden states once per stage, at that stage's layer; the attention
mask, rotary cos/sin and position IDs at every layer) and are removed when generation ends. A single
stage is the one-stage case of the same code.

Each stage's selector sees the tokens still present: `LayerContext.visual_index` indexes the current
visual tokens (recycled ones included), and `attention(queries)` is recomputed from layer K-1's
inputs, which are the previous stage's sequence. It returns the kept ones, and may return recycled
tokens (`LayerSelection`): new hidden states at layer K's input, inserted right after the kept visual
tokens (where SparseVLM puts its merged clusters); later stages see them as visual tokens.

Positions. Under ``keep`` every token keeps its original rotary position (cos/sin are gathered from
the full prompt's, not recomputed); a recycled token takes its anchor's position, the anchor being
one of the visual tokens present when it was made. Under ``reassign`` each stage renumbers its
sequence consecutively (recycled tokens numbered on after the kept visual tokens), and decoding goes
on from each stage's last ID. Layers before the first stage keep the full sequence in the KV cache,
each later layer only its stage's tokens, so decoding masks are built per stage.

Attention weights for scoring are recomputed for the query rows asked for (`LayerContext.attention`),
so the model keeps its SDPA / flash attention everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

import torch

from mllm.adapters import ModelAdapter
from mllm.errors import KeepSetError


@dataclass
class LayerContext:
    """What a selector sees when tokens are about to be dropped before layer `layer`."""

    layer: int
    hidden_states: torch.Tensor  # (B, L, D) entering layer `layer`: the tokens still present
    visual_index: torch.Tensor  # (B, n) sequence positions of each row's visual tokens now, in sequence order
    attention_mask: torch.Tensor  # (B, L) 2-D padding mask of the current sequence
    _adapter: ModelAdapter
    _previous: dict[str, Any] | None
    stage: int = 0  # which of `LayerPruning.layers` this is

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


@dataclass
class LayerSelection:
    """A selector's answer when it recycles: `kept` (B, k) as a plain answer, plus `recycled` (B, m, D)
    hidden states at the stage layer's input, each at the position of `anchors` (B, m), indices into
    the current visual tokens (repeats allowed). Every row keeps and recycles the same numbers."""

    kept: torch.Tensor
    recycled: torch.Tensor | None = None
    anchors: torch.Tensor | None = None


Selector = Callable[[LayerContext], torch.Tensor | LayerSelection]


@dataclass
class LayerPruning:
    """Drop visual tokens for LLM layers >= each of `layer` (one layer, or strictly increasing layers).

    `select` is called once per stage and returns, per row, the indices of the visual tokens to keep,
    into that row's current visual tokens (0..n-1, i.e. into `LayerContext.visual_index`), or a
    `LayerSelection` that also recycles tokens. Every row must keep the same number.
    """

    layer: int | Sequence[int]
    select: Selector
    policy: Literal["keep", "reassign"] = "keep"

    def __post_init__(self) -> None:
        if self.policy not in ("keep", "reassign"):
            raise ValueError(f"in-LLM pruning supports policies 'keep' and 'reassign', not {self.policy!r}")
        layers = self.layers
        if not layers or any(later <= earlier for earlier, later in pairwise(layers)):
            raise ValueError(f"in-LLM pruning layers must be one or more strictly increasing layers, got {layers}")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(int(layer) for layer in self.layer) if isinstance(self.layer, Sequence) else (int(self.layer),)


@dataclass
class _Sequence:
    """The prompt as the layers of one stage see it at prefill: the first four fields are (B, L), one per token."""

    source: torch.Tensor  # prompt slot it came from (a recycled token: its anchor's): its position ID under keep
    real: torch.Tensor  # 1 on real tokens, 0 on padding
    origin: torch.Tensor  # index into the LLM's input visual tokens (a recycled token: its anchor's); -1 if text
    recycled: torch.Tensor  # bool
    index: torch.Tensor | None = None  # into cat(previous sequence, `extra`): how the stage builds it
    extra: torch.Tensor | None = None  # (B, m, D) the stage's recycled hidden states
    mask: torch.Tensor | None = None  # 4-D prefill mask in the form the model passed (None: none passed)
    positions: torch.Tensor | None = None  # consecutive position IDs, under reassign

    @property
    def visual_index(self) -> torch.Tensor:
        return (self.origin >= 0).nonzero()[:, 1].view(self.origin.shape[0], -1)


@dataclass
class _PruningState:
    pruning: LayerPruning
    adapter: ModelAdapter
    attention_mask: torch.Tensor  # (B, L) prefill mask
    visual_index: torch.Tensor  # (B, n)
    sequences: list[_Sequence] = field(default_factory=list)  # [0]: the prompt; [s + 1]: after stage s
    previous: dict[str, Any] | None = None  # layer K-1's attention inputs, for the next stage to score with
    decoded: int = 0  # tokens fed after the prompt so far
    hooks: list[Any] = field(default_factory=list)
    # Under reassign, a stage's renumbered rotary embeddings for the current forward pass, made by its first layer
    # and reused by the rest: (stage, prefill, decoded) -> (cos, sin).
    rotary: tuple[tuple[int, bool, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        batch, length = self.attention_mask.shape
        device = self.attention_mask.device
        origin = torch.full((batch, length), -1, dtype=torch.long, device=device)
        origin.scatter_(1, self.visual_index, torch.arange(self.visual_index.shape[1], device=device).expand(batch, -1))
        self.sequences.append(_Sequence(torch.arange(length, device=device).expand(batch, -1), self.attention_mask,
                                        origin, torch.zeros(batch, length, dtype=torch.bool, device=device)))

    @property
    def prefill_length(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def sequence_keep(self) -> torch.Tensor:
        """(B, L'): for each token the last layer saw, its prompt slot (a recycled token: its anchor's)."""
        return self.sequences[-1].source

    @property
    def kept_visual(self) -> list[torch.Tensor]:
        """Per row, the input visual tokens (indices into visual_index) the last layer saw, in order.

        Recycled tokens are not among them, so rows may differ in length once a later stage has pruned
        some rows' recycled tokens and not others'.
        """
        last = self.sequences[-1]
        original = (last.origin >= 0) & ~last.recycled
        return [origin[keep] for origin, keep in zip(last.origin, original)]

    def stage_of(self, layer: int) -> int:
        """How many stages act on `layer` (0: it sees the full prompt)."""
        return sum(start <= layer for start in self.pruning.layers)

    def prefill_tokens(self, num_layers: int) -> torch.Tensor:
        """(B, num_layers): the real (unpadded) prompt tokens each decoder layer processed at prefill."""
        counts = torch.stack([sequence.real.sum(dim=1) for sequence in self.sequences], dim=1)
        return counts[:, [min(self.stage_of(layer), len(self.sequences) - 1) for layer in range(num_layers)]]


def _gather(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Gather along `dim` with a (B, n) index, broadcasting over every other dimension."""
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    shape = [index.shape[0]] + [1] * (tensor.ndim - 1)
    shape[dim] = index.shape[1]
    expanded = index.view(shape).expand(*[s if d != dim else index.shape[1] for d, s in enumerate(tensor.shape)])
    return tensor.gather(dim, expanded.to(tensor.device))


def _check_indices(indices: object, batch: int, count: int, what: str) -> torch.Tensor:
    indices = torch.as_tensor(indices)
    if indices.ndim != 2 or indices.shape[0] != batch:
        raise KeepSetError(f"in-LLM selector must return (batch={batch}, n) {what}, got {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= count):
        raise KeepSetError(f"in-LLM selector {what} index out of range [0, {count})")
    return indices.long()


def _prefill_mask(real: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor | None:
    """A causal mask over the current order that hides padding keys, in the form of the model's own `like`.

    Built, not gathered: a recycled token sits after every kept visual token whatever its anchor.
    """
    if like is None:  # SDPA's causal shortcut (no padding anywhere): still right for the shorter sequence
        return None
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
    allowed = causal[None, None] & real.bool()[:, None, None, :]
    if like.dtype == torch.bool:
        return allowed
    additive = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
    return additive.masked_fill(~allowed, torch.finfo(like.dtype).min)


def _choose(state: _PruningState, stage: int, hidden: torch.Tensor, like: torch.Tensor | None) -> None:
    """Run stage `stage`'s selector on the tokens present and append the sequence its layers will see."""
    previous = state.sequences[-1]
    visual_index = previous.visual_index
    context = LayerContext(state.pruning.layers[stage], hidden, visual_index, previous.real, state.adapter,
                           state.previous, stage)
    answer = state.pruning.select(context)
    state.previous = None  # the next stage scores with its own layer's inputs
    selection = answer if isinstance(answer, LayerSelection) else LayerSelection(answer)
    batch, count = visual_index.shape
    kept = _check_indices(selection.kept, batch, count, "kept").to(visual_index.device).sort(dim=1).values
    if (kept[:, 1:] == kept[:, :-1]).any():
        raise KeepSetError("in-LLM selector repeated a visual-token index")
    extra = selection.recycled
    anchors = torch.zeros(batch, 0, dtype=torch.long, device=visual_index.device)
    if extra is not None:
        if selection.anchors is None or extra.ndim != 3 or extra.shape[0] != batch or extra.shape[2] != hidden.shape[2]:
            raise KeepSetError(f"recycled tokens need hidden states (batch={batch}, m, {hidden.shape[2]}) and anchors; "
                               f"got {tuple(extra.shape)}")
        anchors = _check_indices(selection.anchors, batch, count, "anchor").to(visual_index.device)
        if anchors.shape[1] != extra.shape[1]:
            raise KeepSetError(f"{extra.shape[1]} recycled tokens with {anchors.shape[1]} anchors")
        extra = extra.to(device=hidden.device, dtype=hidden.dtype)
    recycled = anchors.shape[1]
    if kept.shape[1] + recycled == 0:
        raise KeepSetError("in-LLM selector kept no visual token")

    # The new order by sort keys: token j at j * step, recycled token r just after the visual span, dropped last.
    length = previous.real.shape[1]
    step = recycled + 1
    keep = torch.ones(batch, length, dtype=torch.bool, device=kept.device)
    keep.scatter_(1, visual_index, False)
    keep.scatter_(1, visual_index.gather(1, kept), True)
    keys = (torch.arange(length, device=kept.device) * step).expand(batch, -1).masked_fill(~keep, step * length)
    after_visual = visual_index[:, -1:] * step + 1 + torch.arange(recycled, device=kept.device)
    new_length = length - count + kept.shape[1] + recycled
    index = torch.cat([keys, after_visual], dim=1).sort(dim=1).indices[:, :new_length]

    slots = visual_index.gather(1, anchors)  # recycled tokens inherit their anchors' slot and origin

    def extend(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values, values.gather(1, slots)], dim=1).gather(1, index)

    real = extend(previous.real)
    is_recycled = torch.cat([previous.recycled, torch.ones_like(slots, dtype=torch.bool)], dim=1).gather(1, index)
    sequence = _Sequence(extend(previous.source), real, extend(previous.origin), is_recycled, index, extra,
                         _prefill_mask(real, like))
    if state.pruning.policy == "reassign":
        sequence.positions = (real.long().cumsum(-1) - 1).masked_fill(real == 0, 1)
    state.sequences.append(sequence)


def _decode_mask(state: _PruningState, sequence: _Sequence, hidden: torch.Tensor) -> torch.Tensor | None:
    """The mask of a decoding step for a layer whose cache holds only its stage's prompt tokens.

    Built here rather than sliced from transformers' mask: transformers sizes the mask by layer 0's
    cache, which is a pruned one when the first stage is at layer 0.
    """
    if bool(state.attention_mask.all()):
        return None  # no padding: a single query may attend to every cached key
    prompt = sequence.real.bool()
    valid = torch.cat([prompt, prompt.new_ones(prompt.shape[0], state.decoded)], dim=1)
    allowed = valid[:, None, None, :].expand(-1, 1, hidden.shape[1], -1)
    if state.adapter.model.config._attn_implementation != "eager":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
    return additive.masked_fill(~allowed, torch.finfo(hidden.dtype).min)


def _slice_layer_inputs(state: _PruningState, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    hidden = args[0] if args else kwargs["hidden_states"]
    cos, _ = kwargs["position_embeddings"]
    prefill = cos.shape[1] == state.prefill_length
    stage = state.stage_of(layer) - 1
    reassign = state.pruning.policy == "reassign"
    # Llama's layers receive position IDs; Qwen2-VL's receive None (M-RoPE lives in cos/sin alone).
    given = kwargs.get("position_ids")
    if prefill:
        if layer == state.pruning.layers[stage]:
            _choose(state, stage, hidden, kwargs.get("attention_mask"))
            sequence = state.sequences[stage + 1]
            if sequence.extra is not None:
                hidden = torch.cat([hidden, sequence.extra], dim=1)
            hidden = _gather(hidden, 1, sequence.index)
        sequence = state.sequences[stage + 1]
        mask = sequence.mask
        positions = sequence.positions if reassign or given is None else _gather(given, 1, sequence.source)
    else:
        sequence = state.sequences[stage + 1]
        if layer == state.pruning.layers[0]:
            state.decoded += hidden.shape[1]
        mask = _decode_mask(state, sequence, hidden)
        positions = given
        if reassign:  # continue the stage's renumbered sequence: its last ID + tokens decoded
            positions = sequence.positions[:, -1:] + state.decoded
    if reassign:
        key = (stage, prefill, state.decoded)
        if state.rotary is None or state.rotary[0] != key:
            state.rotary = (key, state.adapter.rotary_embeddings(hidden, positions))
        kwargs["position_embeddings"] = state.rotary[1]
    elif prefill:  # keep: each token's own (or its anchor's) rotary position, gathered from the full prompt's
        cos_sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = tuple(_gather(part, 1, sequence.source) for part in cos_sin)
    kwargs["position_ids"] = positions if given is not None else None
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
    for layer in pruning.layers:
        if not 0 <= layer < len(layers):
            raise ValueError(f"in-LLM pruning layer {layer} out of range: the LLM has {len(layers)} layers")
    state = _PruningState(pruning, adapter, attention_mask, visual_index)

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict, stage: int) -> None:
        if len(state.sequences) == stage + 1:  # prefill, before stage `stage` chooses
            state.previous = {
                "normed_hidden": args[0] if args else kwargs["hidden_states"],
                "position_embeddings": kwargs["position_embeddings"],
                "attention_mask": kwargs.get("attention_mask"),
            }

    try:
        for stage, layer in enumerate(pruning.layers):
            if layer > 0:
                def hook(module: torch.nn.Module, args: tuple, kwargs: dict, stage: int = stage) -> None:
                    capture(module, args, kwargs, stage)

                state.hooks.append(layers[layer - 1].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
        for index in range(pruning.layers[0], len(layers)):
            def slice_inputs(module: torch.nn.Module, args: tuple, kwargs: dict,
                             index: int = index) -> tuple[tuple, dict]:
                return _slice_layer_inputs(state, index, args, kwargs)

            state.hooks.append(layers[index].register_forward_pre_hook(slice_inputs, with_kwargs=True))
        yield state
    finally:
        for handle in state.hooks:
            handle.remove()
