"""The synthetic world: unambiguous expressions, boxes inside the image, captions without locations."""

import json
import random
import re

import numpy as np
import pytest
import torch

from grounding.boxes import parse_box
from grounding.data import load_dataset
from minillava.split import sample_id, scene_seed_of, write_eval_split
from minillava.world import (
    LOCATION_WORDS,
    TRAIN_SEED_OFFSET,
    Scene,
    SceneObject,
    box_answer,
    caption,
    cell_name,
    make_scene,
    referring_expressions,
    render,
    resolve,
    shape_mask,
    shape_variants,
    vqa_questions,
    where_questions,
)

SEEDS = range(400)


def words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def test_every_expression_refers_to_exactly_its_target():
    kinds = set()
    for seed in SEEDS:
        scene = make_scene(seed)
        for ref in referring_expressions(scene, random.Random(seed)):
            assert resolve(ref.text, scene) == [ref.target], (seed, ref)
            kinds.add(ref.kind)
    assert kinds == {"attribute", "relational", "absolute"}


def test_resolve_sees_ambiguity_and_relations():
    left = SceneObject("circle", "red", (2, 20, 14, 32))
    right = SceneObject("circle", "red", (40, 20, 52, 32))
    anchor = SceneObject("cross", "blue", (22, 40, 34, 52))
    scene = Scene(64, (left, right, anchor), seed=0)
    assert resolve("the red circle", scene) == [0, 1]
    assert resolve("the circle left of the blue cross", scene) == [0]
    assert resolve("the circle right of the cross", scene) == [1]
    assert resolve("the object at the bottom", scene) == [2]
    assert resolve("the green square", scene) == []
    with pytest.raises(ValueError, match="not an expression"):
        resolve("the thing over there", scene)


def test_scenes_are_deterministic_and_objects_inside_and_apart():
    for seed in SEEDS:
        scene = make_scene(seed)
        assert scene == make_scene(seed)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= scene.size and 0 <= y1 < y2 <= scene.size
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                overlap_x = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
                overlap_y = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                assert overlap_x <= 0 or overlap_y <= 0
    assert np.array_equal(np.asarray(render(make_scene(3))), np.asarray(render(make_scene(3))))
    assert not np.array_equal(np.asarray(render(make_scene(3))), np.asarray(render(make_scene(4))))


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "cross"])
def test_every_shape_touches_all_four_sides_of_its_box(shape):
    mask = shape_mask(shape, 17, 13)
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_rendered_object_has_its_colour_inside_its_box():
    scene = make_scene(11)
    image = np.asarray(scene.render()).astype(float)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        inside = image[y1:y2, x1:x2][shape_mask(obj.shape, x2 - x1, y2 - y1)].mean(axis=0)
        from minillava.world import COLORS

        assert np.abs(inside - COLORS[obj.color]).max() < 30


def test_captions_and_questions_never_mention_a_location():
    for seed in SEEDS:
        scene = make_scene(seed)
        rng = random.Random(seed)
        text = caption(scene, rng)
        assert not words(text) & LOCATION_WORDS, text
        assert text.count(" a ") + text.startswith("a ") == len(scene.objects)
        for question in vqa_questions(scene, rng):
            assert not words(question.text) & LOCATION_WORDS, question


def test_vqa_answers_are_right():
    for seed in SEEDS:
        scene = make_scene(seed)
        for q in vqa_questions(scene, random.Random(seed)):
            if q.kind == "count":
                noun = q.text.removeprefix("how many ").removesuffix(" are there?")
                expected = sum(o.shape + "s" == noun or f"{o.color} objects" == noun for o in scene.objects)
                assert q.answer == str(expected)
            elif q.kind == "exist":
                color, shape = q.text.removeprefix("is there a ").removesuffix("?").split()
                present = any(o.color == color and o.shape == shape for o in scene.objects)
                assert q.answer == ("yes" if present else "no")
            elif q.kind == "color":
                shape = q.text.removeprefix("what color is the ").removesuffix("?")
                assert [o.color for o in scene.objects if o.shape == shape] == [q.answer]
            else:
                color = q.text.removeprefix("what shape is the ").removesuffix(" object?")
                assert [o.shape for o in scene.objects if o.color == color] == [q.answer]


def test_where_questions_name_one_object_by_attribute_and_answer_its_cell():
    cells = set()
    for seed in SEEDS:
        scene = make_scene(seed)
        questions = where_questions(scene, random.Random(seed))
        for question in questions:
            expression = re.fullmatch(r"where is (.+)\?", question.text).group(1)
            assert not words(expression) & LOCATION_WORDS, question.text  # found by colour and shape alone
            (target,) = resolve(expression, scene)
            assert question.answer == cell_name(scene.objects[target], scene.size)
            cells.add(question.answer)
    assert len(cells) == 9


