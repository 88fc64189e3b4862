"""misalign.ablate: strength 0 is the unablated run, runs resume and grow, bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import mllm
from grounding import load_dataset, prompt_style, run_evaluation
from grounding.fixtures import write_jsonl_layout
from misalign import CORRUPTIONS, corruption_spec, make_corruption, parse_corruption
from misalign.ablate import main, misaligned_predict, run_ablation
from tests.conftest import PROMPTS

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = ROOT / "data" / "minillava" / "contrastive"
EVAL = ROOT / "data" / "minillava" / "eval"


def ablate(*args: object) -> int:
    return main([*map(str, args), "--no-progress", "--bootstrap", "100"])


def samples(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def miniature_ablation(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ablation") / "permuted"
    assert ablate("--model", MINIATURE, "--data", EVAL, "--kind", "permuted", "--strength", "0,1", "--limit", 48,
                  "--batch-size", 48, "--out", out) == 0
    return out


def test_the_cli_writes_a_run_per_task_and_strength_and_one_table(miniature_ablation):
    out = miniature_ablation
    for task in ("rec", "vqa"):
        for strength in ("0", "1"):
            run = out / task / f"strength={strength}"
            config = json.loads((run / "config.json").read_text())
            assert config["corruption"] == "permuted" and config["strength"] == float(strength)
            assert len(samples(run)) == 48 and (run / "summary.json").is_file()
    table = pd.read_csv(out / "ablation.csv")
    assert set(zip(table.task, table.strength)) == {("rec", 0), ("rec", 1), ("vqa", 0), ("vqa", 1)}
    assert (out / "ablation.png").stat().st_size > 0 and (out / "ablation.pdf").stat().st_size > 0


def test_strength_zero_is_the_unablated_evaluation(miniature_ablation, tmp_path):
    model = mllm.load(MINIATURE, device="cpu", dtype="float32")
    dataset = load_dataset("jsonl", EVAL / "rec", "val")
    run_evaluation(model, dataset, tmp_path, prompt_style("llava-1.5"), batch_size=48, limit=48, progress=False,
                   resamples=10)
    plain = [record["answer"] for record in samples(tmp_path)]
    assert [record["answer"] for record in samples(miniature_ablation / "rec" / "strength=0")] == plain


def test_permuting_every_visual_id_breaks_rec_on_the_miniature(miniature_ablation):
    table = pd.read_csv(miniature_ablation / "ablation.csv")
    rec = table[(table.task == "rec") & (table.metric == "acc@0.5")].set_index("strength").value
    assert rec[0] >= 0.5 and rec[1] <= rec[0] - 0.3


def test_a_rerun_computes_only_the_new_strengths(miniature_ablation, monkeypatch):
    before = {path: path.read_bytes() for path in miniature_ablation.glob("*/strength=*/samples.jsonl")}
    calls = []
    original = mllm.generate

    def counting(*args, **options):
        calls.append(options["policy"])
        return original(*args, **options)

    monkeypatch.setattr(mllm, "generate", counting)
    assert ablate("--model", MINIATURE, "--data", EVAL, "--kind", "permuted", "--strength", "0,0.5,1",
                  "--tasks", "rec", "--limit", 48, "--batch-size", 48, "--out", miniature_ablation) == 0
    assert [policy.fraction for policy in calls] == [0.5]
    assert all(path.read_bytes() == content for path, content in before.items())
    table = pd.read_csv(miniature_ablation / "ablation.csv")
    assert sorted(set(table[table.task == "rec"].strength)) == [0, 0.5, 1]


def test_another_corruption_in_the_same_directory_is_refused(miniature_ablation, capsys):
    assert ablate("--model", MINIATURE, "--data", EVAL, "--kind", "shifted", "--strength", "4", "--limit", 4,
                  "--out", miniature_ablation) == 2
    assert "corruption: 'permuted' there, 'shifted' now" in capsys.readouterr().err


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_every_kind_at_strength_zero_reproduces_the_unablated_model(tiny_model, images, kind):
    encoding = tiny_model.encode(images, PROMPTS)
    plain = tiny_model.generate(encoding, max_new_tokens=4, output_logits=True)
    ablated = misaligned_predict(make_corruption(kind), 0, seed=5)(tiny_model, encoding, max_new_tokens=4,
                                                                   output_logits=True)
    assert ablated.texts == plain.texts
    torch.testing.assert_close(ablated.prefill_logits, plain.prefill_logits, rtol=0, atol=0)


def test_the_tiny_model_runs_every_kind_through_the_api(tiny_model, tmp_path):
    data = write_jsonl_layout(tmp_path / "data" / "rec", count=3)
    datasets = {"rec": load_dataset("jsonl", data, "val")}
    table = run_ablation(tiny_model, datasets, make_corruption("span-shift", start=2), [0, 3], tmp_path / "out",
                         style=prompt_style("llava-1.5"), batch_size=2, resamples=10, progress=False)
    assert set(table.strength) == {0, 3} and set(table.corruption) == {"span-shift:start=2"}
    assert (tmp_path / "out" / "ablation.csv").is_file()


def test_corruption_specs_round_trip():
    for spec in ("permuted", "permuted:window=8", "span-shift:start=32", "token-permutation"):
        assert corruption_spec(parse_corruption(spec)) == spec


@pytest.mark.parametrize(("args", "needle"), [
    (["--kind", "rotated", "--strength", "1"], "unknown corruption 'rotated'"),
    (["--kind", "permuted:size=3", "--strength", "1"], "corruption 'permuted' takes options ['window', 'axis']"),
    (["--kind", "shifted", "--strength", "0.5"], "number of positions, got 0.5"),
    (["--kind", "permuted", "--strength", "0,2"], "'fraction' must lie in [0, 1]"),
    (["--kind", "permuted", "--strength", "half"], "--strength: need comma-separated numbers"),
    (["--kind", "span-shift:start=60", "--strength", "8"], "does not fit in"),
    (["--kind", "permuted", "--strength", "1", "--rec", "refcoco"], "--rec 'refcoco': need DATASET:PATH"),
    (["--kind", "permuted", "--strength", "1", "--split", "rec=val,ocr=test"], "--split 'rec=val,ocr=test'"),
    (["--kind", "permuted", "--strength", "0", "--kind", "permuted", "--strength", "1"], "given twice"),
    # the second --strength goes with the second --kind: 4 shifts fine, but permutes no fraction
    (["--kind", "shifted", "--strength", "0,1", "--kind", "permuted", "--strength", "0,4"],
     "'fraction' must lie in [0, 1]"),
])
def test_bad_input_is_named_before_any_run(args, needle, tmp_path, capsys):
    assert ablate("--model", MINIATURE, "--data", EVAL, *args, "--out", tmp_path / "out") == 2
    assert needle in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*/strength=*"))


def test_a_task_without_data_is_named(tmp_path, capsys):
    assert ablate("--model", MINIATURE, "--kind", "permuted", "--strength", "1", "--tasks", "vqa",
                  "--out", tmp_path / "out") == 2
    assert "no data for task vqa" in capsys.readouterr().err


def test_strengths_go_with_their_kinds_or_one_list_with_all(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablate("--model", MINIATURE, "--data", EVAL, "--kind", "permuted", "--kind", "shifted", "--kind", "identity",
               "--strength", "0", "--strength", "1", "--out", tmp_path / "out")
    assert "once for every --kind or once after each; got 2 for 3 kinds" in capsys.readouterr().err


def test_several_kinds_are_refused_where_one_kinds_ablation_lives(miniature_ablation, capsys):
    before = sorted(path.name for path in miniature_ablation.iterdir())
    assert ablate("--model", MINIATURE, "--data", EVAL, "--kind", "permuted", "--kind", "shifted", "--strength", "0",
                  "--limit", 4, "--out", miniature_ablation) == 2
    assert f"{miniature_ablation / 'config.json'}: {miniature_ablation} holds the ablation of one kind" in (
        capsys.readouterr().err)
    assert sorted(path.name for path in miniature_ablation.iterdir()) == before
