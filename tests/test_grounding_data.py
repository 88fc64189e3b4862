"""Evaluation data on disk: every layout `load_dataset` reads, the restricted unpickler, and bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mllm
from grounding.data import load_dataset
from grounding.data.safe_pickle import load_plain_pickle
from grounding.errors import DatasetFormatError, SplitNotFoundError, UnsafePickleError
from grounding.fixtures import (
    COLOURS,
    synthetic_scenes,
    write_gqa_layout,
    write_jsonl_layout,
    write_parquet_layout,
    write_refer_layout,
)

# ---------------------------------------------------------------------------------------------- helpers


def xyxy(bbox):
    x, y, w, h = bbox
    return (x, y, x + w, y + h)


def write_hf_parquet(path: Path, scenes, *, first_id: int = 0, columns: tuple[str, ...] = ()) -> Path:
    """A parquet file as written by hand with pyarrow, in the HF / lmms-eval RefCOCO schema."""
    table = {
        "question_id": [str(first_id + i) for i in range(len(scenes))],
        "image": [{"bytes": scene.jpeg(), "path": f"{first_id + i}.jpg"} for i, scene in enumerate(scenes)],
        "answer": [scene.expressions for scene in scenes],
        "bbox": [list(scene.bbox) for scene in scenes],
        "file_name": [f"COCO_train2014_{first_id + i:012d}.jpg" for i in range(len(scenes))],
    }
    if columns:
        table = {name: values for name, values in table.items() if name in columns}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), path)
    return path


def parquet_path(root: Path, split: str = "val") -> Path:
    return root / "data" / f"{split}-00000-of-00001.parquet"


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(edit(value)))


def refs_path(root: Path, name: str = "refcoco", split_by: str = "unc") -> Path:
    return root / name / f"refs({split_by}).p"


def write_marker(path: str) -> None:
    """What a malicious pickle would call: it leaves a file behind, so the test can tell it ran."""
    Path(path).write_text("hacked")


class Payload:
    """Unpickling this calls `function(*args)`."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class Custom:
    def __init__(self) -> None:
        self.value = 1


def colour_near(pixel, colour: str, tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, COLOURS[colour]))


# ---------------------------------------------------------------------------------------------- parquet