@pytest.mark.parametrize(("center", "cell"), [((2, 2), "top left"), ((32, 2), "top"), ((62, 32), "right"),
                                              ((32, 32), "middle"), ((20, 44), "bottom left"),
                                              ((63, 63), "bottom right")])
def test_cell_name_reads_the_centre_on_a_3x3_grid(center, cell):
    x, y = center
    assert cell_name(SceneObject("circle", "red", (x - 1, y - 1, x + 1, y + 1)), 64) == cell


def test_box_answer_is_llava_format_and_parses_back():
    text = box_answer((9, 34, 26, 55), 64)
    assert text == "[0.14, 0.53, 0.41, 0.86]"
    assert parse_box(text).values == (0.14, 0.53, 0.41, 0.86)


def test_eval_split_loads_through_grounding_with_kinds(tmp_path):
    description = write_eval_split(tmp_path, rec_scenes=12, vqa_scenes=8, size=32, seed=5)
    rec = load_dataset("jsonl", tmp_path / "rec", "val")
    vqa = load_dataset("jsonl", tmp_path / "vqa", "val")
    assert (len(rec), len(vqa)) == (description["rec_samples"], description["vqa_samples"])
    assert rec.task == "rec" and vqa.task == "vqa"
    assert {s.meta["kind"] for s in rec} <= {"attribute", "relational", "absolute"}
    assert len({s.id for s in rec}) == len(rec)
    for sample in rec:
        image = sample.image.load()
        assert image.size == (32, 32)
        x1, y1, x2, y2 = sample.box
        assert 0 <= x1 < x2 <= 32 and 0 <= y1 < y2 <= 32
        seed = scene_seed_of(sample.id)
        assert 5 <= seed < 5 + 12 < TRAIN_SEED_OFFSET
        assert resolve(sample.text, make_scene(seed, 32)) != []


def test_sample_ids_name_their_scene_and_refuse_other_formats():
    assert scene_seed_of(sample_id(417, "attribute")) == 417
    for bad in ("417", "abc/attribute", "417/", "coco_123"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            scene_seed_of(bad)


def test_caption_batches_hold_groups_that_differ_only_in_shape():
    from minillava.model import build_tokenizer
    from minillava.train import TrainConfig, caption_batch, to_pixels

    config = TrainConfig(preset="test", stage1_batch=8, stage1_group=4)
    tokenizer = build_tokenizer()
    images, ids, lengths = caption_batch(3, config, tokenizer)
    pixels = to_pixels(images)
    assert pixels.shape == (8, 3, 32, 32) and ids.shape[0] == 8
    captions = [tokenizer.decode(row[:n - 1]) for row, n in zip(ids.tolist(), lengths.tolist())]
    for group in (captions[:4], captions[4:]):
        colours = [sorted(re.findall(r"a (\w+) ", text)) for text in group]
        assert all(c == colours[0] for c in colours)
    assert not torch.equal(pixels[0], pixels[4])


def test_shipped_split_is_what_the_generator_writes(tmp_path, repo_root):
    shipped = repo_root / "data" / "minillava" / "eval"
    description = json.loads((shipped / "split.json").read_text())
    write_eval_split(tmp_path, rec_scenes=description["rec_scenes"], vqa_scenes=description["vqa_scenes"],
                     size=description["size"], seed=description["seed"])
    for task in ("rec", "vqa"):
        assert (tmp_path / task / "val.jsonl").read_text() == (shipped / task / "val.jsonl").read_text()
    assert description["rec_samples"] >= 1000
    for name in ("000000.png", "000399.png", "000650.png"):
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / name)),
                              np.asarray(Image.open(shipped / "images" / name)))


def test_shape_variants_keep_places_colours_and_background():
    scene = make_scene(21)
    rng = random.Random(0)
    variants = shape_variants(scene, 8, rng)
    assert variants[0] is scene and len(variants) == 8
    for variant in variants:
        assert [(o.color, o.box) for o in variant.objects] == [(o.color, o.box) for o in scene.objects]
    assert len({tuple(o.shape for o in v.objects) for v in variants}) == 8  # no two share a caption's content
    with pytest.raises(ValueError, match="shape variants"):
        shape_variants(scene, 4 ** len(scene.objects) + 1, rng)
    outside = np.ones((64, 64), dtype=bool)  # the background, noise included, is the same picture
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        outside[y1:y2, x1:x2] = False
    original = np.asarray(render(scene))
    assert all(np.array_equal(np.asarray(render(v))[outside], original[outside]) for v in variants)
