"""Training the miniature: the training path is the evaluation path, runs repeat, and resume exactly."""

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mllm
from grounding.data import load_dataset
from grounding.prompts import prompt_style
from grounding.runner import run_evaluation
from minillava import train as training
from minillava.model import PRESETS, REGION_PROMPT, build_tokenizer, instruction_texts, world_corpus
from minillava.split import write_eval_split
from minillava.train import (
    TrainConfig,
    instruction_batch,
    instruction_loss,
    to_pixels,
    tokenize_instructions,
)
from minillava.world import box_answer, make_scene


def tiny_config(**changes):
    options = {"preset": "test", "stage1_steps": 20, "stage1_batch": 8, "stage2_steps": 100, "stage2_batch": 8,
               "rec_fraction": 0.5, "train_scenes": 24, "warmup": 5, "save_every": 10, "vqa_only_steps": 20,
               "where_fraction": 0.125, "region_fraction": 0.125, "precision": "fp32", "device": "cpu"}
    return TrainConfig(**{**options, **changes})


def losses(work):
    return [(row["stage"], int(row["step"]), float(row["loss"])) for row in csv.DictReader((work / "log.csv").open())]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("minillava")
    out = training.train(tiny_config(), root / "model", root / "work", progress=False)
    return out, root / "work"


def test_region_descriptions_name_the_object_in_the_box_and_stay_out_of_the_vocabulary():
    described = 0
    for seed in range(1_000_000, 1_000_040):
        scene = make_scene(seed, 64)
        regions = [(text, answer) for task, text, answer in instruction_texts(seed, 64) if task == "region"]
        assert len(regions) == len(scene.objects)
        for text, answer in regions:
            box = text.removeprefix(REGION_PROMPT + " ")
            (obj,) = [obj for obj in scene.objects if box_answer(obj.box, 64) == box]
            assert answer == f"the {obj.color} {obj.shape}"
            described += 1
    assert described > 80
    assert not any(REGION_PROMPT in line or "where is" in line for line in world_corpus(count=20))


def test_tokenizer_keeps_digits_apart_and_round_trips():
    tokenizer = build_tokenizer()
    answer = "[0.14, 0.53, 0.41, 0.86]"
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    assert len(ids) == 24  # brackets, 4 x "0" "." d d, 3 x "," "▁"
    assert tokenizer.decode(ids) == answer
    words = tokenizer("the purple triangle above the red cross", add_special_tokens=False).input_ids
    assert len(words) == 7  # one token per word of the world
    odd = "Zebra? 12 #$%"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False).input_ids) == odd


def test_training_sequences_are_what_evaluation_feeds_the_model(trained):
    out, _ = trained
    model = mllm.load(out, device="cpu", dtype="float32")
    size, grid = PRESETS["test"].image_size, PRESETS["test"].grid
    texts = instruction_texts(7, size)
    scene = make_scene(7, size)
    data = tokenize_instructions(model.processor, [(0, *item) for item in texts], grid[0] * grid[1])
    for row, (_, text, answer) in enumerate(texts):
        encoding = model.encode([scene.render()], [text])
        assert encoding.input_ids[0].tolist() == data.ids[row][: data.starts[row]]
        answer_ids = data.ids[row][data.starts[row] :]
        assert answer_ids[-1] == model.processor.tokenizer.eos_token_id
        assert model.processor.tokenizer.decode(answer_ids, skip_special_tokens=True) == answer
    assert {task for task, _, _ in texts} == {"rec", "vqa", "caption", "where", "region"}
    pixels = to_pixels([scene.render()])
    assert torch.equal(pixels, encoding.pixel_values)
    rows = np.arange(len(texts))
    ids, labels, mask = instruction_batch(rows, data, model.processor.tokenizer.pad_token_id)
    features = model.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    with torch.no_grad():
        tasks = [task for task, _, _ in texts]
        ours = instruction_loss(model.model, features.expand(len(rows), -1, -1), ids, labels, mask,
                               tasks=tasks)
        expected = 0.0
        for task in set(tasks):
            group = [row for row in rows if tasks[row] == task]
            token_mean = model.model(input_ids=ids[group], pixel_values=pixels.expand(len(group), -1, -1, -1),
                                     attention_mask=mask[group], labels=labels[group]).loss
            expected += len(group) / len(rows) * token_mean
        batch_token_mean = model.model(input_ids=ids, pixel_values=pixels.expand(len(rows), -1, -1, -1),
                                       attention_mask=mask, labels=labels).loss
    # a token mean within each task, each task weighted by its share of the queries
    torch.testing.assert_close(ours, expected)
    assert abs(ours - batch_token_mean) > 1e-3  # the weighting is not a plain token mean