def test_parquet_layout_gives_one_sample_per_expression(tmp_path):
    write_parquet_layout(tmp_path, count=5, rows_per_group=2)
    dataset = load_dataset("refcoco", tmp_path, "val")
    scenes = synthetic_scenes(5, 0)

    assert len(dataset) == 10
    assert dataset.task == "rec"
    assert (dataset.name, dataset.split) == ("refcoco", "val")
    assert [sample.index for sample in dataset] == list(range(10))
    assert [sample.id for sample in dataset] == [f"{1000 + row}/{k}" for row in range(5) for k in range(2)]
    for number, sample in enumerate(dataset):
        scene = scenes[number // 2]
        assert sample.text == scene.expressions[number % 2]
        assert sample.box == xyxy(scene.bbox)
        assert sample.answers == ()
        assert sample.problem is None
        assert sample.meta["question_id"] == str(1000 + number // 2)
        assert sample.meta["file_name"] == f"COCO_train2014_{number // 2:012d}.jpg"


def test_parquet_images_are_read_from_their_row_group(tmp_path):
    write_parquet_layout(tmp_path, count=5, rows_per_group=2)
    dataset = load_dataset("refcoco", tmp_path, "val")
    scenes = synthetic_scenes(5, 0)

    # Rows 0-1 are in row group 0, rows 2-3 in group 1, row 4 alone in group 2.
    assert [(sample.image.row_group, sample.image.row) for sample in dataset[::2]] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert dataset[8].image.path == parquet_path(tmp_path)
    for number in (8, 3, 0):  # last row group first, then back: each image is its own row's
        scene = scenes[number // 2]
        image = dataset[number].image.load()
        assert image.mode == "RGB"
        assert image.size == scene.image.size
        x1, y1, x2, y2 = xyxy(scene.bbox)
        assert colour_near(image.getpixel((int((x1 + x2) / 2), int((y1 + y2) / 2))), scene.colour)


def test_parquet_shards_directly_in_the_folder_are_read_in_order(tmp_path):
    scenes = synthetic_scenes(5, 3)
    write_hf_parquet(tmp_path / "test-00001-of-00002.parquet", scenes[3:], first_id=3)
    write_hf_parquet(tmp_path / "test-00000-of-00002.parquet", scenes[:3], first_id=0)
    write_hf_parquet(tmp_path / "val-00000-of-00001.parquet", synthetic_scenes(2, 9), first_id=50)

    dataset = load_dataset("refcoco+", tmp_path, "test")

    assert dataset.name == "refcoco+"
    assert len(dataset) == 10
    assert [sample.id for sample in dataset] == [f"{row}/{k}" for row in range(5) for k in range(2)]
    assert [sample.index for sample in dataset] == list(range(10))
    assert [sample.image.path.name for sample in dataset] == (
        ["test-00000-of-00002.parquet"] * 6 + ["test-00001-of-00002.parquet"] * 4)
    assert [sample.box for sample in dataset[::2]] == [xyxy(scene.bbox) for scene in scenes]
    assert dataset[7].image.load().size == scenes[3].image.size


# ---------------------------------------------------------------------------------------------- refer


def test_refer_layout_val_split(tmp_path):
    write_refer_layout(tmp_path)
    dataset = load_dataset("refcoco", tmp_path, "val")
    scenes = synthetic_scenes(6, 0)  # 2 refs per split, in order train, val, testA
    image_folder = (tmp_path / "images" / "train2014").resolve()

    assert dataset.task == "rec"
    assert dataset.source == refs_path(tmp_path)
    assert [sample.id for sample in dataset] == ["2/4", "2/5", "3/6", "3/7"]
    assert [sample.index for sample in dataset] == [0, 1, 2, 3]
    assert [sample.text for sample in dataset] == [*scenes[2].expressions, *scenes[3].expressions]
    assert [sample.box for sample in dataset] == [xyxy(scenes[2].bbox)] * 2 + [xyxy(scenes[3].bbox)] * 2
    assert [sample.image.path.resolve() for sample in dataset] == [
        image_folder / "COCO_train2014_000000000502.jpg"] * 2 + [image_folder / "COCO_train2014_000000000503.jpg"] * 2
    assert all(sample.problem is None for sample in dataset)
    assert dataset[0].meta["ann_id"] == 9002 and dataset[0].meta["image_id"] == 502
    assert dataset[2].image.load().size == scenes[3].image.size


@pytest.mark.parametrize(("split", "first_ref"), [("train", 0), ("testA", 4)])
def test_refer_layout_other_splits(tmp_path, split, first_ref):
    write_refer_layout(tmp_path)
    dataset = load_dataset("refcoco", tmp_path, split)
    scenes = synthetic_scenes(6, 0)

    assert dataset.split == split
    assert [sample.id for sample in dataset] == [
        f"{ref}/{2 * ref + k}" for ref in (first_ref, first_ref + 1) for k in range(2)]
    assert dataset[0].box == xyxy(scenes[first_ref].bbox)
    assert dataset[3].text == scenes[first_ref + 1].expressions[1]


@pytest.mark.parametrize("split_by", ["umd", None])
def test_refcocog_umd(tmp_path, split_by):
    write_refer_layout(tmp_path, name="refcocog", split_by="umd")
    dataset = load_dataset("refcocog", tmp_path, "val", split_by=split_by)  # umd is refcocog's default

    assert dataset.name == "refcocog"
    assert dataset.source == refs_path(tmp_path, "refcocog", "umd")
    assert [sample.id for sample in dataset] == ["2/4", "2/5", "3/6", "3/7"]


def test_refcocog_other_split_by_is_not_found(tmp_path):
    write_refer_layout(tmp_path, name="refcocog", split_by="umd")
    with pytest.raises(DatasetFormatError, match="refs"):
        load_dataset("refcocog", tmp_path, "val", split_by="google")


def test_refer_files_directly_in_the_folder(tmp_path):
    write_refer_layout(tmp_path)
    for name in ("refs(unc).p", "instances.json"):
        (tmp_path / "refcoco" / name).rename(tmp_path / name)
    (tmp_path / "refcoco").rmdir()

    dataset = load_dataset("refcoco", tmp_path, "val")

    assert dataset.source == tmp_path / "refs(unc).p"
    assert len(dataset) == 4
    assert dataset[0].image.path.resolve() == (tmp_path / "images/train2014/COCO_train2014_000000000502.jpg").resolve()


def test_refer_images_argument_overrides_the_folder(tmp_path):
    write_refer_layout(tmp_path / "refer")
    elsewhere = tmp_path / "coco" / "train2014"
    shutil.move(tmp_path / "refer" / "images" / "train2014", elsewhere)

    with pytest.raises(DatasetFormatError, match="train2014"):  # nothing left next to the annotations
        load_dataset("refcoco", tmp_path / "refer", "val")
    dataset = load_dataset("refcoco", tmp_path / "refer", "val", images=elsewhere)

    assert dataset[0].image.path == elsewhere / "COCO_train2014_000000000502.jpg"
    assert dataset[0].image.load().size == synthetic_scenes(6, 0)[2].image.size


def test_refer_images_argument_that_does_not_exist(tmp_path):
    write_refer_layout(tmp_path)
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("refcoco", tmp_path, "val", images=missing)
    assert str(missing) in str(error.value)


# ---------------------------------------------------------------------------------------------- restricted unpickler


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "function"])
def test_malicious_pickle_is_refused_without_running(tmp_path, kind, protocol):
    marker = tmp_path / "marker.txt"
    payload = {
        "os.system": Payload(os.system, f"echo hacked > '{marker}'"),
        "builtins.exec": Payload(exec, f"open({str(marker)!r}, 'w').write('hacked')"),
        "function": Payload(write_marker, str(marker)),
    }[kind]
    data = pickle.dumps([{"ref_id": 1}, payload], protocol=protocol)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)

    with pytest.raises(UnsafePickleError) as error:
        load_plain_pickle(path)

    assert str(path) in str(error.value)
    assert not marker.exists()
    pickle.loads(data)  # the control: an ordinary unpickler does run it
    assert marker.exists()


