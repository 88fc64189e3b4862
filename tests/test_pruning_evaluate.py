"""pruning.evaluate end to end on the shipped miniature: runs, resume, a user's method, bad input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import mllm
from mllm.specs import spec_slug
from pruning import METHODS
from pruning.evaluate import main, split_method_specs

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = ROOT / "data" / "minillava" / "contrastive"
EVAL = ROOT / "data" / "minillava" / "eval"


def evaluate(*args: object) -> int:
    return main([*map(str, args), "--no-progress", "--bootstrap", "100"])


@pytest.fixture(scope="module")
def pruning_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruning") / "run"
    assert evaluate("--model", MINIATURE, "--data", EVAL, "--methods", "random,prumerge:adaptive=true",
                    "--ratios", "0.5", "--limit", 32, "--batch-size", 32, "--out", out) == 0
    return out


def test_the_cli_writes_the_unpruned_run_and_one_run_per_method_budget_and_policy(pruning_run):
    table = pd.read_csv(pruning_run / "pruning.csv")
    rec = table[(table.task == "rec") & (table.metric == "acc@0.5")]
    assert set(zip(rec.method, rec.budget, rec.positions)) == {
        ("unpruned", "0", "none"), ("random", "0.5", "reassign"), ("random", "0.5", "keep"),
        ("prumerge:adaptive=true", "adaptive", "reassign"), ("prumerge:adaptive=true", "adaptive", "keep")}
    assert set(rec[rec.method == "random"].tokens_fed) == {32.0} and set(rec.num_visual) == {64}
    assert set(rec[rec.method == "random"].tokens_layer_mean) == {32.0}  # pruned before the LLM: every layer
    adaptive = rec[rec.method == "prumerge:adaptive=true"].tokens_fed
    assert (adaptive < 64).all() and (adaptive != 32).all()  # its own count, reported
    run = pruning_run / "rec" / "random" / "0.5" / "keep"
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "random" and config["budget"] == "0.5" and config["positions"] == "keep"
    assert (pruning_run / "pruning.png").stat().st_size > 0


def test_gap_recovers_what_renumbering_loses_on_the_miniature(pruning_run):
    table = pd.read_csv(pruning_run / "pruning.csv")
    rec = table[(table.task == "rec") & (table.metric == "acc@0.5") & (table.method == "random")]
    keep, reassign = (float(rec[rec.positions == policy].value.iloc[0]) for policy in ("keep", "reassign"))
    assert keep >= reassign + 0.2


def test_the_table_reports_each_runs_cost(pruning_run):
    table = pd.read_csv(pruning_run / "pruning.csv")
    rec = table[(table.task == "rec") & (table.metric == "acc@0.5")].set_index(["method", "positions"])
    flops = rec.prefill_gflops
    assert flops["random", "keep"] == flops["random", "reassign"]  # GAP feeds the same tokens
    assert flops["random", "keep"] < 0.75 * flops["unpruned", "none"]  # half the visual tokens of the prompt gone
    assert (rec.prefill_ms > 0).all() and (rec.decode_ms_per_step > 0).all()
    assert rec.peak_memory_mib.isna().all()  # measured on CUDA only


def test_a_rerun_computes_nothing_new(pruning_run, monkeypatch):
    calls = []
    monkeypatch.setattr(mllm, "generate", lambda *args, **options: calls.append(1))
    assert evaluate("--model", MINIATURE, "--data", EVAL, "--methods", "random", "--ratios", "0.5",
                    "--limit", 32, "--batch-size", 32, "--out", pruning_run) == 0
    assert calls == []


def test_a_user_registered_method_runs_through_the_cli(tmp_path, monkeypatch):
    (tmp_path / "my_scorer.py").write_text(textwrap.dedent('''
        import torch
        from pruning import Selection, VisionPruning, register_method

        @register_method
        class FirstTokens(VisionPruning):
            name = "first-tokens"

            def __init__(self, offset: int = 0) -> None:
                self.offset = offset

            def select(self, model, encoding, num_kept):
                kept = torch.arange(self.offset, self.offset + num_kept)
                return Selection(kept.expand(encoding.batch_size, -1))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert evaluate("--model", MINIATURE, "--data", EVAL, "--tasks", "vqa", "--import", "my_scorer",
                        "--methods", "first-tokens:offset=4", "--keep", 16, "--positions", "keep",
                        "--limit", 8, "--out", tmp_path / "out") == 0
    finally:
        METHODS.pop("first-tokens", None)
    table = pd.read_csv(tmp_path / "out" / "pruning.csv")
    assert set(table.method) == {"unpruned", "first-tokens:offset=4"}
    assert set(table[table.method != "unpruned"].tokens_fed) == {16.0}


@pytest.mark.parametrize(("args", "needle"), [
    (["--methods", "prune-it", "--ratios", "0.5"], "unknown pruning method 'prune-it'"),
    (["--methods", "random:sed=2", "--ratios", "0.5"], "takes parameters ['seed']"),
    (["--methods", "random"], "give --ratios (fractions pruned) or --keep"),
    (["--methods", "random", "--ratios", "1.5"], "must lie in [0, 1)"),
    (["--methods", "random", "--ratios", "0.5", "--positions", "keep,shuffle"], "unknown position policy 'shuffle'"),
    (["--methods", "random", "--ratios", "0.5", "--import", "no_such_module"], "No module named 'no_such_module'"),
])
def test_bad_input_is_named_before_any_run(args, needle, tmp_path, capsys):
    assert evaluate("--model", MINIATURE, "--data", EVAL, *args, "--out", tmp_path / "out") == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_method_specs_split_on_commas_between_methods_only():
    assert split_method_specs("random,fastv:layer=3,query=all,spatial") == ["random", "fastv:layer=3,query=all",
                                                                            "spatial"]


def test_a_path_in_a_method_spec_stays_one_directory_level(tmp_path):
    name = spec_slug("trim:clip=/models/clip-vit,sign=positive")
    assert "/" not in name and (tmp_path / name).parent == tmp_path