def test_stage2_opens_with_vqa_alone_then_mixes_the_tasks():
    config = TrainConfig(stage2_batch=32, vqa_only_steps=1500, rec_fraction=0.5, caption_fraction=0.125,
                         where_fraction=0.1875)
    assert training.batch_counts(config, 0) == training.batch_counts(config, 1499) == {
        "rec": 0, "vqa": 32, "caption": 0, "where": 0, "region": 0}
    assert training.batch_counts(config, 1500) == {"rec": 16, "caption": 4, "where": 6, "region": 0, "vqa": 6}
    with_regions = TrainConfig(rec_fraction=0.55, caption_fraction=0.0625, region_fraction=0.125)
    assert training.batch_counts(with_regions, 0) == {"rec": 18, "caption": 2, "where": 0, "region": 4, "vqa": 8}
    # the defaults: no VQA-only opening, no "where", no regions
    assert training.batch_counts(TrainConfig(), 0) == {"rec": 19, "caption": 5, "where": 0, "region": 0, "vqa": 8}
    with pytest.raises(SystemExit, match="must not exceed 1"):
        training.batch_counts(TrainConfig(rec_fraction=0.6, region_fraction=0.5), 0)
    with pytest.raises(SystemExit, match="must not exceed 1"):
        training.batch_counts(TrainConfig(rec_fraction=0.9), 2000)
    with pytest.raises(SystemExit, match="must not exceed 1"):  # before the VQA-only steps are spent
        training.batch_counts(TrainConfig(rec_fraction=0.9, vqa_only_steps=1500), 0)


def test_same_seed_same_loss_curve_other_seed_another(trained, tmp_path):
    _, work = trained
    first = losses(work)
    assert len([row for row in first if row[0] == "stage2"]) == 100
    training.train(tiny_config(), tmp_path / "again", tmp_path / "again-work", progress=False)
    assert losses(tmp_path / "again-work") == first
    training.train(tiny_config(seed=1), tmp_path / "other", tmp_path / "other-work", progress=False)
    assert losses(tmp_path / "other-work") != first


def test_a_killed_run_resumes_to_the_same_curve(trained, tmp_path, monkeypatch):
    _, work = trained
    real_loss, calls = training.instruction_loss, {"n": 0}

    def dies_at_step_35(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 35:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "instruction_loss", dies_at_step_35)
    with pytest.raises(KeyboardInterrupt):
        training.train(tiny_config(), tmp_path / "model", tmp_path / "work", progress=False)
    assert torch.load(tmp_path / "work" / "stage2.pt", weights_only=False)["step"] == 30
    monkeypatch.setattr(training, "instruction_loss", real_loss)
    training.train(tiny_config(), tmp_path / "model", tmp_path / "work", progress=False)
    assert losses(tmp_path / "work") == losses(work)


def test_resuming_with_another_configuration_is_refused(trained, tmp_path):
    _, work = trained
    with pytest.raises(SystemExit, match="another configuration"):
        training.train(tiny_config(stage2_lr=0.5), tmp_path / "model", work, progress=False)


def test_a_state_saved_before_a_setting_existed_resumes_at_its_default(trained, tmp_path):
    _, work = trained
    shutil.copytree(work, tmp_path / "work")
    state = torch.load(tmp_path / "work" / "stage2.pt", weights_only=False)
    del state["config"]["vqa_only_steps"]  # as if saved before the option: read as its default, 0
    torch.save(state, tmp_path / "work" / "stage2.pt")
    with pytest.raises(SystemExit, match="another configuration"):  # this run opened with 20 VQA-only steps
        training.train(tiny_config(), tmp_path / "model", tmp_path / "work", progress=False)
    training.train(tiny_config(vqa_only_steps=0), tmp_path / "model", tmp_path / "work", progress=False)
    assert losses(tmp_path / "work") == losses(work)  # resumed at the end: nothing retrained


