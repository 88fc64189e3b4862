"""Layer-wise position probes on a vision tower: how well each layer's patch tokens tell where the patch was.

    python -m probes.layerwise --model /ckpt/llava-1.5-7b-hf --images my_images/ --out results/probe-7b
    python -m probes.layerwise --model data/minillava/spatial --dataset jsonl --data data/minillava/eval/rec \\
        --out results/probes/spatial --target index --layers all
    python -m probes.layerwise --model /ckpt/Qwen2.5-VL-7B-Instruct --images images_of_one_size/ \\
        --out results/probes/qwen2.5-vl-7b
    torchrun --nproc_per_node 8 -m probes.layerwise --model /ckpt/llava-1.5-7b-hf --images my_images/ \\
        --out results/probe-7b
    python -m probes.layerwise --shard 0/2 ...   # and --shard 1/2 ..., anywhere that sees the same --out

Writes under --out: `activations/` (the streamed patch tokens, resumable), `records.jsonl` (one line
per feature set and layer, written as each is fitted; a rerun skips what is there), `layerwise.csv`
(series, layer, metric, value, ci_low, ci_high), `config.json` (the settings; a rerun with others is
refused), `layerwise.json` (grid, layers, train/test image ids, hook check, versions) and
`layerwise.png` / `.pdf`.

Sharded extraction: under `torchrun` / `accelerate launch` (RANK / WORLD_SIZE), or with `--shard r/n`,
process r extracts the r-th of n contiguous runs of whole batches into `activations/shard{r}of{n}/`
(`activations/shards.json` records the blocks), each resumable on its own. The process that finishes
its shard last, seeing every shard complete, fits the probes on all images in order and writes the
results, exactly as one process would (a claim on `.fitting.lock` keeps two that finish together from both
fitting); the others say so and exit. Activations extracted with one number of processes resume only
with that number (another is refused): to refit a finished sharded store, rerun any one `--shard r/n`.

Series: `probe` (hidden state k), `shuffled labels` (the same probe trained on labels permuted
across training patches), `patch embedding` and `patch + position embedding` (before any block),
and `chance` (a uniform guess). Train and test images are disjoint: the split is by image, never by
patch. CIs are 95% bootstrap intervals over test images.

`--features visual-tokens` probes, instead, the visual tokens the LLM receives (the projector's output) on
their own grid: one feature set, `visual tokens`, beside chance. Where a token concatenates patches
(MiniGPT-v2: 1 x 4 strips, a 32 x 8 grid) or merges them (Qwen's 2 x 2), that grid is not the tower's.

Native-resolution towers (Qwen2-VL, Qwen2.5-VL): patches are the ViT's, before the 2x2 merger, and
targets are raster positions on the unmerged patch grid. Every image must get the same grid (give images
of one size; `--min-pixels` / `--max-pixels` bound the resize). The tower has no position embedding (2-D
RoPE acts inside attention), so `patch + position embedding` is absent and `patch embedding` is
hidden state 0.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from grounding import bootstrap_intervals
from grounding.records import append_records, claim, repair_torn_tail, write_atomic
from grounding.records import read_records as read_jsonl_records
from grounding.runner import Shard, check_or_write_config
from grounding.summary import package_versions
from grounding.tasks import add_model_arguments, load_model
from probes.activations import (
    FEATURES,
    PATCH,
    PATCH_POS,
    VISUAL_TOKENS,
    ActivationStore,
    ImageList,
    extract_shard,
    shard_layout,
)
from probes.estimator import SOLVERS, fit_layers, patch_scores
from probes.targets import METRICS, TARGETS, chance, num_classes, patch_labels

SERIES = {PATCH: "patch embedding", PATCH_POS: "patch + position embedding", VISUAL_TOKENS: "visual tokens"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
RECORDS = "records.jsonl"
FITTING_CLAIM = ".fitting.lock"
# Config fields that may change on a rerun: the activation store's own layout (`shard_layout`) refuses
# a store extracted with another number of shards, and runs written before the field existed resume.
RESUMABLE_CHANGES = ("shards",)


# -------------------------------------------------------------------------------------- images
def images_from_directory(directory: str | Path, limit: int | None = None) -> ImageList:
    from mllm import load_image

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--images {directory}: not a directory")
    files = sorted(path for path in directory.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise FileNotFoundError(f"--images {directory}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageList(ids=[str(path.relative_to(directory)) for path in files],
                     load=lambda index: load_image(files[index]))


def images_from_dataset(name: str, data: str | Path, split: str, limit: int | None = None) -> ImageList:
    """The distinct images of a `grounding` dataset, in order of first appearance."""
    from grounding import load_dataset

    refs = {}
    for sample in load_dataset(name, data, split):
        refs.setdefault(str(sample.image), sample.image)
    chosen = list(refs.values())[:limit]
    return ImageList(ids=[str(ref) for ref in chosen], load=lambda index: chosen[index].load())


# --------------------------------------------------------------------------------------- split
def split_images(num_images: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) image indices, sorted; every patch of an image lands on the same side."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    test_count = max(1, round(num_images * test_fraction))
    if num_images - test_count < 1:
        raise ValueError(f"{num_images} images cannot be split into train and test; give more images")
    order = np.random.default_rng(seed).permutation(num_images)
    return np.sort(order[test_count:]), np.sort(order[:test_count])


def flat(features: np.ndarray, images: np.ndarray) -> np.ndarray:
    """(len(images) * patches, D) float32 rows for the chosen images, image-major."""
    chosen = np.asarray(features[images], dtype=np.float32)
    return chosen.reshape(-1, chosen.shape[-1])


# ------------------------------------------------------------------------------------- probing
def summarize(scores: dict[str, np.ndarray], patches: int, *, resamples: int, seed: int) -> dict[str, dict]:
    """Per-metric value and 95% CI, the bootstrap resampling test images (patches of one image stay together)."""
    per_image = {metric: values.reshape(-1, patches).mean(axis=1) for metric, values in scores.items()
                 if not np.isnan(values).all()}
    intervals = bootstrap_intervals(per_image, resamples=resamples, seed=seed)
    return {metric: {"value": float(values.mean()), "ci95": list(intervals[metric])}
            for metric, values in per_image.items()}


def layer_chunks(names: list, train_rows: int, width: int, classes: int, budget_bytes: float, *,
                 limit: int | None = None) -> list[list]:
    """Groups of at most `limit` feature sets, each group small enough to solve at once within `budget_bytes`."""
    per_layer = 4 * train_rows * (width + 3 * max(classes, 2))
    size = max(1, min(int(budget_bytes // per_layer), limit or len(names)))
    return [names[start:start + size] for start in range(0, len(names), size)]


def run_layerwise(store: ActivationStore, out: Path, *, target: str = "index", solver: str = "torch",
                  test_fraction: float = 0.2, seed: int = 0, C: float = 1.0, max_iter: int = 500,
                  device: str = "cpu", shuffled: bool = True, resamples: int = 1000,
                  memory_budget_gb: float = 4.0, layers_per_solve: int | None = None,
                  progress: bool = True) -> list[dict]:
    """Fit and score a probe per feature set of `store` (and the shuffled-label control per layer).

    Appends one record per (series, layer) to `out/records.jsonl` as it goes; a rerun resumes. With the
    torch solver, `layers_per_solve` feature sets share one batched solve (within `memory_budget_gb`).
    """
    from tqdm import tqdm

    grid = store.grid
    patches = grid[0] * grid[1]
    train, test = split_images(len(store.spec.image_ids), test_fraction, seed)
    train_index, test_index = patch_labels(len(train), grid), patch_labels(len(test), grid)
    done = {(record["series"], record["layer"]) for record in read_records(out)}

    jobs = [(SERIES[name], None, name) for name in store.spec.embeddings]
    jobs += [("probe", layer, layer) for layer in store.spec.layers]
    if shuffled:
        jobs += [("shuffled labels", layer, layer) for layer in store.spec.layers]
    jobs = [job for job in jobs if (job[0], job[1]) not in done]
    rng = np.random.default_rng(seed + 1)
    shuffles = {layer: rng.permutation(train_index) for layer in store.spec.layers}

    width = store.features(store.names[0]).shape[-1]
    if layers_per_solve is None:
        # A joint L-BFGS solve runs until its slowest layer converges: worth it where one solve fills a
        # GPU, slower than one layer at a time on a CPU (benchmarks/probe_solvers.py).
        layers_per_solve = None if device.startswith("cuda") else 1
    chunks = layer_chunks(jobs, len(train_index), width, num_classes(target, grid), memory_budget_gb * 2**30,
                          limit=layers_per_solve)
    bar = tqdm(total=len(jobs), desc=f"probes ({solver})", disable=not progress)
    for chunk in chunks:
        began = time.perf_counter()
        labels = [shuffles[name] if series == "shuffled labels" else train_index for series, _, name in chunk]
        probes = fit_layers([flat(store.features(name), train) for _, _, name in chunk], labels, grid=grid,
                            target=target, C=C, max_iter=max_iter, device=device, solver=solver)
        seconds = (time.perf_counter() - began) / len(chunk)
        for (series, layer, name), probe in zip(chunk, probes):
            scores = patch_scores(probe, flat(store.features(name), test), test_index)
            record = {"index": record_key(series, layer), "series": series, "layer": layer, "target": target,
                      "solver": solver,
                      "metrics": summarize(scores, patches, resamples=resamples, seed=seed),
                      "n_train_images": len(train), "n_test_images": len(test), "n_iter": probe.n_iter_,
                      "fit_seconds": round(seconds, 3)}
            append_records(out / RECORDS, [record])
            bar.update(1)
    bar.close()
    return read_records(out)


def record_key(series: str, layer: int | None) -> str:
    return f"{series}/{'' if layer is None else layer}"


def read_records(out: Path) -> list[dict]:
    """The records written so far; a killed writer's torn last line is dropped."""
    path = out / RECORDS
    repair_torn_tail(path)
    return list(read_jsonl_records([path]).values()) if path.is_file() else []


