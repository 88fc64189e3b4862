"""GAP's cost over renumbering: the same pruned tokens run under `reassign` and `keep`, timed side by side.

    python benchmarks/gap_overhead.py                                   # the shipped contrastive miniature, CPU
    python benchmarks/gap_overhead.py --model /ckpt/llava-1.5-7b-hf --data DIR --dataset refcoco \
        --device cuda --dtype bfloat16 --batch-size 16

For each method, one batch of REC prompts is encoded once; then `prune_generate` runs under the two
policies in alternation (reassign, keep, reassign, keep, ... after a warm-up of each), so drift in
the machine's speed falls on both alike. Per policy it reports the median over repeats of
- select + build: the call's wall time outside the LLM (scoring, selecting, numbering, padding),
- prefill: the LLM on the prompt up to the first logits,
- decode per step: one decoding step for the batch (the two policies may stop after different
  numbers of steps, so steps are compared, not totals),
the ratio keep / reassign of each, and the analytic prefill FLOPs of both (equal when GAP is free).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import mllm
from grounding import default_style_for, load_dataset
from mllm.cost import prefill_flops
from pruning import make_method, prune_generate

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("select_build", "prefill", "decode_step")


def run_once(model: mllm.MLLM, encoding: mllm.Encoding, method: str, budget: str, policy: str, *,
             max_new_tokens: int) -> dict[str, float]:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    started = time.perf_counter()
    generation = prune_generate(model, encoding, method, budget, policy, max_new_tokens=max_new_tokens)
    total = time.perf_counter() - started
    steps = max(generation.decode_steps, 1)
    return {"select_build": total - generation.prefill_seconds - generation.decode_seconds,
            "prefill": generation.prefill_seconds, "decode_step": generation.decode_seconds / steps,
            "flops": float(prefill_flops(model.adapter, generation.layer_tokens).sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "data" / "minillava" / "contrastive")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "minillava" / "eval" / "rec")
    parser.add_argument("--dataset", default="jsonl")
    parser.add_argument("--split", default="val")
    parser.add_argument("--methods", default="random,cls-visual,prumerge,visionzip,fastv")
    parser.add_argument("--budget", default="0.5", help="fraction pruned, or keep=N")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, help="also write the measurements as JSON here")
    args = parser.parse_args()

    model = mllm.load(args.model, device=args.device, dtype=args.dtype)
    dataset = load_dataset(args.dataset, args.data, args.split)
    style = default_style_for(model.model.config.model_type)
    samples = dataset.samples[: args.batch_size]
    images = [sample.image.load() for sample in samples]
    prompts = [style.text("rec", sample.text) for sample in samples]

    results = {}
    print(f"{args.model.name}, {len(samples)} prompts a batch, budget {args.budget}, {args.repeats} repeats, "
          f"{args.device}; median ms (keep / reassign)")
    print(f"{'method':<12} {'select+build':>24} {'prefill':>24} {'decode step':>24}  prefill FLOPs equal")
    for method_spec in args.methods.split(","):
        method = make_method(method_spec)
        encoding = model.encode(images, prompts, frame=style.image_frame, **method.encode_options(model))
        times: dict[str, dict[str, list[float]]] = {policy: {phase: [] for phase in PHASES}
                                                    for policy in ("reassign", "keep")}
        flops = {}
        for repeat in range(args.repeats + 1):
            for policy in ("reassign", "keep"):
                measured = run_once(model, encoding, method, args.budget, policy, max_new_tokens=args.max_new_tokens)
                flops[policy] = measured["flops"]
                if repeat:  # the first round warms up both
                    for phase in PHASES:
                        times[policy][phase].append(measured[phase])
        medians = {policy: {phase: statistics.median(values) for phase, values in phases.items()}
                   for policy, phases in times.items()}
        ratios = {phase: medians["keep"][phase] / medians["reassign"][phase] for phase in PHASES}
        results[method_spec] = {"median_seconds": medians, "ratio_keep_over_reassign": ratios,
                                "prefill_flops": flops, "samples": times}
        cells = [f"{1e3 * medians['keep'][p]:7.2f} / {1e3 * medians['reassign'][p]:7.2f} ({ratios[p]:.2f}x)"
                 for p in PHASES]
        print(f"{method_spec:<12} {cells[0]:>24} {cells[1]:>24} {cells[2]:>24}  {flops['keep'] == flops['reassign']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {key: str(value) for key, value in vars(args).items()}
        args.out.write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
