"""What every dataset loader returns: samples whose images stay on disk until asked for."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from grounding.errors import DatasetFormatError
from mllm.errors import ImageLoadError
from mllm.images import load_image

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the original image
Task = Literal["rec", "vqa"]


@dataclass(frozen=True)
class ImageRef:
    """Where a sample's image lives: a file, or one row of a parquet file's HF `image` column."""

    path: Path
    row_group: int | None = None
    row: int | None = None  # row inside `row_group`

    def __str__(self) -> str:
        return str(self.path) if self.row is None else f"{self.path} (row group {self.row_group}, row {self.row})"

    def load(self) -> Image.Image:
        """Decode the image as RGB; raises `mllm.ImageLoadError` naming the file."""
        if self.row is None:
            return load_image(self.path)
        from grounding.data.parquet import read_image_bytes

        try:
            return load_image(read_image_bytes(self))
        except ImageLoadError as error:
            raise ImageLoadError(f"{self}: {error}") from error


@dataclass(frozen=True)
class Sample:
    """One evaluation item: `box` for REC, `answers` for VQA.

    `problem` is set by the loader when the sample cannot be scored (a zero-area box, say); the
    evaluation records it and counts it instead of dropping it.
    """

    index: int  # position in the dataset as loaded: stable across runs, used to shard and resume
    id: str
    image: ImageRef
    text: str  # the referring expression or the question
    box: Box | None = None
    answers: tuple[str, ...] = ()
    problem: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Dataset:
    """The samples of one split, and where they came from."""

    name: str
    split: str
    task: Task
    source: Path
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def __iter__(self):
        return iter(self.samples)


def read_json_object(path: Path, what: str) -> dict:
    """Parse `path` as a JSON object; `what` names the object expected, for the error message."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise DatasetFormatError(f"{path}: expected {what}, found a JSON {type(value).__name__}")
    return value


def checked_box(x: float, y: float, w: float, h: float) -> tuple[Box, str | None]:
    """[x, y, w, h] -> ([x1, y1, x2, y2], problem or None)."""
    box = (float(x), float(y), float(x) + float(w), float(y) + float(h))
    problem = None if w > 0 and h > 0 else f"box [x, y, w, h] = {[x, y, w, h]} has zero area"
    return box, problem


def four_numbers(value: object) -> bool:
    """Whether a box field holds exactly four numbers (booleans are not numbers here)."""
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def xywh_box(value: object, where: str) -> tuple[Box | None, str | None]:
    """An annotation's `bbox` field -> (box, None), or (box or None, the problem naming `where`)."""
    if not four_numbers(value):
        return None, f"{where} field 'bbox' is {value!r}, not [x, y, w, h]"
    box, problem = checked_box(*value)
    return box, problem and f"{where} field 'bbox': {problem}"
