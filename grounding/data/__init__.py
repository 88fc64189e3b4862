"""Evaluation data read from local disk: `load_dataset(name, data_dir, split)` picks the layout it finds.

| name | layouts |
| --- | --- |
| `refcoco`, `refcoco+`, `refcocog` | lmms-eval / HF parquet (`parquet.py`) or the `refer` files (`refer.py`) |
| `gqa` | GQA questions JSON + image folder (`gqa.py`) |
| `jsonl` | your own JSONL, REC or VQA (`jsonl.py`) |
"""

from __future__ import annotations

from pathlib import Path

from grounding.data.gqa import load_gqa
from grounding.data.jsonl import load_jsonl
from grounding.data.parquet import load_parquet_rec, parquet_files
from grounding.data.refer import load_refer, refs_file
from grounding.data.samples import Box, Dataset, ImageRef, Sample
from grounding.errors import DatasetFormatError

REC_DATASETS = ("refcoco", "refcoco+", "refcocog")
DATASETS = (*REC_DATASETS, "gqa", "jsonl")


def load_dataset(name: str, data: str | Path, split: str, *, images: str | Path | None = None,
                 split_by: str | None = None) -> Dataset:
    """Load split `split` of dataset `name` from directory (or, for `jsonl`, file) `data`."""
    data = Path(data)
    if not data.exists():
        raise DatasetFormatError(f"data path {data} does not exist")
    if name in REC_DATASETS:
        if parquet_files(data):
            return load_parquet_rec(data, name, split)
        if refs_file(data, name, split_by) is not None:
            return load_refer(data, name, split, split_by=split_by, images=images)
        raise DatasetFormatError(f"{data}: found neither lmms-eval parquet files ({data}/data/*.parquet) nor a "
                                 f"refer refs(*).p for {name}")
    if name == "gqa":
        return load_gqa(data, split, images=images)
    if name == "jsonl":
        return load_jsonl(data, split)
    raise DatasetFormatError(f"unknown dataset {name!r}; choose one of {DATASETS}")


__all__ = ["DATASETS", "REC_DATASETS", "Box", "Dataset", "ImageRef", "Sample", "load_dataset"]