@pytest.mark.parametrize(("protocol", "asks_for"), [
    (0, "copy_reg._reconstructor"),  # protocols 0 and 1 rebuild objects through copyreg
    (2, f"{__name__}.Custom"),
    (5, f"{__name__}.Custom"),
])
def test_pickled_custom_class_is_refused(tmp_path, protocol, asks_for):
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps({"refs": [Custom()]}, protocol=protocol))
    with pytest.raises(UnsafePickleError) as error:
        load_plain_pickle(path)
    assert str(path) in str(error.value)
    assert f"asks for {asks_for}" in str(error.value)


@pytest.mark.parametrize("protocol", [2, 5])
def test_plain_containers_load_equal(tmp_path, protocol):
    value = {
        "list": [1, 2.5, -3, "four", None, True, False],
        "tuple": (1, ("nested", [2.0])),
        "set": {1, 2, 3},
        "frozenset": frozenset({"a", "b"}),
        "dict": {1: "int key", (1, 2): "tuple key", "unicode": "café ☕"},
        "big": 2**70,
        "empty": [[], {}, (), set(), ""],
    }
    path = tmp_path / "plain.p"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    assert load_plain_pickle(path) == value


def test_bytes_load_at_protocol_5(tmp_path):
    path = tmp_path / "bytes.p"
    path.write_bytes(pickle.dumps({"raw": b"\x00\xffabc"}, protocol=5))
    assert load_plain_pickle(path) == {"raw": b"\x00\xffabc"}


@pytest.mark.parametrize("content", [b"", b"this is not a pickle", pickle.dumps([1, 2, 3])[:-3]])
def test_unreadable_pickle_is_a_format_error(tmp_path, content):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(content)
    with pytest.raises(DatasetFormatError) as error:
        load_plain_pickle(path)
    assert str(path) in str(error.value)


