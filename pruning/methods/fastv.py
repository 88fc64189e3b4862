"""`fastv`: drop the visual tokens the last prompt token attends to least, inside the LLM before layer `layer`.

As FastV's reference code (pkunlp-icler/FastV, `fast_v_inplace`): the score is the last token's attention
in layer `layer - 1`, averaged over heads; layers before `layer` see every token. `query=all` scores by
the mean attention a token receives from every real prompt token instead (the paper's wording).
Kept tokens stay in sequence order, so `reassign` and `reassign-raster` are the same run here.
"""

from __future__ import annotations

import torch

import mllm
from pruning.registry import LayerPruningMethod, register_method, top_k_indices


@register_method
class FastV(LayerPruningMethod):
    name = "fastv"

    def __init__(self, layer: int = 2, query: str = "last") -> None:
        if layer < 1:
            raise ValueError(f"fastv: layer must be >= 1 (it scores with layer - 1's attention), got {layer}")
        if query not in ("last", "all"):
            raise ValueError(f"fastv: query must be 'last' or 'all', got {query!r}")
        self.layer = layer
        self.query = query

    def layer_pruning(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int,
                      policy: str) -> mllm.LayerPruning:
        def select(context: mllm.LayerContext) -> torch.Tensor:
            mask = context.attention_mask.bool()
            if self.query == "last":
                received = context.attention().mean(dim=1)[:, 0]  # (B, L)
            else:
                batch, length = mask.shape
                queries = torch.arange(length, device=mask.device).expand(batch, -1)
                weights = context.attention(queries).mean(dim=1)  # (B, L queries, L keys)
                received = (weights * mask[:, :, None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
            return top_k_indices(received.gather(1, context.visual_index), num_kept)

        return mllm.LayerPruning(self.layer, select, policy=policy)
