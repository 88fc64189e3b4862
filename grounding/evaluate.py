"""Evaluate a model on REC or VQA data: batched, one JSONL record per sample as it goes, resumable.

    python -m grounding.evaluate --model DIR --data DIR --dataset refcoco --split val \
        [--limit N] --out results/NAME

Rerunning the same command resumes from the records already written (after a crash or Ctrl-C).
Under `torchrun` / `accelerate launch` (or with `--shard r/n`) each process evaluates a contiguous
block of whole batches into its own shard file, on its own GPU (LOCAL_RANK); whichever finishes last
merges them and writes the summary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from grounding.boxes import BOX_FORMATS
from grounding.data import DATASETS, load_dataset
from grounding.runner import Shard, run_config, run_evaluation
from grounding.tasks import add_run_arguments, chosen_style, load_model, reported_errors
from mllm.images import FRAME_KINDS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m grounding.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local checkpoint directory")
    parser.add_argument("--data", required=True, help="dataset directory (or, for jsonl, file)")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", required=True, help="run directory, e.g. results/refcoco-val")
    parser.add_argument("--images", help="image folder, when not where the layout expects it")
    parser.add_argument("--split-by", help="refer layout: unc, umd or google (default by dataset)")
    parser.add_argument("--box-format", choices=BOX_FORMATS)
    parser.add_argument("--image-frame", choices=FRAME_KINDS, help="how the image is shown to the model")
    parser.add_argument("--answer-frame", choices=FRAME_KINDS, help="what the answer's coordinates are fractions of")
    parser.add_argument("--max-new-tokens", type=int)
    add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with reported_errors(args.out) as outcome:
        shard = Shard.parse(args.shard)
        dataset = load_dataset(args.dataset, args.data, args.split, images=args.images, split_by=args.split_by)
        model = load_model(args)
        style = chosen_style(args, model)
        style = style.with_options(box_format=args.box_format, image_frame=args.image_frame,
                                   answer_frame=args.answer_frame)
        if args.max_new_tokens:
            style = style.with_options(rec_max_new_tokens=args.max_new_tokens, vqa_max_new_tokens=args.max_new_tokens)
        config = run_config(model, dataset, style, limit=args.limit, batch_size=args.batch_size,
                            images=args.images, split_by=args.split_by)
        summary = run_evaluation(model, dataset, args.out, style, config=config, batch_size=args.batch_size,
                                 limit=args.limit, shard=shard, resamples=args.bootstrap,
                                 progress=not args.no_progress)
    if outcome.status:
        return outcome.status
    if summary is None:
        print(f"shard {shard.rank}/{shard.world} done; the last shard to finish writes {args.out}/summary.json")
        return 0
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    lines = [f"{summary['config']['dataset']} {summary['config']['split']}: {summary['n_scored']} scored, "
             f"{summary['n_errors']} errors {summary['errors_by_kind'] or ''}".rstrip()]
    lines += [f"  {name:<20} {entry['value']:.4f}  [{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]"
              for name, entry in summary["metrics"].items()]
    if summary["n_errors"]:
        lines.append(f"  warning: {summary['n_errors']} samples could not be scored; see 'error' in samples.jsonl")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
