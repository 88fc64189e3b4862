"""Where the answer looked: the share of the answer's attention on the referent's patches, per LLM layer.

    python -m pruning.attention --model DIR --data data/minillava/eval --methods random --ratios 0.5,0.75 \
        --positions reassign,keep --out results/attention/NAME [--limit 300]

The same sweep as `pruning.evaluate` on the REC task (the unpruned run and every method, budget and
policy; resumable, shardable, one pass), whose records also carry, per LLM layer, the attention of the
steps that produced the answer (`mllm.answer_attention`, head mean, averaged over the answer's steps):

- `attention.visual`: the share on all visual tokens fed (merged and extra tokens included);
- `attention.referent`: the share on the fed tokens whose patch overlaps the target box (a merged token
  counts by its host patch; extra tokens, which have none, never);
- `attention.referent_tokens`, `attention.visual_tokens`: how many tokens those were.

From them OUT/attention.csv has, per run and layer, the mean `referent_of_visual` (referent / visual:
how concentrated the visual attention is on the referent) and `lift` (that share over the referent's
share of the fed visual tokens: 1 is attention spread evenly), with 95% bootstrap CIs. OUT/attention_gains.csv
asks whether pruning filters spatial noise: per pruned run, the samples where it hits and the unpruned model
misses (`gains`) against the rest, with each group's layer-mean `referent_of_visual` under the run and under
the unpruned model on the same samples. OUT/attention.png/.pdf draws both. The records are ordinary
pruning records too (`pruning.coverage` reads the directory). Methods that prune inside the LLM are refused:
a teacher-forced answer would enter their selection.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

import mllm
from grounding import Dataset, PromptStyle
from grounding.data import Sample
from grounding.metrics import bootstrap_means, percentile_interval
from grounding.records import scored_records, write_atomic
from grounding.runner import Annotate, Shard, run_sweep
from grounding.tasks import (
    add_run_arguments,
    add_task_arguments,
    chosen_style,
    finishing_shard,
    load_model,
    reported_errors,
)
from pruning.apply import layout_groups
from pruning.budget import Budget
from pruning.coverage import box_cells
from pruning.evaluate import FeedFunction, add_pruning_arguments, pruning_setup, pruning_sweep
from pruning.registry import LayerPruningMethod, PruningMethod, method_spec

ATTENTION_COLUMNS = ("method", "budget", "positions", "layer", "n", "referent_of_visual", "referent_of_visual_low",
                     "referent_of_visual_high", "lift", "lift_low", "lift_high", "visual", "visual_low", "visual_high")
GAINS_COLUMNS = ("method", "budget", "positions", "group", "n", "run", "run_low", "run_high", "unpruned",
                 "unpruned_low", "unpruned_high", "difference", "difference_low", "difference_high")


def attention_annotator(feed: FeedFunction) -> Annotate:
    """`Run.annotate` for a run feeding `feed`: each sample's attention shares per layer (module docstring)."""

    def annotate(model: mllm.MLLM, encoding: mllm.Encoding, generation: mllm.Generation,
                 samples: Sequence[Sample]) -> list[dict]:
        notes: list[dict] = [{}] * encoding.batch_size
        for rows in layout_groups(encoding):  # a ragged batch is pruned grid by grid, as prune_generate does
            part = encoding.subset(rows) if len(rows) < encoding.batch_size else encoding
            fed = feed(model, part)
            answers = [generation.token_ids[row] for row in rows]
            attentions = mllm.answer_attention(model, fed.encoding, answers, keep=fed.keep, policy=fed.policy,
                                               extra=fed.extra)
            for row, attention in zip(rows, attentions):
                notes[row] = {"attention": attention_shares(attention, samples[row].box, encoding.frames[row],
                                                            encoding.grids[row])}
        return notes

    return annotate


