"""RefCOCO / RefCOCO+ / RefCOCOg in the original `refer` toolkit layout.

`DIR/refs(unc).p` (RefCOCO, RefCOCO+), `refs(umd).p` or `refs(google).p` (RefCOCOg), next to a COCO
`instances.json`, either directly in DIR or in `DIR/refcoco`, `DIR/refcoco+`, `DIR/refcocog`; images
in a COCO `train2014` folder. One sample per referring sentence. The pickle is read with a
restricted unpickler (`safe_pickle`): it comes from strangers.
"""

from __future__ import annotations

from pathlib import Path

from grounding.data.safe_pickle import load_plain_pickle
from grounding.data.samples import Dataset, ImageRef, Sample, read_json_object, xywh_box
from grounding.errors import DatasetFormatError, SplitNotFoundError

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
IMAGE_FOLDERS = ("train2014", "images/train2014", "images/mscoco/images/train2014",
                 "../images/train2014", "../images/mscoco/images/train2014", "../train2014")


def refs_file(root: Path, name: str, split_by: str | None = None) -> Path | None:
    """The refs pickle for dataset `name`, or None when `root` holds no refer layout."""
    split_by = split_by or DEFAULT_SPLIT_BY.get(name, "unc")
    for folder in (root / name, root):
        if (folder / f"refs({split_by}).p").is_file():
            return folder / f"refs({split_by}).p"
    return None


def find_image_folder(annotations: Path, images: str | Path | None) -> Path:
    if images is not None:
        if not Path(images).is_dir():
            raise DatasetFormatError(f"image folder {images} does not exist")
        return Path(images)
    for folder in (annotations.parent / folder for folder in IMAGE_FOLDERS):
        if folder.is_dir():
            return folder.resolve()
    raise DatasetFormatError(f"{annotations}: no COCO train2014 image folder found next to it (looked for "
                             f"{', '.join(IMAGE_FOLDERS)}); pass the folder with --images")


def _read_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found; the refer layout keeps it next to the refs pickle")
    instances = read_json_object(path, "a COCO instances object with 'images' and 'annotations'")
    for field in ("images", "annotations"):
        if not isinstance(instances.get(field), list):
            raise DatasetFormatError(f"{path}: field '{field}' is missing or not a list (not COCO instances.json)")
    try:
        images = {image["id"]: image for image in instances["images"]}
        annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
    except (KeyError, TypeError) as error:
        raise DatasetFormatError(f"{path}: an entry of 'images' or 'annotations' has no field 'id'") from error
    return images, annotations


def _check_refs(refs: object, path: Path) -> list[dict]:
    if not isinstance(refs, list):
        raise DatasetFormatError(f"{path}: expected a list of refs, found {type(refs).__name__}")
    for position, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise DatasetFormatError(f"{path}: ref {position} is a {type(ref).__name__}, not a dict")
        for field in ("ref_id", "ann_id", "image_id", "split", "sentences"):
            if field not in ref:
                raise DatasetFormatError(f"{path}: ref {position} has no field '{field}'")
    return refs


def load_refer(root: str | Path, name: str, split: str, *, split_by: str | None = None,
               images: str | Path | None = None) -> Dataset:
    root = Path(root)
    path = refs_file(root, name, split_by)
    if path is None:
        wanted = f"refs({split_by or DEFAULT_SPLIT_BY.get(name, 'unc')}).p"
        raise DatasetFormatError(f"{root}: no {wanted} in {root / name} or {root}")
    refs = _check_refs(load_plain_pickle(path), path)
    splits = sorted({str(ref["split"]) for ref in refs})
    if split not in splits:
        raise SplitNotFoundError(f"{path}: no split {split!r}; splits found: {splits}")
    instances_path = path.parent / "instances.json"
    image_info, annotations = _read_instances(instances_path)
    folder = find_image_folder(path, images)
    samples: list[Sample] = []
    for ref in refs:
        if ref["split"] != split:
            continue
        image = image_info.get(ref["image_id"])
        annotation = annotations.get(ref["ann_id"])
        file_name = image.get("file_name") if image else f"<image_id {ref['image_id']}>"
        box, problem = None, None
        if image is None:
            problem = f"{instances_path}: no entry in 'images' with id {ref['image_id']} (ref {ref['ref_id']})"
        elif annotation is None or "bbox" not in annotation:
            problem = f"{instances_path}: no annotation with a 'bbox' and id {ref['ann_id']} (ref {ref['ref_id']})"
        else:
            box, problem = xywh_box(annotation["bbox"], f"{instances_path}: annotation {ref['ann_id']}")
        meta = {"ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "image_id": ref["image_id"],
                "category_id": ref.get("category_id")}
        for sentence in ref["sentences"] or [{}]:
            text = sentence.get("sent", sentence.get("raw"))
            samples.append(Sample(
                index=len(samples), id=f"{ref['ref_id']}/{sentence.get('sent_id', 0)}",
                image=ImageRef(folder / str(file_name)), text=str(text or ""), box=box,
                problem=problem or (None if text else f"{path}: ref {ref['ref_id']} has a sentence without 'sent'"),
                meta={**meta, "sent_id": sentence.get("sent_id")}))
    return Dataset(name=name, split=split, task="rec", source=path, samples=samples)
