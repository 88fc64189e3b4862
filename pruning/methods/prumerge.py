"""`prumerge` and `prumerge+`: keep the patches the CLS token singles out, and merge their neighbours into them.

As LLaVA-PruMerge's reference (42Shawn/LLaVA-PruMerge, `clip_encoder.py`, `token_prune_merge_advanced`):

- Scores: the CLS row of a single-head attention over the full width, with the last vision layer's
  query and key projections applied to its input (the features LLaVA feeds its projector).
- `adaptive=true`: keep the IQR outliers, scores above Q3 + 1.5 IQR (the paper's setting, about 5% of
  the tokens on LLaVA-1.5; the budget is ignored and the count reported). `adaptive=false` (default):
  keep the top-scoring tokens, as many as make the budget with the summary token, so that methods
  compare at equal numbers of tokens fed to the LLM.
- Merge: each kept token adds its `neighbours` most key-similar tokens (cosine; other kept tokens
  included, as in the reference), weighted by their CLS attention, unnormalised, before the projector.
- `global_token=true` appends one extra token, the CLS-attention-weighted sum of every pruned token.
  It has no patch of its own: `extra_position` says whose position ID it takes (`centroid`: the patch
  nearest the attention-weighted centroid of the pruned tokens; `last`: the last patch).
- Emit order: best score first (what the reference feeds, and what `reassign` renumbers).

Two deviations, both to make a batch equal its rows run alone: the IQR is computed per image (the
reference pools the whole batch), and when nothing is pruned nothing is merged.

`prumerge+` adds spatially uniform samples (`token_prune_merge_advanced_plus`): with `adaptive=true` the
reference's samples every int(step / 3) tokens from int(step / 6), step = int(N / outliers); with a
budget, a quarter of it by score (the reference's share) and the rest evenly spaced over the others.
"""

from __future__ import annotations

import torch

import mllm
from pruning.registry import Selection, VisionPruning, register_method, require_cls_token, top_k_indices


