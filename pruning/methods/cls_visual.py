"""`cls-visual`: the patches the vision tower's CLS token attends to most, in its penultimate layer."""

from __future__ import annotations

import torch

import mllm
from pruning.registry import Selection, VisionPruning, register_method, require_cls_token, top_k_indices


def cls_attention(model: mllm.MLLM, encoding: mllm.Encoding, layer: int) -> torch.Tensor:
    """(B, N) the CLS query's attention to each visual token's patches at vision layer `layer`, averaged over
    heads (summed over a token's patches where it concatenates several: MiniGPT-v2's 1 x 4 strips)."""
    attentions = encoding.vision_attentions or {}
    resolved = layer % len(model.adapter.vision_layers)
    if resolved not in attentions:
        raise ValueError(f"this method reads vision layer {layer}'s attention: encode with "
                         f"vision_attentions=[{layer}] (method.encode_options(model) says so)")
    cls_row = attentions[resolved][:, :, 0, :].mean(dim=1)  # (B, 1 + N)
    return model.adapter.token_scores(model.adapter.vision_patch_tokens(cls_row[..., None])[..., 0])


@register_method
class ClsVisualPruning(VisionPruning):
    """Top-k patches by CLS attention at vision layer `layer`, emitted best first."""

    name = "cls-visual"

    def __init__(self, layer: int = -2) -> None:
        self.layer = layer

    def encode_options(self, model: mllm.MLLM) -> dict[str, object]:
        require_cls_token(self, model)
        return {"vision_attentions": [self.layer]}

    def select(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int) -> Selection:
        return Selection(top_k_indices(cls_attention(model, encoding, self.layer), num_kept))
