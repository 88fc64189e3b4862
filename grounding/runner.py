"""Run a model over a dataset: batched, one JSONL record per sample as it goes, resumable, shardable.

A run resumes from the records already in its directory (after a crash or Ctrl-C). Under
`torchrun` / `accelerate launch` (or `Shard(r, n)`) each process evaluates every n-th sample into
its own shard file; whichever finishes last merges them and writes the summary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

import mllm
from grounding.data import Dataset, Sample
from grounding.errors import RunConfigError
from grounding.prompts import PromptStyle
from grounding.records import (
    append_records,
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

# A predictor runs the model on an encoded batch; pruning and ablations pass their own.
Predict = Callable[..., mllm.Generation]
# Config fields that may change when a run is resumed: they do not change what a sample's record is.
RESUMABLE_CHANGES = ("limit", "batch_size", "device", "shard")


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


def default_predict(model: mllm.MLLM, encoding: mllm.Encoding, **options: Any) -> mllm.Generation:
    return mllm.generate(model, encoding, **options)


def evaluate_batch(model: mllm.MLLM, samples: Sequence[Sample], task: str, style: PromptStyle,
                   predict: Predict = default_predict, *, encode_options: dict | None = None) -> list[dict]:
    """One record per sample: scored, or an error record saying why it could not be.

    `encode_options` go to `model.encode` (e.g. the vision attentions a pruning method reads).
    """
    records: dict[int, dict] = {}
    ready = []
    for sample in samples:
        if sample.problem:
            records[sample.index] = error_record(sample, "sample", sample.problem)
            continue
        try:
            ready.append((sample, sample.image.load()))
        except mllm.ImageLoadError as error:
            records[sample.index] = error_record(sample, "image", str(error))
    if ready:
        encoding = model.encode([image for _, image in ready],
                                [style.text(task, sample.text) for sample, _ in ready], frame=style.image_frame,
                                **(encode_options or {}))
        with peak_memory(model.device) as memory:
            generation = predict(model, encoding, max_new_tokens=style.max_new_tokens(task), stop=style.stop)
        cost = generation_cost(model, generation, memory["bytes"])
        for row, (sample, image) in enumerate(ready):
            text = generation.texts[row].strip()
            record = (score_rec(sample, text, image.size, style, input_size=encoding.frames[row].input_size)
                      if task == "rec" else score_vqa(sample, text))
            records[sample.index] = {**record, **cost[row]}
    return [records[sample.index] for sample in samples]


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
    changed = sorted(key for key in set(written) | set(current)
                     if key not in resumable and written.get(key) != current.get(key))
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


def run_evaluation(model: mllm.MLLM, dataset: Dataset, out: str | Path, style: PromptStyle, *,
                   config: dict | None = None, predict: Predict = default_predict, batch_size: int = 8,
                   limit: int | None = None, shard: Shard = Shard(), resamples: int = 1000,
                   progress: bool = True, encode_options: dict | None = None) -> dict | None:
    """Evaluate this process's shard of `dataset[:limit]` into `out`, resuming what is there.

    Returns the summary once every selected sample has a record (None while other shards still run).
    `config` is what made the run (see `run_config`); a caller adds its own fields (method, ratio).
    `predict` and `encode_options` let a caller change how the model runs (pruning, ablations).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else run_config(model, dataset, style, limit=limit, batch_size=batch_size)
    check_or_write_config(out, config)
    selected = dataset.samples[:limit]
    mine = selected[shard.rank :: shard.world]
    path = shard_file(out, shard.rank, shard.world)
    repair_torn_tail(path)
    done = set(read_records(record_files(out)))
    # Batches are fixed chunks of the shard, so a resumed run pads and batches samples as an
    # uninterrupted one does; a chunk cut short by a kill is recomputed whole.
    chunks = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    label = f"{dataset.name} {dataset.split}" + (f" shard {shard.rank}/{shard.world}" if shard.world > 1 else "")
    with tqdm(total=len(mine), initial=sum(sample.index in done for sample in mine), disable=not progress,
              desc=label, unit="sample") as bar:
        for chunk in chunks:
            todo = [sample for sample in chunk if sample.index not in done]
            if not todo:
                continue
            records = evaluate_batch(model, chunk, dataset.task, style, predict, encode_options=encode_options)
            append_records(path, [record for record in records if record["index"] not in done])
            bar.update(len(todo))
    return finish(out, selected, dataset.task, config, resamples)


def run_config(model: mllm.MLLM, dataset: Dataset, style: PromptStyle, **extra: Any) -> dict:
    config = {
        "model": str(model.path), "model_type": model.model.config.model_type, "dtype": str(model.dtype).split(".")[-1],
        "dataset": dataset.name, "split": dataset.split, "data": str(dataset.source), "task": dataset.task,
        "n_dataset": len(dataset), "prompt_style": asdict(style), **extra,
    }
    if model.fixed_grid is None:  # native resolution: the pixel bounds decide how many tokens an image gets
        size = model.processor.image_processor.size
        config["image_pixels"] = {"min": int(size["shortest_edge"]), "max": int(size["longest_edge"])}
    return config
