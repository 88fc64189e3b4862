"""Prune with each method at each budget, number the kept tokens by each position policy, evaluate REC and VQA.

    python -m pruning.evaluate --model DIR --data data/minillava/eval --methods random,fastv,prumerge \
        --ratios 0.5,0.75 --positions reassign,keep --tasks rec,vqa --out results/pruning/NAME

`--methods` takes parameters (`fastv:layer=3,query=all`); a user's registered method is named the same
way (`--import my_module` registers it first). `--ratios` are fractions pruned, `--keep` numbers of
tokens kept; the budget counts every token fed to the LLM. On LLaVA-NeXT's base crop and tiles with
newline tokens, `--newlines keep|row|drop` and `--budget-scope per-crop|all` say how (`pruning.crops`).
Methods that pick their own count (`prumerge:adaptive=true`) run once per policy and report the tokens
they fed. Data as in
`misalign.ablate`: `--data DIR` (rec/ and vqa/ JSONL) or `--rec NAME:PATH --vqa NAME:PATH`.

Each run is a grounding run directory, resumable: OUT/TASK/unpruned/ once, and
OUT/TASK/METHOD/BUDGET/POLICY/. The sweep is one pass over each task's data: a batch is encoded once
for every run, each (method, budget) selects once for all its policies, and runs feeding the LLM the
same tokens generate once, each still writing its own records. Under `torchrun --nproc_per_node N` /
`accelerate launch` (or `--shard r/n`) each process, on its own GPU, evaluates its block of every
run; the last to finish writes the summaries, the table and the figure, equal to one process's.

OUT/pruning.csv (method, budget, positions, task, metric, value, CI, n, and the cost: visual tokens the
last LLM layer saw and their mean over the layers (the two differ for methods that prune inside the
LLM), analytic prefill GFLOPs, prefill ms per sample, ms per decoding step, peak CUDA memory) and
OUT/pruning.png/.pdf cover every finished run in OUT. The times are measured per batch (a sample's
share of its batch's prefill): compare runs made with one --batch-size. Runs that generated once for
several share that generation's times.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import pandas as pd

import mllm
from grounding import Dataset, PromptStyle, default_style_for
from grounding.records import write_atomic
from grounding.runner import (
    Annotate,
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
from mllm.specs import spec_slug
from pruning.apply import (
    NOT_ON_CROPS,
    POSITIONS,
    BatchSelections,
    Feed,
    feed_order,
    layout_groups,
    mllm_policy,
    prune_generate,
    pruned_feed,
)
from pruning.budget import Budget
from pruning.crops import BUDGET_SCOPES, NEWLINE_RULES, CropRule
from pruning.registry import LayerPruningMethod, PruningMethod, make_method, method_spec

TABLE_COLUMNS = ("method", "budget", "positions", "task", "dataset", "split", "metric", "value", "ci_low", "ci_high",
                 "n", "tokens_fed", "tokens_layer_mean", "num_visual", "prefill_gflops", "prefill_ms",
                 "decode_ms_per_step", "peak_memory_mib")
UNPRUNED = "unpruned"


def split_method_specs(text: str) -> list[str]:
    """`random,fastv:layer=3,query=all` -> ['random', 'fastv:layer=3,query=all']: a `name=value` part continues."""
    specs: list[str] = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and specs:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def parse_budget_list(ratios: str | None, keep: str | None) -> list[Budget]:
    budgets = [Budget(pruned=float(value)) for value in (ratios or "").split(",") if value.strip()]
    budgets += [Budget(kept=int(value)) for value in (keep or "").split(",") if value.strip()]
    if not budgets:
        raise ValueError("give --ratios (fractions pruned) or --keep (tokens kept)")
    return budgets


def budget_label(method: PruningMethod, budget: Budget) -> str:
    return "adaptive" if method.adaptive else str(budget)


def run_directory(out: Path, task: str, method: PruningMethod | None = None, budget: str = "",
                  positions: str = "") -> Path:
    if method is None:
        return out / task / UNPRUNED
    return out / task / spec_slug(method_spec(method)) / budget / positions


# A pruning feed as a function of the batch (see `pruning.apply.Feed`).
FeedFunction = Callable[[mllm.MLLM, mllm.Encoding], Feed]
# Makes a run's `Run.annotate` from what the run feeds the LLM (`pruning.attention` passes one).
Annotator = Callable[[FeedFunction], Annotate]


def unpruned_feed(model: mllm.MLLM, encoding: mllm.Encoding) -> Feed:
    return Feed(encoding, None, "keep")


def pruned_run(out: Path, config: dict, method: PruningMethod, budget: Budget, positions: str, *,
               selections: BatchSelections, encode_options: dict, annotator: Annotator | None = None,
               crops: CropRule | None = None) -> Run:
    """A sweep run of `method` at `budget` under `positions`; its key says when it feeds what another run feeds."""

    def predict(model: mllm.MLLM, encoding: mllm.Encoding, **options: object) -> mllm.Generation:
        return prune_generate(model, encoding, method, budget, positions, selections=selections, crops=crops,
                              **options)

    def key(model: mllm.MLLM, encoding: mllm.Encoding) -> Hashable | None:
        if isinstance(method, LayerPruningMethod) or len(layout_groups(encoding)) > 1:
            return None  # in-LLM pruning is its own; a ragged batch is pruned per token map, not worth a key
        selection = selections(model, encoding, method, budget, crops)
        feed = feed_key(encoding, feed_order(selection, positions), mllm_policy(positions))
        if selection.features is None and selection.extra is None:
            return feed  # the bare kept tokens: the same as any run feeding them (the unpruned run, at 0%)
        return (method_spec(method), str(budget), feed)

    def fed(model: mllm.MLLM, encoding: mllm.Encoding) -> Feed:
        return pruned_feed(model, encoding, method, budget, positions, selections=selections, crops=crops)

    return Run(out, config, predict, key, encode_options, annotate=annotator(fed) if annotator else None)


def run_pruning(model: mllm.MLLM, datasets: Mapping[str, Dataset], methods: Sequence[PruningMethod],
                budgets: Sequence[Budget], out: str | Path, *, positions: Sequence[str] = ("reassign", "keep"),
                style: PromptStyle | None = None, batch_size: int = 8, limit: int | None = None,
                shard: Shard | None = None, resamples: int = 1000, progress: bool = True,
                crops: CropRule | None = None) -> pd.DataFrame | None:
    """The unpruned run and every (method, budget, policy) run, per task, into `out`; return the table.

    One pass over each task's data (`pruning_sweep`). Under `shard` this process evaluates its block of
    every run; the table comes back (and is written) from the process that finds every run complete, None
    from the others.
    """
    parts = pruning_sweep(model, datasets, methods, budgets, out, positions=positions, style=style,
                          batch_size=batch_size, limit=limit, crops=crops)
    summaries = run_sweep(model, parts, batch_size=batch_size, limit=limit, shard=shard or Shard(),
                          resamples=resamples, progress=progress, label="pruning")
    if any(summary is None for summary in summaries):
        return None
    table = pruning_table(out)
    write_atomic(Path(out) / "pruning.csv", table.to_csv(index=False))
    return table


def pruning_sweep(model: mllm.MLLM, datasets: Mapping[str, Dataset], methods: Sequence[PruningMethod],
                  budgets: Sequence[Budget], out: str | Path, *, positions: Sequence[str] = ("reassign", "keep"),
                  style: PromptStyle | None = None, batch_size: int = 8, limit: int | None = None,
                  annotator: Annotator | None = None, extra_config: dict | None = None,
                  crops: CropRule | None = None) -> list[SweepPart]:
    """Per task, the unpruned run and every (method, budget, policy) run, checked and ready for `run_sweep`.

    A batch is encoded once for every run, each (method, budget) selects once for all its policies, and
    runs feeding the LLM the same tokens generate once. `annotator` makes each run's `Run.annotate` from
    what it feeds; `extra_config` goes into every run's config (what the annotations are). `crops` rules
    visual tokens of several crops with newlines (`pruning.crops`); their runs' configs record it.
    """
    for policy in positions:
        mllm_policy(policy)  # an unknown policy fails before anything is written
    # A method that cannot read this model (trim's CLIP width) fails here, before anything is written.
    encode_options = [method.encode_options(model) for method in methods]
    adapter, model_type = model.adapter, model.model.config.model_type
    for method, options in zip(methods, encode_options):
        in_llm, merges_states = isinstance(method, LayerPruningMethod), bool(options.get("vision_hidden_states"))
        if in_llm and "compact" in positions:
            raise ValueError(f"{method_spec(method)!r} prunes inside the LLM, where 'compact' positions are not "
                             "defined (its tokens already carry their IDs): run it with reassign and keep")
        if merges_states and adapter.patches_per_token > 1:  # CLS attention sums per token; states do not
            raise ValueError(f"{method_spec(method)!r} reads the vision tower's hidden states, one per patch, and "
                             f"{model_type} feeds {adapter.patches_per_token} patches per visual token: merging "
                             "tokens by their patches' states is not implemented yet")
        if not adapter.tokens_on_one_grid and (in_llm or merges_states):
            raise ValueError(f"{method_spec(method)!r} on {model_type}: {NOT_ON_CROPS}")
    crop_config = {}
    if not adapter.tokens_on_one_grid:
        crops = crops or CropRule()
        crop_config = crops.config()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    style = style or default_style_for(model.model.config.model_type)
    check_or_write_config(out, model_identity(model))
    selections = BatchSelections()
    parts = []
    for task, dataset in datasets.items():
        base = run_config(model, dataset, style, limit=limit, batch_size=batch_size,
                          num_visual=model.num_visual_tokens if model.fixed_grid else None, **(extra_config or {}),
                          **crop_config)
        runs = [Run(run_directory(out, task), {**base, "method": UNPRUNED}, key=lambda _, encoding: feed_key(encoding),
                    annotate=annotator(unpruned_feed) if annotator else None)]
        for method, options in zip(methods, encode_options):
            for budget in dict.fromkeys(budget_label(method, b) for b in budgets):
                parsed = Budget.parse(budget) if budget != "adaptive" else Budget(pruned=0.0)
                for policy in positions:
                    config = {**base, "method": method_spec(method), "budget": budget, "positions": policy}
                    runs.append(pruned_run(run_directory(out, task, method, budget, policy), config, method, parsed,
                                           policy, selections=selections, encode_options=options,
                                           annotator=annotator, crops=crops))
        parts.append(SweepPart(dataset, style, runs))
    return parts


def pruning_table(out: str | Path) -> pd.DataFrame:
    """One row per (method, budget, positions, task, metric) over every finished run in `out`."""
    rows = []
    for path in sorted(Path(out).glob("*/**/summary.json")):
        summary = json.loads(path.read_text())
        config = summary["config"]
        cost = {key: float("nan") if value is None else value for key, value in summary.get("cost", {}).items()}
        for metric, entry in summary["metrics"].items():
            rows.append({"method": config["method"], "budget": config.get("budget", "0"),
                         "positions": config.get("positions", "none"), "task": summary["task"],
                         "dataset": config["dataset"], "split": config["split"], "metric": metric,
                         "value": entry["value"], "ci_low": entry["ci95"][0], "ci_high": entry["ci95"][1],
                         "n": entry["n"], "tokens_fed": cost.get("num_visual_fed", float("nan")),
                         "tokens_layer_mean": cost.get("num_visual_layer_mean", float("nan")),
                         "num_visual": config["num_visual"],
                         "prefill_gflops": cost.get("prefill_flops", float("nan")) / 1e9,
                         "prefill_ms": cost.get("prefill_seconds", float("nan")) * 1e3,
                         "decode_ms_per_step": cost.get("decode_seconds_per_step", float("nan")) * 1e3,
                         "peak_memory_mib": cost.get("peak_memory_bytes", float("nan")) / 2**20})
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    # Native-resolution models have no one count: the unpruned run's mean visual tokens per sample stand in.
    if table.num_visual.isna().any():
        unpruned = table[table.method == UNPRUNED].groupby("task").tokens_fed.first()
        table["num_visual"] = table.num_visual.fillna(table.task.map(unpruned)).astype(float)
    return table.sort_values(["task", "metric", "method", "budget", "positions"], ignore_index=True)


def format_table(table: pd.DataFrame) -> str:
    """Each task's headline metric, a row per (method, budget) and a column per (task, position policy)."""
    return headline_table(table, index=["method", "budget"], columns=["task", "positions"])


