"""grounding.evaluate end to end on the tiny random LLaVA: records, summary, resume, shards, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mllm
from grounding import Shard, load_dataset, prompt_style, run_evaluation
from grounding.evaluate import main
from grounding.fixtures import synthetic_scenes, write_jsonl_layout, write_parquet_layout
from grounding.summary import MEASURED_FIELDS
from grounding.tasks import reported_errors

ROOT = Path(__file__).resolve().parents[1]


def evaluate_cli(*args: str) -> int:
    return main([*map(str, args), "--no-progress", "--bootstrap", "200"])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def reproducible(summary: dict) -> dict:
    """A summary without its wall-clock readings, which no two runs reproduce."""
    return {**summary, "cost": {key: value for key, value in summary["cost"].items() if key not in MEASURED_FIELDS}}


def summary_of(out: Path) -> dict:
    return reproducible(json.loads((out / "summary.json").read_text()))


def records_of(out: Path) -> list[dict]:
    """Every record of a run, in file order, without its wall-clock readings."""
    lines = (out / "samples.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if key not in MEASURED_FIELDS} for line in lines]


def boxes_from_features(model: mllm.MLLM, encoding: mllm.Encoding, **options: object) -> mllm.Generation:
    """A predictor whose answers vary with the image (the random model's own text never holds a box)."""
    generation = mllm.generate(model, encoding, **options)
    first_two = encoding.visual_features[:, :2, :].float()
    # a z-score of each token's mean feature, so the spread of boxes does not depend on the model's init scale
    centres = torch.sigmoid(first_two.mean(dim=-1) / first_two.std(dim=-1) * first_two.shape[-1] ** 0.5).tolist()
    texts = [f"[{x - 0.25:.2f}, {y - 0.25:.2f}, {x + 0.25:.2f}, {y + 0.25:.2f}]" for x, y in centres]
    return dataclasses.replace(generation, texts=texts)


@pytest.fixture
def parquet_data(tmp_path: Path) -> Path:
    return write_parquet_layout(tmp_path / "refcoco", count=7, rows_per_group=3)


def test_cli_writes_one_record_per_sample_summary_and_config(tiny_checkpoint, parquet_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert evaluate_cli("--model", tiny_checkpoint, "--data", parquet_data, "--dataset", "refcoco", "--split", "val",
                        "--out", out, "--batch-size", "4", "--limit", "9") == 0
    records = read_jsonl(out / "samples.jsonl")
    assert [record["index"] for record in records] == list(range(9))
    first = records[0]
    scene = synthetic_scenes(7)[0]
    x, y, w, h = scene.bbox
    assert first["target"] == [x, y, x + w, y + h]
    assert first["image_size"] == list(scene.image.size)
    assert first["num_visual_fed"] == 16 and first["error"] is None and isinstance(first["prediction"], str)
    summary = summary_of(out)
    assert summary["n_samples"] == 9 and summary["n_scored"] == 9 and summary["n_errors"] == 0
    assert summary["n_unparsed"] == 9  # a random model writes no box: every answer scores IoU 0, counted
    assert summary["metrics"]["parse_failure_rate"]["value"] == 1.0
    assert summary["config"]["prompt_style"]["name"] == "llava-1.5"
    assert summary["config"]["limit"] == 9 and summary["versions"]["torch"] == torch.__version__
    assert json.loads((out / "config.json").read_text())["dataset"] == "refcoco"
    assert (out / "metrics.csv").read_text().startswith("metric,value,ci95_low,ci95_high,n\n")
    assert "refcoco val: 9 scored, 0 errors" in capsys.readouterr().out


def test_vqa_run_scores_exact_match(tiny_model, tmp_path):
    data = tmp_path / "vqa.jsonl"
    scene_images = synthetic_scenes(3)
    for number, scene in enumerate(scene_images):
        scene.image.save(tmp_path / f"{number}.png")
    data.write_text("".join(json.dumps({"image": f"{n}.png", "question": "colour?", "answers": [s.colour]}) + "\n"
                            for n, s in enumerate(scene_images)))
    dataset = load_dataset("jsonl", data, "val")

    def answers_red(model, encoding, **options):
        return dataclasses.replace(mllm.generate(model, encoding, **options), texts=["Red."] * encoding.batch_size)

    summary = run_evaluation(tiny_model, dataset, tmp_path / "run", prompt_style("llava-1.5"), predict=answers_red,
                             progress=False, resamples=50)
    expected = sum(scene.colour == "red" for scene in scene_images) / 3
    assert summary["task"] == "vqa" and summary["metrics"]["accuracy"]["value"] == pytest.approx(expected)
    assert [record["correct"] for record in read_jsonl(tmp_path / "run" / "samples.jsonl")] == [
        scene.colour == "red" for scene in scene_images]


KILLER = """
import json, os, signal, sys
import grounding.runner as runner
real_append, calls = runner.append_records, []

def append_then_die(path, records):
    calls.append(1)
    if len(calls) == 3:  # die while writing the third batch: half a line reaches the file
        line = json.dumps(records[0])
        with open(path, "a") as file:
            file.write(line[: len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real_append(path, records)

runner.append_records = append_then_die
from grounding.evaluate import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_same_records_and_summary(tiny_checkpoint, parquet_data, tmp_path):
    args = ["--model", str(tiny_checkpoint), "--data", str(parquet_data), "--dataset", "refcoco", "--split", "val",
            "--batch-size", "3", "--no-progress", "--bootstrap", "200"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args, "--out", str(tmp_path / "resumed")],
                            env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    assert killed.returncode == -9, killed.stderr
    partial = (tmp_path / "resumed" / "samples.jsonl").read_text()
    assert partial.count("\n") == 6 and not partial.endswith("\n")  # two batches and a torn line
    assert not (tmp_path / "resumed" / "summary.json").exists()

    assert evaluate_cli(*args[:-3], "--out", tmp_path / "resumed") == 0
    assert evaluate_cli(*args[:-3], "--out", tmp_path / "straight") == 0
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert records_of(resumed) == records_of(straight)
    assert summary_of(resumed) == summary_of(straight)
    assert summary_of(resumed)["n_samples"] == 14


def test_interrupted_api_run_resumes_to_the_same_summary(tiny_model, parquet_data, tmp_path):
    dataset = load_dataset("refcoco", parquet_data, "val")
    style = prompt_style("llava-1.5")
    calls = []

    def interrupted(model, encoding, **options):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return boxes_from_features(model, encoding, **options)

    with pytest.raises(KeyboardInterrupt):
        run_evaluation(tiny_model, dataset, tmp_path / "resumed", style, predict=interrupted, batch_size=4,
                       progress=False)
    assert len(read_jsonl(tmp_path / "resumed" / "samples.jsonl")) == 8
    resumed = run_evaluation(tiny_model, dataset, tmp_path / "resumed", style, predict=boxes_from_features,
                             batch_size=4, progress=False)
    straight = run_evaluation(tiny_model, dataset, tmp_path / "straight", style, predict=boxes_from_features,
                              batch_size=4, progress=False)
    assert reproducible(resumed) == reproducible(straight)
    ious = [record["iou"] for record in read_jsonl(tmp_path / "straight" / "samples.jsonl")]
    assert len(set(ious)) > 3  # the answers vary, so equal summaries are not trivially equal
    assert 0 < straight["metrics"]["acc@0.1"]["value"] < 1


def test_a_finished_run_rerun_computes_nothing(tiny_model, parquet_data, tmp_path):
    dataset = load_dataset("refcoco", parquet_data, "val")
    first = run_evaluation(tiny_model, dataset, tmp_path, prompt_style("llava-1.5"), progress=False)

    def must_not_run(model, encoding, **options):
        raise AssertionError("a finished run was recomputed")

    assert run_evaluation(tiny_model, dataset, tmp_path, prompt_style("llava-1.5"), predict=must_not_run,
                          progress=False) == first


def test_shards_merge_into_the_single_process_result(tiny_model, parquet_data, tmp_path):
    dataset = load_dataset("refcoco", parquet_data, "val")
    style = prompt_style("llava-1.5")
    options = {"predict": boxes_from_features, "batch_size": 1, "progress": False}
    assert run_evaluation(tiny_model, dataset, tmp_path / "sharded", style, shard=Shard(1, 3), **options) is None
    assert run_evaluation(tiny_model, dataset, tmp_path / "sharded", style, shard=Shard(0, 3), **options) is None
    merged = run_evaluation(tiny_model, dataset, tmp_path / "sharded", style, shard=Shard(2, 3), **options)
    single = run_evaluation(tiny_model, dataset, tmp_path / "single", style, **options)
    assert reproducible(merged) == reproducible(single)
    shard_lines = read_jsonl(tmp_path / "sharded" / "samples.shard1of3.jsonl")
    assert [record["index"] for record in shard_lines] == list(range(4, 9))  # the middle third, contiguous
    assert records_of(tmp_path / "sharded") == records_of(tmp_path / "single")


def test_sample_level_problems_are_recorded_and_counted(tiny_checkpoint, tmp_path, capsys):
    data = write_jsonl_layout(tmp_path / "custom", count=5)
    lines = (data / "val.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    broken["image"] = "images/missing.png"
    flat = json.loads(lines[3])
    flat["box"][3] = flat["box"][1]  # zero height
    lines[1], lines[3] = json.dumps(broken), json.dumps(flat)
    (data / "val.jsonl").write_text("\n".join(lines) + "\n")

    out = tmp_path / "run"
    assert evaluate_cli("--model", tiny_checkpoint, "--data", data, "--dataset", "jsonl", "--split", "val",
                        "--out", out) == 0
    records = read_jsonl(out / "samples.jsonl")
    assert len(records) == 5
    assert records[1]["error_kind"] == "image" and "missing.png" in records[1]["error"]
    assert records[3]["error_kind"] == "sample" and "val.jsonl:4" in records[3]["error"]
    assert "zero area" in records[3]["error"]
    summary = summary_of(out)
    assert (summary["n_samples"], summary["n_scored"], summary["n_errors"]) == (5, 3, 2)
    assert summary["errors_by_kind"] == {"image": 1, "sample": 1}
    assert summary["metrics"]["mean_iou"]["n"] == 3
    assert "2 samples could not be scored" in capsys.readouterr().out


def test_a_directory_of_another_configuration_is_refused(tiny_checkpoint, parquet_data, tmp_path, capsys):
    args = ["--model", tiny_checkpoint, "--data", parquet_data, "--dataset", "refcoco", "--out", tmp_path / "run",
            "--limit", "2"]
    assert evaluate_cli(*args) == 0
    before = (tmp_path / "run" / "samples.jsonl").read_text()
    assert evaluate_cli(*args, "--answer-frame", "padded") == 2
    error = capsys.readouterr().err
    assert "config.json" in error and "prompt_style.answer_frame: 'original' there, 'padded' now" in error
    assert (tmp_path / "run" / "samples.jsonl").read_text() == before  # nothing lost or mixed in
    assert evaluate_cli(*args[:-2], "--limit", "4", "--batch-size", "3") == 0  # limit and batch size may change
    assert summary_of(tmp_path / "run")["n_samples"] == 4


@pytest.mark.parametrize(("dataset", "split", "needle"), [("refcoco", "testB", "splits found: ['val']"),
                                                           ("gqa", "val", "no questions file")])
def test_bad_split_or_layout_fails_before_loading_the_model(parquet_data, tmp_path, capsys, dataset, split, needle):
    assert evaluate_cli("--model", tmp_path / "no-model", "--data", parquet_data, "--dataset", dataset,
                        "--split", split, "--out", tmp_path / "run") == 2
    error = capsys.readouterr().err
    assert needle in error and str(parquet_data) in error
    assert not (tmp_path / "run").exists()


def test_torchrun_shards_and_merges(tiny_checkpoint, parquet_data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
               "-m", "grounding.evaluate", "--model", str(tiny_checkpoint), "--data", str(parquet_data),
               "--dataset", "refcoco", "--limit", "6", "--batch-size", "1", "--no-progress", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {path.name for path in out.glob("samples*.jsonl")} == {
        "samples.jsonl", "samples.shard0of2.jsonl", "samples.shard1of2.jsonl"}
    assert [record["index"] for record in read_jsonl(out / "samples.jsonl")] == list(range(6))
    assert summary_of(out)["n_samples"] == 6


@pytest.mark.parametrize(("option", "value", "needle"), [("--shard", "2/2", "--shard '2/2'"),
                                                         ("--shard", "a/b", "--shard 'a/b'"),
                                                         ("--prompt-style", "nope", "unknown prompt style 'nope'")])
def test_bad_options_give_a_clear_error(tiny_checkpoint, parquet_data, tmp_path, capsys, option, value, needle):
    assert evaluate_cli("--model", tiny_checkpoint, "--data", parquet_data, "--dataset", "refcoco",
                        "--out", tmp_path / "run", option, value) == 2
    assert needle in capsys.readouterr().err


def test_a_cli_reports_bad_input_and_ctrl_c_with_their_exit_status(tmp_path, capsys):
    with reported_errors(tmp_path, ValueError) as outcome:
        raise ValueError("--ratios: not a number")
    assert outcome.status == 2 and "error: --ratios: not a number" in capsys.readouterr().err
    with reported_errors(tmp_path) as outcome:
        raise KeyboardInterrupt
    assert outcome.status == 130 and str(tmp_path) in capsys.readouterr().err
    with pytest.raises(TypeError), reported_errors(tmp_path, ValueError):
        raise TypeError("a bug is not bad input")
