"""Run a model over a dataset: batched, one JSONL record per sample as it goes, resumable, shardable.

A run resumes from the records already in its directory (after a crash or Ctrl-C). Under
`torchrun` / `accelerate launch` (or `Shard(r, n)`) process r evaluates the r-th of n contiguous runs of
whole batches (`shard_blocks`) into its own shard file, so that every batch, padding included, is one a
single process would run; whichever finishes last merges them and writes the summary.

A sweep (`run_sweep`) is many runs over one dataset in one pass: each batch is loaded and encoded
once (vision tower, projector, embeddings, the vision attentions any run reads) and every run that
lacks it generates from that encoding; runs that feed the LLM the same thing generate once.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import mllm
from grounding.data import Dataset, Sample
from grounding.errors import RunConfigError
from grounding.prompts import PromptStyle
from grounding.records import (
    append_records,
    kept_mask,
    read_records,
    record_files,
    repair_torn_tail,
    shard_file,
    write_atomic,
    write_merged,
)
from grounding.scoring import error_record, score_rec, score_vqa
from grounding.summary import metrics_csv, package_versions, summarize, summary_json
from mllm.cost import peak_memory, prefill_flops
from mllm.positions import PositionPolicy, position_ids

# A predictor runs the model on an encoded batch; pruning and ablations pass their own.
Predict = Callable[..., mllm.Generation]
# Config fields that may change when a run is resumed: they do not change what a sample's record is.
RESUMABLE_CHANGES = ("limit", "batch_size", "device", "shard")
# Fields a run directory written before the toolkit recorded them lacks: resumed with a warning, not refused.
UNRECORDED_BEFORE = ("weights",)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def parse(cls, spec: str | None = None) -> Shard:
        """`r/n`, else the RANK / WORLD_SIZE that torchrun and accelerate set, else the whole dataset."""
        rank, world = spec.partition("/")[::2] if spec else (os.environ.get("RANK", "0"),
                                                                 os.environ.get("WORLD_SIZE", "1"))
        source = f"--shard {spec!r}" if spec else "RANK / WORLD_SIZE"
        if not (rank.isdigit() and world.isdigit() and 0 <= int(rank) < int(world)):
            raise RunConfigError(f"{source}: need r/n with 0 <= r < n, got rank {rank!r} of {world!r}")
        return cls(int(rank), int(world))

    def take(self, items: Sequence[Any], batch_size: int) -> Sequence[Any]:
        """This rank's block of `items` (see `shard_blocks`)."""
        start, stop = shard_blocks(len(items), self.world, batch_size)[self.rank]
        return items[start:stop]