def test_load_dataset_refuses_a_malicious_refs_pickle(tmp_path):
    write_refer_layout(tmp_path)
    marker = tmp_path / "marker.txt"
    path = refs_path(tmp_path)
    path.write_bytes(pickle.dumps([Payload(write_marker, str(marker))], protocol=2))

    with pytest.raises(UnsafePickleError) as error:
        load_dataset("refcoco", tmp_path, "val")

    assert str(path) in str(error.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- GQA


@pytest.mark.parametrize("split", ["testdev", "testdev_balanced"])
def test_gqa_layout(tmp_path, split):
    write_gqa_layout(tmp_path)
    dataset = load_dataset("gqa", tmp_path, split)
    scenes = synthetic_scenes(6, 0)

    assert dataset.task == "vqa"
    assert dataset.split == split
    assert dataset.source == tmp_path / "questions" / "testdev_balanced_questions.json"
    assert len(dataset) == 6
    assert [sample.id for sample in dataset] == [str(2000 + n) for n in range(6)]
    assert [sample.index for sample in dataset] == list(range(6))
    assert [sample.answers for sample in dataset] == [(scene.colour,) for scene in scenes]
    assert all(sample.text == "What colour is the box?" and sample.box is None for sample in dataset)
    assert dataset[4].image.path == tmp_path / "images" / "n000004.jpg"
    assert dataset[4].image.load().size == scenes[4].image.size


def test_gqa_images_argument(tmp_path):
    write_gqa_layout(tmp_path / "gqa")
    elsewhere = tmp_path / "gqa-images"
    shutil.move(tmp_path / "gqa" / "images", elsewhere)
    dataset = load_dataset("gqa", tmp_path / "gqa", "testdev", images=elsewhere)
    assert dataset[1].image.path == elsewhere / "n000001.jpg"


def test_gqa_without_image_folder(tmp_path):
    write_gqa_layout(tmp_path)
    shutil.rmtree(tmp_path / "images")
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("gqa", tmp_path, "testdev")
    assert str(tmp_path / "images") in str(error.value)


# ---------------------------------------------------------------------------------------------- JSONL


@pytest.mark.parametrize("use_file", [False, True])
def test_jsonl_layout(tmp_path, use_file):
    write_jsonl_layout(tmp_path)
    dataset = load_dataset("jsonl", tmp_path / "val.jsonl" if use_file else tmp_path, "val")
    scenes = synthetic_scenes(6, 0)

    assert dataset.task == "rec"
    assert dataset.source == tmp_path / "val.jsonl"
    assert [sample.id for sample in dataset] == [f"scene-{n}" for n in range(6)]
    assert [sample.index for sample in dataset] == list(range(6))
    assert [sample.text for sample in dataset] == [scene.expressions[0] for scene in scenes]
    assert [sample.box for sample in dataset] == [xyxy(scene.bbox) for scene in scenes]
    assert dataset[5].image.path == tmp_path / "images" / "5.png"
    assert dataset[5].image.load().size == scenes[5].image.size


def test_jsonl_bbox_xywh_gives_the_same_box(tmp_path):
    lines = [
        {"image": "a.png", "expression": "the cup", "box": [10, 20, 40, 60]},
        {"image": "a.png", "expression": "the cup", "bbox": [10, 20, 30, 40]},
    ]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = load_dataset("jsonl", tmp_path, "val")
    assert dataset[0].box == dataset[1].box == (10.0, 20.0, 40.0, 60.0)
    assert [sample.id for sample in dataset] == ["1", "2"]  # line numbers when there is no "id"


def test_jsonl_vqa(tmp_path):
    lines = [
        {"id": "q1", "image": "img/1.jpg", "question": "what colour is the cup?", "answers": ["red", "dark red"]},
        "",
        {"id": "q2", "image": "/abs/2.jpg", "question": "how many?", "answers": [2]},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(line) if line else "" for line in lines))
    dataset = load_dataset("jsonl", path, "test")

    assert dataset.task == "vqa"
    assert dataset.split == "test"
    assert [sample.id for sample in dataset] == ["q1", "q2"]
    assert [sample.index for sample in dataset] == [0, 1]
    assert dataset[0].text == "what colour is the cup?"
    assert dataset[0].answers == ("red", "dark red")
    assert dataset[1].answers == ("2",)
    assert dataset[0].box is None
    assert dataset[0].image.path == tmp_path / "img" / "1.jpg"
    assert dataset[1].image.path == Path("/abs/2.jpg")