def attention_shares(attention: mllm.AnswerAttention, box: Sequence[float], frame: mllm.ImageFrame,
                     grid: Sequence[int]) -> dict:
    """Per layer, the answer steps' mean attention on the fed visual tokens and on those in the referent."""
    cells, _ = box_cells(box, frame, grid)
    referent = np.isin(attention.kept.numpy(), cells)
    visual_index = attention.visual_index.numpy()
    on_tokens = attention.weights.mean(dim=1).numpy()  # (layers, P): mean over the answer's steps
    visual = on_tokens[:, visual_index].sum(axis=1)
    on_referent = on_tokens[:, visual_index[: len(referent)][referent]].sum(axis=1)
    return {"visual": [round(float(value), 6) for value in visual],
            "referent": [round(float(value), 6) for value in on_referent],
            "referent_tokens": int(referent.sum()), "visual_tokens": len(visual_index),
            "steps": int(attention.weights.shape[1])}


def run_attention(model: mllm.MLLM, dataset: Dataset, methods: Sequence[PruningMethod], budgets: Sequence[Budget],
                  out: str | Path, *, positions: Sequence[str] = ("reassign", "keep"), style: PromptStyle | None = None,
                  batch_size: int = 8, limit: int | None = None, shard: Shard | None = None, resamples: int = 1000,
                  progress: bool = True, threshold: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The attention sweep on a REC dataset into `out`; the two tables once every run is complete."""
    if not model.adapter.tokens_on_one_grid:
        raise ValueError(f"{model.model.config.model_type}: the referent's cells are read on one grid of visual "
                         "tokens; on a base crop and tiles with newlines they are not implemented yet")
    for method in methods:
        if isinstance(method, LayerPruningMethod):
            raise ValueError(f"{method_spec(method)!r} prunes inside the LLM: its selection would see the "
                             "teacher-forced answer, so its attention is not measured here")
    parts = pruning_sweep(model, {"rec": dataset}, methods, budgets, out, positions=positions, style=style,
                          batch_size=batch_size, limit=limit, annotator=attention_annotator,
                          extra_config={"annotations": "attention"})
    summaries = run_sweep(model, parts, batch_size=batch_size, limit=limit, shard=shard or Shard(),
                          resamples=resamples, progress=progress, label="attention")
    if any(summary is None for summary in summaries):
        return None
    return write_attention_tables(out, resamples=resamples, threshold=threshold)


def attention_records(out: str | Path, *, threshold: float = 0.5) -> pd.DataFrame:
    """One row per (run, REC sample, layer) of an attention sweep's directory; a hit is IoU >= `threshold`."""
    rows = []
    for config_file in sorted((Path(out) / "rec").glob("**/config.json")):
        config = json.loads(config_file.read_text())
        for index, record in scored_records(config_file.parent).items():
            if "attention" not in record:
                raise ValueError(f"{config_file.parent}/samples.jsonl: sample {index} has no field 'attention' "
                                 "(not written by pruning.attention)")
            shares = record["attention"]
            for layer, (visual, referent) in enumerate(zip(shares["visual"], shares["referent"])):
                rows.append({"method": config["method"], "budget": config.get("budget", "0"),
                             "positions": config.get("positions", "none"), "index": index, "layer": layer,
                             "hit": record["iou"] >= threshold, "visual": visual, "referent": referent,
                             "referent_tokens": shares["referent_tokens"], "visual_tokens": shares["visual_tokens"]})
    table = pd.DataFrame(rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["referent_of_visual"] = table.referent / table.visual
        table["lift"] = table.referent_of_visual / (table.referent_tokens / table.visual_tokens)
    return table


def _mean_ci(values: np.ndarray, resamples: int) -> tuple[float, float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan"), float("nan")
    low, high = percentile_interval(bootstrap_means({"x": values}, resamples=resamples)[:, 0])
    return float(values.mean()), low, high


def attention_table(records: pd.DataFrame, *, resamples: int = 1000) -> pd.DataFrame:
    """Per (run, layer): mean referent_of_visual, lift and visual share over samples, with CIs. Samples whose
    referent kept no token have no referent_of_visual lift and are left out of those two means."""
    rows = []
    for (method, budget, positions, layer), group in records.groupby(["method", "budget", "positions", "layer"]):
        entry = {"method": method, "budget": budget, "positions": positions, "layer": layer, "n": len(group)}
        for name in ("referent_of_visual", "lift", "visual"):
            values = group[name].to_numpy(float)
            if name != "visual":
                values = np.where(group.referent_tokens.to_numpy() > 0, values, np.nan)
            entry[name], entry[f"{name}_low"], entry[f"{name}_high"] = _mean_ci(values, resamples)
        rows.append(entry)
    return pd.DataFrame(rows, columns=list(ATTENTION_COLUMNS))


def gains_table(records: pd.DataFrame, *, resamples: int = 1000) -> pd.DataFrame:
    """Per pruned run: the samples it hits and the unpruned model misses (`gains`) and the rest (`others`),
    with the layer-mean referent_of_visual under the run and under the unpruned model on the same samples."""
    per_sample = records.groupby(["method", "budget", "positions", "index"]).agg(
        hit=("hit", "first"), concentration=("referent_of_visual", "mean"),
        referent_tokens=("referent_tokens", "first")).reset_index()
    unpruned = per_sample[per_sample.method == "unpruned"].set_index("index")
    rows = []
    for (method, budget, positions), run in per_sample[per_sample.method != "unpruned"].groupby(
            ["method", "budget", "positions"]):
        paired = run.set_index("index").join(unpruned[["hit", "concentration"]].add_suffix("_unpruned"), how="inner")
        paired = paired[paired.referent_tokens > 0]
        gained = paired.hit & ~paired.hit_unpruned
        for name, rows_of in (("gains", gained), ("others", ~gained)):
            chosen = paired[rows_of]
            entry = {"method": method, "budget": budget, "positions": positions, "group": name, "n": len(chosen)}
            for column, values in (("run", chosen.concentration), ("unpruned", chosen.concentration_unpruned),
                                   ("difference", chosen.concentration - chosen.concentration_unpruned)):
                entry[column], entry[f"{column}_low"], entry[f"{column}_high"] = _mean_ci(values.to_numpy(float),
                                                                                          resamples)
            rows.append(entry)
    return pd.DataFrame(rows, columns=list(GAINS_COLUMNS))


def write_attention_tables(out: str | Path, *, resamples: int = 1000,
                           threshold: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`attention.csv` and `attention_gains.csv` from a sweep's records (rerun at another `threshold` at no cost)."""
    out = Path(out)
    records = attention_records(out, threshold=threshold)
    table, gains = attention_table(records, resamples=resamples), gains_table(records, resamples=resamples)
    write_atomic(out / "attention.csv", table.to_csv(index=False))
    write_atomic(out / "attention_gains.csv", gains.to_csv(index=False))
    return table, gains


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pruning.attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pruning_arguments(parser)
    add_task_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="results directory, e.g. results/attention/NAME")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="IoU of a hit, which decides the samples a run wins over the unpruned model")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.tasks != ["rec"] and "rec" in args.tasks:
        args.tasks = ["rec"]  # attention to a referent needs one: VQA is not run
    if args.tasks != ["rec"]:
        parser.error("--tasks: the attention analysis runs on REC only")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from grounding.tasks import task_datasets
    from pruning.figures import plot_attention

    with reported_errors(args.out, ValueError, ImportError) as outcome:
        methods, budgets, positions, _ = pruning_setup(args)
        dataset = task_datasets(args)["rec"]
        shard = Shard.parse(args.shard)
        model = load_model(args)
        style = chosen_style(args, model)
        tables = run_attention(model, dataset, methods, budgets, args.out, positions=positions, style=style,
                               batch_size=args.batch_size, limit=args.limit, shard=shard, resamples=args.bootstrap,
                               progress=not args.no_progress, threshold=args.threshold)
    if outcome.status:
        return outcome.status
    with finishing_shard(args.out, shard, tables is not None, f"{args.out / 'attention.csv'} and its figure") as writes:
        if writes:
            plot_attention(*tables, args.out / "attention.png", title=Path(args.model).name)
    if not writes:
        return 0
    print(tables[1].to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    print(f"wrote {args.out / 'attention.csv'}, {args.out / 'attention_gains.csv'} and {args.out / 'attention.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
