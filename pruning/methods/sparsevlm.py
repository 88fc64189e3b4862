"""`sparsevlm`: prune visual tokens in stages inside the LLM, scored by text raters, recycling some pruned ones.

As SparseVLM's reference code (Gumpest/SparseVLMs, v1.x; see pruning/REFERENCES.md section 3):

- Raters: from the LLM's input embeddings, `m = mean_visual softmax_text(V Tᵀ)` with T every token after
  the image; the raters are the text tokens with `m` above its mean (all of them if none is).
- Stages: before each of `layers` the visual tokens present (recycled ones included) are scored by the
  raters' attention to them in the layer before, averaged over raters and heads, and the best kept.
  `layers=auto` scales the reference's (3, 7, 16) of 32 layers (it prunes after 2, 6 and 15) to the
  model's depth: round(l * depth / 32), clamped to [1, depth - 1], repeats dropped (the tiny 3- and
  4-layer LLMs get (1, 2)). Or `layers=3/7/16`: one to three strictly increasing layers.
- Counts: the budget is the reference's "retain N", a layer average: the visual tokens each layer sees,
  averaged over all layers (those before the first stage see all N), equals the budget as closely as
  integers allow. The stage counts keep the proportions of the reference's list for 192 of 576,
  (300, 200, 110) (its last k for k stages), scaled by one factor, each in [1, N], nonincreasing.
  Recycled tokens count toward their stage's count. `stages()` reports what was chosen. The average
  cannot go below (K N + depth - K) / depth with the first stage at K: smaller budgets get 1 per stage.
- `recycle=true` (the reference's `s_flag`): of the tokens a stage prunes, the top 30% by score (+1)
  are clustered by DPC-kNN into int(n / 10) + 1 clusters (fewer if the stage's count is smaller),
  each cluster's uniform mean is inserted after the kept visual tokens, in centre order. A recycled
  token sits at its cluster centre's position under `keep` (the centre is one of the tokens present).

Deviations: the reference breaks density ties with random noise, this code by index (deterministic);
cluster means are exact (the reference divides by count + 1e-6); the reference always prunes at least
one token per stage (`min(K, n - 1)`), here a stage whose count is all the tokens present prunes
nothing, so that a budget of N is the unpruned model; its layer average counts one layer fewer at full
length ("2*576 4*300 10*200 16*110"); positions follow the run's policy (the reference renumbers).
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch

import mllm
from pruning.registry import LayerPruningMethod, register_method, top_k_indices

REFERENCE_LAYERS = (3, 7, 16)  # LLM layers before which the reference drops tokens, of...
REFERENCE_DEPTH = 32  # ...Vicuna-7B's 32
REFERENCE_COUNTS = (300, 200, 110)  # its counts at those layers for "retain 192" of 576


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The reference's pruning layers scaled to `num_layers`, each in [1, num_layers - 1], repeats dropped."""
    if num_layers < 2:
        raise ValueError(f"sparsevlm needs an LLM of at least 2 layers, this one has {num_layers}")
    scaled = (math.floor(layer * num_layers / REFERENCE_DEPTH + 0.5) for layer in REFERENCE_LAYERS)
    return tuple(sorted({min(num_layers - 1, max(1, layer)) for layer in scaled}))


def stage_counts(layers: tuple[int, ...], num_layers: int, num_visual: int, num_kept: int) -> list[int]:
    """Visual tokens after each stage: the reference's proportions, one factor, layer average nearest `num_kept`."""
    if num_kept >= num_visual:
        return [num_visual] * len(layers)
    shares = REFERENCE_COUNTS[-len(layers):]
    spans = [later - earlier for earlier, later in pairwise([*layers, num_layers])]

    def counts(factor: float) -> list[int]:
        return [min(num_visual, max(1, math.floor(factor * share + 0.5))) for share in shares]

    def average(stage: list[int]) -> float:
        return (layers[0] * num_visual + sum(span * count for span, count in zip(spans, stage))) / num_layers

    # The counts only change where some factor * share crosses a half: try just past every such point.
    factors = sorted({0.0} | {(j + 0.5) / share + 1e-9 for share in shares for j in range(num_visual)})
    return min((counts(factor) for factor in factors), key=lambda stage: abs(average(stage) - num_kept))


def recycling_rule(pruned: int) -> tuple[int, int]:
    """(tokens clustered, clusters) for `pruned` pruned tokens, as the reference: the top 30% (+1), n / 10 + 1."""
    selected = min(pruned, int(pruned * 0.3) + 1)
    return selected, int(selected / 10) + 1


def split_count(present: int, count: int, recycle: bool) -> tuple[int, int]:
    """(kept, recycled) adding up to `count`: the most kept tokens whose pruned rest recycles into the rest."""
    if not recycle or count >= present:
        return min(count, present), 0
    for kept in range(count - 1, -1, -1):
        if kept + recycling_rule(present - kept)[1] <= count:
            return kept, count - kept
    return 0, count