def shard_blocks(count: int, world: int, batch_size: int) -> list[tuple[int, int]]:
    """Per rank, its items [start, stop): the rank-th of `world` contiguous runs of whole batches.

    Cutting only between batches gives every rank the very batches a single process would run, so
    sharded results equal one process's, not merely up to padding. With fewer batches than ranks some are empty.
    """
    batches = -(-count // batch_size)
    edges = [min(count, batch_size * (batches * rank // world)) for rank in range(world + 1)]
    return list(pairwise(edges))


def default_predict(model: mllm.MLLM, encoding: mllm.Encoding, **options: Any) -> mllm.Generation:
    return mllm.generate(model, encoding, **options)


# What decides a run's generation on a batch, when the run can say (see `Run.key`).
RunKey = Callable[[mllm.MLLM, mllm.Encoding], Hashable | None]
# Fields a run adds to each sample's record, from the batch's encoding and its generation (see `Run.annotate`).
Annotate = Callable[[mllm.MLLM, mllm.Encoding, mllm.Generation, Sequence[Sample]], list[dict]]


@dataclass(frozen=True)
class Run:
    """One configuration of a sweep: its run directory, the config that made it, how it generates.

    `key(model, encoding)`, when given, names what the run feeds the LLM on that batch; runs of one
    sweep whose keys agree generate the same tokens, so the batch is generated once and its records
    are written to each of them (strength 0 of every corruption kind and the unpruned model, for one).
    `annotate(model, encoding, generation, samples)`, when given, returns one dict of extra record fields
    per encoded sample (an analysis of how the run generated); runs that share a key share them too.
    """

    out: Path
    config: dict
    predict: Predict = default_predict
    key: RunKey | None = None
    encode_options: dict = field(default_factory=dict)  # what `predict` reads from the encoding (`model.encode`)
    annotate: Annotate | None = None


@dataclass(frozen=True)
class SweepPart:
    """The runs of a sweep on one dataset, with one prompt style."""

    dataset: Dataset
    style: PromptStyle
    runs: Sequence[Run]


def feed_key(encoding: mllm.Encoding, keep: Sequence[torch.Tensor] | None = None,
             policy: str | PositionPolicy = "keep") -> tuple:
    """A `Run.key` for generation from `encoding` without merged features, extra tokens or in-LLM pruning:
    each row's fed visual tokens in order and the position IDs they get decide everything the LLM sees."""
    policy = PositionPolicy.parse(policy)
    rows = []
    for row, count in enumerate(encoding.visual_counts):
        kept = torch.arange(count) if keep is None else torch.as_tensor(keep[row]).cpu()
        ids = position_ids(kept, encoding.layouts[row], policy)
        rows.append((tuple(kept.tolist()), tuple(ids.flatten().tolist())))
    return tuple(rows)


def merge_encode_options(options: Iterable[dict]) -> dict:
    """One encoding serving several runs: hidden states if any run reads them, every attention layer any reads."""
    merged: dict[str, Any] = {}
    for option in options:
        for name, value in option.items():
            if name == "vision_attentions":
                merged[name] = sorted(set(merged.get(name, ())) | set(value or ()))
            elif name == "vision_hidden_states":
                merged[name] = merged.get(name, False) or bool(value)
            elif name in merged and merged[name] != value:
                raise ValueError(f"encode option {name!r}: runs of one sweep ask for {merged[name]!r} and {value!r}")
            else:
                merged[name] = value
    return merged


def _load_images(samples: Sequence[Sample]) -> tuple[dict[int, dict], list[tuple[Sample, Any]]]:
    """Error records for samples that cannot be scored; the others with their loaded images."""
    errors: dict[int, dict] = {}
    ready = []
    for sample in samples:
        if sample.problem:
            errors[sample.index] = error_record(sample, "sample", sample.problem)
            continue
        try:
            ready.append((sample, sample.image.load()))
        except mllm.ImageLoadError as error:
            errors[sample.index] = error_record(sample, "image", str(error))
    return errors, ready


def evaluate_runs(model: mllm.MLLM, samples: Sequence[Sample], task: str, style: PromptStyle,
                  runs: Sequence[Run]) -> Iterator[list[dict]]:
    """Per run in turn, one record per sample: the batch is loaded and encoded once for all runs (with what
    any of them reads), and generated once per distinct `Run.key`. Yielding run by run lets the caller write
    each run's records as soon as they exist, so a kill loses one run's batch, not every run's."""
    errors, ready = _load_images(samples)
    encoding = None
    if ready:
        texts = [style.text(task, sample.text, sample.index) for sample, _ in ready]
        encoding = model.encode([image for _, image in ready], texts, frame=style.image_frame,
                                **merge_encode_options(run.encode_options for run in runs))
    computed: dict[Hashable, list[dict]] = {}
    for run in runs:
        records = dict(errors)
        if encoding is not None:
            key = run.key(model, encoding) if run.key is not None else None
            if key is None or key not in computed:
                with peak_memory(model.device) as memory:
                    generation = run.predict(model, encoding, max_new_tokens=style.max_new_tokens(task),
                                             stop=style.stop)
                cost = generation_cost(model, generation, memory["bytes"])
                notes = (run.annotate(model, encoding, generation, [sample for sample, _ in ready]) if run.annotate
                         else [{}] * len(ready))
                scored = []
                for row, (sample, image) in enumerate(ready):
                    text = generation.texts[row].strip()
                    record = (score_rec(sample, text, image.size, style, input_size=encoding.frames[row].input_size)
                              if task == "rec" else score_vqa(sample, text))
                    scored.append({**record, **cost[row], **visual_fields(encoding, generation, row), **notes[row]})
                if key is not None:
                    computed[key] = scored
            else:
                scored = computed[key]
            records.update((sample.index, dict(record)) for (sample, _), record in zip(ready, scored))
        yield [records[sample.index] for sample in samples]


def evaluate_batch(model: mllm.MLLM, samples: Sequence[Sample], task: str, style: PromptStyle,
                   predict: Predict = default_predict, *, encode_options: dict | None = None) -> list[dict]:
    """One record per sample: scored, or an error record saying why it could not be.

    `encode_options` go to `model.encode` (e.g. the vision attentions a pruning method reads).
    """
    run = Run(Path(), {}, predict, encode_options=encode_options or {})
    return next(evaluate_runs(model, samples, task, style, [run]))


def visual_fields(encoding: mllm.Encoding, generation: mllm.Generation, row: int) -> dict:
    """What a record says of the row's visual tokens: the grid they tile and which of them the last LLM
    layer saw (`grounding.records.kept_mask`)."""
    grid = encoding.grids[row]  # None where the tokens are no single grid (LLaVA-NeXT's crops and newlines)
    return {"visual_grid": None if grid is None else [int(grid[0]), int(grid[1])],
            "visual_kept": kept_mask(generation.kept[row].tolist(), encoding.visual_counts[row])}


def generation_cost(model: mllm.MLLM, generation: mllm.Generation, peak_bytes: int | None) -> list[dict]:
    """Per row: the visual tokens the last LLM layer saw and their mean over the layers (they differ when
    tokens are dropped inside the LLM), analytic prefill FLOPs, the row's share of the batch's prefill time,
    the batch's seconds per decoding step, and the batch's peak accelerator memory (None off CUDA). Times
    are per batch, so they depend on `--batch-size`; compare runs made with the same one."""
    rows = len(generation.texts)
    step = generation.decode_seconds / generation.decode_steps if generation.decode_steps else None
    costs = [{"num_visual_fed": len(generation.kept[row]) + generation.num_extra, "num_visual_layer_mean": None,
              "prefill_flops": None, "prefill_seconds": generation.prefill_seconds / rows,
              "decode_seconds_per_step": step, "peak_memory_bytes": peak_bytes} for row in range(rows)]
    if generation.visual_layer_tokens is not None:  # a caller's own predict may not say what each layer saw
        flops = prefill_flops(model.adapter, generation.layer_tokens)
        for row, cost in enumerate(costs):
            visual = generation.visual_layer_tokens[row]
            cost.update(num_visual_fed=int(visual[-1]), num_visual_layer_mean=float(visual.double().mean()),
                        prefill_flops=float(flops[row]))
    return costs


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_or_write_config(out: Path, config: dict, *, resumable: Sequence[str] = RESUMABLE_CHANGES) -> None:
    """A run directory belongs to one configuration; refuse to mix records of two.

    Fields named in `resumable` may differ on a rerun (they do not change what a record is).
    """
    path = out / "config.json"
    if not path.is_file():
        write_atomic(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return
    written, current = _flat(json.loads(path.read_text())), _flat(json.loads(json.dumps(config)))
    unrecorded = sorted(key for key in current if key in UNRECORDED_BEFORE and key not in written)
    if unrecorded:
        warnings.warn(f"{path}: written before runs recorded {', '.join(unrecorded)}; resuming it as this "
                      f"checkpoint's run (delete {out} if another checkpoint wrote it)", stacklevel=2)
    changed = sorted(key for key in set(written) | set(current)
                     if key not in resumable and key not in unrecorded and written.get(key) != current.get(key))
    if changed:
        details = "; ".join(f"{key}: {written.get(key)!r} there, {current.get(key)!r} now" for key in changed)
        raise RunConfigError(f"{path}: this directory holds a run with another configuration ({details}). "
                             f"Pass a new --out, or rerun with the same settings to resume.")


def finish(out: Path, selected: Sequence[Sample], task: str, config: dict, resamples: int = 1000) -> dict | None:
    """Merge every shard's records; once all selected samples have one, write the summary."""
    records = read_records(record_files(out))
    missing = [sample.index for sample in selected if sample.index not in records]
    if missing:
        return None
    write_merged(out, records)
    summary = summarize([records[sample.index] for sample in selected], task, resamples=resamples)
    summary = {**summary, "config": config, "versions": package_versions()}
    write_atomic(out / "summary.json", summary_json(summary))
    write_atomic(out / "metrics.csv", metrics_csv(summary))
    return summary


def run_sweep(model: mllm.MLLM, parts: Sequence[SweepPart], *, batch_size: int = 8, limit: int | None = None,
              shard: Shard = Shard(), resamples: int = 1000, progress: bool = True,
              label: str = "sweep") -> list[dict | None]:
    """Every run of every part, in one pass over each part's data: each batch of this process's shard is
    encoded once and run through every run that still lacks it, appending to that run's own records.

    Runs stay separate, resumable run directories (see `run_evaluation`); a killed sweep resumes each
    run where it stopped. Returns each run's summary in order, None for runs other shards still owe.
    """
    states = []
    for part in parts:
        for run in part.runs:
            run.out.mkdir(parents=True, exist_ok=True)
            check_or_write_config(run.out, run.config)
        selected = part.dataset.samples[:limit]
        mine = shard.take(selected, batch_size)
        paths = [shard_file(run.out, shard.rank, shard.world) for run in part.runs]
        for path in paths:
            repair_torn_tail(path)
        done = [set(read_records(record_files(run.out))) for run in part.runs]
        states.append((part, selected, mine, paths, done))
    total = sum(len(mine) * len(part.runs) for part, _, mine, _, _ in states)
    initial = sum(sum(sample.index in seen for sample in mine) for _, _, mine, _, done in states for seen in done)
    runs = sum(len(part.runs) for part in parts)
    if runs > 1:
        label += f", {runs} runs"
    if shard.world > 1:
        label += f", shard {shard.rank}/{shard.world}"
    with tqdm(total=total, initial=initial, disable=not progress, desc=label, unit="sample",
              dynamic_ncols=True) as bar:
        for part, _, mine, paths, done in states:
            # Batches are fixed chunks of the shard, so a resumed run pads and batches samples as an
            # uninterrupted one does; a run a kill cut short in a chunk recomputes that chunk whole.
            for start in range(0, len(mine), batch_size):
                chunk = mine[start : start + batch_size]
                owing = [number for number, seen in enumerate(done) if any(s.index not in seen for s in chunk)]
                if not owing:
                    continue
                results = evaluate_runs(model, chunk, part.dataset.task, part.style,
                                        [part.runs[number] for number in owing])
                for number, records in zip(owing, results):
                    new = [record for record in records if record["index"] not in done[number]]
                    append_records(paths[number], new)
                    done[number].update(record["index"] for record in new)
                    bar.update(len(new))
    # Only now: a rank that finished an early part before the others sees their records of it here.
    return [finish(run.out, selected, part.dataset.task, run.config, resamples)
            for part, selected, *_ in states for run in part.runs]


def run_evaluation(model: mllm.MLLM, dataset: Dataset, out: str | Path, style: PromptStyle, *,
                   config: dict | None = None, predict: Predict = default_predict, batch_size: int = 8,
                   limit: int | None = None, shard: Shard = Shard(), resamples: int = 1000,
                   progress: bool = True, encode_options: dict | None = None) -> dict | None:
    """Evaluate this process's shard of `dataset[:limit]` into `out`, resuming what is there.

    Returns the summary once every selected sample has a record (None while other shards still run).
    `config` is what made the run (see `run_config`); a caller adds its own fields (method, ratio).
    `predict` and `encode_options` let a caller change how the model runs (pruning, ablations).
    A sweep of one run (`run_sweep`).
    """
    config = config if config is not None else run_config(model, dataset, style, limit=limit, batch_size=batch_size)
    part = SweepPart(dataset, style, [Run(Path(out), config, predict, encode_options=encode_options or {})])
    return run_sweep(model, [part], batch_size=batch_size, limit=limit, shard=shard, resamples=resamples,
                     progress=progress, label=f"{dataset.name} {dataset.split}")[0]


def model_identity(model: mllm.MLLM) -> dict:
    """The checkpoint a run directory belongs to: its path and its weights' fingerprint (a retrained
    checkpoint saved to the same path is another model)."""
    return {"model": str(model.path), "weights": model.weights}


def run_config(model: mllm.MLLM, dataset: Dataset, style: PromptStyle, **extra: Any) -> dict:
    config = {
        **model_identity(model), "model_type": model.model.config.model_type, "dtype": str(model.dtype).split(".")[-1],
        "dataset": dataset.name, "split": dataset.split, "data": str(dataset.source), "task": dataset.task,
        "n_dataset": len(dataset), "prompt_style": asdict(style), **extra,
    }
    size = model.processor.image_processor.size
    if model.fixed_grid is None and size.get("longest_edge") is not None:
        # native resolution: the pixel bounds decide how many tokens an image gets
        config["image_pixels"] = {"min": int(size["shortest_edge"]), "max": int(size["longest_edge"])}
    pinpoints = getattr(model.model.config, "image_grid_pinpoints", None)
    if pinpoints:  # LLaVA-NeXT: the tile canvases an image may get
        config["image_grid_pinpoints"] = [list(map(int, canvas)) for canvas in pinpoints]
    return config
