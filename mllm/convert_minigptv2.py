"""`python -m mllm.convert minigptv2`: MiniGPT-v2's released files merged into one `mllm.load` checkpoint.

    python -m mllm.convert minigptv2 --checkpoint minigptv2_checkpoint.pth --eva eva_vit_g.pth \\
        --llama /ckpt/Llama-2-7b-chat-hf --out /ckpt/minigptv2

MiniGPT-v2 (Vision-CAIR/MiniGPT-4) saves only what it trained, under `ckpt["model"]`: `llama_proj` and the
LoRA factors (r 64, alpha 16, on every layer's q_proj and v_proj; peft's key names, with or without the
`.default` adapter level), and maybe `ln_vision` (identity where absent, as MiniGPT-v2 initialises it). The
EVA ViT-g comes from LAVIS' `eva_vit_g.pth` (a flat state dict: `cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.*`), of which MiniGPT-v2 builds 39 blocks (a 40th in the file is ignored, as its `strict=False` load
ignores it), and Llama-2-7b-chat from its Hugging Face directory. The converter does what MiniGPT-v2 does at
load time: the 16 x 16 position embeddings interpolated bicubically (align_corners False, in float32, the CLS
position kept) to the 448 px grid, q and v biases with a zero k bias, and the LoRA merged (W + alpha / r B A).

Every tensor is checked before anything is written, and the output appears only once complete: a missing or
unexpected key, a misshapen factor or a projector of the wrong width is refused by file and key.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, Blip2VisionConfig, LlamaConfig

from mllm.convert_common import ConversionError, Weights, check_state, read_config, require, write_checkpoint
from mllm.minigptv2 import MiniGPTv2Config, MiniGPTv2ForConditionalGeneration
from mllm.tiny import build_minigptv2_processor

_LORA = re.compile(r"llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.([qv])_proj\."
                   r"lora_([AB])(?:\.default)?\.weight")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_BLOCK_KEYS = {"norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
               "attn.qkv.weight": "self_attn.qkv.weight", "attn.proj.weight": "self_attn.projection.weight",
               "attn.proj.bias": "self_attn.projection.bias", "norm2.weight": "layer_norm2.weight",
               "norm2.bias": "layer_norm2.bias", "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
               "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias"}
_BIASES = ("attn.q_bias", "attn.v_bias")
_EMBEDDINGS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")


@dataclass(frozen=True)
class EvaShape:
    """What MiniGPT-v2's `create_eva_vit_g` fixes rather than reads from the weights (the released values)."""

    depth: int = 39
    head_dim: int = 88
    image_size: int = 448
    tokens_per_group: int = 4


