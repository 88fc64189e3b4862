"""Time the two position-probe solvers side by side on the same activations, and check they agree.

    python benchmarks/probe_solvers.py                                  # the shipped contrastive miniature
    python benchmarks/probe_solvers.py --store results/probes/llava-7b/activations --device cuda

Fits one probe per layer three ways on one train/test split (by image): scikit-learn's lbfgs layer
by layer, the torch solver layer by layer, and the torch solver on all layers in one batched solve.
Prints each one's wall time, the speed-up over scikit-learn, and the largest accuracy gap.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from probes import PositionProbe, fit_layers, patch_labels
from probes.activations import ActivationStore, extract_activations
from probes.layerwise import flat, images_from_directory, split_images

ROOT = Path(__file__).resolve().parent.parent


def miniature_store(directory: Path, limit: int) -> ActivationStore:
    import mllm

    model = mllm.load(ROOT / "data" / "minillava" / "contrastive", device="cpu", dtype="float32")
    images = images_from_directory(ROOT / "data" / "minillava" / "eval" / "images", limit=limit)
    return extract_activations(model, images, directory, dtype="float32", progress=False)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an activation store (default: extract the miniature's)")
    parser.add_argument("--images", type=int, default=400, help="images of the miniature's split, without --store")
    parser.add_argument("--target", default="index")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the measurements as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        store = ActivationStore(args.store) if args.store else miniature_store(Path(scratch), args.images)
        grid, layers = store.grid, store.spec.layers
        train, test = split_images(len(store.spec.image_ids), 0.2, seed=0)
        y_train, y_test = patch_labels(len(train), grid), patch_labels(len(test), grid)
        X_train = [flat(store.features(layer), train) for layer in layers]
        X_test = [flat(store.features(layer), test) for layer in layers]

    def timed(fit: Callable[[], list]) -> tuple[float, list[float]]:
        synchronize(args.device)
        began = time.perf_counter()
        probes = fit()
        synchronize(args.device)
        return time.perf_counter() - began, [probe.score(X, y_test) for probe, X in zip(probes, X_test)]

    options = {"grid": grid, "target": args.target}
    fit_layers(X_train[:1], y_train, device=args.device, max_iter=5, **options)  # warm-up: kernels, allocator
    runs = {
        "sklearn, layer by layer": timed(lambda: [PositionProbe(solver="sklearn", **options).fit(X, y_train)
                                                  for X in X_train]),
        f"torch ({args.device}), layer by layer": timed(lambda: [fit_layers([X], y_train, device=args.device,
                                                                            **options)[0] for X in X_train]),
        f"torch ({args.device}), all layers at once": timed(lambda: fit_layers(X_train, y_train, device=args.device,
                                                                               **options)),
    }
    baseline_seconds, baseline_scores = runs["sklearn, layer by layer"]
    print(f"{len(layers)} layers, {len(train)} train / {len(test)} test images, {X_train[0].shape[0]} train patches, "
          f"width {X_train[0].shape[1]}, {grid[0] * grid[1]} positions, target {args.target}")
    print(f"{'solver':<40} {'seconds':>9} {'speed-up':>9} {'max |acc - sklearn|':>20}")
    results = {}
    for name, (seconds, scores) in runs.items():
        gap = float(np.max(np.abs(np.array(scores) - baseline_scores)))
        print(f"{name:<40} {seconds:9.2f} {baseline_seconds / seconds:8.2f}x {gap:20.4f}")
        results[name] = {"seconds": seconds, "speedup": baseline_seconds / seconds, "accuracy": scores,
                         "max_gap_to_sklearn": gap}
    if args.out:
        args.out.write_text(json.dumps({"layers": layers, "device": args.device, "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
