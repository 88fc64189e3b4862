"""Convert checkpoints released in their own repositories' formats into ones `mllm.load` reads.

    python -m mllm.convert shikra --llama /ckpt/llama-7b --delta /ckpt/shikra-7b-delta-v1 \\
        --clip /ckpt/clip-vit-large-patch14 --out /ckpt/shikra-7b
    python -m mllm.convert minigptv2 --checkpoint minigptv2_checkpoint.pth --eva eva_vit_g.pth \\
        --llama /ckpt/Llama-2-7b-chat-hf --out /ckpt/minigptv2      # mllm.convert_minigptv2

`shikra` applies the released delta (`shikras/shikra-7b-delta-v1`) as the repository's `apply_delta.py` does:
every LLaMA tensor is base + delta, in the delta's dtype; the three tokens Shikra adds (`<im_patch>`,
`<im_start>`, `<im_end>`: rows 32000-32002 of `embed_tokens` and `lm_head`) and the projector
(`model.mm_projector`) are stored whole in the delta. The CLIP tower, which Shikra loads from
`openai/clip-vit-large-patch14` beside its checkpoint, is read from `--clip`. The output is a
`mllm.shikra.ShikraForConditionalGeneration` checkpoint with the delta's tokenizer and a processor (CLIP's image
processor, Shikra's `vicuna_v1.1` conversation).

Everything is checked before anything is written, and the output appears only once complete (written beside
`--out`, then renamed): a wrong base (vocabulary size, shapes), a delta with a missing, extra or misshapen
tensor, or a CLIP of another width is refused by file and field, and leaves nothing behind. The sources are
memory-mapped; the merged model is held in memory once (about 14 GB for the 7B in float16).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import AutoTokenizer, LlamaConfig, LlavaProcessor

from mllm.convert_common import ConversionError, Weights, check_state, read_config, require, write_checkpoint
from mllm.shikra import SHIKRA_CHAT_TEMPLATE, SHIKRA_TOKENS, ShikraConfig, ShikraForConditionalGeneration
from mllm.tiny import CLIPImageProcessor  # the PIL one: the toolkit never installs torchvision

PROJECTOR = {"model.mm_projector.weight": "model.multi_modal_projector.weight",
             "model.mm_projector.bias": "model.multi_modal_projector.bias"}
def _llm_key(key: str) -> str:
    """Shikra's (LLaMA's) key -> ShikraForConditionalGeneration's."""
    return key if key == "lm_head.weight" else "model.language_model." + key.removeprefix("model.")