def test_a_longer_floor_continues_a_finished_run_as_a_fresh_run_makes_it(trained, tmp_path):
    _, work = trained
    shutil.copytree(work, tmp_path / "continued")
    training.train(tiny_config(stage2_floor_steps=20), tmp_path / "model", tmp_path / "continued", progress=False)
    (tmp_path / "fresh").mkdir()
    for name in ("stage1.pt", "log.csv"):  # the same tower: only stage 2 is run again, from its first step
        (tmp_path / "fresh" / name).write_bytes((work / name).read_bytes())
    (tmp_path / "fresh" / "log.csv").write_text("".join(
        line for line in (work / "log.csv").open() if not line.startswith("stage2")))
    training.train(tiny_config(stage2_floor_steps=20), tmp_path / "again", tmp_path / "fresh", progress=False)
    continued = losses(tmp_path / "continued")
    assert continued == losses(tmp_path / "fresh")
    assert continued[:len(losses(work))] == losses(work)
    floor = [float(row["lr"]) for row in csv.DictReader((tmp_path / "fresh" / "log.csv").open())
             if row["stage"] == "stage2" and int(row["step"]) >= 100]
    assert floor == pytest.approx([TrainConfig().stage2_lr / 10] * 20)
    # a state past the end of a shorter run is refused, not saved as if that run had made it
    with pytest.raises(SystemExit, match="past this run's 100 steps"):
        training.train(tiny_config(), tmp_path / "model", tmp_path / "continued", progress=False)


def test_a_new_stage_2_reuses_the_trained_tower(trained, tmp_path):
    _, work = trained
    (tmp_path / "work").mkdir()
    for name in ("stage1.pt", "log.csv"):
        (tmp_path / "work" / name).write_bytes((work / name).read_bytes())
    assert training.train(tiny_config(), tmp_path / "model", tmp_path / "work", progress=False,
                          stage1_only=True) is None
    assert not (tmp_path / "model").exists()
    training.train(tiny_config(stage2_steps=10, stage2_lr=3e-3), tmp_path / "model", tmp_path / "work",
                   progress=False)
    stage1 = [row for row in losses(tmp_path / "work") if row[0] == "stage1"]
    assert stage1 == [row for row in losses(work) if row[0] == "stage1"]
    with pytest.raises(SystemExit, match="another configuration"):
        training.train(tiny_config(stage1_lr=0.5), tmp_path / "model", tmp_path / "work", progress=False)


