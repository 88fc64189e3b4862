"""probes: TransformerLens hooks, the position probe and its solvers, the controls, and the layerwise CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone

import mllm
from grounding import RunConfigError
from probes import PositionProbe, chance, fit_layers, patch_labels, target_values
from probes.activations import PATCH, PATCH_POS, ActivationStore, ImageList, StoreMismatchError, extract_activations
from probes.bridge import VisionHooks, boot_bridge
from probes.layerwise import flat, main, run_layerwise, split_images
from probes.targets import distance
from tests.conftest import random_image


def noise_images(count: int, seed: int = 0) -> ImageList:
    return ImageList(ids=[f"noise-{i}" for i in range(count)], load=lambda i: random_image(seed * 10_000 + i))


def accuracy(records: list[dict], series: str, layer: int | None = None) -> dict:
    [record] = [r for r in records if r["series"] == series and r["layer"] == layer]
    return record["metrics"]["accuracy"]


# ----------------------------------------------------------------------------------- TransformerLens
def test_hooks_equal_output_hidden_states_and_leave_the_model_untouched(tiny_model):
    tower_class = type(tiny_model.adapter.vision_tower)
    attention = tiny_model.model.config._attn_implementation
    parameters = {name: p.clone() for name, p in tiny_model.model.named_parameters()}
    hooks = VisionHooks(tiny_model)
    pixels, _ = tiny_model.encode_pixels([random_image(i) for i in range(3)])
    states = hooks.run(pixels, range(hooks.num_layers))
    _, reference = tiny_model.adapter.image_features(pixels, output_hidden_states=True)
    assert hooks.num_layers == len(reference) == len(tiny_model.adapter.vision_layers) + 1
    for layer, expected in enumerate(reference):
        torch.testing.assert_close(states[layer], expected, rtol=1e-5, atol=1e-5)
    assert hooks.max_difference_from_transformers(pixels) < 1e-5
    assert hooks.hook_name(0) == "vision_encoder.encoder_layers.0.hook_in"
    assert hooks.hook_name(2) == "vision_encoder.encoder_layers.1.hook_out"
    # No permanent edits: hooks are gone after the call, and mllm's model is the same model.
    assert not any(point.has_hooks() for point in hooks.bridge.hook_dict.values())
    assert type(tiny_model.adapter.vision_tower) is tower_class
    assert tiny_model.model.config._attn_implementation == attention
    for name, parameter in tiny_model.model.named_parameters():
        assert torch.equal(parameter, parameters[name]), name
    with pytest.raises(ValueError, match="layer 9 out of range"):
        hooks.hook_name(9)


def test_bridge_never_installs_torchvision(tiny_model, monkeypatch):
    """TransformerLens pip-installs torchvision when a processor fails to load; the bridge must not let it."""
    import subprocess

    import transformers
    from transformer_lens.model_bridge.sources.transformers import helpers

    def no_processor(*args, **kwargs):
        raise ImportError("this processor needs torchvision")

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"tried to run {args}")

    installer = helpers._ensure_torchvision
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", no_processor)
    monkeypatch.setattr(subprocess, "check_call", no_subprocess)
    bridge = boot_bridge(tiny_model)
    assert bridge.processor is tiny_model.processor
    assert helpers._ensure_torchvision is installer  # the guard is lifted after the boot


def test_patch_embeddings_are_the_towers_embeddings_without_cls(tiny_model):
    pixels, _ = tiny_model.encode_pixels([random_image(i) for i in range(2)])
    embeddings = tiny_model.adapter.vision_tower.embeddings(pixels)
    with_position = tiny_model.adapter.vision_patch_embeddings(pixels, with_position=True)
    torch.testing.assert_close(with_position, embeddings[:, 1:])
    without = tiny_model.adapter.vision_patch_embeddings(pixels, with_position=False)
    position = tiny_model.adapter.vision_tower.embeddings.position_embedding.weight[1:]
    torch.testing.assert_close(without + position, with_position)


def test_encode_pixels_gives_what_encode_feeds_the_tower(tiny_model, images):
    pixels, frames = tiny_model.encode_pixels(images, frame="padded")
    encoding = tiny_model.encode(images, ["hi"] * len(images), frame="padded")
    torch.testing.assert_close(pixels, encoding.pixel_values)
    assert [f.offset_x for f in frames] == [f.offset_x for f in encoding.frames]


# ------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("target", ["index", "row", "col", "rowcol"])
def test_chance_is_the_expected_score_of_a_uniform_guess(target):
    grid = (3, 5)
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 15, 200_000)
    guess = rng.integers(0, 15, len(truth))
    predicted = target_values(guess, target, grid)
    off = distance(predicted, truth, target, grid)
    expected = chance(target, grid)
    assert (off == 0).mean() == pytest.approx(expected["accuracy"], abs=0.01)
    assert off.mean() == pytest.approx(expected["manhattan"], rel=0.01)


def test_targets_and_distances_on_a_grid():
    grid = (2, 3)
    index = np.array([0, 4, 5])
    assert target_values(index, "row", grid).tolist() == [0, 1, 1]
    assert target_values(index, "col", grid).tolist() == [0, 1, 2]
    assert target_values(index, "rowcol", grid).tolist() == [[0, 0], [1, 1], [1, 2]]
    assert distance(np.array([5, 4, 0]), index, "index", grid).tolist() == [3, 0, 3]
    assert patch_labels(2, grid).tolist() == [0, 1, 2, 3, 4, 5] * 2
    with pytest.raises(ValueError, match="unknown probe target 'xy'"):
        target_values(index, "xy", grid)


def test_split_is_by_image_and_reproducible():
    train, test = split_images(50, 0.2, seed=3)
    assert len(test) == 10 and len(train) == 40
    assert not set(train) & set(test) and set(train) | set(test) == set(range(50))
    again = split_images(50, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    with pytest.raises(ValueError, match="cannot be split"):
        split_images(1, 0.5, seed=0)


# -------------------------------------------------------------------------------------- estimator
def planted(num_images: int, grid=(4, 4), width=24, signal=0.6, seed=0):
    """Features holding a linear trace of position (per patch, and of its row and column) under noise."""
    rng = np.random.default_rng(seed)
    index = patch_labels(num_images, grid)
    directions = rng.normal(size=(grid[0] * grid[1], width))
    coordinates = target_values(index, "rowcol", grid) @ rng.normal(size=(2, width))
    return (directions[index] + coordinates) * signal + rng.normal(size=(len(index), width)), index


def test_probe_follows_the_sklearn_estimator_api():
    X, y = planted(60)
    probe = PositionProbe(grid=(4, 4), target="row", C=0.5)
    assert clone(probe).get_params() == probe.get_params()
    assert not [name for name in vars(probe) if name.endswith("_")]  # the constructor only stores
    probe.fit(X, y)
    learned = sorted(name for name in vars(probe) if name.endswith("_"))
    assert learned == ["classes_", "coef_", "intercept_", "mean_", "n_iter_", "scale_"]
    assert probe.coef_.shape == (4, 24) and probe.classes_.tolist() == [0, 1, 2, 3]
    assert probe.predict_proba(X[:5]).sum(axis=1) == pytest.approx(np.ones(5), abs=1e-5)
    assert probe.score(X, y) > 0.5
    with pytest.raises(ValueError, match="unknown solver"):
        PositionProbe(grid=(4, 4), solver="adam").fit(X, y)


@pytest.mark.parametrize("target", ["index", "row", "col", "rowcol"])
def test_torch_and_sklearn_solvers_agree_on_planted_features(target):
    X, y = planted(120)
    train, test = slice(0, 96 * 16), slice(96 * 16, None)
    scores = [PositionProbe(grid=(4, 4), target=target, solver=solver).fit(X[train], y[train]).score(X[test], y[test])
              for solver in ("sklearn", "torch")]
    assert scores[0] > 2 * chance(target, (4, 4))["accuracy"]
    assert abs(scores[0] - scores[1]) <= 0.01


def test_batched_fit_matches_fitting_each_layer_alone():
    (X1, y), (X2, _) = planted(40, seed=1), planted(40, seed=2, signal=0.2)
    shuffled = np.random.default_rng(0).permutation(y)
    together = fit_layers([X1, X2, X1], [y, y, shuffled], grid=(4, 4))
    alone = [PositionProbe(grid=(4, 4)).fit(X, labels) for X, labels in ((X1, y), (X2, y), (X1, shuffled))]
    for batched, single, X in zip(together, alone, (X1, X2, X1)):
        assert (batched.predict(X) == single.predict(X)).mean() > 0.98


# ------------------------------------------------------------------------- the three checks
@pytest.fixture(scope="module")
def zeroed_store(tiny_checkpoint, tmp_path_factory):
    """The tiny tower with every position embedding zeroed, on images of i.i.d. noise."""
    model = mllm.load(tiny_checkpoint, device="cpu", dtype="float32")
    with torch.no_grad():
        model.adapter.vision_tower.embeddings.position_embedding.weight.zero_()
    return extract_activations(model, noise_images(400), tmp_path_factory.mktemp("zeroed"), progress=False)


def test_without_position_embeddings_no_layer_reads_position(zeroed_store, tmp_path):
    records = run_layerwise(zeroed_store, tmp_path, shuffled=False, resamples=200, progress=False)
    level = chance("index", zeroed_store.grid)["accuracy"]
    readings = [("probe", layer) for layer in zeroed_store.spec.layers] + [("patch + position embedding", None)]
    for series, layer in readings:
        result = accuracy(records, series, layer)
        assert result["ci95"][0] <= level, (series, layer, result)  # not above chance, at 95% confidence
        assert result["value"] < level + 0.02, (series, layer, result)


@pytest.fixture(scope="module")
def miniature_store(repo_root, tmp_path_factory):
    """The shipped contrastive miniature on 200 images of its evaluation split, every layer."""
    model = mllm.load(repo_root / "data" / "minillava" / "contrastive", device="cpu", dtype="float32")
    from probes.layerwise import images_from_directory

    images = images_from_directory(repo_root / "data" / "minillava" / "eval" / "images", limit=200)
    return extract_activations(model, images, tmp_path_factory.mktemp("miniature"), progress=False)


def test_patch_embeddings_with_position_read_position_and_without_do_not(miniature_store, tmp_path):
    records = run_layerwise(miniature_store, tmp_path, shuffled=True, resamples=200, progress=False)
    level = chance("index", miniature_store.grid)["accuracy"]
    assert accuracy(records, "patch + position embedding")["value"] > 0.98
    assert accuracy(records, "probe", 0)["value"] > 0.98
    assert accuracy(records, "patch embedding")["value"] < 0.1
    for layer in miniature_store.spec.layers:
        assert accuracy(records, "shuffled labels", layer)["value"] < level + 0.03


def test_torch_solver_is_within_a_point_of_sklearn_on_a_real_split(miniature_store):
    train, test = split_images(len(miniature_store.spec.image_ids), 0.2, seed=0)
    grid = miniature_store.grid
    X_train, X_test = (flat(miniature_store.features(3), images) for images in (train, test))
    y_train, y_test = patch_labels(len(train), grid), patch_labels(len(test), grid)
    scores = {solver: PositionProbe(grid=grid, solver=solver).fit(X_train, y_train).score(X_test, y_test)
              for solver in ("sklearn", "torch")}
    assert 0.3 < scores["sklearn"] < 0.999  # a layer where the probe is neither saturated nor lost
    assert abs(scores["sklearn"] - scores["torch"]) <= 0.01


# ------------------------------------------------------------------------------------ store and CLI
def test_store_streams_and_resumes_after_a_crash(tiny_model, tmp_path):
    images = noise_images(10, seed=4)
    fresh = extract_activations(tiny_model, images, tmp_path / "fresh", batch_size=4, dtype="float32", progress=False)

    def crash_at_seven(index):
        if index == 7:
            raise KeyboardInterrupt
        return images.load(index)

    with pytest.raises(KeyboardInterrupt):
        extract_activations(tiny_model, ImageList(images.ids, crash_at_seven), tmp_path / "resumed", batch_size=4,
                            dtype="float32", progress=False)
    assert ActivationStore(tmp_path / "resumed").done == 4
    resumed = extract_activations(tiny_model, images, tmp_path / "resumed", batch_size=4, dtype="float32",
                                  progress=False)
    assert resumed.complete and resumed.hook_check["max_relative_difference"] < 1e-5
    for name in fresh.names:
        assert np.array_equal(fresh.features(name), resumed.features(name)), name
    assert fresh.features(PATCH).shape == (10, 16, 32) and set(fresh.names) >= {PATCH, PATCH_POS, 0, 3}
    with pytest.raises(StoreMismatchError, match=r"store\.json"):
        extract_activations(tiny_model, noise_images(11), tmp_path / "fresh", progress=False)


def test_cli_writes_table_config_and_figure_and_resumes(tiny_checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        random_image(i, 40, 30).save(folder / f"{i:02d}.png")
    out = tmp_path / "run"

    def arguments(target):
        return ["--model", str(tiny_checkpoint), "--images", str(folder), "--out", str(out), "--layers", "0,-1",
                "--target", target, "--bootstrap", "50", "--no-progress", "--device", "cpu"]

    argv = arguments("row")
    assert main(argv) == 0
    for name in ("layerwise.csv", "layerwise.png", "layerwise.pdf", "config.json", "layerwise.json", "records.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["target"] == "row"
    metadata = json.loads((out / "layerwise.json").read_text())
    assert metadata["layers"] == [0, 3] and metadata["run"]["target"] == "row"
    assert not set(metadata["images"]["train"]) & set(metadata["images"]["test"])
    table = (out / "layerwise.csv").read_text().splitlines()
    assert table[0] == "series,layer,metric,value,ci_low,ci_high,n_test_images"
    assert any(line.startswith("chance,,accuracy,0.25,") for line in table)
    lines = (out / "records.jsonl").read_text().splitlines()
    last = lines.pop()
    (out / "records.jsonl").write_text("\n".join(lines) + "\n" + last[:40])  # killed while writing the last record
    config = json.loads((out / "config.json").read_text())
    assert config.pop("shards") == 1 and (out / "activations" / "store.json").is_file()
    (out / "config.json").write_text(json.dumps(config))  # a run from before the field resumes too
    assert main(argv) == 0  # the rerun drops the torn line, refits that one feature set only
    again = (out / "records.jsonl").read_text().splitlines()
    assert again[:-1] == lines

    def untimed(line):
        return {key: value for key, value in json.loads(line).items() if key != "fit_seconds"}

    assert untimed(again[-1]) == untimed(last)
    with pytest.raises(RunConfigError, match="target"):
        main(arguments("col"))


def test_cli_names_an_empty_image_folder(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        main(["--model", str(tiny_checkpoint), "--images", str(tmp_path), "--out", str(tmp_path / "o"),
              "--no-progress"])


def test_layerwise_table_orders_series(tmp_path: Path):
    from probes.layerwise import table_rows

    record = {"series": "probe", "layer": 1, "metrics": {"accuracy": {"value": 0.5, "ci95": [0.4, 0.6]}},
              "n_test_images": 3}
    rows = table_rows([record, {**record, "layer": 0}], "index", (2, 2), 3)
    assert [(r["series"], r["layer"]) for r in rows] == [("probe", 0), ("probe", 1), ("chance", None),
                                                        ("chance", None), ("chance", None)]


def test_the_visual_tokens_the_llm_receives_are_probed_on_their_own_grid(tiny_model, images, tmp_path):
    """`features="visual-tokens"` stores transformers' projector output (get_image_features) per image, on the
    visual-token grid, and nothing of the tower's layers."""
    from mllm.encoding import encode_vision_inputs
    from probes.activations import VISUAL_TOKENS, ImageList, extract_activations

    squares = [image.resize((32, 32)) for image in images]
    store = extract_activations(tiny_model, ImageList([str(i) for i in range(4)], lambda i: squares[i]),
                                tmp_path / "store", features="visual-tokens", frame="padded", dtype="float32",
                                progress=False)
    assert store.spec.layers == [] and store.names == [VISUAL_TOKENS] and tuple(store.grid) == tiny_model.grid
    pixels = encode_vision_inputs(tiny_model, squares, frame="padded")[0]["pixel_values"]
    with torch.no_grad():
        expected = torch.stack(list(tiny_model.model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=tiny_model.model.config.vision_feature_layer,
            vision_feature_select_strategy="default").pooler_output))
    np.testing.assert_allclose(np.asarray(store.features(VISUAL_TOKENS)), expected.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features 'llm'"):
        extract_activations(tiny_model, ImageList(["0"], lambda i: squares[0]), tmp_path / "other", features="llm")