# ---------------------------------------------------------------------------------------------- bad input: splits


@pytest.mark.parametrize(("name", "write", "found"), [
    ("refcoco", write_parquet_layout, ["val"]),
    ("refcoco", write_refer_layout, ["testA", "train", "val"]),
    ("gqa", write_gqa_layout, ["testdev_balanced"]),
    ("jsonl", write_jsonl_layout, ["val"]),
])
def test_missing_split_lists_the_splits_found(tmp_path, name, write, found):
    write(tmp_path)
    with pytest.raises(SplitNotFoundError) as error:
        load_dataset(name, tmp_path, "testB")
    message = str(error.value)
    assert str(tmp_path) in message
    assert "'testB'" in message or "testB.jsonl" in message
    assert f"splits found: {found!r}" in message


# ---------------------------------------------------------------------------------------------- bad input: refer


@pytest.mark.parametrize(("edit", "field"), [
    (lambda instances: [instances], "list"),
    (lambda instances: {"images": instances["images"]}, "'annotations'"),
    (lambda instances: {"annotations": instances["annotations"]}, "'images'"),
])
def test_bad_instances_json(tmp_path, edit, field):
    write_refer_layout(tmp_path)
    path = tmp_path / "refcoco" / "instances.json"
    edit_json(path, edit)
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("refcoco", tmp_path, "val")
    assert str(path) in str(error.value)
    assert field in str(error.value)


def test_instances_json_that_is_not_json(tmp_path):
    write_refer_layout(tmp_path)
    path = tmp_path / "refcoco" / "instances.json"
    path.write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not valid JSON") as error:
        load_dataset("refcoco", tmp_path, "val")
    assert str(path) in str(error.value)


def test_missing_instances_json(tmp_path):
    write_refer_layout(tmp_path)
    path = tmp_path / "refcoco" / "instances.json"
    path.unlink()
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("refcoco", tmp_path, "val")
    assert str(path) in str(error.value)


def rewrite_refs(root: Path, edit) -> Path:
    path = refs_path(root)
    path.write_bytes(pickle.dumps(edit(pickle.loads(path.read_bytes())), protocol=2))
    return path


def drop_field(refs: list, position: int, field: str) -> list:
    del refs[position][field]
    return refs


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda refs: {"refs": refs}, "found dict"),
    (lambda refs: [*refs, "a string"], "ref 6 is a str"),
    (lambda refs: drop_field(refs, 3, "sentences"), "ref 3 has no field 'sentences'"),
    (lambda refs: drop_field(refs, 0, "split"), "ref 0 has no field 'split'"),
])
def test_bad_refs_pickle(tmp_path, edit, expected):
    write_refer_layout(tmp_path)
    path = rewrite_refs(tmp_path, edit)
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("refcoco", tmp_path, "val")
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_refer_bbox_of_three_numbers_names_instances_json(tmp_path):
    write_refer_layout(tmp_path)
    path = tmp_path / "refcoco" / "instances.json"

    def edit(instances):
        instances["annotations"][2]["bbox"] = [1, 2, 3]  # annotation 9002, the first val ref's
        return instances

    edit_json(path, edit)
    dataset = load_dataset("refcoco", tmp_path, "val")  # one bad annotation: that sample is kept, marked
    assert dataset[0].box is None and dataset[1].box is None  # both sentences of the ref
    assert str(path) in dataset[0].problem and "field 'bbox' is [1, 2, 3]" in dataset[0].problem
    assert dataset[2].problem is None


# ---------------------------------------------------------------------------------------------- bad input: parquet


