"""Small datasets in each real on-disk layout, drawn from synthetic scenes: for tests and demos.

Each scene is a non-square noisy image with one coloured rectangle; the expression names its colour
and the target is that rectangle. `write_all(root)` writes every layout `load_dataset` reads.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels
    colour: str

    @property
    def expressions(self) -> list[str]:
        return [f"the {self.colour} box", f"{self.colour} rectangle"]

    def jpeg(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()


def synthetic_scenes(count: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        width, height = int(rng.integers(40, 97)), int(rng.integers(40, 97))
        pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
        w, h = int(rng.integers(8, width // 2)), int(rng.integers(8, height // 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        pixels[y : y + h, x : x + w] = COLOURS[colour]
        scenes.append(Scene(Image.fromarray(pixels), (float(x), float(y), float(w), float(h)), colour))
    return scenes


def write_parquet_layout(root: str | Path, *, split: str = "val", count: int = 6, rows_per_group: int = 4,
                         seed: int = 0) -> Path:
    """lmms-eval's layout: `root/data/{split}-00000-of-00001.parquet`, HF `image` struct, xywh `bbox`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    scenes = synthetic_scenes(count, seed)
    table = pa.table({
        "question_id": [str(1000 + i) for i in range(count)],
        "image": [{"bytes": scene.jpeg(), "path": None} for scene in scenes],
        "question": ["Please carefully observe the area circled in the image and come up with a caption."] * count,
        "answer": [scene.expressions for scene in scenes],
        "segmentation": [[] for _ in scenes],
        "bbox": [list(scene.bbox) for scene in scenes],
        "iscrowd": [0] * count,
        "file_name": [f"COCO_train2014_{i:012d}.jpg" for i in range(count)],
    })
    pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet", row_group_size=rows_per_group)
    return root


def coco_file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def write_refer_layout(root: str | Path, *, name: str = "refcoco", split_by: str = "unc",
                       splits: tuple[str, ...] = ("train", "val", "testA"), per_split: int = 2, seed: int = 0) -> Path:
    """The refer toolkit's layout: `root/{name}/refs({split_by}).p` + `instances.json`, `root/images/train2014`."""
    root = Path(root)
    annotations_dir, images_dir = root / name, root / "images" / "train2014"
    annotations_dir.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    scenes = synthetic_scenes(per_split * len(splits), seed)
    refs, images, annotations = [], [], []
    for number, scene in enumerate(scenes):
        image_id, ann_id = 500 + number, 9000 + number
        scene.image.save(images_dir / coco_file_name(image_id), quality=95)
        images.append({"id": image_id, "file_name": coco_file_name(image_id), "width": scene.image.width,
                       "height": scene.image.height})
        annotations.append({"id": ann_id, "image_id": image_id, "bbox": list(scene.bbox), "category_id": 1,
                            "area": scene.bbox[2] * scene.bbox[3], "iscrowd": 0, "segmentation": []})
        refs.append({
            "ref_id": number, "ann_id": ann_id, "image_id": image_id, "split": splits[number // per_split],
            "category_id": 1, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "sent_ids": [2 * number, 2 * number + 1],
            "sentences": [{"sent_id": 2 * number + k, "sent": text, "raw": text, "tokens": text.split()}
                          for k, text in enumerate(scene.expressions)],
        })
    # Protocol 2, as the refer pickles were written by Python 2.
    (annotations_dir / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    (annotations_dir / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}))
    return root


def write_gqa_layout(root: str | Path, *, split: str = "testdev_balanced", count: int = 6, seed: int = 0) -> Path:
    """GQA's layout: `root/questions/{split}_questions.json` and `root/images/{imageId}.jpg`."""
    root = Path(root)
    (root / "questions").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    questions = {}
    for number, scene in enumerate(synthetic_scenes(count, seed)):
        image_id = f"n{number:06d}"
        scene.image.save(root / "images" / f"{image_id}.jpg", quality=95)
        questions[f"{2000 + number}"] = {"imageId": image_id, "question": "What colour is the box?",
                                         "answer": scene.colour, "fullAnswer": f"The box is {scene.colour}."}
    (root / "questions" / f"{split}_questions.json").write_text(json.dumps(questions))
    return root


def write_jsonl_layout(root: str | Path, *, split: str = "val", count: int = 6, seed: int = 0) -> Path:
    """The toolkit's own JSONL: image path relative to the file, expression, xyxy pixel `box`."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for number, scene in enumerate(synthetic_scenes(count, seed)):
        scene.image.save(root / "images" / f"{number}.png")
        x, y, w, h = scene.bbox
        lines.append(json.dumps({"id": f"scene-{number}", "image": f"images/{number}.png",
                                 "expression": scene.expressions[0], "box": [x, y, x + w, y + h]}))
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root
