"""benchmarks/pruned_inference.py on the tiny test sizes: the CPU smoke test of the GPU benchmark (no timing is
asserted; what is checked is that every part is measured and the accounting is consistent)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "pruned_inference.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("pruned_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["llava-tiny", "qwen2.5-vl-tiny"])
def test_every_part_is_measured_and_gap_costs_no_flops(benchmark, arch, tmp_path):
    assert benchmark.main(["--arch", arch, "--methods", "random,fastv", "--ratios", "0,0.5", "--batches", "1,2",
                           "--repeats", "1", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "pruned_inference.json").read_text())
    rows, summary = result["rows"], result["summary"]
    parts = {(row["part"], row["method"], row["budget"], row["positions"], row["attention"]) for row in rows}
    assert {("pruning", "random", "0", "keep", "sdpa"), ("pruning", "fastv", "0.5", "reassign", "sdpa"),
            ("attention", "fastv", "0.5", "keep", "eager")} <= parts
    unpruned = next(row for row in rows if row["part"] == "pruning" and row["budget"] == "0")
    for row in rows:
        assert row["prefill"] > 0 and row["decode_step"] > 0 and row["end_to_end"] >= row["prefill"]
        if row["part"] == "pruning" and row["budget"] != "0":
            assert 0 < row["flops_ratio"] < 1 and math.isfinite(row["efficiency"])
            assert row["visual_layer_mean"] < unpruned["visual_layer_mean"]
    assert all(entry["flops_equal"] for entry in summary["gap"]) and len(summary["gap"]) == 2
    assert {entry["batch"] for entry in summary["throughput"]} == {1, 2}
    table = (tmp_path / "pruned_inference.md").read_text()
    assert table.startswith(f"# {arch} on cpu") and "GAP (keep) against reassign" in table


@pytest.mark.parametrize(("arch", "parameters"), [
    ("llava-1.5-7b", 7_063_427_072),  # llava-hf/llava-1.5-7b-hf's safetensors
    ("qwen2.5-vl-7b", 8_292_166_656),  # Qwen/Qwen2.5-VL-7B-Instruct's safetensors
])
def test_the_7b_architectures_have_the_released_checkpoints_parameter_counts(benchmark, arch, parameters, tmp_path):
    import torch
    from transformers import AutoConfig

    from mllm.adapters import adapter_class_for

    directory = benchmark.write_architecture(arch, tmp_path / arch)
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = adapter_class_for(config).model_class._from_config(config)
    assert sum(parameter.numel() for parameter in model.parameters()) == parameters