def _merged_llm(base: Weights, delta: Weights, base_vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(our key, base + delta) for every LLaMA tensor, and the projector as the delta stores it."""
    def rotary(key: str) -> bool:
        return key.endswith("rotary_emb.inv_freq")  # a buffer old conversions saved; recomputed from the config

    missing = sorted(key for key in base.keys() if key not in delta and not rotary(key))
    if missing:
        raise ConversionError(f"{delta.directory}: the delta has no tensor {missing[0]!r} of the base "
                              f"({len(missing)} missing); is --delta a Shikra delta of this --llama?")
    for key in delta.keys():
        if rotary(key):
            continue
        change = delta[key]
        if key in PROJECTOR:
            yield PROJECTOR[key], change
            continue
        if key not in base:
            raise ConversionError(f"{delta.file_of(key)}: tensor {key!r} is neither LLaMA's nor Shikra's projector")
        original = base[key].to(change.dtype)
        if original.shape == change.shape:
            yield _llm_key(key), change + original
        elif key in ("model.embed_tokens.weight", "lm_head.weight") and change.shape[1:] == original.shape[1:] \
                and original.shape[0] == base_vocab and change.shape[0] == base_vocab + len(SHIKRA_TOKENS):
            merged = change.clone()
            merged[:base_vocab] += original  # the added tokens' rows are stored whole
            yield _llm_key(key), merged
        else:
            raise ConversionError(f"{delta.file_of(key)}: tensor {key!r} has shape {tuple(change.shape)}, the base's "
                                  f"({base.file_of(key)}) {tuple(original.shape)}")


def shikra_config(llama: dict, delta: dict, clip_vision: dict, base_vocab: int) -> ShikraConfig:
    text = LlamaConfig(**{**llama, "vocab_size": base_vocab + len(SHIKRA_TOKENS), "tie_word_embeddings": False,
                          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    side = clip_vision["image_size"] // clip_vision["patch_size"]
    return ShikraConfig(vision_config={**clip_vision, "model_type": "clip_vision_model"}, text_config=text.to_dict(),
                        image_token_id=base_vocab, im_start_token_id=base_vocab + 1, im_end_token_id=base_vocab + 2,
                        vision_feature_layer=int(delta.get("mm_vision_select_layer", -2)),
                        vision_feature_select_strategy="default", image_seq_length=side * side,
                        projector_hidden_act="linear", tie_word_embeddings=False)


def convert_shikra(llama: str | Path, delta: str | Path, clip: str | Path, out: str | Path) -> Path:
    """Apply the Shikra delta to LLaMA, add CLIP, and write a checkpoint `mllm.load` reads (module docstring)."""
    llama, delta, clip, out = Path(llama), Path(delta), Path(clip), Path(out)
    if out.exists():
        raise ConversionError(f"--out {out}: exists; remove it or choose another directory")
    base_config, delta_config = read_config(llama, "llama"), read_config(delta, "delta")
    clip_config = read_config(clip, "clip")
    require(base_config, llama / "config.json", "model_type", "llama", "--llama must be LLaMA in Hugging Face format")
    require(delta_config, delta / "config.json", "model_type", "shikra", "--delta must be Shikra's released delta")
    require(delta_config, delta / "config.json", "mm_use_im_start_end", True,
             "Shikra frames its image with <im_start> and <im_end>")
    base_vocab = int(base_config.get("vocab_size", 0))
    wanted = base_vocab + len(SHIKRA_TOKENS)
    if delta_config.get("vocab_size") != wanted:
        raise ConversionError(f"{llama / 'config.json'}: field 'vocab_size' is {base_vocab}, but the delta's "
                              f"({delta / 'config.json'}) is {delta_config.get('vocab_size')}: Shikra adds "
                              f"{len(SHIKRA_TOKENS)} tokens to the original LLaMA's 32000")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        require(base_config, llama / "config.json", field, delta_config.get(field), "the delta's value")
    clip_vision = clip_config.get("vision_config", clip_config)
    if not (clip / "preprocessor_config.json").is_file():
        raise ConversionError(f"{clip / 'preprocessor_config.json'}: not found; --clip must be the whole "
                              "openai/clip-vit-large-patch14 download (its image processor too)")
    require(clip_vision, clip / "config.json", "hidden_size", delta_config.get("mm_hidden_size"),
             "the delta's mm_hidden_size, the projector's input width")
    tokenizer = AutoTokenizer.from_pretrained(delta, local_files_only=True)
    for offset, token in enumerate(SHIKRA_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != base_vocab + offset:
            raise ConversionError(f"{delta}: the tokenizer gives {token} id {tokenizer.convert_tokens_to_ids(token)}, "
                                  f"Shikra's is {base_vocab + offset}")

    config = shikra_config(base_config, delta_config, clip_vision, base_vocab)
    state = dict(_merged_llm(Weights(llama), Weights(delta), base_vocab))
    clip_weights = Weights(clip)
    state |= {"model.vision_tower." + key.removeprefix("vision_model."): clip_weights[key]
              for key in clip_weights.keys() if key.startswith("vision_model.")}
    check_state(state, ShikraForConditionalGeneration, config, vision_source=clip, other_source=delta,
                extra_source=clip)

    def write(directory: Path) -> None:
        save_torch_state_dict({key: tensor.contiguous() for key, tensor in state.items()}, directory)
        config.save_pretrained(directory)
        generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                      "pad_token_id": tokenizer.unk_token_id}  # the delta's 0 / 1 / -1 are wrong (Shikra overrides)
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.pad_token = tokenizer.unk_token
        image_processor = CLIPImageProcessor.from_pretrained(clip, local_files_only=True)
        LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=clip_vision["patch_size"],
                       vision_feature_select_strategy="default", image_token="<im_patch>",
                       num_additional_image_tokens=1, chat_template=SHIKRA_CHAT_TEMPLATE).save_pretrained(directory)

    return write_checkpoint(out, write)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mllm.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="model", required=True)
    shikra = commands.add_parser("shikra", help="apply Shikra's released delta to LLaMA-7B, with CLIP ViT-L/14")
    shikra.add_argument("--llama", required=True, type=Path, help="LLaMA-7B in Hugging Face format (vocab 32000)")
    shikra.add_argument("--delta", required=True, type=Path, help="shikras/shikra-7b-delta-v1, downloaded")
    shikra.add_argument("--clip", required=True, type=Path, help="openai/clip-vit-large-patch14, downloaded")
    shikra.add_argument("--out", required=True, type=Path, help="the directory to write (must not exist)")
    minigptv2 = commands.add_parser("minigptv2", help="merge MiniGPT-v2's checkpoint (projector, LoRA) with EVA "
                                    "ViT-g and Llama-2-7b-chat")
    minigptv2.add_argument("--checkpoint", required=True, type=Path, help="MiniGPT-v2's released .pth (stage 3)")
    minigptv2.add_argument("--eva", required=True, type=Path, help="LAVIS' eva_vit_g.pth")
    minigptv2.add_argument("--llama", required=True, type=Path, help="Llama-2-7b-chat in Hugging Face format")
    minigptv2.add_argument("--lora-alpha", type=float, default=16.0,
                           help="LoRA alpha where the checkpoint's config does not record it (released: 16)")
    minigptv2.add_argument("--out", required=True, type=Path, help="the directory to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        if args.model == "shikra":
            out = convert_shikra(args.llama, args.delta, args.clip, args.out)
        else:
            from mllm.convert_minigptv2 import convert_minigptv2

            out = convert_minigptv2(args.checkpoint, args.eva, args.llama, args.out, lora_alpha=args.lora_alpha)
    except ConversionError as error:
        print(f"error: {error}")
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
