"""The Qwen2-VL miniature's training path: what it trains on is what evaluation feeds, checked against
transformers' own `Qwen2VLForConditionalGeneration` forward (its M-RoPE numbering, its merger) as the oracle."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

import mllm
from grounding.boxes import parse_box
from grounding.data import load_dataset
from grounding.prompts import prompt_style
from grounding.runner import run_evaluation
from minillava import train as training
from minillava.arch import QWEN_SCENE_SIZES, architecture
from minillava.model import build_tokenizer, instruction_texts
from minillava.split import write_eval_split
from minillava.train import TrainConfig, instruction_batch, instruction_loss, tokenize_instructions
from minillava.world import box_answer, make_scene

QWEN = architecture("qwen2-vl")


def qwen_config(**changes):
    options = {"arch": "qwen2-vl", "preset": "test", "stage1_steps": 10, "stage1_batch": 8, "stage1_group": 4,
               "stage2_steps": 30, "stage2_batch": 8, "rec_fraction": 0.5, "train_scenes": 24, "warmup": 5,
               "save_every": 10, "precision": "fp32", "device": "cpu"}
    return TrainConfig(**{**options, **changes})


def losses(work):
    return [(row["stage"], int(row["step"]), float(row["loss"])) for row in csv.DictReader((work / "log.csv").open())]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("miniqwen")
    out = training.train(qwen_config(), root / "model", root / "work", progress=False)
    return out, root / "work"


def test_qwen_tokenizer_keeps_digits_and_newlines_apart_and_round_trips():
    tokenizer = build_tokenizer(style="qwen2-vl")
    box = "(141,531),(406,859)"
    ids = tokenizer(box, add_special_tokens=False).input_ids
    assert len(ids) == 17  # 12 digits, 4 parentheses... and 3 commas, one merged with a parenthesis at most
    assert tokenizer.decode(ids) == box
    assert tokenizer.convert_tokens_to_ids("\n") in tokenizer("assistant\nred").input_ids
    assert tokenizer("a", add_special_tokens=True).input_ids == tokenizer("a", add_special_tokens=False).input_ids
    for special in ("<|im_start|>", "<|image_pad|>", "<|box_start|>"):
        assert len(tokenizer(special).input_ids) == 1
    odd = "Zebra? 12 #$%"
    assert tokenizer.decode(tokenizer(odd).input_ids) == odd


def test_qwen_answers_boxes_in_thousandths_that_the_one_parser_reads():
    scene = make_scene(5, 48)
    box = scene.objects[0].box
    answer = box_answer(box, 48, "normalized1000")
    assert answer.startswith("<|box_start|>(") and answer.endswith(")<|box_end|>")
    assert parse_box(answer).values == pytest.approx([1000 * v / 48 for v in box], abs=0.5)
    rec = [answer for task, _, answer in instruction_texts(5, 48, "qwen2-vl") if task == "rec"]
    assert rec and all(parse_box(text).parsed for text in rec)


def test_qwen_training_sequences_are_what_evaluation_feeds_and_the_loss_is_transformers(trained):
    out, _ = trained
    model = mllm.load(out, device="cpu", dtype="float32")
    processor = model.processor
    sizes = QWEN_SCENE_SIZES["test"]
    texts, counts, images = [], [], []
    for scene_index, size in enumerate(sizes):  # two grids in one batch, as training mixes them
        items = [(scene_index, *item) for item in instruction_texts(7 + scene_index, size, "qwen2-vl")
                 if item[0] in ("rec", "vqa", "caption")][:3]
        texts += items
        counts += [QWEN.num_visual("test", size)] * len(items)
        images.append(make_scene(7 + scene_index, size).render())
    data = tokenize_instructions(processor, texts, counts, QWEN.answer_separator)
    for row, (scene_index, _, text, answer) in enumerate(texts):
        encoding = model.encode([images[scene_index]], [text])
        assert encoding.visual_counts == [counts[row]]
        assert encoding.input_ids[0].tolist() == data.ids[row][: data.starts[row]]
        answer_ids = data.ids[row][data.starts[row]:]
        assert answer_ids[-1] == processor.tokenizer.eos_token_id
        assert processor.tokenizer.decode(answer_ids[:-1]) == answer
        pixels = QWEN.pixels(processor, [images[scene_index]])
        assert torch.equal(pixels["pixel_values"], encoding.pixel_values)
        assert torch.equal(pixels["image_grid_thw"], encoding.vision_inputs["image_grid_thw"])
    assert len(set(counts)) == 2
    rows = np.arange(len(texts))
    ids, labels, mask = instruction_batch(rows, data, processor.tokenizer.pad_token_id)
    row_images = [images[scene] for scene, *_ in texts]
    pixels = QWEN.pixels(processor, row_images)
    network = model.model
    with torch.no_grad():
        features = QWEN.features(network, pixels)
        tasks = [task for _, task, _, _ in texts]
        ours = instruction_loss(network, features, ids, labels, mask, tasks=tasks)
        expected = 0.0
        for task in set(tasks):
            group = [row for row in rows if tasks[row] == task]
            part = QWEN.pixels(processor, [row_images[row] for row in group])
            # transformers' own forward: the tower from pixels, M-RoPE IDs from input_ids and the mask
            image_tokens = (ids[group] == network.config.image_token_id).int()  # what the processor returns
            token_mean = network(input_ids=ids[group], attention_mask=mask[group], labels=labels[group],
                                 pixel_values=part["pixel_values"], image_grid_thw=part["image_grid_thw"],
                                 mm_token_type_ids=image_tokens).loss
            expected += len(group) / len(rows) * token_mean
    torch.testing.assert_close(ours, expected)


def test_stage2_freezes_the_vit_and_trains_the_merger(trained):
    _, work = trained
    state = torch.load(work / "stage2.pt", weights_only=False)["model"]
    stage1 = torch.load(work / "stage1.pt", weights_only=False)["model"]
    blocks = [key for key in state if key.startswith("model.visual.blocks.")]
    assert blocks
    for key in blocks:
        assert torch.equal(state[key], stage1["0.vision_model." + key.removeprefix("model.visual.")])
    merger = [key for key in state if key.startswith("model.visual.merger.")]
    assert any(not torch.equal(state[key], stage1["0.vision_model." + key.removeprefix("model.visual.")])
               for key in merger)


def test_a_stage2_that_trains_the_vit_feeds_each_scene_through_it_with_gradients(trained, tmp_path):
    """`--stage2-tower trained`: each batch's scenes go through the ViT (each once), the loss is transformers'
    forward from pixels, the ViT blocks get gradients and move, and the card says so."""
    out, _ = trained
    model = mllm.load(out, device="cpu", dtype="float32")
    network, processor = model.model, model.processor
    config = qwen_config(stage2_tower="trained")
    pixels = training.scene_pixels(config, processor)
    assert len(pixels) == config.train_scenes
    scenes = [3, 0, 3, 1]  # a scene twice in one batch, two sizes
    texts = [(scene, *next(item for item in instruction_texts(training.train_seed(config, scene),
                                                               QWEN.scene_size("test", scene), "qwen2-vl")
                            if item[0] == "rec")) for scene in scenes]
    data = tokenize_instructions(processor, texts, [QWEN.num_visual("test", QWEN.scene_size("test", scene))
                                                    for scene in scenes], QWEN.answer_separator)
    ids, labels, mask = instruction_batch(np.arange(len(scenes)), data, processor.tokenizer.pad_token_id)
    QWEN.freeze_tower(network, blocks=False)
    features = training.batch_features(network, QWEN, pixels, scenes, torch.device("cpu"))
    assert torch.equal(features[0], features[2]) and len({len(part) for part in features}) == 2
    loss = instruction_loss(network, features, ids, labels, mask, tasks=["rec"] * len(scenes))
    both = {key: torch.cat([pixels[scene][key] for scene in scenes]) for key in pixels[0]}
    expected = network(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=both["pixel_values"],
                       image_grid_thw=both["image_grid_thw"],
                       mm_token_type_ids=(ids == network.config.image_token_id).int()).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert network.model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

    trained_out = training.train(qwen_config(stage2_tower="trained", stage2_steps=10), tmp_path / "model",
                                 tmp_path / "work", progress=False)
    state = torch.load(tmp_path / "work" / "stage2.pt", weights_only=False)["model"]
    stage1 = torch.load(tmp_path / "work" / "stage1.pt", weights_only=False)["model"]
    blocks = [key for key in state if key.startswith("model.visual.blocks.")]
    assert any(not torch.equal(state[key], stage1["0.vision_model." + key.removeprefix("model.visual.")])
               for key in blocks)
    from minillava.card import evaluate_and_card

    write_eval_split(tmp_path / "split", rec_scenes=2, vqa_scenes=1, size=max(QWEN_SCENE_SIZES["test"]))
    evaluate_and_card(trained_out, tmp_path / "split", tmp_path / "results", device="cpu")
    card = (trained_out / "README.md").read_text()
    assert "ViT + merger + LLM" in card and "--stage2-tower trained" in card


def test_the_spatial_read_out_targets_each_patch_where_the_processor_put_it():
    """Qwen's ViT holds its patches merge block by merge block; the read-out's (row, column) targets are checked
    against patches painted with their own row and column, as the processor flattens them."""
    from PIL import Image

    from minillava.arch import merge_order_positions

    sizes = QWEN.sizes("test")
    processor = QWEN.processor("test", build_tokenizer(style="qwen2-vl"))
    patch = sizes.patch_size
    images, grids = [], [(4, 4), (6, 4)]  # (rows, cols) of patches: a square and a tall image
    for rows, cols in grids:
        paint = np.zeros((rows * patch, cols * patch, 3), dtype=np.uint8)
        for row in range(rows):
            for col in range(cols):
                paint[row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] = (20 * row, 20 * col, 0)
        images.append(Image.fromarray(paint))
    pixels = QWEN.pixels(processor, images)
    assert pixels["image_grid_thw"][:, 1:].tolist() == [list(grid) for grid in grids]
    values = pixels["pixel_values"].reshape(len(pixels["pixel_values"]), 3, -1).mean(dim=-1)  # (patches, RGB)
    mean = torch.tensor(processor.image_processor.image_mean)
    std = torch.tensor(processor.image_processor.image_std)
    painted = ((values * std + mean) * 255 / 20).round().long()[:, :2]  # (row, col) as painted
    positions = merge_order_positions(pixels["image_grid_thw"], sizes.spatial_merge_size)
    assert torch.equal(positions, painted)


def test_a_qwen_spatial_tower_trains_its_row_and_column_read_outs(tmp_path):
    out = training.train(qwen_config(tower="spatial", stage2_steps=5), tmp_path / "model", tmp_path / "work",
                         progress=False)
    stage1 = torch.load(tmp_path / "work" / "stage1.pt", weights_only=False)
    heads = [key for key in stage1["model"] if key.startswith("1.heads.")]
    assert len(heads) == 8  # two layers x (row, column) x (weight, bias)
    assert stage1["config"]["tower"] == "spatial"
    from minillava.card import evaluate_and_card

    write_eval_split(tmp_path / "split", rec_scenes=2, vqa_scenes=1, size=max(QWEN_SCENE_SIZES["test"]))
    evaluate_and_card(out, tmp_path / "split", tmp_path / "results", device="cpu")
    assert "read-out of each patch's row and column" in (out / "README.md").read_text()


def test_qwen_runs_repeat_with_the_same_seed(trained, tmp_path):
    _, work = trained
    again = training.train(qwen_config(), tmp_path / "model", tmp_path / "work", progress=False)
    assert again is not None
    assert losses(tmp_path / "work") == losses(work)
    other = tmp_path / "other"
    training.train(qwen_config(seed=1), other / "model", other / "work", progress=False)
    assert losses(other / "work") != losses(work)


def test_the_qwen_miniature_is_a_qwen2_vl_checkpoint_evaluated_like_one(trained, tmp_path):
    out, _ = trained
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    text = config["text_config"]
    assert text["initializer_range"] == pytest.approx(text["hidden_size"] ** -0.5)
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["arch"] == "qwen2-vl"
    write_eval_split(tmp_path / "split", rec_scenes=4, vqa_scenes=2, size=max(QWEN_SCENE_SIZES["test"]))
    model = mllm.load(out, device="cpu", dtype="float32")
    assert model.model.config.model_type == "qwen2_vl"
    for task in ("rec", "vqa"):
        dataset = load_dataset("jsonl", tmp_path / "split" / task, "val")
        summary = run_evaluation(model, dataset, tmp_path / task, prompt_style("qwen2-vl"), progress=False,
                                 resamples=10)
        assert summary["n_samples"] == len(dataset) and summary["n_errors"] == 0


def test_the_qwen_card_describes_its_architecture_and_what_was_measured(trained, tmp_path):
    from minillava.card import evaluate_and_card

    out = shutil.copytree(trained[0], tmp_path / "model")
    write_eval_split(tmp_path / "split", rec_scenes=4, vqa_scenes=2, size=max(QWEN_SCENE_SIZES["test"]))
    evaluation = evaluate_and_card(out, tmp_path / "split", tmp_path / "results", device="cpu")
    card = (out / "README.md").read_text()
    rec = evaluation["rec"]["summary"]
    assert f"| REC | {rec['n_samples']} | ACC@0.5 | {rec['metrics']['acc@0.5']['value']:.3f}" in card
    assert card.startswith("# minillava-qwen2-vl (contrastive tower)")
    for phrase in ("Qwen2-VL's ViT, patch 4", "2x2 patch merger", "M-RoPE (t, h, w sections [2, 2, 2])",
                   "prompt style `qwen2-vl`", "Merger + LLM, ViT frozen", "Scenes of 24, 32 px",
                   "--tower contrastive --arch qwen2-vl"):
        assert phrase in card, phrase


@pytest.mark.parametrize(("changes", "message"), [
    ({"tower": "sharp"}, "--arch qwen2-vl trains one of"),
    ({"tower_from": "data/minillava/spatial"}, "--tower-from: implemented for --arch llava"),
    ({"arch": "qwen3"}, "--arch 'qwen3'"),
    ({"stage2_tower": "partly"}, "--stage2-tower 'partly'"),
])
def test_what_the_qwen_miniature_cannot_train_is_refused(tmp_path, changes, message):
    with pytest.raises(SystemExit, match=message):
        training.train(qwen_config(**changes), tmp_path / "model", tmp_path / "work", progress=False)