def _load_pth(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: not found (--{what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ConversionError(f"{path}: not a PyTorch checkpoint torch.load reads with weights_only=True ({error})") \
            from None


def interpolate_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g0^2, D) -> (1, 1 + grid^2, D): the patch positions resized bicubically, the CLS position kept."""
    width = table.shape[-1]
    source = math.isqrt(table.shape[1] - 1)
    if source * source != table.shape[1] - 1:
        raise ConversionError(f"pos_embed: {table.shape[1] - 1} patch positions are no square grid")
    patches = table[:, 1:].float().reshape(1, source, source, width).permute(0, 3, 1, 2)
    if source != grid:
        patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1].float(), patches.permute(0, 2, 3, 1).reshape(1, grid * grid, width)], dim=1)


def eva_tower(eva: dict, path: Path, shape: EvaShape) -> tuple[dict[str, torch.Tensor], Blip2VisionConfig]:
    """The EVA state dict as `Blip2VisionModel`'s (keys under `model.vision_tower.`) and its config."""
    for key in _EMBEDDINGS:
        if key not in eva:
            raise ConversionError(f"{path}: no tensor {key!r}; --eva must be LAVIS' eva_vit_g.pth")
    patch = eva["patch_embed.proj.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    if width % shape.head_dim:
        raise ConversionError(f"{path}: width {width} is no multiple of the head size {shape.head_dim}")
    grid = shape.image_size // patch_size
    out = {"embeddings.class_embedding": eva["cls_token"],
           "embeddings.position_embedding": interpolate_positions(eva["pos_embed"], grid),
           "embeddings.patch_embedding.weight": patch, "embeddings.patch_embedding.bias": eva["patch_embed.proj.bias"]}
    biases: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in eva.items():
        if key in _EMBEDDINGS:
            continue
        match = _BLOCK.fullmatch(key)
        if match is None:
            raise ConversionError(f"{path}: tensor {key!r} has no place in MiniGPT-v2's EVA tower")
        block, name = int(match.group(1)), match.group(2)
        if block >= shape.depth:
            continue  # MiniGPT-v2 builds `depth` blocks and loads with strict=False
        if name in _BIASES:
            biases.setdefault(block, {})[name] = tensor
        elif name in _BLOCK_KEYS:
            out[f"encoder.layers.{block}.{_BLOCK_KEYS[name]}"] = tensor
        else:
            raise ConversionError(f"{path}: tensor {key!r} has no place in an EVA block")
    for block in range(shape.depth):
        found = biases.get(block, {})
        for name in _BIASES:
            if name not in found:
                raise ConversionError(f"{path}: no tensor 'blocks.{block}.{name}'")
        q, v = found["attn.q_bias"], found["attn.v_bias"]
        out[f"encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])  # k has none
    out["post_layernorm.weight"], out["post_layernorm.bias"] = torch.ones(width), torch.zeros(width)  # unused
    intermediate = eva["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in eva else 4 * width
    config = Blip2VisionConfig(hidden_size=width, intermediate_size=intermediate, num_hidden_layers=shape.depth,
                               num_attention_heads=width // shape.head_dim, image_size=shape.image_size,
                               patch_size=patch_size, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
    return {"model.vision_tower." + key: tensor for key, tensor in out.items()}, config


def merged_llm(llama: Weights, checkpoint: dict, path: Path, alpha: float) -> dict[str, torch.Tensor]:
    """Llama's tensors under our keys, q_proj and v_proj with the checkpoint's LoRA merged: W + alpha / r B A."""
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in checkpoint.items():
        match = _LORA.fullmatch(key)
        if match:
            factors.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    state = {}
    for key in llama.keys():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer old conversions saved; recomputed from the config
        tensor = llama[key]
        match = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.([qv])_proj\.weight", key)
        if match:
            pair = factors.pop((int(match.group(1)), match.group(2)), {})
            if set(pair) != {"A", "B"}:
                side = "A" if "A" not in pair else "B"
                raise ConversionError(f"{path}: no LoRA factor {side} for {key!r} (MiniGPT-v2 trains q_proj and "
                                      "v_proj of every layer)")
            down, up = pair["A"].float(), pair["B"].float()
            if down.shape[1] != tensor.shape[1] or up.shape[0] != tensor.shape[0] or up.shape[1] != down.shape[0]:
                raise ConversionError(f"{path}: LoRA factors of {key!r} have shapes {tuple(down.shape)} and "
                                      f"{tuple(up.shape)}; the weight is {tuple(tensor.shape)}")
            tensor = (tensor.float() + alpha / down.shape[0] * (up @ down)).to(tensor.dtype)
        state[key if key == "lm_head.weight" else "model.language_model." + key.removeprefix("model.")] = tensor
    if factors:
        layer, projection = sorted(factors)[0]
        raise ConversionError(f"{path}: LoRA factors for layer {layer}'s {projection}_proj, which --llama has not")
    return state


def convert_minigptv2(checkpoint: str | Path, eva: str | Path, llama: str | Path, out: str | Path, *,
                      lora_alpha: float = 16.0, shape: EvaShape = EvaShape()) -> Path:
    """Merge MiniGPT-v2's checkpoint, EVA ViT-g and Llama-2-chat into one checkpoint (module docstring)."""
    checkpoint, eva, llama, out = Path(checkpoint), Path(eva), Path(llama), Path(out)
    if out.exists():
        raise ConversionError(f"--out {out}: exists; remove it or choose another directory")
    llama_config = read_config(llama, "llama")
    require(llama_config, llama / "config.json", "model_type", "llama", "--llama must be Llama-2-chat in Hugging "
            "Face format")
    saved = _load_pth(checkpoint, "checkpoint")
    if "model" not in saved or not isinstance(saved["model"], dict):
        raise ConversionError(f"{checkpoint}: no 'model' state dict (MiniGPT-v2 saves {{'model': ...}})")
    trained = saved["model"]
    model_config = (saved.get("config") or {}).get("model", {}) if isinstance(saved.get("config"), dict) else {}
    alpha = float(model_config.get("lora_alpha", lora_alpha))
    for key in ("llama_proj.weight", "llama_proj.bias"):
        if key not in trained:
            raise ConversionError(f"{checkpoint}: no tensor {key!r}; is --checkpoint MiniGPT-v2's?")
    known = {"llama_proj.weight", "llama_proj.bias", "ln_vision.weight", "ln_vision.bias"}
    unexpected = sorted(key for key in trained if key not in known and not _LORA.fullmatch(key))
    if unexpected:
        raise ConversionError(f"{checkpoint}: tensor {unexpected[0]!r} has no place in MiniGPT-v2 "
                              f"({len(unexpected)} such)")

    vision_state, vision_config = eva_tower(_load_pth(eva, "eva"), eva, shape)
    width, hidden = vision_config.hidden_size, int(llama_config["hidden_size"])
    projector = trained["llama_proj.weight"]
    if tuple(projector.shape) != (hidden, width * shape.tokens_per_group):
        raise ConversionError(f"{checkpoint}: llama_proj.weight has shape {tuple(projector.shape)}; "
                              f"{shape.tokens_per_group} EVA tokens of width {width} into Llama's {hidden} need "
                              f"{(hidden, width * shape.tokens_per_group)}")
    state = vision_state | merged_llm(Weights(llama), trained, checkpoint, alpha)
    state["model.multi_modal_projector.linear.weight"] = projector
    state["model.multi_modal_projector.linear.bias"] = trained["llama_proj.bias"]
    state["model.multi_modal_projector.ln_vision.weight"] = trained.get("ln_vision.weight", torch.ones(width))
    state["model.multi_modal_projector.ln_vision.bias"] = trained.get("ln_vision.bias", torch.zeros(width))

    tokenizer = AutoTokenizer.from_pretrained(llama, local_files_only=True)
    image_token = tokenizer.unk_token_id
    text = LlamaConfig(**{**llama_config, "tie_word_embeddings": False})
    grid = shape.image_size // vision_config.patch_size
    config = MiniGPTv2Config(vision_config=vision_config.to_dict(), text_config=text.to_dict(),
                             image_token_id=image_token, vision_feature_layer=-1,
                             vision_feature_select_strategy="default",
                             image_seq_length=grid * grid // shape.tokens_per_group,
                             tokens_per_group=shape.tokens_per_group, tie_word_embeddings=False)
    check_state(state, MiniGPTv2ForConditionalGeneration, config, vision_source=eva, other_source=llama,
                extra_source=llama)
    dtype = state["model.language_model.embed_tokens.weight"].dtype

    def write(directory: Path) -> None:
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict({key: tensor.to(dtype).contiguous() for key, tensor in state.items()}, directory)
        config.save_pretrained(directory)
        generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                      "pad_token_id": tokenizer.eos_token_id}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.pad_token = tokenizer.eos_token  # not <unk>: that is the image placeholder
        build_minigptv2_processor(tokenizer, shape.image_size, vision_config.patch_size,
                                  tokens_per_group=shape.tokens_per_group).save_pretrained(directory)

    return write_checkpoint(out, write)
