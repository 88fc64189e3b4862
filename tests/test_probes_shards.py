"""probes.layerwise sharded over processes: --shard r/n and torchrun equal one process; a killed shard resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grounding.records import claim
from probes import layerwise
from probes.activations import (
    ActivationStore,
    ImageList,
    ShardedStore,
    StackedRows,
    StoreMismatchError,
    shard_layout,
)
from tests.conftest import random_image

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 12
BATCH_SIZE = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(NUM_IMAGES):
        random_image(i, 40, 30).save(folder / f"{i:02d}.png")
    return folder


def arguments(checkpoint: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(checkpoint), "--images", str(folder), "--out", str(out), "--layers", "0,-1",
            "--batch-size", str(BATCH_SIZE), "--bootstrap", "50", "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def single(tiny_checkpoint, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process run every sharded run must equal."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert layerwise.main(arguments(tiny_checkpoint, folder, out)) == 0
    return out


def records(out: Path) -> list[dict]:
    """The records in file order, without their fit times."""
    lines = (out / "records.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if key != "fit_seconds"} for line in lines]


def assert_same_results(out: Path, single: Path) -> None:
    assert (out / "layerwise.csv").read_text() == (single / "layerwise.csv").read_text()
    assert records(out) == records(single)
    ours, theirs = (json.loads((path / "layerwise.json").read_text()) for path in (out, single))
    assert ours["images"] == theirs["images"] and ours["grid"] == theirs["grid"]


def test_stacked_rows_index_like_one_array():
    whole = np.arange(7 * 3 * 2).reshape(7, 3, 2)
    stacked = StackedRows([whole[:3], whole[3:3], whole[3:]])
    assert stacked.shape == whole.shape and len(stacked) == 7
    for rows in (np.array([6, 0, 3, 2]), slice(1, 6, 2), 4, [5]):
        assert np.array_equal(stacked[rows], whole[rows])
    assert np.array_equal(np.asarray(stacked, dtype=np.float32), whole.astype(np.float32))


def test_shard_calls_in_turn_equal_one_process(tiny_checkpoint, folder, single, tmp_path, capsys):
    out = tmp_path / "run"
    assert layerwise.main(arguments(tiny_checkpoint, folder, out, "--shard", "0/2")) == 0
    assert "shard 0/2 done; the last shard to finish writes" in capsys.readouterr().out
    assert not (out / "layerwise.csv").exists() and not (out / "records.jsonl").exists()

    # Another process fitting (both shards saw the store complete): this one leaves it to that one.
    with claim(out / layerwise.FITTING_CLAIM) as claimed:
        assert claimed
        assert layerwise.main(arguments(tiny_checkpoint, folder, out, "--shard", "1/2")) == 0
    assert "another process is fitting" in capsys.readouterr().out
    assert not (out / "layerwise.csv").exists()

    assert layerwise.main(arguments(tiny_checkpoint, folder, out, "--shard", "1/2")) == 0
    assert_same_results(out, single)
    activations = out / "activations"
    assert json.loads((activations / "shards.json").read_text())["blocks"] == [[0, 6], [6, 12]]
    assert ActivationStore(activations / "shard1of2").spec.image_ids == [f"{i:02d}.png" for i in range(6, 12)]
    sharded, whole = ShardedStore(activations), ActivationStore(single / "activations")
    assert sharded.spec == whole.spec and sharded.complete
    for name in whole.names:
        assert np.array_equal(sharded.features(name), whole.features(name)), name
    assert json.loads((out / "config.json").read_text())["shards"] == 2


def test_torchrun_equals_one_process(tiny_checkpoint, folder, single, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
               "-m", "probes.layerwise", *arguments(tiny_checkpoint, folder, out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {path.name for path in (out / "activations").iterdir()} == {"shards.json", "shard0of2", "shard1of2"}
    # Which rank fits is a race (both may see the store complete); the claim lets one of them at a time.
    assert "wrote" in done.stdout and "shard" in done.stdout
    assert_same_results(out, single)


def test_a_killed_shard_resumes_to_the_same_result(tiny_checkpoint, folder, single, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert layerwise.main(arguments(tiny_checkpoint, folder, out, "--shard", "1/2")) == 0
    listed = layerwise.images_from_directory

    def killed_at_image_three(directory: Path, limit: int | None = None) -> ImageList:
        images = listed(directory, limit)

        def load(index: int) -> object:
            if index == 3:
                raise KeyboardInterrupt
            return images.load(index)

        return ImageList(images.ids, load)

    monkeypatch.setattr(layerwise, "images_from_directory", killed_at_image_three)
    with pytest.raises(KeyboardInterrupt):
        layerwise.main(arguments(tiny_checkpoint, folder, out, "--shard", "0/2"))
    assert ActivationStore(out / "activations" / "shard0of2").done == 2  # the batch [2, 4) was cut short
    assert not (out / "layerwise.csv").exists()
    monkeypatch.setattr(layerwise, "images_from_directory", listed)
    assert layerwise.main(arguments(tiny_checkpoint, folder, out, "--shard", "0/2")) == 0
    assert_same_results(out, single)


def test_another_layout_is_refused_naming_the_directory(folder, tmp_path):
    sharded = tmp_path / "sharded"
    assert shard_layout(sharded, 12, 2, 4) == [(0, 4), (4, 12)]
    assert shard_layout(sharded, 12, 2, 1) == [(0, 4), (4, 12)]  # a rank resumed with another batch keeps its images
    with pytest.raises(StoreMismatchError, match=f"{sharded}: holds activations extracted in 2 shards, not 3"):
        shard_layout(sharded, 12, 3, 4)
    with pytest.raises(StoreMismatchError, match="written for 12 images, not 13"):
        shard_layout(sharded, 13, 2, 4)
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "store.json").write_text("{}")
    with pytest.raises(StoreMismatchError, match=f"{tmp_path / 'single'}: holds activations extracted by a single"):
        shard_layout(tmp_path / "single", 12, 2, 4)
    # From the CLI, before any model is loaded (there is none at --model).
    out = tmp_path / "run"
    shard_layout(out / "activations", NUM_IMAGES, 2, BATCH_SIZE)
    with pytest.raises(StoreMismatchError, match=r"extracted in 2 shards; rerun as 2 processes"):
        layerwise.main(arguments(tmp_path / "no-model", folder, out))
