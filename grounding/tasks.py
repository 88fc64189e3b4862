"""The REC and VQA data and the run settings of an evaluation, as the CLIs take them on the command line.

    --data DIR                      DIR/rec/SPLIT.jsonl and DIR/vqa/SPLIT.jsonl (the miniature's layout)
    --rec refcoco:/data/RefCOCO     a task's dataset as NAME:PATH (any name `load_dataset` reads)
    --split val | rec=val,vqa=testdev_balanced
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

import mllm
from grounding.data import Dataset, load_dataset
from grounding.errors import GroundingError, PromptStyleError
from grounding.prompts import PromptStyle, default_style_for, load_rec_templates, prompt_style
from grounding.records import claim
from grounding.runner import Shard

TASKS = ("rec", "vqa")
# The metric each task's curves and tables lead with; summaries hold all of them.
HEADLINE = {"rec": "acc@0.5", "vqa": "accuracy"}


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="rec,vqa", type=lambda text: [t for t in text.split(",") if t],
                        help="comma-separated, from rec,vqa (default: both)")
    parser.add_argument("--data", help="a directory holding rec/SPLIT.jsonl and vqa/SPLIT.jsonl")
    parser.add_argument("--rec", help="REC dataset as NAME:PATH, e.g. refcoco:/data/RefCOCO")
    parser.add_argument("--vqa", help="VQA dataset as NAME:PATH, e.g. gqa:/data/GQA")
    parser.add_argument("--split", default="val", help="SPLIT, or TASK=SPLIT,... (default: val)")
    parser.add_argument("--images", help="image folder, when not where the dataset's layout expects it")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """How `--model` is loaded (`load_model`): the same flags in every CLI that loads one."""
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--min-pixels", type=int, help="native-resolution models (Qwen2-VL): resize each image to at "
                        "least this many pixels (default: the checkpoint's processor's)")
    parser.add_argument("--max-pixels", type=int, help="native-resolution models: at most this many pixels")


def load_model(args: argparse.Namespace, device: str | None = None) -> mllm.MLLM:
    """The checkpoint `--model` names, loaded as `add_model_arguments`' flags say (`device` overrides `--device`)."""
    return mllm.load(args.model, dtype=args.dtype, device=device or args.device, min_pixels=args.min_pixels,
                     max_pixels=args.max_pixels)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """How the model runs and how the run reports: the same flags in every evaluation CLI."""
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples (of each task)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-style", help="default: the style registered for the checkpoint's model type")
    parser.add_argument("--rec-templates", type=Path, help="a JSON list of REC question templates (Shikra's "
                        "config/_base_/dataset/template/REC.json: <expr> marks the expression, <image> the image); "
                        "each sample is asked one, drawn from its index and --template-seed")
    parser.add_argument("--template-seed", type=int, default=0)
    parser.add_argument("--rec-template-index", type=int, help="ask every sample this one of --rec-templates")
    add_model_arguments(parser)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--shard", help="r/n: evaluate the r-th of n contiguous blocks of whole batches of each "
                        "run; the last shard to finish writes the summaries (default: RANK/WORLD_SIZE)")
    parser.add_argument("--no-progress", action="store_true")


def chosen_style(args: argparse.Namespace, model: mllm.MLLM) -> PromptStyle:
    """The prompt style `add_run_arguments`' flags choose: `--prompt-style` or the checkpoint's own, asking the
    `--rec-templates` when given."""
    style = prompt_style(args.prompt_style) if args.prompt_style else default_style_for(model.model.config.model_type)
    if args.rec_templates is None:
        if args.rec_template_index is not None:
            raise PromptStyleError("--rec-template-index needs --rec-templates")
        return style
    templates = load_rec_templates(args.rec_templates)
    if args.rec_template_index is not None:
        if not 0 <= args.rec_template_index < len(templates):
            raise PromptStyleError(f"{args.rec_templates}: --rec-template-index {args.rec_template_index} is not "
                                   f"one of its {len(templates)} templates")
        templates = (templates[args.rec_template_index],)
    return style.with_options(rec_templates=templates, template_seed=args.template_seed)