def dpc_knn(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN as the reference's `cluster_and_merge`, on x (B, n, C).

    Returns the (B, clusters) centres, best first, and (B, n) each token's cluster (0..clusters-1).
    Distance d = |xi - xj| / sqrt(C); density = exp(-mean of the squared distances to the `clusters`
    nearest tokens, itself included); delta = distance to the nearest denser token (the largest
    distance in the row for the densest); centres = top delta * density; every token joins its
    nearest centre, centres themselves. Ties go to the lower index.
    """
    x = x.float()
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[-1] ** 0.5
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: j is denser than i
    farthest = distance.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(denser, distance, farthest).min(dim=-1).values
    centres = top_k_indices(delta * density, clusters)
    to_centres = distance.gather(1, centres[:, :, None].expand(-1, -1, distance.shape[2]))  # (B, clusters, n)
    assign = to_centres.argmin(dim=1)
    assign.scatter_(1, centres, torch.arange(clusters, device=x.device).expand_as(centres))
    return centres, assign


def cluster_means(x: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """(B, clusters, C): the uniform mean of each cluster's tokens."""
    members = torch.nn.functional.one_hot(assign, clusters).float()  # (B, n, clusters)
    means = members.transpose(1, 2) @ x.float() / members.sum(dim=1)[:, :, None]
    return means.to(x.dtype)


def text_raters(encoding: mllm.Encoding) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) offsets of each row's rater tokens from its text start (the token after the image), and validity."""
    rows = []
    for row in range(encoding.batch_size):
        start = int(encoding.visual_start[row])
        visual = encoding.inputs_embeds[row, start:start + encoding.num_visual].float()
        text = encoding.inputs_embeds[row, start + encoding.num_visual:].float()
        relevance = (visual @ text.T).softmax(dim=-1).mean(dim=0)  # raw dot products, as the reference
        raters = (relevance > relevance.mean()).nonzero()[:, 0]
        rows.append(raters if len(raters) else torch.arange(len(text), device=text.device))
    offsets = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    valid = torch.nn.utils.rnn.pad_sequence([torch.ones_like(row, dtype=torch.bool) for row in rows], batch_first=True)
    return offsets, valid


def rater_scores(context: mllm.LayerContext, offsets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, n): the raters' attention to each current visual token in the layer before, mean over raters and heads."""
    length = context.attention_mask.shape[1]
    device = context.visual_index.device
    queries = (context.visual_index[:, -1:] + 1 + offsets.to(device)).clamp(max=length - 1)
    attention = context.attention(queries).mean(dim=1)  # (B, raters, L)
    visual = attention.gather(2, context.visual_index[:, None, :].expand(-1, queries.shape[1], -1))
    weights = valid.to(device=device, dtype=visual.dtype)[:, :, None]
    return (visual * weights).sum(dim=1) / weights.sum(dim=1)


@register_method
class SparseVLM(LayerPruningMethod):
    name = "sparsevlm"

    def __init__(self, layers: str | int = "auto", recycle: bool = True) -> None:
        if isinstance(layers, (list, tuple)):
            layers = "/".join(str(layer) for layer in layers)
        self.layers = layers
        self.recycle = recycle
        if layers != "auto":
            self.stage_layers(max(self._given_layers()) + 1)  # checks the form now, the range per model

    def _given_layers(self) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in str(self.layers).split("/"))
        except ValueError:
            raise ValueError(f"sparsevlm: layers must be 'auto' or such as 3/7/16, got {self.layers!r}") from None

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """The LLM layers before which tokens are dropped, for an LLM of `num_layers` layers."""
        if self.layers == "auto":
            return default_layers(num_layers)
        layers = self._given_layers()
        if not 1 <= len(layers) <= len(REFERENCE_COUNTS):
            raise ValueError(f"sparsevlm: give one to {len(REFERENCE_COUNTS)} layers, got {self.layers!r}")
        if any(later <= earlier for earlier, later in pairwise(layers)):
            raise ValueError(f"sparsevlm: layers must be strictly increasing, got {self.layers!r}")
        if layers[0] < 1 or layers[-1] >= num_layers:
            raise ValueError(f"sparsevlm: layers {self.layers!r} out of range: each must lie in [1, {num_layers - 1}] "
                             f"(it scores with the layer before; the LLM has {num_layers} layers)")
        return layers

    def stages(self, num_layers: int, num_visual: int, num_kept: int) -> list[tuple[int, int, int]]:
        """Per stage: (layer, visual tokens from that layer on, of which recycled)."""
        layers = self.stage_layers(num_layers)
        present, stages = num_visual, []
        for layer, count in zip(layers, stage_counts(layers, num_layers, num_visual, num_kept)):
            stages.append((layer, count, split_count(present, count, self.recycle)[1]))
            present = count
        return stages

    def layer_pruning(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int,
                      policy: str) -> mllm.LayerPruning:
        stages = self.stages(len(model.adapter.decoder_layers), encoding.num_visual, num_kept)
        offsets, valid = text_raters(encoding)

        def select(context: mllm.LayerContext) -> torch.Tensor | mllm.LayerSelection:
            batch, present = context.visual_index.shape
            count = stages[context.stage][1]
            if count >= present:  # nothing to prune: the unpruned model, not even scored
                return torch.arange(present, device=context.visual_index.device).expand(batch, -1)
            kept, recycled = split_count(present, count, self.recycle)
            order = top_k_indices(rater_scores(context, offsets, valid), present)  # best first
            if recycled == 0:
                return order[:, :kept]
            chosen = order[:, kept:kept + recycling_rule(present - kept)[0]]  # the best of the pruned
            slots = context.visual_index.gather(1, chosen)[:, :, None]
            hidden = context.hidden_states.gather(1, slots.expand(-1, -1, context.hidden_states.shape[2]))
            centres, assign = dpc_knn(hidden, recycled)
            merged = cluster_means(hidden, assign, recycled)
            return mllm.LayerSelection(order[:, :kept], merged, chosen.gather(1, centres))

        return mllm.LayerPruning(tuple(layer for layer, _, _ in stages), select, policy=policy)