def table_rows(records: Sequence[dict], target: str, grid: tuple[int, int], n_test: int) -> list[dict]:
    """Tidy rows (series, layer, metric, value, ci_low, ci_high, n_test_images), chance included."""
    rows = []
    order = {"probe": 0, "shuffled labels": 1, SERIES[PATCH]: 2, SERIES[PATCH_POS]: 3, SERIES[VISUAL_TOKENS]: 4}
    for record in sorted(records, key=lambda r: (order[r["series"]], -1 if r["layer"] is None else r["layer"])):
        for metric in METRICS:
            if metric in record["metrics"]:
                value = record["metrics"][metric]
                rows.append({"series": record["series"], "layer": record["layer"], "metric": metric,
                             "value": value["value"], "ci_low": value["ci95"][0], "ci_high": value["ci95"][1],
                             "n_test_images": record["n_test_images"]})
    for metric, value in chance(target, grid).items():
        if not math.isnan(value):
            rows.append({"series": "chance", "layer": None, "metric": metric, "value": value, "ci_low": value,
                         "ci_high": value, "n_test_images": n_test})
    return rows


def write_table(rows: Sequence[dict], path: Path) -> None:
    import csv

    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})


# ----------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from grounding import DATASETS

    parser = argparse.ArgumentParser(prog="python -m probes.layerwise", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local checkpoint directory (anything mllm.load reads)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (searched recursively)")
    source.add_argument("--dataset", choices=DATASETS, help="a grounding dataset; its distinct images are probed")
    parser.add_argument("--data", help="with --dataset: its directory (or, for jsonl, file)")
    parser.add_argument("--split", default="val", help="with --dataset: the split (default: val)")
    parser.add_argument("--limit", type=int, help="probe only the first N images")
    parser.add_argument("--out", required=True, type=Path, help="run directory, e.g. results/probes/NAME")
    parser.add_argument("--layers", default="all", help="'all' or comma-separated hidden-state indices (0: embeddings)")
    parser.add_argument("--features", default="tower", choices=FEATURES,
                        help="the vision tower's patches, layer by layer (default), or the visual tokens the LLM "
                             "receives, on their own grid (one feature set; --layers is ignored)")
    parser.add_argument("--target", default="index", choices=TARGETS)
    parser.add_argument("--solver", default="torch", choices=SOLVERS)
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength, as scikit-learn's")
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-shuffled", action="store_true", help="skip the shuffled-label control")
    parser.add_argument("--frame", default="padded", choices=("padded", "original", "cropped"))
    parser.add_argument("--batch-size", type=int, default=16, help="images per vision-tower forward pass")
    parser.add_argument("--store-dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--shard", help="r/n: extract the r-th of n contiguous blocks of whole batches; the last "
                        "shard to finish fits the probes (default: RANK/WORLD_SIZE)")
    add_model_arguments(parser)
    parser.add_argument("--memory-gb", type=float, default=4.0, help="budget for one batched solve")
    parser.add_argument("--layers-per-solve", type=int,
                        help="layers fitted in one batched torch solve (default: as many as fit on a GPU, 1 on a CPU)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.dataset and not args.data:
        parser.error("--dataset needs --data")
    return args


def parse_layers(text: str, num_layers: int) -> list[int] | None:
    if text == "all":
        return None
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--layers {text!r}: give 'all' or comma-separated integers") from None
    return [layer % num_layers if layer < 0 else layer for layer in layers]


def run_config(args: argparse.Namespace) -> dict:
    """What decides the results; a run directory holding another one is refused."""
    keys = ("model", "images", "dataset", "data", "split", "limit", "layers", "target", "solver", "C", "max_iter",
            "test_fraction", "seed", "no_shuffled", "frame", "store_dtype", "dtype", "min_pixels", "max_pixels")
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items() if key in keys}
    if args.features != "tower":  # a tower run's config stays what it was before the option existed
        config["features"] = args.features
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shard = Shard.parse(args.shard)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    config = {**run_config(args), "shards": shard.world}
    check_or_write_config(out, config, resumable=RESUMABLE_CHANGES)  # every other setting changes the results

    if args.images:
        images = images_from_directory(args.images, args.limit)
    else:
        images = images_from_dataset(args.dataset, args.data, args.split, args.limit)
    shard_layout(out / "activations", len(images), shard.world, args.batch_size)  # another layout: refused unloaded
    model = load_model(args)
    num_layers = len(model.adapter.vision_layers) + 1
    store = extract_shard(model, images, out / "activations", rank=shard.rank, world=shard.world,
                          batch_size=args.batch_size, layers=parse_layers(args.layers, num_layers), frame=args.frame,
                          dtype=args.store_dtype, progress=not args.no_progress, features=args.features)
    device = str(model.device)  # the probes fit where this process's model ran (its own GPU under torchrun)
    del model  # the probes need only the stored activations
    if store is None:
        print(f"shard {shard.rank}/{shard.world} done; the last shard to finish writes {out / 'layerwise.csv'}")
        return 0
    with claim(out / FITTING_CLAIM) as claimed:
        if not claimed:
            print(f"shard {shard.rank}/{shard.world} done; another process is fitting the probes into {out}")
            return 0
        write_results(store, images, out, args=args, config=config, device=device)
    return 0


def write_results(store: ActivationStore, images: ImageList, out: Path, *, args: argparse.Namespace, config: dict,
                  device: str) -> None:
    """Fit the probes on the complete `store` and write the records, table, metadata and figure."""
    from probes.figures import plot_layerwise

    records = run_layerwise(store, out, target=args.target, solver=args.solver, test_fraction=args.test_fraction,
                            seed=args.seed, C=args.C, max_iter=args.max_iter, device=device,
                            shuffled=not args.no_shuffled, resamples=args.bootstrap, memory_budget_gb=args.memory_gb,
                            layers_per_solve=args.layers_per_solve, progress=not args.no_progress)
    train, test = split_images(len(images), args.test_fraction, args.seed)
    rows = table_rows(records, args.target, store.grid, len(test))
    write_table(rows, out / "layerwise.csv")
    versions = package_versions("transformer-lens", "scikit-learn")
    write_atomic(out / "layerwise.json", json.dumps({
        "run": config, "grid": list(store.grid), "layers": store.spec.layers, "hook_check": store.hook_check,
        "images": {"train": [images.ids[i] for i in train], "test": [images.ids[i] for i in test]},
        "device": device, "versions": versions,
    }, indent=2) + "\n")
    unit = "visual-token" if args.features == "visual-tokens" else "patch"
    title = f"{Path(args.model).name}: linear probe for {unit} {args.target} ({len(test)} test images)"
    plot_layerwise(rows, out / "layerwise.png", title=title)
    print(f"wrote {out / 'layerwise.csv'} and {out / 'layerwise.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
