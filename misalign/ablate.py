"""Accuracy against corruption strength, REC and VQA side by side, with every visual token kept.

    python -m misalign.ablate --model DIR --data data/minillava/eval --kind permuted \
        --strength 0,0.01,0.1,0.5,1 --tasks rec,vqa --out results/misalign/NAME

`--data DIR` reads the JSONL layout of the miniature's evaluation set (DIR/rec/SPLIT.jsonl and
DIR/vqa/SPLIT.jsonl); for other data name each task's dataset: `--rec refcoco:/data/RefCOCO
--vqa gqa:/data/GQA --split rec=val,vqa=testdev_balanced`. `--kind` takes options:
`permuted:window=8`, `span-shift:start=32`. Negative strengths need `--strength=-8,0,8`.

Several kinds in one call share one pass over the data, each with its own strengths (one
`--strength` for all, or one after each `--kind`), and each into its own OUT/KIND/ (the spec as a
directory name, `permuted@window=8`):

    python -m misalign.ablate --model DIR --data data/minillava/eval --kind permuted --strength 0,0.5,1 \
        --kind shifted --strength=-8,0,8 --out results/misalign/NAME
    torchrun --nproc_per_node 8 -m misalign.ablate ...   # or --shard r/n: each process takes its block

Each (task, strength) is one grounding run directory, OUT/TASK/strength=S/ (config.json,
samples.jsonl, summary.json, metrics.csv), so a killed run resumes where it stopped and strengths
can be added later. OUT/ablation.csv and OUT/ablation.png/.pdf collect every finished run in OUT
(with several kinds, OUT/ablation.csv collects them all). Each batch is encoded once for every run,
and runs that feed the LLM the same IDs (strength 0 of every kind) generate once, their records
written to each. Every image gets the same corruption, drawn once from --seed; rerun into another OUT
for another draw.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import mllm
from grounding import Dataset, PromptStyle, default_style_for
from grounding.records import write_atomic
from grounding.runner import (
    Predict,
    Run,
    Shard,
    SweepPart,
    check_or_write_config,
    feed_key,
    model_identity,
    run_config,
    run_sweep,
)
from grounding.tasks import (
    add_run_arguments,
    add_task_arguments,
    check_tasks,
    chosen_style,
    finishing_shard,
    headline_table,
    load_model,
    reported_errors,
    task_datasets,
)
from misalign.corruptions import Misalignment, corruption_spec, parse_corruption
from mllm.positions import PositionPolicy, check_policy
from mllm.specs import spec_slug

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


def misaligned_feed(misalignment: Misalignment, strength: float, seed: int,
                    encoding: mllm.Encoding) -> tuple[list[torch.Tensor], PositionPolicy]:
    """What the corruption feeds the LLM on `encoding`: each row's token order and the one policy for all."""
    # Each row's own token count (native-resolution models differ per image); the policy is count-free.
    corruptions = {count: misalignment.at(strength, count, seed) for count in set(encoding.visual_counts)}
    return ([corruptions[count].order for count in encoding.visual_counts],
            corruptions[encoding.visual_counts[0]].policy)


def misaligned_predict(misalignment: Misalignment, strength: float, seed: int = 0) -> Predict:
    """A predictor for `grounding.run_evaluation` that feeds every batch through the corruption."""

    def predict(model: mllm.MLLM, encoding: mllm.Encoding, **options: object) -> mllm.Generation:
        keep, policy = misaligned_feed(misalignment, strength, seed, encoding)
        return mllm.generate(model, encoding, keep=keep, policy=policy, **options)

    return predict


@dataclass(frozen=True)
class Ablation:
    """One corruption at its strengths, into its own directory (see `run_ablations`)."""

    misalignment: Misalignment
    strengths: Sequence[float]
    out: Path


def run_ablation(model: mllm.MLLM, datasets: Mapping[str, Dataset], misalignment: Misalignment,
                 strengths: Sequence[float], out: str | Path, **options: Any) -> pd.DataFrame | None:
    """`run_ablations` of one corruption: evaluate each task at each strength into `out`; the table."""
    tables = run_ablations(model, datasets, [Ablation(misalignment, strengths, Path(out))], **options)
    return None if tables is None else tables[0]


def run_ablations(model: mllm.MLLM, datasets: Mapping[str, Dataset], ablations: Sequence[Ablation], *,
                  style: PromptStyle | None = None, seed: int = 0, batch_size: int = 8, limit: int | None = None,
                  shard: Shard | None = None, resamples: int = 1000,
                  progress: bool = True) -> list[pd.DataFrame] | None:
    """Evaluate each task at every (corruption, strength) in one pass over its data (`ablation_sweep`),
    resuming; per ablation, its table (also written as its directory's ablation.csv).

    Under `shard` this process evaluates its block of every run; the tables come from the process that
    finds every run complete, None from the others.
    """
    parts = ablation_sweep(model, datasets, ablations, style=style, seed=seed, batch_size=batch_size, limit=limit)
    summaries = run_sweep(model, parts, batch_size=batch_size, limit=limit, shard=shard or Shard(),
                          resamples=resamples, progress=progress, label="misalign")
    if any(summary is None for summary in summaries):
        return None
    tables = []
    for ablation in ablations:
        tables.append(ablation_table(ablation.out))
        write_atomic(ablation.out / "ablation.csv", tables[-1].to_csv(index=False))
    return tables


