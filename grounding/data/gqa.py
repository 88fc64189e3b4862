"""GQA-style VQA: a questions JSON (GQA's `{split}_questions.json`) and an image folder.

The JSON maps question IDs to `{"imageId", "question", "answer", ...}` as GQA releases it
(`testdev_balanced_questions.json`); images are `images/{imageId}.jpg`. Files are looked for in
DIR, `DIR/questions` and `DIR/questions1.2`.
"""

from __future__ import annotations

from pathlib import Path

from grounding.data.samples import Dataset, ImageRef, Sample, read_json_object
from grounding.errors import DatasetFormatError, SplitNotFoundError

QUESTION_FOLDERS = (".", "questions", "questions1.2")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def question_files(root: Path) -> dict[str, Path]:
    """split name -> questions file, e.g. `testdev_balanced` -> `.../testdev_balanced_questions.json`."""
    found = {}
    for folder in QUESTION_FOLDERS:
        for path in sorted((root / folder).glob("*_questions.json")):
            found.setdefault(path.name.removesuffix("_questions.json"), path)
    return found


def _image_path(folder: Path, image_id: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{image_id}{suffix}").is_file():
            return folder / f"{image_id}{suffix}"
    return folder / f"{image_id}.jpg"  # missing: recorded against this name when the sample is evaluated


def load_gqa(root: str | Path, split: str, *, images: str | Path | None = None, name: str = "gqa") -> Dataset:
    root = Path(root)
    files = question_files(root)
    path = files.get(split) or files.get(f"{split}_balanced")
    if path is None:
        raise SplitNotFoundError(f"{root}: no questions file for split {split!r} (looked for {split}_questions.json "
                                 f"in {', '.join(QUESTION_FOLDERS)}); splits found: {sorted(files)}")
    folder = Path(images) if images is not None else root / "images"
    if not folder.is_dir():
        raise DatasetFormatError(f"image folder {folder} does not exist; pass it with --images")
    questions = read_json_object(path, "GQA's object of question ID -> question")
    samples = []
    for question_id, entry in questions.items():
        for field in ("imageId", "question", "answer"):
            if not isinstance(entry, dict) or field not in entry:
                raise DatasetFormatError(f"{path}: question {question_id!r} has no field '{field}'")
        image = ImageRef(_image_path(folder, entry["imageId"]))
        samples.append(Sample(index=len(samples), id=str(question_id), image=image, text=str(entry["question"]),
                              answers=(str(entry["answer"]),), meta={"image_id": entry["imageId"]}))
    return Dataset(name=name, split=split, task="vqa", source=path, samples=samples)