def add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and what to prune it with: --model, --methods, --ratios / --keep, --positions, --import."""
    parser.add_argument("--model", required=True, help="local checkpoint directory (anything mllm.load reads)")
    parser.add_argument("--methods", required=True, help="comma-separated methods, e.g. random,fastv:layer=3")
    parser.add_argument("--ratios", help="comma-separated fractions pruned, e.g. 0.25,0.5,0.75,0.9")
    parser.add_argument("--keep", help="comma-separated numbers of tokens kept, e.g. 64,144")
    parser.add_argument("--positions", default="reassign,keep", help=f"comma-separated, from {','.join(POSITIONS)}")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        help="a module to import first (one that registers your own methods)")
    parser.add_argument("--newlines", default="row", choices=NEWLINE_RULES,
                        help="LLaVA-NeXT's newline tokens: feed every one, the one of each row that keeps a token, "
                             "or none (pruning.crops; default row)")
    parser.add_argument("--budget-scope", default="per-crop", choices=BUDGET_SCOPES,
                        help="LLaVA-NeXT's base crop and tiles: the budget split over them, or one budget over all "
                             "(pruning.crops; default per-crop)")


def pruning_setup(args: argparse.Namespace) -> tuple[list[PruningMethod], list[Budget], list[str], CropRule]:
    """The methods (after --import), budgets, position policies and crop rule the arguments name."""
    for module in args.imports:
        importlib.import_module(module)
    methods = [make_method(spec) for spec in split_method_specs(args.methods)]
    budgets = parse_budget_list(args.ratios, args.keep)
    positions = [policy for policy in args.positions.split(",") if policy]
    return methods, budgets, positions, CropRule(args.newlines, args.budget_scope)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pruning.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pruning_arguments(parser)
    add_task_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="results directory, e.g. results/pruning/NAME")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    check_tasks(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from pruning.figures import plot_pruning

    with reported_errors(args.out, ValueError, ImportError) as outcome:
        methods, budgets, positions, crops = pruning_setup(args)
        datasets = task_datasets(args)
        shard = Shard.parse(args.shard)
        model = load_model(args)
        style = chosen_style(args, model)
        table = run_pruning(model, datasets, methods, budgets, args.out, positions=positions, style=style,
                            batch_size=args.batch_size, limit=args.limit, shard=shard, resamples=args.bootstrap,
                            progress=not args.no_progress, crops=crops)
    if outcome.status:
        return outcome.status
    with finishing_shard(args.out, shard, table is not None, f"{args.out / 'pruning.csv'} and its figure") as writes:
        if writes:
            plot_pruning(table, args.out / "pruning.png", title=Path(args.model).name)
    if not writes:
        return 0
    print(format_table(table))
    print(f"wrote {args.out / 'pruning.csv'} and {args.out / 'pruning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
