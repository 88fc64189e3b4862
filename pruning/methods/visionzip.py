"""`visionzip`: dominant tokens by CLS attention, plus contextual tokens merged from the rest.

As VisionZip's reference (dvlab-research/VisionZip, `CLIPVisionTower_VisionZip.forward`):

- Dominant: the CLS token and the patches with the highest CLS attention in vision layer `layer`
  (default -2), summed over heads. The CLS token counts towards the dominant share when `cls_token=true`.
- Contextual: `contextual_share` of the budget (the reference's 10 of 64, 20 of 128, 30 of 192 are all
  0.15625). Targets are evenly spaced by rank among the remaining patches; every other remaining patch
  joins the target whose key (layer `layer`, averaged over heads) is most cosine-similar, and a
  contextual token is its target plus the mean of its members, before the projector.
- Emit order: dominant patches in raster order, then the contextual tokens in target order. A
  contextual token sits at its target's position. The CLS token is an extra token fed after them at
  `cls_position`: the first patch's ID (`first`) or the last's (`last`); the reference feeds it first.
"""

from __future__ import annotations

import torch

import mllm
from pruning.methods.cls_visual import cls_attention
from pruning.registry import Selection, VisionPruning, register_method, require_cls_token, top_k_indices


@torch.no_grad()
def head_mean_keys(model: mllm.MLLM, encoding: mllm.Encoding, layer: int) -> torch.Tensor:
    """(B, N, head_dim) patch keys of vision layer `layer` on its input, averaged over heads."""
    adapter = model.adapter
    resolved = layer % len(adapter.vision_layers)
    _, keys = adapter.vision_queries_keys(resolved, encoding.vision_hidden_states[resolved])
    batch, length, width = keys.shape
    heads = adapter.vision_num_heads
    keys = keys.float().view(batch, length, heads, width // heads).mean(dim=2)
    return adapter.vision_patch_tokens(keys)


@register_method
class VisionZip(VisionPruning):
    name = "visionzip"

    def __init__(self, contextual_share: float = 0.15625, layer: int = -2, cls_token: bool = True,
                 cls_position: str = "first") -> None:
        if not 0.0 <= contextual_share < 1.0:
            raise ValueError(f"visionzip: contextual_share must lie in [0, 1), got {contextual_share}")
        if cls_position not in ("first", "last"):
            raise ValueError(f"visionzip: cls_position must be 'first' or 'last', got {cls_position!r}")
        self.contextual_share = contextual_share
        self.layer = layer
        self.cls_token = cls_token
        self.cls_position = cls_position

    def encode_options(self, model: mllm.MLLM) -> dict[str, object]:
        require_cls_token(self, model)
        return {"vision_hidden_states": True, "vision_attentions": [self.layer]}

    def split(self, num_kept: int) -> tuple[int, int]:
        """(dominant patches, contextual tokens) for a budget of `num_kept` tokens, the CLS token included."""
        contextual = round(self.contextual_share * num_kept)
        dominant = num_kept - contextual - int(self.cls_token)
        if dominant < 1:
            raise ValueError(f"visionzip: a budget of {num_kept} tokens leaves no dominant patch "
                             f"({contextual} contextual{', 1 CLS' if self.cls_token else ''})")
        return dominant, contextual

    @torch.no_grad()
    def select(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int) -> Selection:
        num_visual = encoding.num_visual
        if num_kept >= num_visual:
            return Selection(torch.arange(num_visual).expand(encoding.batch_size, -1))
        dominant_count, contextual_count = self.split(num_kept)
        scores = cls_attention(model, encoding, self.layer)
        keys = torch.nn.functional.normalize(head_mean_keys(model, encoding, self.layer), dim=-1)
        hidden = encoding.vision_hidden_states[model.model.config.vision_feature_layer].float()
        features = model.adapter.vision_patch_tokens(hidden)
        kept_rows, merged_rows = [], []
        for row in range(encoding.batch_size):
            dominant = top_k_indices(scores[row][None], dominant_count)[0].sort().values
            rest = torch.ones(num_visual, dtype=torch.bool, device=dominant.device)
            rest[dominant] = False
            rest = rest.nonzero()[:, 0]
            step = max(1, len(rest) // max(1, contextual_count))
            targets = rest[torch.arange(0, len(rest), step)[:contextual_count]]
            contextual = features[row, targets]
            members = rest[~torch.isin(rest, targets)]
            if len(targets) and len(members):
                owner = (keys[row, members] @ keys[row, targets].T).argmax(dim=1)  # (members,)
                sums = torch.zeros_like(contextual).index_add_(0, owner, features[row, members])
                counts = torch.bincount(owner, minlength=len(targets)).clamp(min=1)[:, None]
                contextual = contextual + sums / counts
            kept_rows.append(torch.cat([dominant, targets]).cpu())
            merged_rows.append(torch.cat([features[row, dominant], contextual]))
        dtype = encoding.inputs_embeds.dtype
        merged = [model.adapter.project(rows[None].to(dtype))[0] for rows in merged_rows]
        if not self.cls_token:
            return Selection(kept_rows, merged)
        cls_features = model.adapter.project(hidden[:, :1].to(dtype))  # CLIP's CLS comes first
        anchor = 0 if self.cls_position == "first" else num_visual - 1
        anchors = torch.full((encoding.batch_size, 1), anchor)
        return Selection(kept_rows, merged, extra=cls_features, extra_anchors=anchors)