def test_parquet_missing_bbox_column(tmp_path):
    path = write_hf_parquet(tmp_path / "data" / "val-00000-of-00001.parquet", synthetic_scenes(2, 0),
                            columns=("question_id", "image", "answer", "file_name"))
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("refcoco", tmp_path, "val")
    assert str(path) in str(error.value)
    assert "['bbox']" in str(error.value)


def test_parquet_file_that_is_not_parquet(tmp_path):
    path = tmp_path / "val.parquet"
    path.write_bytes(b"PAR1 but not really")
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("refcoco", tmp_path, "val")
    assert str(path) in str(error.value)


def test_parquet_row_without_image_bytes_is_an_image_load_error(tmp_path):
    path = tmp_path / "val.parquet"
    pq.write_table(pa.table({"question_id": ["1"], "image": [{"bytes": None, "path": "x.jpg"}],
                             "answer": [["the cup"]], "bbox": [[1.0, 2.0, 3.0, 4.0]]}), path)
    dataset = load_dataset("refcoco", tmp_path, "val")
    with pytest.raises(mllm.ImageLoadError) as error:
        dataset[0].image.load()
    assert str(path) in str(error.value)


def test_parquet_corrupt_image_bytes_is_an_image_load_error(tmp_path):
    path = tmp_path / "val.parquet"
    pq.write_table(pa.table({"question_id": ["1"], "image": [{"bytes": b"not a jpeg", "path": "x.jpg"}],
                             "answer": [["the cup"]], "bbox": [[1.0, 2.0, 3.0, 4.0]]}), path)
    dataset = load_dataset("refcoco", tmp_path, "val")
    with pytest.raises(mllm.ImageLoadError) as error:
        dataset[0].image.load()
    assert f"{path} (row group 0, row 0)" in str(error.value)


# ---------------------------------------------------------------------------------------------- bad input: GQA


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda questions: list(questions.values()), "found a JSON list"),
    (lambda questions: {**questions, "2003": {"imageId": "n000003", "question": "?"}},
     "question '2003' has no field 'answer'"),
    (lambda questions: {**questions, "2001": "just a string"}, "question '2001' has no field"),
])
def test_bad_gqa_questions(tmp_path, edit, expected):
    write_gqa_layout(tmp_path)
    path = tmp_path / "questions" / "testdev_balanced_questions.json"
    edit_json(path, edit)
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("gqa", tmp_path, "testdev")
    assert str(path) in str(error.value)
    assert expected in str(error.value)


# ---------------------------------------------------------------------------------------------- bad input: JSONL


