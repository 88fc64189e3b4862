"""Where an answer looked: each LLM layer's attention from the queries that produced the answer's tokens.

    rows = mllm.answer_attention(model, enc, generation.token_ids, keep=kept, policy="keep")
    rows[0].weights        # (layers, T, P): head-mean attention of answer step t to prompt token p
    rows[0].visual_index   # positions in the prompt of the fed visual tokens (kept order, then extras)

The prompt is built as `generate` builds it (same kept tokens, order, position IDs and extras) and the
answer is fed after it, teacher-forced, numbered on from the last prompt token's IDs + 1 on every
axis, as decoding numbers it. Query t is the token whose output chose answer token t: the last prompt
token for t = 0, answer token t - 1 after it. Weights are recomputed for those rows only from each
layer's inputs (`ModelAdapter.llm_attention`), so the model keeps its SDPA / flash attention; forward
pre-hooks capture the inputs and are removed when the call returns. In-LLM pruning is not supported
here: its selection would see the teacher-forced answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mllm.encoding import Encoding
from mllm.errors import KeepSetError
from mllm.generation import ExtraTokens, KeepSpec, build_prompt_batch
from mllm.positions import PositionPolicy

if TYPE_CHECKING:
    from mllm.loading import MLLM


@dataclass
class AnswerAttention:
    """One row's attention from its answer steps to its prompt."""

    weights: torch.Tensor  # (layers, T, P) float32, the mean over heads; P: the row's real prompt tokens
    visual_index: torch.Tensor  # (n,) positions in the P prompt tokens of the fed visual tokens, in the order fed
    kept: torch.Tensor  # (k,) the fed visual tokens' original indices (the first k of `visual_index`; extras after)


@torch.no_grad()
def answer_attention(mllm: MLLM, encoding: Encoding, answers: Sequence[Sequence[int]], *, keep: KeepSpec = None,
                     policy: PositionPolicy | str = "keep", extra: ExtraTokens | None = None) -> list[AnswerAttention]:
    """Per row, every LLM layer's attention from the steps that produced `answers[row]` to the prompt."""
    if len(answers) != encoding.batch_size:
        raise KeepSetError(f"{len(answers)} answers for a batch of {encoding.batch_size} rows")
    if any(len(answer) == 0 for answer in answers):
        raise KeepSetError("every row needs at least one answer token: its first is produced by the prompt")
    prompt = build_prompt_batch(mllm, encoding, keep, policy, extra)
    adapter = mllm.adapter
    device = prompt.inputs_embeds.device
    batch, length = prompt.attention_mask.shape
    steps = max(len(answer) for answer in answers)
    pad_id = mllm.tokenizer.pad_token_id or 0
    tokens = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
    real = torch.zeros(batch, steps, dtype=prompt.attention_mask.dtype, device=device)
    for row, answer in enumerate(answers):
        tokens[row, : len(answer)] = torch.as_tensor(list(answer), device=device)
        real[row, : len(answer)] = 1
    # Only answer tokens before the last are fed: the last is produced, never read.
    fed = tokens[:, : steps - 1]
    embeds = torch.cat([prompt.inputs_embeds, adapter.embed_tokens(fed).to(prompt.inputs_embeds.dtype)], dim=1)
    mask = torch.cat([prompt.attention_mask, real[:, : steps - 1]], dim=1)
    following = prompt.position_ids[:, :, -1:] + 1 + torch.arange(steps - 1, device=device)  # (axes, B, T-1)
    positions = torch.cat([prompt.position_ids, following], dim=2)
    queries = (length - 1 + torch.arange(steps, device=device)).expand(batch, -1)  # (B, T)

    layers = adapter.decoder_layers
    weights: list[torch.Tensor] = [torch.empty(0)] * len(layers)
    hooks = []

    def capture(index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            rows = adapter.llm_attention(index, normed_hidden=args[0] if args else kwargs["hidden_states"],
                                         position_embeddings=kwargs["position_embeddings"],
                                         attention_mask=kwargs.get("attention_mask"), queries=queries)
            weights[index] = rows.mean(dim=1)[:, :, :length].float().cpu()  # (B, T, prompt keys)
        return hook

    try:
        for index, layer in enumerate(layers):
            hooks.append(layer.self_attn.register_forward_pre_hook(capture(index), with_kwargs=True))
        adapter.language_model(inputs_embeds=embeds, attention_mask=mask,
                               position_ids=adapter.llm_position_ids(positions), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    stacked = torch.stack(weights, dim=1)  # (B, layers, T, L)
    out = []
    for row, answer in enumerate(answers):
        padding = int((prompt.attention_mask[row] == 0).sum())
        out.append(AnswerAttention(weights=stacked[row, :, : len(answer), padding:],
                                   visual_index=prompt.visual_index[row].cpu() - padding,
                                   kept=prompt.kept[row].cpu()))
    return out
