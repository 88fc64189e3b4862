"""Run the LLM on chosen visual tokens with chosen position IDs, then decode greedily with a KV cache.

The prompt fed to the LLM is `prefix | kept visual tokens (in the given order) | suffix` for each
row, numbered by `mllm.positions`; rows are left-padded into one batch. The attention mask is always
explicit: position IDs with gaps and no mask would be read by transformers as packed sequences.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mllm.encoding import Encoding
from mllm.errors import KeepSetError
from mllm.layer_pruning import LayerPruning, layer_pruning_hooks
from mllm.positions import PositionPolicy, position_ids, validate_anchors, validate_kept

if TYPE_CHECKING:
    from mllm.loading import MLLM

KeepSpec = torch.Tensor | Sequence[torch.Tensor | Sequence[int]] | None


@dataclass
class PromptBatch:
    """The left-padded LLM input after pre-LLM pruning."""

    inputs_embeds: torch.Tensor  # (B, L', D)
    attention_mask: torch.Tensor  # (B, L')
    position_ids: torch.Tensor  # (axes, B, L'); padding gets 1
    kept: list[torch.Tensor]  # per row: kept visual indices (0..N-1) in the order fed
    visual_index: list[torch.Tensor]  # per row: sequence positions of the fed visual tokens (kept, then extra)


@dataclass
class Generation:
    """Greedy decoding output, one entry per row."""

    token_ids: list[list[int]]  # generated tokens, EOS included when reached
    texts: list[str]  # decoded, special tokens skipped, cut before the first stop string
    kept: list[torch.Tensor]  # visual tokens (original indices) the last LLM layer saw, in order
    position_ids: list[torch.Tensor]  # per row: (axes, L') prompt position IDs fed to the first LLM layer
    prefill_logits: torch.Tensor | None = None  # (B, L', V) when requested; in-LLM pruning: kept rows only
    prefill_mask: torch.Tensor | None = None  # (B, L') bool: which rows of prefill_logits are real tokens
    step_logits: torch.Tensor | None = None  # (B, T, V): logits that chose generated token t
    num_extra: int = 0  # extra tokens (`ExtraTokens`) fed after each row's kept visual tokens
    layer_tokens: torch.Tensor | None = None  # (B, num_layers): real prompt tokens each LLM layer saw at prefill
    visual_layer_tokens: torch.Tensor | None = None  # (B, num_layers): how many of them were visual (extras included)
    prefill_seconds: float = 0.0  # wall time of the batch's prefill (the LLM on the prompt, first logits)
    decode_seconds: float = 0.0  # wall time of the decoding steps after it
    decode_steps: int = 0  # LLM forward passes after the prefill (tokens decoded per row, at most)


def merge_generations(parts: Sequence[tuple[Sequence[int], Generation]], batch: int) -> Generation:
    """One `Generation` for a batch run in parts (rows grouped by grid): part i holds rows `parts[i][0]`.

    Logits are not merged (the parts' prompts differ in length); the parts' times add up.
    """
    if any(part.prefill_logits is not None for _, part in parts):
        raise KeepSetError("logits of a batch run in parts are not merged: request output_logits for rows "
                           "with one grid of visual tokens")
    order = [None] * batch
    for rows, part in parts:
        for position, row in enumerate(rows):
            order[row] = (part, position)
    per_row = {name: [getattr(part, name)[position] for part, position in order]
               for name in ("token_ids", "texts", "kept", "position_ids")}
    extras = {part.num_extra for _, part in parts}
    if len(extras) > 1:
        raise KeepSetError(f"parts of one batch fed different numbers of extra tokens: {sorted(extras)}")
    return Generation(
        **per_row,
        num_extra=extras.pop(),
        layer_tokens=torch.stack([part.layer_tokens[position] for part, position in order]),
        visual_layer_tokens=torch.stack([part.visual_layer_tokens[position] for part, position in order]),
        prefill_seconds=sum(part.prefill_seconds for _, part in parts),
        decode_seconds=sum(part.decode_seconds for _, part in parts),
        decode_steps=sum(part.decode_steps for _, part in parts),
    )


def _keep_per_row(keep: KeepSpec, counts: Sequence[int]) -> list[torch.Tensor]:
    """One validated keep set per row, each against that row's own number of visual tokens."""
    if keep is None:
        return [torch.arange(count) for count in counts]
    rows = list(keep) if not isinstance(keep, torch.Tensor) or keep.ndim == 2 else None
    if rows is None or len(rows) != len(counts):
        shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else len(keep)
        raise KeepSetError(f"keep must give one keep set per prompt ({len(counts)}), got {shape}")
    kept = []
    for row, (indices, count) in enumerate(zip(rows, counts)):
        try:
            kept.append(validate_kept(torch.as_tensor(indices).cpu(), count))
        except KeepSetError as error:
            raise KeepSetError(f"row {row}: {error}") from None
    return kept


@dataclass
class ExtraTokens:
    """Visual tokens without a slot of their own, fed after each row's kept tokens (see `mllm.positions`).

    `features`: (B, m, D) in the LLM's embedding space. `anchors`: (B, m) visual-token indices whose
    original position IDs they take (under ``reassign`` they are numbered on after the kept tokens).
    """

    features: torch.Tensor
    anchors: torch.Tensor

    def check(self, counts: Sequence[int]) -> None:
        batch = len(counts)
        if self.features.ndim != 3 or self.anchors.shape != self.features.shape[:2] or self.anchors.shape[0] != batch:
            raise KeepSetError(f"extra tokens need features (batch={batch}, m, D) and anchors (batch, m); got "
                               f"{tuple(self.features.shape)} and {tuple(self.anchors.shape)}")
        for anchors, count in zip(self.anchors, counts):
            validate_anchors(anchors, count)


def build_prompt_batch(
    mllm: MLLM, encoding: Encoding, keep: KeepSpec = None, policy: PositionPolicy | str = "keep",
    extra: ExtraTokens | None = None,
) -> PromptBatch:
    """Select and order each row's visual tokens (then any `extra`), number the sequence under `policy`, left-pad."""
    policy = PositionPolicy.parse(policy)
    kept_rows = _keep_per_row(keep, encoding.visual_counts)
    if extra is not None:
        extra.check(encoding.visual_counts)
    embeds = encoding.inputs_embeds
    rows, positions, fed = [], [], []
    for row, kept in enumerate(kept_rows):
        padding, prefix, _ = encoding.layout(row)
        start = int(encoding.visual_start[row])
        visual = embeds[row, start + kept.to(embeds.device)]
        anchors = None
        if extra is not None:
            visual = torch.cat([visual, extra.features[row].to(device=embeds.device, dtype=embeds.dtype)])
            anchors = extra.anchors[row]
        rows.append(torch.cat([embeds[row, padding:start], visual, embeds[row, start + encoding.visual_counts[row]:]]))
        positions.append(position_ids(kept, encoding.layouts[row], policy, extra_anchors=anchors))
        fed.append(len(visual))

    length = max(len(row) for row in rows)
    pad_id = mllm.tokenizer.pad_token_id
    pad_embed = mllm.adapter.embed_tokens(torch.tensor([pad_id or 0], device=embeds.device))[0]
    batch_embeds = pad_embed.expand(len(rows), length, -1).clone()
    mask = torch.zeros(len(rows), length, dtype=encoding.attention_mask.dtype, device=embeds.device)
    batch_ids = torch.ones(positions[0].shape[0], len(rows), length, dtype=torch.long, device=embeds.device)
    visual_index = []
    for row, (sequence, ids) in enumerate(zip(rows, positions)):
        padding = length - len(sequence)
        batch_embeds[row, padding:] = sequence
        mask[row, padding:] = 1
        batch_ids[:, row, padding:] = ids.to(embeds.device)
        prefix = encoding.layout(row)[1]
        visual_index.append(padding + prefix + torch.arange(fed[row]))
    return PromptBatch(batch_embeds, mask, batch_ids, kept_rows, visual_index)


def eos_ids(mllm: MLLM) -> set[int]:
    """The token IDs that end a generation: the generation config's EOS (several for Qwen), else the tokenizer's."""
    eos = mllm.model.generation_config.eos_token_id
    if eos is None:
        eos = mllm.tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def _clock(device: torch.device) -> float:
    """Wall time once the device's queued work is done, so GPU kernels are timed and not just launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    hits = [text.index(s) for s in stop if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


@torch.no_grad()
def generate(
    mllm: MLLM,
    encoding: Encoding,
    *,
    keep: KeepSpec = None,
    policy: PositionPolicy | str = "keep",
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    layer_pruning: LayerPruning | None = None,
    output_logits: bool = False,
    extra: ExtraTokens | None = None,
) -> Generation:
    """Greedy generation on the kept visual tokens of each row.

    `keep`: per row, indices (0..N-1) of the visual tokens to feed, in the order to feed them;
    None keeps all in raster order. `policy`: how the fed tokens are numbered (see
    `mllm.positions`). `layer_pruning`: drop more tokens inside the LLM (see `mllm.layer_pruning`).
    `extra`: visual tokens without a slot, fed after the kept ones at their anchors' IDs (`ExtraTokens`).
    """
    if extra is not None and layer_pruning is not None:
        raise KeepSetError("extra tokens and in-LLM pruning cannot be combined in one call")
    prompt = build_prompt_batch(mllm, encoding, keep, policy, extra)
    adapter = mllm.adapter
    batch = prompt.inputs_embeds.shape[0]
    device = prompt.inputs_embeds.device
    eos = eos_ids(mllm)
    pad_id = mllm.tokenizer.pad_token_id or 0

    hooks = nullcontext()
    if layer_pruning is not None:
        counts = {len(kept) for kept in prompt.kept}
        if len(counts) != 1:
            raise KeepSetError(f"in-LLM pruning needs every row to enter the LLM with the same number of "
                               f"visual tokens; got {sorted(counts)}: run such rows in separate calls")
        hooks = layer_pruning_hooks(layer_pruning, adapter, prompt.attention_mask,
                                    torch.stack(prompt.visual_index).to(device))

    mask = prompt.attention_mask
    next_position = prompt.position_ids[:, :, -1:] + 1  # (axes, B, 1): the last prompt token's IDs + 1
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = [max_new_tokens] * batch
    step_logits = []
    started = _clock(device)
    prefill_done = None
    with hooks as state:
        out = adapter.language_model(inputs_embeds=prompt.inputs_embeds, attention_mask=mask,
                                     position_ids=adapter.llm_position_ids(prompt.position_ids), use_cache=True)
        cache = out.past_key_values
        hidden = out.last_hidden_state
        prefill_logits = adapter.lm_head(hidden) if output_logits else None
        logits = prefill_logits[:, -1] if output_logits else adapter.lm_head(hidden[:, -1])
        prefill_done = _clock(device)
        for step in range(max_new_tokens):
            if output_logits:
                step_logits.append(logits.float())
            token = logits.float().argmax(dim=-1).masked_fill(finished, pad_id)
            generated = torch.cat([generated, token[:, None]], dim=1)
            for row in (~finished).nonzero().flatten().tolist():
                done = int(token[row]) in eos
                if stop and not done:  # decode only when there are stop strings to look for
                    text = mllm.tokenizer.decode(generated[row, : step + 1], skip_special_tokens=True)
                    done = _cut_at_stop(text, stop)[1]
                if done:
                    finished[row] = True
                    lengths[row] = step + 1
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = adapter.language_model(
                inputs_embeds=adapter.embed_tokens(token[:, None]), attention_mask=mask,
                position_ids=adapter.llm_position_ids(next_position + step), past_key_values=cache, use_cache=True)
            logits = adapter.lm_head(out.last_hidden_state[:, -1])
    finished_at = _clock(device)

    kept, logits_mask = prompt.kept, prompt.attention_mask
    num_layers = len(adapter.decoder_layers)
    layer_tokens = prompt.attention_mask.sum(dim=1, keepdim=True).expand(-1, num_layers)
    if state is not None:
        kept = [row_kept[state.kept_visual[row].cpu()] for row, row_kept in enumerate(prompt.kept)]
        logits_mask = prompt.attention_mask.gather(1, state.sequence_keep)
        layer_tokens = state.prefill_tokens(num_layers)
    # Text tokens are never pruned, so each layer's visual count is its token count less the row's text.
    text_tokens = prompt.attention_mask.sum(dim=1) - torch.tensor([len(index) for index in prompt.visual_index],
                                                                   device=device)
    token_ids = [generated[row, : lengths[row]].tolist() for row in range(batch)]
    texts = [_cut_at_stop(mllm.tokenizer.decode(ids, skip_special_tokens=True), stop)[0] for ids in token_ids]
    return Generation(
        token_ids=token_ids,
        texts=texts,
        kept=kept,
        position_ids=[prompt.position_ids[:, row, prompt.attention_mask[row] == 1].cpu() for row in range(batch)],
        prefill_logits=prefill_logits,
        prefill_mask=logits_mask.bool() if output_logits else None,
        step_logits=torch.stack(step_logits, dim=1) if output_logits else None,
        num_extra=0 if extra is None else extra.features.shape[1],
        layer_tokens=layer_tokens.cpu(),
        visual_layer_tokens=(layer_tokens - text_tokens[:, None]).cpu(),
        prefill_seconds=prefill_done - started,
        decode_seconds=finished_at - prefill_done,
        decode_steps=max(0, generated.shape[1] - 1),
    )