@torch.no_grad()
def cls_scores_and_keys(model: mllm.MLLM, encoding: mllm.Encoding) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) CLS attention to each patch and (B, N, D) patch keys, from the last vision layer on its input."""
    hidden = encoding.vision_hidden_states
    if hidden is None:
        raise ValueError("prumerge reads the vision tower's hidden states: encode with vision_hidden_states=True "
                         "(method.encode_options(model) says so)")
    adapter = model.adapter
    last = len(adapter.vision_layers) - 1
    queries, keys = (part.float() for part in adapter.vision_queries_keys(last, hidden[last]))
    attention = (queries @ keys.transpose(1, 2) * queries.shape[-1] ** -0.5).softmax(dim=-1)
    cls_row = attention[:, 0, :]  # the CLS query, over every key
    return adapter.vision_patch_tokens(cls_row[..., None])[..., 0], adapter.vision_patch_tokens(keys)


def iqr_outliers(scores: torch.Tensor) -> int:
    """How many scores lie above Q3 + 1.5 IQR (at least one)."""
    low, high = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return max(1, int((scores > high + 1.5 * (high - low)).sum()))


def merge_neighbours(kept: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, features: torch.Tensor,
                     neighbours: int) -> torch.Tensor:
    """(n, D_vision): each kept token plus the score-weighted features of its most key-similar others."""
    unit = torch.nn.functional.normalize(keys, dim=-1)
    similarity = unit[kept] @ unit.T  # (n, N)
    similarity[torch.arange(len(kept)), kept] = float("-inf")  # never its own neighbour
    count = min(neighbours, keys.shape[0] - 1)
    nearest = similarity.topk(count, dim=1).indices  # (n, count)
    return features[kept] + (scores[nearest][..., None] * features[nearest]).sum(dim=1)


def centroid_patch(indices: torch.Tensor, weights: torch.Tensor, grid: tuple[int, int]) -> int:
    """The raster index of the patch nearest the weighted centroid of `indices` on the grid."""
    cols = grid[1]
    weights = weights / weights.sum().clamp(min=1e-12)
    row = float((weights * (indices // cols).float()).sum())
    col = float((weights * (indices % cols).float()).sum())
    return round(row) * cols + round(col)


@register_method
class PruMerge(VisionPruning):
    name = "prumerge"

    def __init__(self, adaptive: bool = False, neighbours: int = 32, global_token: bool = True,
                 extra_position: str = "centroid") -> None:
        if extra_position not in ("centroid", "last"):
            raise ValueError(f"{self.name}: extra_position must be 'centroid' or 'last', got {extra_position!r}")
        self.adaptive = adaptive
        self.neighbours = neighbours
        self.global_token = global_token
        self.extra_position = extra_position

    def encode_options(self, model: mllm.MLLM) -> dict[str, object]:
        require_cls_token(self, model)
        return {"vision_hidden_states": True}

    def patches(self, num_kept: int) -> int:
        """Patches to keep so that, with the summary token, `num_kept` tokens reach the LLM."""
        return max(1, num_kept - int(self.global_token))

    def choose(self, scores: torch.Tensor, num_kept: int) -> torch.Tensor:
        """One image's kept indices, in emit order."""
        count = iqr_outliers(scores) if self.adaptive else self.patches(num_kept)
        return top_k_indices(scores[None], count)[0]

    @torch.no_grad()
    def select(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int) -> Selection:
        num_visual = encoding.num_visual
        if num_kept >= num_visual and not self.adaptive:
            return Selection(torch.arange(num_visual).expand(encoding.batch_size, -1))
        scores, keys = cls_scores_and_keys(model, encoding)
        features = model.adapter.projector_inputs(encoding.vision_hidden_states).float()
        kept_rows, merged_rows, extra_rows, anchors = [], [], [], []
        for row in range(encoding.batch_size):
            kept = self.choose(scores[row], num_kept)
            kept_rows.append(kept.cpu())
            merged_rows.append(merge_neighbours(kept, scores[row], keys[row], features[row], self.neighbours))
            pruned = torch.ones(num_visual, dtype=torch.bool, device=kept.device)
            pruned[kept] = False
            if self.global_token and bool(pruned.any()):
                dropped = pruned.nonzero()[:, 0]
                weights = scores[row, dropped]
                extra_rows.append((weights[:, None] * features[row, dropped]).sum(dim=0, keepdim=True))
                anchor = centroid_patch(dropped.cpu(), weights.cpu(), encoding.grid) \
                    if self.extra_position == "centroid" else num_visual - 1
                anchors.append(anchor)
        project = model.adapter.project
        dtype = encoding.inputs_embeds.dtype
        merged = [project(rows[None].to(dtype))[0] for rows in merged_rows]
        extra = anchor_tensor = None
        if len(extra_rows) == encoding.batch_size:
            extra = project(torch.stack(extra_rows).to(dtype))
            anchor_tensor = torch.tensor(anchors)[:, None]
        return Selection(kept_rows, merged, extra=extra, extra_anchors=anchor_tensor)


@register_method
class PruMergePlus(PruMerge):
    name = "prumerge+"

    def choose(self, scores: torch.Tensor, num_kept: int) -> torch.Tensor:
        num_visual = scores.shape[0]
        if self.adaptive:
            outliers = top_k_indices(scores[None], iqr_outliers(scores))[0]
            step = max(1, num_visual // len(outliers))
            samples = torch.arange(step // 6, num_visual - 1, max(1, step // 3), device=scores.device)
        else:
            num_kept = self.patches(num_kept)
            outliers = top_k_indices(scores[None], max(1, round(num_kept / 4)))[0]
            others = torch.ones(num_visual, dtype=torch.bool, device=scores.device)
            others[outliers] = False
            rest = others.nonzero()[:, 0]
            samples = rest[torch.linspace(0, len(rest) - 1, num_kept - len(outliers)).round().long()]
        samples = samples[~torch.isin(samples, outliers)]
        return torch.cat([outliers, samples])