def test_stage_2_from_a_finished_miniatures_tower_retrains_it_exactly(trained, tmp_path):
    out, work = trained
    again = training.train(tiny_config(tower_from=str(out)), tmp_path / "model", tmp_path / "work", progress=False)
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    assert losses(tmp_path / "work") == losses(work)  # stage 1's rows carried over, stage 2's the same
    record = json.loads((again / "training.json").read_text())
    assert record["config"]["tower_from"] == str(out)
    assert record["tower_from_sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert record["seconds"]["stage1"] == json.loads((out / "training.json").read_text())["seconds"]["stage1"]
    from minillava.card import evaluate_and_card

    write_eval_split(tmp_path / "split", rec_scenes=2, vqa_scenes=1, size=PRESETS["test"].image_size)
    evaluate_and_card(again, tmp_path / "split", tmp_path / "results", device="cpu")
    card = (again / "README.md").read_text()
    assert f"stage 2 started from the tower of `{out}`" in card and record["tower_from_sha256"][:16] in card
    assert f"--tower-from {out}" in card  # the reproduce line


def test_stage_2_from_a_tower_trained_otherwise_is_refused(trained, tmp_path):
    out, _ = trained
    with pytest.raises(SystemExit, match=r"training\.json: config\.stage1_lr is 0\.001, this run's is 0\.5"):
        training.train(tiny_config(tower_from=str(out), stage1_lr=0.5), tmp_path / "model", tmp_path / "w1",
                       progress=False)
    with pytest.raises(SystemExit, match=r"no training\.json"):
        training.train(tiny_config(tower_from=str(tmp_path)), tmp_path / "model", tmp_path / "w2", progress=False)
    with pytest.raises(SystemExit, match="is the --tower-from checkpoint"):
        training.train(tiny_config(tower_from=str(out)), out, tmp_path / "w3", progress=False)
    source = shutil.copytree(out, tmp_path / "source")  # a run from a copy, whose weights then change
    training.train(tiny_config(tower_from=str(source), stage2_steps=10), tmp_path / "m5", tmp_path / "w5",
                   progress=False)
    (source / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes() + b" ")
    with pytest.raises(SystemExit, match="not the file this run started from"):
        training.train(tiny_config(tower_from=str(source), stage2_steps=10), tmp_path / "m5", tmp_path / "w5",
                       progress=False)
    with pytest.raises(SystemExit, match="cannot be given with --stage1-only"):
        training.train(tiny_config(tower_from=str(out)), tmp_path / "model", tmp_path / "w4", progress=False,
                       stage1_only=True)
    assert not (tmp_path / "model").exists()


def test_the_miniature_is_a_llava_checkpoint_evaluated_like_one(trained, tmp_path):
    out, _ = trained
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["preset"] == "test" and record["seconds"]["stage2"] > 0
    write_eval_split(tmp_path / "split", rec_scenes=4, vqa_scenes=2, size=PRESETS["test"].image_size)
    model = mllm.load(out, device="cpu", dtype="float32")
    for task in ("rec", "vqa"):
        dataset = load_dataset("jsonl", tmp_path / "split" / task, "val")
        summary = run_evaluation(model, dataset, tmp_path / task, prompt_style("llava-1.5"), progress=False,
                                 resamples=10)
        assert summary["n_samples"] == len(dataset) and summary["n_errors"] == 0
        record = json.loads((tmp_path / task / "samples.jsonl").read_text().splitlines()[0])
        assert record["meta"]["kind"]


def test_the_cards_reproduce_line_rebuilds_the_configuration():
    from dataclasses import asdict

    from minillava.card import train_flags

    config = tiny_config(tower="spatial", stage2_lr=3e-3, stage2_floor_steps=40)
    args = training.parse_args([*train_flags(asdict(config)).split(), "--out", "x"])
    rebuilt = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    assert rebuilt == config


def test_the_card_reports_what_the_evaluation_measured(trained, tmp_path):
    from minillava.card import evaluate_and_card

    out = shutil.copytree(trained[0], tmp_path / "model")  # the card is written beside the weights
    write_eval_split(tmp_path / "split", rec_scenes=4, vqa_scenes=2, size=PRESETS["test"].image_size)
    evaluation = evaluate_and_card(out, tmp_path / "split", tmp_path / "results", device="cpu")
    card = (out / "README.md").read_text()
    assert json.loads((out / "evaluation.json").read_text()) == evaluation
    rec, vqa = evaluation["rec"]["summary"], evaluation["vqa"]["summary"]
    assert f"| REC | {rec['n_samples']} | ACC@0.5 | {rec['metrics']['acc@0.5']['value']:.3f}" in card
    assert f"| VQA | {vqa['n_samples']} | accuracy | {vqa['metrics']['accuracy']['value']:.3f}" in card
    assert set(evaluation["rec"]["by_kind"]) <= {"absolute", "attribute", "relational"}
    objects = evaluation["rec"]["objects_by_kind"]
    chance = {kind: entry["random_object"] for kind, entry in objects.items()}
    assert set(chance) == set(evaluation["rec"]["by_kind"])
    assert all(1 / 3 <= value <= 1 / 2 for value in chance.values())  # 2-3 objects a scene
    for kind, entry in objects.items():  # a box on the target is a box on some object
        assert entry["some_object"] >= evaluation["rec"]["by_kind"][kind]["acc@0.5"]["value"]
        assert f" | {entry['random_object']:.3f} | {entry['some_object']:.3f} |" in card
    near_chance = [kind for kind, value in chance.items()
                   if evaluation["rec"]["by_kind"][kind]["acc@0.5"]["value"] < value + 0.05]
    assert (f"On {' and '.join(near_chance)} expressions it scores at most 0.05 above" in card) == bool(near_chance)
    assert "the test size" in card and "--tower contrastive" in card
    assert ("VQA alone for the first 20 steps, then 50% REC, 15% captions, 12.5% where, "
            "12.5% region descriptions, 10% VQA") in card
    assert 'and captions and training-only "where is ...?" questions and region descriptions (a box in' in card


@pytest.mark.parametrize(("record", "field"), [({"id": "0042", "meta": {"kind": "attribute"}}, "'id'"),
                                               ({"id": "17/attribute", "meta": {}}, "'meta.kind'")])
def test_the_card_names_the_file_and_field_of_a_record_from_another_split(tmp_path, record, field):
    from minillava.card import rec_against_objects

    write_eval_split(tmp_path / "split", rec_scenes=2, vqa_scenes=1, size=PRESETS["test"].image_size)
    run = tmp_path / "rec"
    run.mkdir()
    (run / "samples.jsonl").write_text(json.dumps({"index": 0, "box": None, **record}) + "\n")
    with pytest.raises(ValueError, match=r"samples\.jsonl") as error:
        rec_against_objects(tmp_path / "split", run)
    assert field in str(error.value) and repr(record["id"]) in str(error.value)


def test_the_current_recipe_is_read_from_the_config(trained, tmp_path):
    from minillava.model import trained_with_current_init

    out, _ = trained
    assert trained_with_current_init(out)  # the LLM started at std hidden^-1/2
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["initializer_range"] = 0.02  # what the first shipped spatial miniature records
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not trained_with_current_init(tmp_path)
