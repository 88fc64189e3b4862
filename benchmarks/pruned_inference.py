"""What pruning and GAP cost at a model's real size: latency, memory and throughput beside the FLOPs ideal.

    python benchmarks/pruned_inference.py --arch llava-1.5-7b --device cuda --dtype bfloat16 --out results/bench
    python benchmarks/pruned_inference.py --arch qwen2.5-vl-7b --device cuda --dtype bfloat16 --out results/bench
    python benchmarks/pruned_inference.py --model data/minillava/contrastive --batches 1,4,8   # CPU, a miniature
    python benchmarks/pruned_inference.py --arch qwen2.5-vl-tiny --repeats 2                     # CPU smoke

`--arch` builds the exact architecture from its config with random weights (timing needs no trained weights,
and none can be downloaded): LLaVA-1.5-7B (CLIP ViT-L/14-336 + Llama-2-7B) or Qwen2.5-VL-7B, or the tiny test
sizes; `--model DIR` times a checkpoint on disk. Everything runs through `mllm` and `pruning` as a user's sweep
does. Measured side by side in one run, each configuration after a warm-up, in alternation over `--repeats`
rounds (so drift in the machine's speed falls on all alike), medians reported:

- per method (pre-LLM `random`, in-LLM `fastv` and `sparsevlm`), fraction pruned and policy (`reassign`, `keep`):
  prefill ms, decode ms per step, end-to-end ms of a REC-style request (encode + prune + generate), peak CUDA
  memory, analytic prefill FLOPs (`mllm.cost`); the prefill speed-up over the unpruned model against the FLOPs
  ideal (efficiency = measured speed-up / FLOPs ratio), and GAP's cost (keep / reassign prefill, memory);
- `fastv` on the toolkit's SDPA path (it recomputes one layer's attention from its queries and keys) against
  FastV's own way, eager attention in every layer so that the weights exist (the model loaded with
  `attn_implementation="eager"`); FlashAttention-2, where `flash_attn` is installed, on `random` (in-LLM pruning
  runs on eager and SDPA only);
- throughput (requests per second) at each of `--batches`, prompts of different lengths left-padded.

Times are wall clock around each phase with the device synchronised (`mllm.generate`'s own prefill and decode
timers). Writes `pruned_inference.json` and `pruned_inference.md` under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import mllm  # noqa: E402
from grounding import default_style_for  # noqa: E402
from mllm.cost import peak_memory, prefill_flops  # noqa: E402
from pruning import prune_generate  # noqa: E402

ARCHS = ("llava-1.5-7b", "qwen2.5-vl-7b", "llava-tiny", "qwen2.5-vl-tiny")
POLICIES = ("reassign", "keep")
EXPRESSIONS = ["the red circle", "the small blue square left of the green cross", "the cup",
               "the second object from the top, next to the large yellow triangle on the right"]


def write_architecture(arch: str, directory: Path) -> Path:
    """A checkpoint directory without weights: `arch`'s config, tokenizer and processor."""
    from mllm.tiny import TinyLlavaConfig, build_char_tokenizer, build_processor, tiny_llava_config
    from mllm.tiny_qwen import (
        QWEN2_VL_CHAT_TEMPLATE,
        TinyQwenConfig,
        build_qwen_image_processor,
        build_qwen_tokenizer,
        tiny_qwen_config,
    )

    directory.mkdir(parents=True, exist_ok=True)
    if arch.startswith("llava"):
        sizes = TinyLlavaConfig() if arch == "llava-tiny" else TinyLlavaConfig(
            image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16, text_hidden=4096,
            text_layers=32, text_heads=32, text_kv_heads=32, max_position_embeddings=4096)
        tokenizer = build_char_tokenizer()
        config = tiny_llava_config(sizes, tokenizer)
        if arch == "llava-1.5-7b":  # Llama-2-7B's MLP and llava-hf's padded vocabulary
            config.text_config.intermediate_size, config.text_config.vocab_size = 11008, 32064
        config.save_pretrained(directory)
        build_processor(sizes, tokenizer).save_pretrained(directory)
        return directory
    sizes = TinyQwenConfig() if arch == "qwen2.5-vl-tiny" else TinyQwenConfig(
        patch_size=14, vision_hidden=1280, vision_layers=32, vision_heads=16, window_size=112, text_hidden=3584,
        text_layers=28, text_heads=28, text_kv_heads=4, mrope_section=(16, 24, 24), max_position_embeddings=128000,
        min_pixels=3136, max_pixels=12845056)
    tokenizer = build_qwen_tokenizer()
    config = tiny_qwen_config(sizes, tokenizer, "qwen2_5_vl")
    if arch == "qwen2.5-vl-7b":  # Qwen2.5-VL-7B-Instruct's config.json
        config.text_config.intermediate_size, config.text_config.vocab_size = 18944, 152064
        config.vision_config.intermediate_size = 3420
        config.vision_config.fullatt_block_indexes = [7, 15, 23, 31]
    config.save_pretrained(directory)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    image_processor = build_qwen_image_processor(sizes)
    image_processor.processor_class = "Qwen2_5_VLProcessor"
    image_processor.save_pretrained(directory)
    return directory


