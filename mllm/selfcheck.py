"""Check that mllm agrees with transformers on a checkpoint, and record what each position policy feeds.

    python -m mllm.selfcheck --out results/selfcheck                 # a tiny random LLaVA built here
    python -m mllm.selfcheck --model /ckpt/llava-1.5-7b-hf --images DIR --out results/selfcheck-7b

Writes `summary.json` (config, versions, each check with its measured value and pass/fail) and
`position_ids.csv` (the IDs of every prompt token under each policy for a 50% random prune).
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import mllm
from mllm.generation import eos_ids
from mllm.images import load_image
from mllm.tiny import build_tiny_llava

POLICIES = ("reassign", "keep", "permute:seed=0", "shift:offset=8")
QUESTIONS = ("Describe the image.", "Where is the object?", "What colour is it?", "Is there a circle?")


def _images(directory: str | None, count: int) -> list:
    if directory is None:
        generator = torch.Generator().manual_seed(0)
        from PIL import Image

        shapes = [(48, 32), (32, 48), (40, 40), (64, 24)]
        return [Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).byte().numpy())
                for w, h in (shapes[index % len(shapes)] for index in range(count))]
    paths = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        raise FileNotFoundError(f"{directory}: no .jpg/.jpeg/.png images to check with")
    return [load_image(path) for path in paths[:count]]


def transformers_generate_tokens(
    model: mllm.MLLM, images: list, prompts: list[str], max_new_tokens: int
) -> list[list[int]]:
    """transformers' own greedy `generate` on the processor's inputs: new tokens per row, cut after EOS."""
    batch = model.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(model.device)
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    out = model.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    eos = eos_ids(model)
    rows = out[:, batch["input_ids"].shape[1]:].tolist()
    cuts = [[step for step, token in enumerate(row) if token in eos] for row in rows]
    return [row[: ends[0] + 1] if ends else row for row, ends in zip(rows, cuts)]


def run_checks(model: mllm.MLLM, images: list, max_new_tokens: int) -> tuple[list[dict], list[dict]]:
    checks = []
    prompts = [model.prompt(QUESTIONS[index % len(QUESTIONS)]) for index in range(len(images))]
    # The frame in which the toolkit shows the processor exactly the images it would be given directly.
    encoding = model.encode(images, prompts, raw_prompts=True, frame=model.adapter.processor_frame)

    started = time.perf_counter()
    ours = model.generate(encoding, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - started
    reference = transformers_generate_tokens(model, images, prompts, max_new_tokens)
    checks.append({"check": "unpruned generate == transformers generate", "batch": len(images),
                   "passed": ours.token_ids == reference, "seconds": round(seconds, 3)})

    # In-LLM pruning needs one visual-token count per batch: the rows with the first row's grid.
    encoding = encoding.subset([row for row, grid in enumerate(encoding.grids) if grid == encoding.grids[0]])
    generator = torch.Generator().manual_seed(0)
    count = encoding.num_visual
    keep = torch.stack([torch.randperm(count, generator=generator)[: count // 2].sort().values
                        for _ in range(encoding.batch_size)])
    gap = model.generate(encoding, keep=keep, policy="keep", max_new_tokens=1, output_logits=True)
    renumbered = model.generate(encoding, keep=keep, policy="reassign", max_new_tokens=1, output_logits=True)
    difference = (gap.step_logits - renumbered.step_logits).abs().max().item()
    checks.append({"check": "50% pruned: keep and reassign feed different positions (max |logit diff|)",
                   "value": difference, "passed": difference > 0})

    inside = model.generate(encoding, layer_pruning=mllm.LayerPruning(0, lambda context: keep),
                            max_new_tokens=1, output_logits=True)
    difference = (inside.step_logits - gap.step_logits).abs().max().item()
    checks.append({"check": "in-LLM pruning at layer 0 == pruning before the LLM (max |logit diff|)",
                   "value": difference, "passed": difference < 1e-3})

    rows = []
    for policy in POLICIES + (("compact", "transpose") if model.adapter.position_axes == 3 else ()):
        fed = model.generate(encoding, keep=keep, policy=policy, max_new_tokens=1)
        for token, ids in enumerate(fed.position_ids[0].T.tolist()):
            rows.append({"policy": policy, "token": token, **dict(zip(id_columns(model), ids))})
    return checks, rows


def id_columns(model: mllm.MLLM) -> list[str]:
    """One position-ID column per axis: `position_id` for LLaVA, `position_id_t/_h/_w` for M-RoPE."""
    axes = model.adapter.position_axes
    return ["position_id"] if axes == 1 else [f"position_id_{axis}" for axis in "thw"[:axes]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build a tiny random LLaVA)")
    parser.add_argument("--images", help="a folder of images to check with (default: random images)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.model or build_tiny_llava(Path(scratch) / "tiny-llava")
        model = mllm.load(path, dtype=args.dtype, device=args.device)
        checks, rows = run_checks(model, _images(args.images, args.batch), args.max_new_tokens)

    summary = {
        "config": {**vars(args), "model": args.model or "tiny random LLaVA (mllm.tiny, seed 0)"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "device": str(model.device), "dtype": str(model.dtype),
        "checks": checks,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "position_ids.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["policy", "token", *id_columns(model)])
        writer.writeheader()
        writer.writerows(rows)
    for check in checks:
        print(f"[{'ok' if check['passed'] else 'FAIL'}] {check['check']}"
              + (f": {check['value']:.3g}" if "value" in check else ""))
    print(f"wrote {out / 'summary.json'} and {out / 'position_ids.csv'}")
    return 0 if all(check["passed"] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
