"""RefCOCO / RefCOCO+ / RefCOCOg in lmms-eval's Hugging Face parquet layout (lmms-lab/RefCOCO etc.).

`DIR/data/{split}-00000-of-00002.parquet` (or `DIR/{split}-*.parquet`), one row per annotated
object: `question_id`, `image` (HF struct with encoded `bytes`), `answer` (the referring
expressions), `bbox` ([x, y, w, h] in pixels), `file_name`. As lmms-eval's REC tasks do, each
expression becomes its own sample. Images are read one row group at a time, when asked for.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from grounding.data.samples import Dataset, ImageRef, Sample, xywh_box
from grounding.errors import DatasetFormatError, SplitNotFoundError
from mllm.errors import ImageLoadError

REQUIRED_FIELDS = ("question_id", "image", "answer", "bbox")
_SHARD = re.compile(r"^(?P<split>.+?)(-\d{5}-of-\d{5})?\.parquet$")


def parquet_files(root: Path) -> list[Path]:
    return sorted([*root.glob("*.parquet"), *root.glob("data/*.parquet")])


def available_splits(root: Path) -> list[str]:
    return sorted({_SHARD.match(path.name).group("split") for path in parquet_files(root)})


def split_files(root: Path, split: str) -> list[Path]:
    files = [path for path in parquet_files(root) if _SHARD.match(path.name).group("split") == split]
    if not files:
        raise SplitNotFoundError(f"{root}: no parquet files for split {split!r}; "
                                 f"splits found: {available_splits(root) or 'none'}")
    return files


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DatasetFormatError(f"{path}: not a readable parquet file: {error}") from error


def load_parquet_rec(root: str | Path, name: str, split: str) -> Dataset:
    root = Path(root)
    samples: list[Sample] = []
    for path in split_files(root, split):
        file = _parquet(path)
        missing = [field for field in REQUIRED_FIELDS if field not in file.schema_arrow.names]
        if missing:
            raise DatasetFormatError(f"{path}: missing field(s) {missing}; an lmms-eval RefCOCO parquet has "
                                     f"{list(REQUIRED_FIELDS)}, found {file.schema_arrow.names}")
        columns = [name for name in ("question_id", "answer", "bbox", "file_name") if name in file.schema_arrow.names]
        for group in range(file.num_row_groups):
            for row, record in enumerate(file.read_row_group(group, columns=columns).to_pylist()):
                samples.extend(_row_samples(record, ImageRef(path, group, row), len(samples)))
    return Dataset(name=name, split=split, task="rec", source=root, samples=samples)


def _row_samples(record: dict, image: ImageRef, start: int) -> list[Sample]:
    expressions = record["answer"]
    if isinstance(expressions, str):
        expressions = [expressions]
    box, problem = xywh_box(record["bbox"], f"{image}:")
    if not expressions:  # kept as one unscorable sample, so the row is counted, not lost
        expressions, problem = [""], f"{image}: field 'answer' holds no referring expression"
    meta = {"question_id": record["question_id"], "file_name": record.get("file_name")}
    return [
        Sample(index=start + k, id=f"{record['question_id']}/{k}", image=image, text=str(expression), box=box,
               problem=problem, meta=meta)
        for k, expression in enumerate(expressions)
    ]


@lru_cache(maxsize=2)
def _image_column(path: Path, row_group: int) -> list:
    return _parquet(path).read_row_group(row_group, columns=["image"]).column("image").to_pylist()


def read_image_bytes(ref: ImageRef) -> bytes:
    """The encoded image of one parquet row (HF `Image` feature: a struct of `bytes` and `path`)."""
    value = _image_column(ref.path, ref.row_group)[ref.row]
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes):  # a sample-level fault: recorded against this sample, not fatal
        raise ImageLoadError(f"{ref}: field 'image' holds no encoded image bytes")
    return value
