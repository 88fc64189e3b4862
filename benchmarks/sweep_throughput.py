"""Sweep throughput: the one-pass engine against the per-run loop, on 1 and 2 processes, side by side.

    python benchmarks/sweep_throughput.py                       # the shipped miniature, CPU, both sweeps
    python benchmarks/sweep_throughput.py --samples 256 --processes 1,2,4 --device auto   # on GPUs

Two sweeps of the shipped contrastive miniature over the first --samples REC and VQA samples of the
shipped split:
- `misalign`: notebook 02's five corruption kinds at their strengths (20 runs per task, 5 of them strength 0);
- `pruning`: random, cls-visual, prumerge, visionzip and fastv at 50% and 75% pruned under reassign and
  keep, and the unpruned run (21 runs per task).

`loop` is how the CLIs ran before the engine: one `run_evaluation` per run, each encoding every batch
itself. `sweep` is `grounding.run_sweep`: every batch encoded once for all runs, runs that feed the LLM
the same tokens generated once. Each (sweep, processes) pair runs loop then sweep in fresh processes, each
`--shard r/n` of the same runs into a fresh directory, with the machine's cores split between the
processes. A process's time is from its model being loaded to its last record; a configuration's is
its slowest process's. Reported: run-samples (samples x runs) per second, and sweep / loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MISALIGN = {"permuted": [0, 0.1, 0.25, 0.5, 1], "permuted:window=8": [0, 0.5, 1], "shifted": [-16, -4, 0, 4, 16],
            "span-shift:start=24": [0, 8, 24], "token-permutation": [0, 0.1, 0.5, 1]}
PRUNING_METHODS = ("random", "cls-visual", "prumerge", "visionzip", "fastv")
PRUNING_RATIOS = (0.5, 0.75)
ENGINES = ("loop", "sweep")


def sweep_parts(model: object, name: str, out: Path, samples: int, batch_size: int) -> list:
    from grounding import load_dataset
    from misalign import parse_corruption
    from misalign.ablate import Ablation, ablation_sweep
    from pruning import make_method
    from pruning.budget import Budget
    from pruning.evaluate import pruning_sweep

    data = ROOT / "data" / "minillava" / "eval"
    datasets = {task: load_dataset("jsonl", data / task, "val") for task in ("rec", "vqa")}
    if name == "misalign":
        ablations = [Ablation(parse_corruption(kind), strengths, out / kind) for kind, strengths in MISALIGN.items()]
        return ablation_sweep(model, datasets, ablations, batch_size=batch_size, limit=samples)
    return pruning_sweep(model, datasets, [make_method(method) for method in PRUNING_METHODS],
                         [Budget(pruned=ratio) for ratio in PRUNING_RATIOS], out, batch_size=batch_size,
                         limit=samples)


def worker(args: argparse.Namespace) -> None:
    """One process of one configuration: its shard of every run, by `args.engine`; its seconds as JSON."""
    import torch

    import mllm
    from grounding.runner import Shard, run_evaluation, run_sweep

    torch.set_num_threads(args.threads)
    model = mllm.load(args.model, device=args.device, dtype=args.dtype)
    parts = sweep_parts(model, args.sweep, args.out, args.samples, args.batch_size)
    shard = Shard(args.rank, args.world)
    options = {"batch_size": args.batch_size, "limit": args.samples, "shard": shard, "resamples": 10,
               "progress": False}
    began = time.perf_counter()
    if args.engine == "sweep":
        run_sweep(model, parts, **options)
    else:
        for part in parts:
            for run in part.runs:
                run_evaluation(model, part.dataset, run.out, part.style, config=run.config, predict=run.predict,
                               encode_options=run.encode_options, **options)
    seconds = time.perf_counter() - began
    runs = sum(len(part.runs) for part in parts)
    print(json.dumps({"seconds": seconds, "runs": runs}))


def measure(args: argparse.Namespace, sweep: str, engine: str, processes: int, root: Path) -> dict:
    out = root / f"{sweep}-{engine}-{processes}"
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT),
           "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    commands = [[sys.executable, __file__, "--worker", engine, "--sweep", sweep, "--rank", str(rank), "--world",
                 str(processes), "--threads", str(threads), "--out", str(out), "--model", str(args.model),
                 "--samples", str(args.samples), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
                 "--device", args.device]
                for rank in range(processes)]
    launched = [subprocess.Popen(command, env={**env, "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE, text=True)
                for rank, command in enumerate(commands)]
    reports = []
    for process in launched:
        stdout, _ = process.communicate()
        if process.returncode:
            raise SystemExit(f"a {engine} worker of {sweep} on {processes} processes failed ({process.returncode})")
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    seconds = max(report["seconds"] for report in reports)
    run_samples = args.samples * reports[0]["runs"]  # every run covers the first --samples of its task
    return {"sweep": sweep, "engine": engine, "processes": processes, "threads": threads, "seconds": seconds,
            "runs": reports[0]["runs"], "run_samples": run_samples, "per_second": run_samples / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "data" / "minillava" / "contrastive")
    parser.add_argument("--samples", type=int, default=96, help="the first N samples of each task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--sweeps", default="misalign,pruning")
    parser.add_argument("--device", default="cpu", help="auto: each process on its own GPU (LOCAL_RANK)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, help="also write the measurements as JSON here")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--sweep", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.engine, args.out = args.worker, Path(args.out)
        worker(args)
        return 0

    rows = []
    print(f"{args.model.name}, first {args.samples} REC and VQA samples, batch {args.batch_size}, {args.device}, "
          f"{os.cpu_count()} cores split between the processes")
    print(f"{'sweep':<9} {'processes':>9} {'runs':>5} {'loop s':>8} {'sweep s':>8} {'loop /s':>8} {'sweep /s':>9} "
          f"{'speed-up':>9}")
    with tempfile.TemporaryDirectory(prefix="sweep-throughput-") as root:
        for sweep in args.sweeps.split(","):
            for processes in (int(count) for count in args.processes.split(",")):
                loop, engine = (measure(args, sweep, engine, processes, Path(root)) for engine in ENGINES)
                rows += [loop, engine]
                print(f"{sweep:<9} {processes:>9} {loop['runs']:>5} {loop['seconds']:>8.1f} {engine['seconds']:>8.1f} "
                      f"{loop['per_second']:>8.1f} {engine['per_second']:>9.1f} "
                      f"{engine['per_second'] / loop['per_second']:>8.2f}x", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
