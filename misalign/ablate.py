"""Accuracy against corruption strength, REC and VQA side by side, with every visual token kept.

    python -m misalign.ablate --model DIR --data data/minillava/eval --kind permuted \
        --strength 0,0.01,0.1,0.5,1 --tasks rec,vqa --out results/misalign/NAME

`--data DIR` reads the JSONL layout of the miniature's evaluation set (DIR/rec/SPLIT.jsonl and
DIR/vqa/SPLIT.jsonl); for other data name each task's dataset: `--rec refcoco:/data/RefCOCO
--vqa gqa:/data/GQA --split rec=val,vqa=testdev_balanced`. `--kind` takes options:
`permuted:window=8`, `span-shift:start=32`. Negative strengths need `--strength=-8,0,8`.

Each (task, strength) is one grounding run directory, OUT/TASK/strength=S/ (config.json,
samples.jsonl, summary.json, metrics.csv), so a killed run resumes where it stopped and strengths
can be added later. OUT/ablation.csv and OUT/ablation.png/.pdf collect every finished run in OUT.
Every image gets the same corruption, drawn once from --seed; rerun into another OUT for another draw.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

import mllm
from grounding import Dataset, PromptStyle, default_style_for, prompt_style
from grounding.records import write_atomic
from grounding.runner import Predict, check_or_write_config, run_config, run_evaluation
from grounding.tasks import (
    HEADLINE,
    add_run_arguments,
    add_task_arguments,
    check_tasks,
    load_model,
    reported_errors,
    task_datasets,
)
from misalign.corruptions import Misalignment, corruption_spec, parse_corruption
from mllm.positions import check_policy

TABLE_COLUMNS = ("corruption", "strength", "seed", "task", "dataset", "split", "metric", "value", "ci_low", "ci_high",
                 "n")


def parse_strengths(text: str) -> list[float]:
    try:
        strengths = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--strength: need comma-separated numbers, got {text!r}") from None
    if not strengths:
        raise ValueError("--strength: give at least one strength")
    return sorted(set(strengths))


def strength_label(strength: float) -> str:
    return f"{strength:g}"


def run_directory(out: Path, task: str, strength: float) -> Path:
    return out / task / f"strength={strength_label(strength)}"


def misaligned_predict(misalignment: Misalignment, strength: float, seed: int = 0) -> Predict:
    """A predictor for `grounding.run_evaluation` that feeds every batch through the corruption."""

    def predict(model: mllm.MLLM, encoding: mllm.Encoding, **options: object) -> mllm.Generation:
        # Each row's own token count (native-resolution models differ per image); the policy is count-free.
        corruptions = {count: misalignment.at(strength, count, seed) for count in set(encoding.visual_counts)}
        keep = [corruptions[count].order for count in encoding.visual_counts]
        policy = corruptions[encoding.visual_counts[0]].policy
        return mllm.generate(model, encoding, keep=keep, policy=policy, **options)

    return predict


def run_ablation(model: mllm.MLLM, datasets: Mapping[str, Dataset], misalignment: Misalignment,
                 strengths: Sequence[float], out: str | Path, *, style: PromptStyle | None = None, seed: int = 0,
                 batch_size: int = 8, limit: int | None = None, resamples: int = 1000,
                 progress: bool = True) -> pd.DataFrame:
    """Evaluate each task's dataset at each strength into `out`, resuming; return (and write) the table.

    `style`: the prompt style, by default the one registered for the checkpoint's model type.
    """
    out = Path(out)
    style = style or default_style_for(model.model.config.model_type)
    out.mkdir(parents=True, exist_ok=True)
    spec = corruption_spec(misalignment)
    # Tasks and strengths may grow between calls; what the curves are *of* may not.
    check_or_write_config(out, {"model": str(model.path), "corruption": spec, "seed": seed})
    for strength in strengths:  # a bad strength fails here, before any run (per image where counts vary)
        if model.fixed_grid is not None:
            check_policy(misalignment.at(strength, model.num_visual_tokens, seed).policy, model.adapter.position_axes)
    for task, dataset in datasets.items():
        for strength in strengths:
            config = run_config(model, dataset, style, limit=limit, batch_size=batch_size, corruption=spec,
                                strength=strength, seed=seed)
            if progress:
                print(f"{task} {spec} strength {strength_label(strength)}", file=sys.stderr)
            run_evaluation(model, dataset, run_directory(out, task, strength), style, config=config,
                           predict=misaligned_predict(misalignment, strength, seed), batch_size=batch_size,
                           limit=limit, resamples=resamples, progress=progress)
    table = ablation_table(out)
    write_atomic(out / "ablation.csv", table.to_csv(index=False))
    return table


def ablation_table(out: str | Path) -> pd.DataFrame:
    """One row per (task, strength, metric) over every finished run in `out`."""
    rows = []
    for path in Path(out).glob("*/strength=*/summary.json"):
        summary = json.loads(path.read_text())
        config = summary["config"]
        for metric, entry in summary["metrics"].items():
            rows.append({"corruption": config["corruption"], "strength": config["strength"], "seed": config["seed"],
                         "task": summary["task"], "dataset": config["dataset"], "split": config["split"],
                         "metric": metric, "value": entry["value"], "ci_low": entry["ci95"][0],
                         "ci_high": entry["ci95"][1], "n": entry["n"]})
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return table.sort_values(["task", "metric", "strength"], ignore_index=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m misalign.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local checkpoint directory (anything mllm.load reads)")
    parser.add_argument("--kind", required=True, help="corruption[:option=value,...], e.g. permuted:window=8")
    parser.add_argument("--strength", required=True, help="comma-separated strengths, e.g. 0,0.1,0.5,1")
    add_task_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="ablation directory, e.g. results/misalign/NAME")
    parser.add_argument("--seed", type=int, default=0, help="draws the corruption (one draw for every image)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    check_tasks(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from misalign.figures import plot_ablation

    with reported_errors(args.out, ValueError) as outcome:
        misalignment = parse_corruption(args.kind)
        strengths = parse_strengths(args.strength)
        datasets = task_datasets(args)
        model = load_model(args)
        style = prompt_style(args.prompt_style) if args.prompt_style else None  # None: the checkpoint's own
        table = run_ablation(model, datasets, misalignment, strengths, args.out, style=style, seed=args.seed,
                             batch_size=args.batch_size, limit=args.limit, resamples=args.bootstrap,
                             progress=not args.no_progress)
    if outcome.status:
        return outcome.status
    title = f"{Path(args.model).name}: {corruption_spec(misalignment)} (seed {args.seed})"
    plot_ablation(table, args.out / "ablation.png", title=title)
    print(format_table(table))
    print(f"wrote {args.out / 'ablation.csv'} and {args.out / 'ablation.png'}")
    return 0


def format_table(table: pd.DataFrame) -> str:
    headline = table[[HEADLINE.get(task) == metric for task, metric in zip(table.task, table.metric)]]
    lines = []
    for row in headline.itertuples():
        lines.append(f"  {row.task} {row.metric:<9} strength {strength_label(row.strength):>6}: "
                     f"{row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]  n={row.n}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