@pytest.mark.parametrize(("second_line", "expected"), [
    ('{"image": "a.png", "expression": "x", "box": [1, 2, 3, 4]', "not valid JSON"),
    ('{"expression": "x", "box": [1, 2, 3, 4]}', "field 'image'"),
    ('{"image": "a.png", "expression": "x", "box": [1, 2, 3]}', "field 'box' must be a list of 4 numbers"),
    ('{"image": "a.png", "expression": "x", "bbox": [1, "2", 3, 4]}', "field 'bbox' must be a list of 4 numbers"),
    ('{"image": "a.png", "box": [1, 2, 3, 4]}', "field 'expression'"),
    ('{"image": "a.png", "expression": "x"}', "no field 'box' or 'bbox'"),
    ('{"image": "a.png", "question": "q?", "answers": ["a"]}', "a vqa line in a rec file"),
    ('[1, 2]', "field 'image'"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, second_line, expected):
    path = tmp_path / "val.jsonl"
    path.write_text('{"image": "a.png", "expression": "x", "box": [1, 2, 3, 4]}\n' + second_line + "\n")
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("jsonl", tmp_path, "val")
    assert f"{path}:2" in str(error.value)
    assert expected in str(error.value)


def test_empty_jsonl(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DatasetFormatError, match="no samples") as error:
        load_dataset("jsonl", tmp_path, "val")
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------------- bad input: images


@pytest.mark.parametrize(("name", "write", "split"), [
    ("refcoco", write_refer_layout, "val"),
    ("gqa", write_gqa_layout, "testdev"),
    ("jsonl", write_jsonl_layout, "val"),
])
def test_missing_image_file_fails_only_when_loaded(tmp_path, name, write, split):
    write(tmp_path)
    missing = load_dataset(name, tmp_path, split)[0].image.path
    missing.unlink()

    dataset = load_dataset(name, tmp_path, split)  # loading the dataset does not open images

    assert dataset[0].image.path == missing
    with pytest.raises(mllm.ImageLoadError) as error:
        dataset[0].image.load()
    assert str(missing) in str(error.value)
    assert dataset[len(dataset) - 1].image.load().mode == "RGB"  # the others still load


# ---------------------------------------------------------------------------------------------- bad input: boxes


def test_zero_area_box_in_parquet_is_kept_with_a_problem(tmp_path):
    write_parquet_layout(tmp_path, count=3, rows_per_group=2)
    path = parquet_path(tmp_path)
    table = pq.read_table(path)
    bboxes = table.column("bbox").to_pylist()
    bboxes[1][2] = 0.0  # w = 0
    table = table.set_column(table.schema.get_field_index("bbox"), "bbox", pa.array(bboxes))
    pq.write_table(table, path, row_group_size=2)

    dataset = load_dataset("refcoco", tmp_path, "val")

    assert len(dataset) == 6
    x, y, _, h = bboxes[1]
    for sample in dataset[2:4]:
        assert sample.box == (x, y, x, y + h)
        assert str(path) in sample.problem
        assert "zero area" in sample.problem
    assert [sample.problem for sample in (*dataset[:2], *dataset[4:])] == [None] * 4


def test_zero_area_box_in_refer_is_kept_with_a_problem(tmp_path):
    write_refer_layout(tmp_path)
    path = tmp_path / "refcoco" / "instances.json"

    def edit(instances):
        instances["annotations"][3]["bbox"][2] = 0  # annotation 9003: the second val ref
        return instances

    edit_json(path, edit)
    dataset = load_dataset("refcoco", tmp_path, "val")

    assert [sample.id for sample in dataset] == ["2/4", "2/5", "3/6", "3/7"]
    assert [sample.problem for sample in dataset[:2]] == [None, None]
    for sample in dataset[2:]:
        assert str(path) in sample.problem
        assert "zero area" in sample.problem
        assert sample.box[0] == sample.box[2]


def test_zero_area_box_in_jsonl_is_kept_with_a_problem(tmp_path):
    lines = [
        {"image": "a.png", "expression": "one", "box": [1, 2, 3, 4]},
        {"image": "a.png", "expression": "two", "bbox": [5, 6, 0, 4]},
        {"image": "a.png", "expression": "three", "box": [7, 8, 7, 9]},
        {"image": "a.png", "expression": "four", "box": [1, 1, 2, 2]},
    ]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = load_dataset("jsonl", tmp_path, "val")

    assert [sample.text for sample in dataset] == ["one", "two", "three", "four"]
    assert dataset[1].box == (5.0, 6.0, 5.0, 10.0)
    assert [sample.problem is None for sample in dataset] == [True, False, False, True]
    for sample, line in ((dataset[1], 2), (dataset[2], 3)):
        assert f"{path}:{line}" in sample.problem
        assert "zero area" in sample.problem


# ---------------------------------------------------------------------------------------------- bad input: name, path


def test_unknown_dataset_name(tmp_path):
    write_jsonl_layout(tmp_path)
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("coco", tmp_path, "val")
    assert "'coco'" in str(error.value)


@pytest.mark.parametrize("name", ["refcoco", "gqa", "jsonl", "coco"])
def test_nonexistent_data_path(tmp_path, name):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(DatasetFormatError) as error:
        load_dataset(name, missing, "val")
    assert str(missing) in str(error.value)


def test_rec_folder_with_neither_layout(tmp_path):
    write_gqa_layout(tmp_path)
    with pytest.raises(DatasetFormatError) as error:
        load_dataset("refcoco", tmp_path, "val")
    assert str(tmp_path) in str(error.value)
    assert "parquet" in str(error.value)
    assert "refs(*).p for refcoco" in str(error.value)