def headline_table(table: pd.DataFrame, index: list[str], columns: list[str]) -> str:
    """The headline metric of each task (`HEADLINE`) from a sweep's table (a row per run and metric), `index`
    down and `columns` across: the short table a CLI prints at the end (the whole table is its CSV)."""
    headline = table[table.metric == table.task.map(HEADLINE)]
    pivot = headline.pivot_table(index=index, columns=columns, values="value")
    pivot.columns = [" ".join(map(str, column)) if isinstance(column, tuple) else str(column)
                     for column in pivot.columns]
    metrics = ", ".join(f"{task} {HEADLINE[task]}" for task in dict.fromkeys(headline.task))
    return f"{metrics}\n{pivot.to_string(float_format=lambda value: f'{value:.3f}')}"


@dataclass
class Outcome:
    """What a CLI's run came to: its exit status (0 while nothing went wrong)."""

    status: int = 0


@contextmanager
def reported_errors(out: Path | str, *errors: type[Exception]) -> Iterator[Outcome]:
    """Bad input (GroundingError, MLLMError, and `errors`) ends the block with its message and status 2;
    Ctrl-C with status 130 and where the records written so far are. The same in every evaluation CLI."""
    outcome = Outcome()
    try:
        yield outcome
    except (GroundingError, mllm.MLLMError, *errors) as error:
        print(f"error: {error}", file=sys.stderr)
        outcome.status = 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the records written so far are kept in {out}; rerun the same command to resume",
              file=sys.stderr)
        outcome.status = 130


@contextmanager
def finishing_shard(out: Path, shard: Shard, complete: bool, what: str) -> Iterator[bool]:
    """Whether this process writes `what` (a sweep's figures), which a sharded sweep writes once: the process
    that found every run complete and holds the claim on it does; the others say why not."""
    if not complete:
        print(f"shard {shard.rank}/{shard.world} done; the last shard to finish writes {what}")
        yield False
        return
    with claim(out / ".figures.lock") as claimed:  # shards finishing together: one of them draws
        if not claimed:
            print(f"shard {shard.rank}/{shard.world} done; another process is writing {what}")
        yield claimed


def check_tasks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown or not args.tasks:
        parser.error(f"--tasks: choose from {','.join(TASKS)}, got {','.join(args.tasks) or 'none'}")


def task_datasets(args: argparse.Namespace) -> dict[str, Dataset]:
    """Each requested task's dataset, from --data DIR or that task's --rec / --vqa NAME:PATH."""
    splits = _splits(args.split)
    datasets = {}
    for task in args.tasks:
        named = getattr(args, task)
        if named:
            name, sep, path = named.partition(":")
            if not sep or not path:
                raise GroundingError(f"--{task} {named!r}: need DATASET:PATH, e.g. refcoco:/data/RefCOCO")
            datasets[task] = load_dataset(name, path, splits.get(task, "val"), images=args.images)
        elif args.data:
            datasets[task] = load_dataset("jsonl", Path(args.data) / task, splits.get(task, "val"))
        else:
            raise GroundingError(f"no data for task {task}: pass --data DIR (with {task}/ in it) or --{task} NAME:PATH")
        if datasets[task].task != task:
            raise GroundingError(f"{datasets[task].source}: given as the {task} data, but its samples are "
                                 f"{datasets[task].task}")
    return datasets


def _splits(text: str) -> dict[str, str]:
    if "=" not in text:
        return dict.fromkeys(TASKS, text)
    splits = {}
    for item in text.split(","):
        task, _, split = item.partition("=")
        if task.strip() not in TASKS or not split.strip():
            raise GroundingError(f"--split {text!r}: need SPLIT or TASK=SPLIT,... with TASK in {TASKS}")
        splits[task.strip()] = split.strip()
    return splits