def ablation_sweep(model: mllm.MLLM, datasets: Mapping[str, Dataset], ablations: Sequence[Ablation], *,
                   style: PromptStyle | None = None, seed: int = 0, batch_size: int = 8,
                   limit: int | None = None) -> list[SweepPart]:
    """Per task, a run per (corruption, strength), checked and ready for `run_sweep`: each batch is encoded
    once, and runs feeding the LLM the same IDs (strength 0 of every kind) generate once.

    `style`: the prompt style, by default the one registered for the checkpoint's model type.
    """
    style = style or default_style_for(model.model.config.model_type)
    for ablation in ablations:  # a bad strength fails here, before any run (per image where counts vary)
        for strength in ablation.strengths:
            if model.fixed_grid is not None:
                check_policy(ablation.misalignment.at(strength, model.num_visual_tokens, seed).policy,
                             model.adapter.position_axes)
    for ablation in ablations:
        ablation.out.mkdir(parents=True, exist_ok=True)
        # Tasks and strengths may grow between calls; what the curves are *of* may not.
        check_or_write_config(ablation.out, {**model_identity(model),
                                             "corruption": corruption_spec(ablation.misalignment), "seed": seed})
    parts = []
    for task, dataset in datasets.items():
        runs = []
        for ablation in ablations:
            spec = corruption_spec(ablation.misalignment)
            for strength in ablation.strengths:
                config = run_config(model, dataset, style, limit=limit, batch_size=batch_size, corruption=spec,
                                    strength=strength, seed=seed)
                runs.append(misaligned_run(run_directory(ablation.out, task, strength), config,
                                           ablation.misalignment, strength, seed))
        parts.append(SweepPart(dataset, style, runs))
    return parts


def misaligned_run(out: Path, config: dict, misalignment: Misalignment, strength: float, seed: int) -> Run:
    """A sweep run of the corruption at `strength`; its key is the token order and IDs it feeds the LLM."""

    def key(model: mllm.MLLM, encoding: mllm.Encoding) -> Hashable:
        keep, policy = misaligned_feed(misalignment, strength, seed, encoding)
        return feed_key(encoding, keep, policy)

    return Run(out, config, misaligned_predict(misalignment, strength, seed), key)


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
    parser.add_argument("--kind", required=True, action="append",
                        help="corruption[:option=value,...], e.g. permuted:window=8; repeat for several")
    parser.add_argument("--strength", required=True, action="append",
                        help="comma-separated strengths, e.g. 0,0.1,0.5,1: once for every --kind, or once after each")
    add_task_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="ablation directory, e.g. results/misalign/NAME")
    parser.add_argument("--seed", type=int, default=0, help="draws the corruption (one draw for every image)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    check_tasks(parser, args)
    if len(args.strength) not in (1, len(args.kind)):
        parser.error(f"--strength: give it once for every --kind or once after each; got {len(args.strength)} "
                     f"for {len(args.kind)} kinds")
    return args


def ablations_of(kinds: Sequence[str], strengths: Sequence[str], out: Path) -> list[Ablation]:
    """The CLI's ablations: one kind into `out` itself, several each into `out`/its spec."""
    strengths = list(strengths) * len(kinds) if len(strengths) == 1 else list(strengths)
    misalignments = [parse_corruption(kind) for kind in kinds]
    specs = [corruption_spec(misalignment) for misalignment in misalignments]
    repeated = sorted({spec for spec in specs if specs.count(spec) > 1})
    if repeated:
        raise ValueError(f"--kind: {', '.join(repeated)} given twice; give each kind once with all its strengths")
    if len(kinds) > 1 and (out / "config.json").is_file():
        raise ValueError(f"{out / 'config.json'}: {out} holds the ablation of one kind; several kinds go into a "
                         "directory each under a new --out")
    return [Ablation(misalignment, parse_strengths(strength), out if len(kinds) == 1 else out / spec_slug(spec))
            for misalignment, strength, spec in zip(misalignments, strengths, specs)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from misalign.figures import plot_ablation

    with reported_errors(args.out, ValueError) as outcome:
        ablations = ablations_of(args.kind, args.strength, args.out)
        datasets = task_datasets(args)
        shard = Shard.parse(args.shard)
        model = load_model(args)
        style = chosen_style(args, model)
        tables = run_ablations(model, datasets, ablations, style=style, seed=args.seed, batch_size=args.batch_size,
                               limit=args.limit, shard=shard, resamples=args.bootstrap, progress=not args.no_progress)
    if outcome.status:
        return outcome.status
    with finishing_shard(args.out, shard, tables is not None, f"the tables and figures under {args.out}") as writes:
        if writes:
            for ablation, table in zip(ablations, tables):
                title = f"{Path(args.model).name}: {corruption_spec(ablation.misalignment)} (seed {args.seed})"
                plot_ablation(table, ablation.out / "ablation.png", title=title)
    if not writes:
        return 0
    table = pd.concat(tables, ignore_index=True)
    if len(ablations) > 1:
        write_atomic(args.out / "ablation.csv", table.to_csv(index=False))
    print(format_table(table))
    print(f"wrote {args.out / 'ablation.csv'} and " + ", ".join(str(a.out / "ablation.png") for a in ablations))
    return 0


def format_table(table: pd.DataFrame) -> str:
    """Each task's headline metric, a row per (corruption, strength) and a column per task."""
    return headline_table(table, index=["corruption", "strength"], columns=["task"])


if __name__ == "__main__":
    sys.exit(main())
