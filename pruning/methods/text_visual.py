"""`text-visual`: the visual tokens most similar to the prompt's text, in the LLM's input embedding space."""

from __future__ import annotations

import torch

import mllm
from pruning.registry import Selection, VisionPruning, register_method, top_k_indices


def text_mask(encoding: mllm.Encoding) -> torch.Tensor:
    """(B, L) True on each row's text tokens: neither padding nor visual."""
    mask = encoding.attention_mask.bool().clone()
    rows = torch.arange(encoding.batch_size, device=mask.device)[:, None]
    mask[rows, encoding.visual_index().to(mask.device)] = False
    return mask


@register_method
class TextVisualPruning(VisionPruning):
    """Top-k visual tokens by cosine similarity to the prompt's text embeddings, emitted best first.

    `reduce` pools a visual token's similarities over the text tokens: `mean` or `max`.
    """

    name = "text-visual"

    def __init__(self, reduce: str = "mean") -> None:
        if reduce not in ("mean", "max"):
            raise ValueError(f"text-visual: reduce must be 'mean' or 'max', got {reduce!r}")
        self.reduce = reduce

    def select(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int) -> Selection:
        embeds = torch.nn.functional.normalize(encoding.inputs_embeds.float(), dim=-1)
        visual = torch.nn.functional.normalize(encoding.visual_features.float(), dim=-1)
        similarity = visual @ embeds.transpose(1, 2)  # (B, N, L)
        text = text_mask(encoding)[:, None, :].to(similarity.device)
        if self.reduce == "max":
            scores = similarity.masked_fill(~text, float("-inf")).amax(dim=-1)
        else:
            scores = (similarity * text).sum(dim=-1) / text.sum(dim=-1).clamp(min=1)
        return Selection(top_k_indices(scores, num_kept))