def random_model(directory: Path, device: str, dtype: str, attn: str) -> mllm.MLLM:
    """The model `directory`'s config describes, with random weights (seed 0), built on `device`."""
    torch.manual_seed(0)
    model = mllm.load(directory, dtype=dtype, device=device, attn_implementation=attn, random_weights=True)
    tokenizer = model.processor.tokenizer  # the directory has no generation_config.json
    model.model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def request_images(model: mllm.MLLM, count: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def time_request(model: mllm.MLLM, images: Sequence[Image.Image], prompts: Sequence[str], *, method: str,
                 budget: str, policy: str, max_new_tokens: int) -> dict[str, float]:
    """One request, end to end: encode, prune, generate; its phases, FLOPs and peak memory."""
    style = default_style_for(model.model.config.model_type)
    synchronize(model)
    started = time.perf_counter()
    with peak_memory(model.device) as memory:
        encoding = model.encode(list(images), list(prompts), frame=style.image_frame)
        generation = prune_generate(model, encoding, method, budget, policy, max_new_tokens=max_new_tokens)
        synchronize(model)
    total = time.perf_counter() - started
    return {"end_to_end": total, "prefill": generation.prefill_seconds,
            "decode_step": generation.decode_seconds / max(generation.decode_steps, 1),
            "prefill_flops": float(prefill_flops(model.adapter, generation.layer_tokens).sum()),
            "peak_memory_bytes": memory["bytes"],
            "visual_layer_mean": float(generation.visual_layer_tokens.float().mean())}


def synchronize(model: mllm.MLLM) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def measure(models: dict[str, mllm.MLLM], configurations: list[dict], *, repeats: int, side: int,
            max_new_tokens: int) -> list[dict]:
    """Every configuration timed once to warm up, then `repeats` rounds in alternation; medians per field."""
    samples: list[list[dict]] = [[] for _ in configurations]
    for round_index in range(repeats + 1):
        for index, configuration in enumerate(configurations):
            model = models[configuration["attention"]]
            batch = configuration["batch"]
            images = request_images(model, batch, side)
            style = default_style_for(model.model.config.model_type)
            prompts = [style.text("rec", EXPRESSIONS[row % len(EXPRESSIONS)]) for row in range(batch)]
            measured = time_request(model, images, prompts, method=configuration["method"],
                                    budget=configuration["budget"], policy=configuration["positions"],
                                    max_new_tokens=max_new_tokens)
            if round_index:
                samples[index].append(measured)
    rows = []
    for configuration, runs in zip(configurations, samples):
        row = dict(configuration)
        for field in runs[0]:
            values = [run[field] for run in runs if run[field] is not None]
            row[field] = statistics.median(values) if values else None
        rows.append(row)
    return rows


def plan(methods: Sequence[str], ratios: Sequence[float], batches: Sequence[int], attentions: Sequence[str]) -> list:
    """The configurations one run measures (see the module docstring)."""
    configurations = [{"part": "pruning", "method": "random", "budget": "0", "positions": "keep", "batch": 1,
                       "attention": "sdpa"}]
    for method in methods:
        for ratio in ratios:
            if ratio == 0:
                continue
            for policy in POLICIES:
                configurations.append({"part": "pruning", "method": method, "budget": f"{ratio:g}",
                                       "positions": policy, "batch": 1, "attention": "sdpa"})
    for attention in attentions:
        if attention == "sdpa":
            continue
        configurations.append({"part": "attention", "method": "random", "budget": "0", "positions": "keep",
                               "batch": 1, "attention": attention})
        # In-LLM pruning runs on eager and SDPA only: FlashAttention-2 is compared on pruning before the LLM.
        method = "fastv" if attention == "eager" else "random"
        for ratio in ratios:
            if ratio:
                configurations.append({"part": "attention", "method": method, "budget": f"{ratio:g}",
                                       "positions": "keep", "batch": 1, "attention": attention})
    for batch in batches:
        for budget in ("0", "0.75"):
            configurations.append({"part": "throughput", "method": "random", "budget": budget, "positions": "keep",
                                   "batch": batch, "attention": "sdpa"})
    return configurations


def summarize(rows: list[dict]) -> dict:
    """Speed-ups against the unpruned model and the FLOPs ideal, GAP's cost, SDPA against eager, throughput."""
    unpruned = next(row for row in rows if row["part"] == "pruning" and row["budget"] == "0")
    for row in rows:
        if row["part"] != "pruning" or row["budget"] == "0":
            continue
        row["prefill_speedup"] = unpruned["prefill"] / row["prefill"]
        row["flops_ratio"] = row["prefill_flops"] / unpruned["prefill_flops"]
        row["efficiency"] = row["prefill_speedup"] * row["flops_ratio"]  # 1: as fast as the FLOPs allow
    gap = []
    for row in rows:
        if row["part"] == "pruning" and row["positions"] == "keep" and row["budget"] != "0":
            other = next(r for r in rows if r["part"] == "pruning" and r["method"] == row["method"]
                         and r["budget"] == row["budget"] and r["positions"] == "reassign")
            memory = (None if row["peak_memory_bytes"] is None or other["peak_memory_bytes"] is None else
                      row["peak_memory_bytes"] - other["peak_memory_bytes"])
            gap.append({"method": row["method"], "budget": row["budget"],
                        "prefill_keep_over_reassign": row["prefill"] / other["prefill"],
                        "end_to_end_keep_over_reassign": row["end_to_end"] / other["end_to_end"],
                        "extra_memory_bytes": memory, "flops_equal": row["prefill_flops"] == other["prefill_flops"]})
    attention = []
    for row in rows:
        if row["part"] == "attention":
            sdpa = next((r for r in rows if r["part"] == "pruning" and r["method"] == row["method"]
                         and r["budget"] == row["budget"] and r["positions"] == "keep"), None)
            if sdpa is not None:
                attention.append({"method": row["method"], "budget": row["budget"], "attention": row["attention"],
                                  "prefill_over_sdpa": row["prefill"] / sdpa["prefill"],
                                  "end_to_end_over_sdpa": row["end_to_end"] / sdpa["end_to_end"]})
    throughput = [{"batch": row["batch"], "budget": row["budget"], "requests_per_second": row["batch"] /
                   row["end_to_end"]} for row in rows if row["part"] == "throughput"]
    for entry in throughput:
        single = next(t for t in throughput if t["batch"] == min(t["batch"] for t in throughput)
                      and t["budget"] == entry["budget"])
        entry["over_smallest_batch"] = entry["requests_per_second"] / single["requests_per_second"]
    return {"gap": gap, "attention": attention, "throughput": throughput}


def markdown(name: str, device: str, rows: list[dict], summary: dict) -> str:
    lines = [f"# {name} on {device}", "",
             "| method | pruned | positions | visual tokens (layer mean) | prefill ms | decode ms/step | "
             "end-to-end ms | peak MiB | prefill speed-up | FLOPs ratio | efficiency |", "|" + "---|" * 11]
    for row in rows:
        if row["part"] != "pruning":
            continue
        memory = "" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:.0f}"
        speed = ("" if "prefill_speedup" not in row else
                 f"{row['prefill_speedup']:.2f}x | {row['flops_ratio']:.3f} | {row['efficiency']:.2f}")
        lines.append(f"| {row['method'] if row['budget'] != '0' else 'unpruned'} | {row['budget']} | "
                     f"{row['positions']} | {row['visual_layer_mean']:.1f} | {1e3 * row['prefill']:.2f} | "
                     f"{1e3 * row['decode_step']:.2f} | {1e3 * row['end_to_end']:.2f} | {memory} | "
                     f"{speed or ' | | '} |")
    lines += ["", "GAP (keep) against reassign, the same tokens:", "",
              "| method | pruned | prefill keep/reassign | end-to-end keep/reassign | extra memory (bytes) |",
              "|---|---|---|---|---|"]
    lines += [f"| {g['method']} | {g['budget']} | {g['prefill_keep_over_reassign']:.3f} | "
              f"{g['end_to_end_keep_over_reassign']:.3f} | {g['extra_memory_bytes']} |" for g in summary["gap"]]
    if summary["attention"]:
        lines += ["", "Other attention implementations against the toolkit's SDPA path (prefill time ratio):", "",
                  "| method | pruned | attention | prefill / SDPA | end-to-end / SDPA |", "|---|---|---|---|---|"]
        lines += [f"| {a['method']} | {a['budget']} | {a['attention']} | {a['prefill_over_sdpa']:.2f} | "
                  f"{a['end_to_end_over_sdpa']:.2f} |" for a in summary["attention"]]
    lines += ["", "Throughput, prompts of different lengths left-padded:", "",
              "| batch | pruned | requests/s | over the smallest batch |", "|---|---|---|---|"]
    lines += [f"| {t['batch']} | {t['budget']} | {t['requests_per_second']:.2f} | {t['over_smallest_batch']:.2f}x |"
              for t in summary["throughput"]]
    return "\n".join(lines) + "\n"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--arch", choices=ARCHS, help="an exact architecture with random weights")
    source.add_argument("--model", type=Path, help="a checkpoint directory (anything mllm.load reads)")
    parser.add_argument("--methods", default="random,fastv,sparsevlm")
    parser.add_argument("--ratios", default="0,0.5,0.75,0.9")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="a REC answer's length")
    parser.add_argument("--image-size", type=int, help="side of the square images (default: the tower's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager-attention (FastV's own) rows")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks")
    args = parser.parse_args(argv)

    attentions = ["sdpa"] + ([] if args.no_eager else ["eager"])
    if importlib.util.find_spec("flash_attn") is not None and args.device.startswith("cuda"):
        attentions.append("flash_attention_2")
    with tempfile.TemporaryDirectory() as scratch:
        if args.arch:
            directory = write_architecture(args.arch, Path(scratch) / args.arch)
            models = {attention: random_model(directory, args.device, args.dtype, attention)
                      for attention in attentions}
            name = args.arch
        else:
            models = {attention: mllm.load(args.model, device=args.device, dtype=args.dtype,
                                           attn_implementation=attention) for attention in attentions}
            name = args.model.name
        first = models["sdpa"]
        vision = first.model.config.vision_config
        side = args.image_size or int(getattr(vision, "image_size", 0) or 448)
        configurations = plan(args.methods.split(","), [float(r) for r in args.ratios.split(",")],
                              [int(b) for b in args.batches.split(",")], attentions)
        rows = measure(models, configurations, repeats=args.repeats, side=side, max_new_tokens=args.max_new_tokens)
    summary = summarize(rows)
    device = device_name(first.device)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {key: str(value) for key, value in vars(args).items()} | {"device_name": device, "image_side": side,
                                                                     "torch": torch.__version__}
    (args.out / "pruned_inference.json").write_text(json.dumps(
        {"config": config, "rows": rows, "summary": summary}, indent=2, default=_plain) + "\n")
    table = markdown(name, device, rows, summary)
    (args.out / "pruned_inference.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'pruned_inference.json'} and {args.out / 'pruned_inference.md'}")
    return 0


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
