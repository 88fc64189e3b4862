"""Sweeps in one pass and over processes: pruning.evaluate and misalign.ablate encode each batch once,
generate identical feeds once, equal the per-run loop, and under torchrun / --shard equal one process,
a killed sweep resuming to the same result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import mllm
from grounding import load_dataset, prompt_style, run_evaluation
from grounding.runner import Shard, shard_blocks
from grounding.summary import MEASURED_FIELDS
from misalign import make_corruption
from misalign.ablate import Ablation, misaligned_predict, run_ablations
from misalign.ablate import main as ablate
from mllm.loading import resolve_device
from pruning import make_method
from pruning.apply import prune_generate
from pruning.budget import Budget
from pruning.evaluate import main as prune
from pruning.evaluate import run_pruning

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = ROOT / "data" / "minillava" / "contrastive"
EVAL = ROOT / "data" / "minillava" / "eval"
LIMIT, BATCH = 12, 4
# The cost columns measured by the clock; every other value of a run is reproducible.
MEASURED_COLUMNS = ("prefill_ms", "decode_ms_per_step", "peak_memory_mib")
PRUNING = ["--methods", "random,cls-visual", "--ratios", "0.5,0.75", "--positions", "reassign,keep"]
MISALIGN = ["--kind", "permuted", "--strength", "0,1", "--kind", "shifted", "--strength=0,8"]


@pytest.fixture(scope="module")
def miniature() -> mllm.MLLM:
    return mllm.load(MINIATURE, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def datasets() -> dict:
    return {task: load_dataset("jsonl", EVAL / task, "val") for task in ("rec", "vqa")}


def arguments(out: Path, sweep: list[str], *extra: str) -> list[str]:
    return ["--model", str(MINIATURE), "--data", str(EVAL), *sweep, "--limit", str(LIMIT), "--batch-size",
            str(BATCH), "--bootstrap", "50", "--no-progress", "--device", "cpu", "--out", str(out), *extra]


def run_records(out: Path) -> dict[str, list[dict]]:
    """Every run directory under `out`, its merged records without their clock readings."""
    runs = {}
    for path in sorted(out.glob("**/samples.jsonl")):
        lines = path.read_text().splitlines()
        runs[str(path.parent.relative_to(out))] = [
            {key: value for key, value in json.loads(line).items() if key not in MEASURED_FIELDS} for line in lines]
    return runs


def run_metrics(out: Path) -> dict[str, dict]:
    return {str(path.parent.relative_to(out)): json.loads(path.read_text())["metrics"]
            for path in sorted(out.glob("**/summary.json"))}


def assert_same_sweep(out: Path, single: Path, table: str) -> None:
    assert run_records(out) == run_records(single) and run_records(out)
    assert run_metrics(out) == run_metrics(single)
    ours, theirs = (pd.read_csv(path / table) for path in (out, single))
    pd.testing.assert_frame_equal(ours.drop(columns=list(MEASURED_COLUMNS), errors="ignore"),
                                  theirs.drop(columns=list(MEASURED_COLUMNS), errors="ignore"))


@pytest.fixture(scope="module")
def single_pruning(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruning") / "single"
    assert prune(arguments(out, PRUNING)) == 0
    return out


@pytest.fixture(scope="module")
def single_misalign(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("misalign") / "single"
    assert ablate(arguments(out, MISALIGN)) == 0
    return out


def test_a_sweep_encodes_each_batch_once_and_generates_each_distinct_feed_once(miniature, datasets, tmp_path,
                                                                                monkeypatch):
    encodes, generations = [], []
    encode, generate = miniature.encode, mllm.generate
    monkeypatch.setattr(miniature, "encode", lambda *args, **options: encodes.append(1) or encode(*args, **options))
    monkeypatch.setattr(mllm, "generate", lambda *args, **options: generations.append(1) or generate(*args, **options))
    ablations = [Ablation(make_corruption("permuted"), [0, 0.5, 1], tmp_path / "permuted"),
                 Ablation(make_corruption("shifted"), [-4, 0], tmp_path / "shifted"),
                 Ablation(make_corruption("token-permutation"), [0], tmp_path / "token-permutation")]
    tables = run_ablations(miniature, {"rec": datasets["rec"]}, ablations, batch_size=BATCH, limit=LIMIT,
                           resamples=10, progress=False)
    batches = -(-LIMIT // BATCH)
    assert len(encodes) == batches  # one encoding per batch for all six runs
    assert len(generations) == 4 * batches  # 0.5, 1, -4 and one strength 0 for the three kinds
    zero = [run_records(tmp_path / name)["rec/strength=0"] for name in ("permuted", "shifted", "token-permutation")]
    assert zero[0] == zero[1] == zero[2] and len(zero[0]) == LIMIT
    assert [set(table.strength) for table in tables] == [{0, 0.5, 1}, {-4, 0}, {0}]


def test_the_one_pass_sweep_equals_the_per_run_loop(miniature, datasets, tmp_path):
    style = prompt_style("llava-1.5")
    methods, budgets = [make_method("random"), make_method("cls-visual")], [Budget(pruned=0.5)]
    run_pruning(miniature, {"rec": datasets["rec"]}, methods, budgets, tmp_path / "sweep",
                positions=["reassign", "keep", "reassign-raster"], style=style, batch_size=BATCH, limit=LIMIT,
                resamples=10, progress=False)
    loop = tmp_path / "loop"
    run_evaluation(miniature, datasets["rec"], loop / "unpruned", style, batch_size=BATCH, limit=LIMIT,
                   resamples=10, progress=False)
    for method in methods:
        encode_options = method.encode_options(miniature)
        for policy in ("reassign", "keep", "reassign-raster"):
            def predict(model, encoding, method=method, policy=policy, **options):
                return prune_generate(model, encoding, method, budgets[0], policy, **options)

            run_evaluation(miniature, datasets["rec"], loop / method.name / policy, style, predict=predict,
                           encode_options=encode_options, batch_size=BATCH, limit=LIMIT, resamples=10,
                           progress=False)
    sweep = run_records(tmp_path / "sweep")
    for name, records in run_records(loop).items():
        method, _, policy = name.partition("/")
        assert sweep[f"rec/{method}/0.5/{policy}" if policy else "rec/unpruned"] == records, name
    strength = misaligned_predict(make_corruption("permuted"), 1.0)
    run_evaluation(miniature, datasets["rec"], loop / "permuted", style, predict=strength, batch_size=BATCH,
                   limit=LIMIT, resamples=10, progress=False)
    run_ablations(miniature, {"rec": datasets["rec"]}, [Ablation(make_corruption("permuted"), [0, 1], tmp_path / "p")],
                  style=style, batch_size=BATCH, limit=LIMIT, resamples=10, progress=False)
    assert run_records(tmp_path / "p")["rec/strength=1"] == run_records(loop)["permuted"]


def test_shards_are_contiguous_blocks_of_whole_batches():
    assert shard_blocks(12, 2, 2) == [(0, 6), (6, 12)]
    assert shard_blocks(12, 2, 5) == [(0, 5), (5, 12)]  # batches [0,5) | [5,10) [10,12), as one process runs them
    assert shard_blocks(3, 4, 2) == [(0, 0), (0, 2), (2, 2), (2, 3)]  # fewer batches than ranks: some idle
    for count, world, batch in ((7, 3, 1), (100, 8, 16), (5, 1, 16)):
        blocks = shard_blocks(count, world, batch)
        assert [stop for _, stop in blocks[:-1]] == [start for start, _ in blocks[1:]]
        assert blocks[0][0] == 0 and blocks[-1][1] == count
        assert all(start % batch == 0 for start, _ in blocks)
    assert list(Shard(1, 2).take(list(range(12)), 5)) == list(range(5, 12))


@pytest.mark.parametrize(("cli", "sweep", "table"), [("pruning.evaluate", PRUNING, "pruning.csv"),
                                                     ("misalign.ablate", MISALIGN, "ablation.csv")])
def test_torchrun_on_two_processes_equals_one(cli, sweep, table, single_pruning, single_misalign, tmp_path):
    single = single_pruning if cli == "pruning.evaluate" else single_misalign
    out = tmp_path / "torchrun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
               "-m", cli, *arguments(out, sweep)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout and "shard" in done.stdout  # one rank wrote the tables, the other said so
    assert len(list(out.glob("rec/**/samples.shard1of2.jsonl"))) == len(list(single.glob("rec/**/samples.jsonl")))
    assert_same_sweep(out, single, table)


@pytest.mark.parametrize("cli", ["pruning.evaluate", "misalign.ablate"])
def test_a_sweep_killed_in_the_middle_resumes_to_the_same_result(cli, single_pruning, single_misalign, tmp_path,
                                                                 monkeypatch, capsys):
    main, sweep, single, table = ((prune, PRUNING, single_pruning, "pruning.csv") if cli == "pruning.evaluate"
                                  else (ablate, MISALIGN, single_misalign, "ablation.csv"))
    out = tmp_path / "killed"
    assert main(arguments(out, sweep, "--shard", "1/2")) == 0
    assert "shard 1/2 done" in capsys.readouterr().out and not (out / table).exists()

    generate, calls = mllm.generate, []

    def killed_after_three(*args, **options):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return generate(*args, **options)

    monkeypatch.setattr(mllm, "generate", killed_after_three)
    assert main(arguments(out, sweep, "--shard", "0/2")) == 130  # Ctrl-C: the records so far are kept
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert sum(path.read_text().count("\n") for path in out.glob("**/samples.shard0of2.jsonl")) > 0
    monkeypatch.setattr(mllm, "generate", generate)
    assert main(arguments(out, sweep, "--shard", "0/2")) == 0
    assert_same_sweep(out, single, table)


def test_auto_puts_each_process_on_its_local_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "5")  # more processes than GPUs: they share in turn
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
