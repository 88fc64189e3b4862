"""What a generation call cost: analytic prefill FLOPs of the LLM, and the peak accelerator memory.

FLOPs count a multiply-add as 2. A decoder layer that processes n prompt tokens costs
- 2 n W for its linear maps (attention projections and MLP, W weights in all), and
- 4 n^2 A for the attention scores and the weighted sum of values (A = heads x head_dim): the full
  n x n products, as FastV's per-layer count 4nd^2 + 2n^2d + 2ndm does (with W = 4d^2 + 2dm there);
  a kernel that skips the masked half does about half of this term.
The prefill adds the LM head on the last prompt token. Norms, rotary embeddings and softmax are left
out (a few n d per layer), and so are the vision tower and projector, which every method here runs
whole: they add the same to every row of a comparison. Layers are read as dense (no mixture of experts).

The FLOPs are computed from the layers' shapes and the tokens each layer actually saw
(`Generation.layer_tokens`), so pruning inside the LLM is counted layer by layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mllm.adapters import ModelAdapter


def linear_weights(module: nn.Module) -> int:
    """Weights of every linear map inside `module` (each costs 2 FLOPs per token)."""
    return sum(child.weight.numel() for child in module.modules() if isinstance(child, nn.Linear))


def attention_width(layer: nn.Module) -> int:
    """Heads x head dimension of a decoder layer's attention: the width of its queries."""
    attention = layer.self_attn
    return attention.config.num_attention_heads * attention.head_dim


def prefill_flops(adapter: ModelAdapter, layer_tokens: torch.Tensor) -> torch.Tensor:
    """(B,) prefill FLOPs per row, from `layer_tokens` (B, num_layers): the tokens each layer processed."""
    layers = adapter.decoder_layers
    if layer_tokens.ndim != 2 or layer_tokens.shape[1] != len(layers):
        raise ValueError(f"layer_tokens must be (batch, {len(layers)} layers), got {tuple(layer_tokens.shape)}")
    tokens = layer_tokens.double()
    weights = torch.tensor([float(linear_weights(layer)) for layer in layers], dtype=torch.float64)
    widths = torch.tensor([float(attention_width(layer)) for layer in layers], dtype=torch.float64)
    per_layer = 2 * tokens * weights + 4 * tokens**2 * widths
    return per_layer.sum(dim=1) + 2 * linear_weights(adapter.lm_head)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int | None]]:
    """Measure the peak memory allocated on a CUDA device inside the block: `{"bytes": ...}` after it.

    On other devices there is no allocator to ask and the value stays None.
    """
    result: dict[str, int | None] = {"bytes": None}
    if device.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device)
