"""Run the evaluation pipeline end to end on data written here, in every layout `load_dataset` reads.

    python -m grounding.demo --out results/grounding-demo [--model DIR]

Without `--model` it builds a tiny random LLaVA, which writes no boxes: its accuracies are 0 and
its parse-failure rate 1. This shows the pipeline (loaders, prompts, parsing, records, summaries),
not a model. Writes the datasets under `OUT/data`, one run directory per layout, and `overview.csv`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import mllm
from grounding.data import load_dataset
from grounding.fixtures import write_gqa_layout, write_jsonl_layout, write_parquet_layout, write_refer_layout
from grounding.prompts import default_style_for
from grounding.runner import run_evaluation
from mllm.tiny import build_tiny_llava

LAYOUTS = (  # run name, dataset, split, writer
    ("refcoco-parquet", "refcoco", "val", write_parquet_layout),
    ("refcoco-refer", "refcoco", "val", write_refer_layout),
    ("custom-jsonl", "jsonl", "val", write_jsonl_layout),
    ("gqa", "gqa", "testdev_balanced", write_gqa_layout),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", help="checkpoint directory (default: a tiny random LLaVA built here)")
    parser.add_argument("--device", default="auto", help="auto: the GPU when there is one")
    args = parser.parse_args(argv)
    out = Path(args.out)
    checkpoint = args.model or out / "tiny-llava"
    if not args.model and not (out / "tiny-llava" / "config.json").is_file():
        build_tiny_llava(checkpoint)
    model = mllm.load(checkpoint, device=args.device, dtype="float32")
    style = default_style_for(model.model.config.model_type)
    rows = []
    for run, name, split, writer in LAYOUTS:
        data = out / "data" / run
        if not data.exists():
            writer(data)
        dataset = load_dataset(name, data, split)
        summary = run_evaluation(model, dataset, out / run, style, progress=False)
        main_metric = "acc@0.5" if dataset.task == "rec" else "accuracy"
        rows.append({"run": run, "dataset": name, "split": split, "task": dataset.task,
                     "n_samples": summary["n_samples"], "n_errors": summary["n_errors"], "metric": main_metric,
                     "value": summary["metrics"][main_metric]["value"],
                     "parse_failure_rate": summary["metrics"].get("parse_failure_rate", {}).get("value", "")})
    with (out / "overview.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"{row['run']:<16} {row['task']} n={row['n_samples']} {row['metric']}={row['value']:.3f} "
              f"errors={row['n_errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
