"""Custom data as JSONL, one sample per line; relative image paths are relative to the file.

REC:  {"image": "img/1.jpg", "expression": "the red cup", "box": [x1, y1, x2, y2]}  (pixels)
      or "bbox": [x, y, w, h] (pixels, COCO order) instead of "box"
VQA:  {"image": "img/1.jpg", "question": "what colour is the cup?", "answers": ["red"]}
An optional "id" names the sample (default: its line number); any other field (say "kind") is kept in
the sample's `meta` and written into its result record.
"""

from __future__ import annotations

import json
from pathlib import Path

from grounding.data.samples import Box, Dataset, ImageRef, Sample, checked_box, four_numbers
from grounding.errors import DatasetFormatError, SplitNotFoundError

_KNOWN_FIELDS = frozenset({"id", "image", "expression", "question", "box", "bbox", "answers"})


def jsonl_file(root: Path, split: str) -> Path:
    if root.is_file():
        return root
    path = root / f"{split}.jsonl"
    if not path.is_file():
        found = sorted(p.stem for p in root.glob("*.jsonl"))
        raise SplitNotFoundError(f"{root}: no {split}.jsonl; splits found: {found or 'none'}")
    return path


def _numbers(value: object, where: str, field: str) -> list[float]:
    if not four_numbers(value):
        raise DatasetFormatError(f"{where}: field '{field}' must be a list of 4 numbers, got {value!r}")
    return [float(v) for v in value]


def _rec_box(entry: dict, where: str) -> tuple[Box, str | None]:
    if "box" in entry:
        x1, y1, x2, y2 = _numbers(entry["box"], where, "box")
        return checked_box(x1, y1, x2 - x1, y2 - y1)
    return checked_box(*_numbers(entry["bbox"], where, "bbox"))


def load_jsonl(path_or_dir: str | Path, split: str, *, name: str = "jsonl") -> Dataset:
    path = jsonl_file(Path(path_or_dir), split)
    samples, task = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetFormatError(f"{where}: not valid JSON: {error}") from error
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetFormatError(f"{where}: each line must be an object with field 'image'")
        line_task = "rec" if ("box" in entry or "bbox" in entry) else "vqa" if "answers" in entry else None
        if line_task is None:
            raise DatasetFormatError(f"{where}: no field 'box' or 'bbox' (REC) nor 'answers' (VQA)")
        if task is not None and line_task != task:
            raise DatasetFormatError(f"{where}: a {line_task} line in a {task} file; keep one task per file")
        task = line_task
        text_field = "expression" if task == "rec" else "question"
        if not isinstance(entry.get(text_field), str):
            raise DatasetFormatError(f"{where}: field '{text_field}' is missing or not a string")
        image = ImageRef(path.parent / entry["image"])  # an absolute path stays absolute
        meta = {key: value for key, value in entry.items() if key not in _KNOWN_FIELDS}
        common = {"index": len(samples), "id": str(entry.get("id", number)), "image": image,
                  "text": entry[text_field], "meta": meta}
        if task == "rec":
            box, problem = _rec_box(entry, where)
            samples.append(Sample(**common, box=box, problem=problem and f"{where}: {problem}"))
        else:
            answers = entry["answers"]
            if not isinstance(answers, list) or not answers:
                raise DatasetFormatError(f"{where}: field 'answers' must be a non-empty list of strings")
            samples.append(Sample(**common, answers=tuple(str(a) for a in answers)))
    if task is None:
        raise DatasetFormatError(f"{path}: no samples")
    return Dataset(name=name, split=split, task=task, source=path, samples=samples)
