"""Patch activations of every requested vision layer, streamed to disk one batch of images at a time.

Memory holds one batch of images across the requested layers while extracting, and one layer of
all images while a probe reads it: never all layers of all images. A store is a directory of
`.npy` files, one per feature set, each (images, patches, D), plus `store.json`. Extraction
writes as it goes and resumes where a killed run stopped.

Patches are the vision tower's, before any merger, in raster order over one (rows, cols) grid shared by
every image of the store: LLaVA's fixed grid, or, for a native-resolution model (Qwen2-VL, Qwen2.5-VL),
the unmerged patch grid of the first image, which every other image must share (give images of one size).

Sharded extraction (`extract_shard`, one process per shard): `shards.json` records the layout, and
shard r of n is a store of its own in `shard{r}of{n}/` holding the r-th of n runs of whole batches
(`shard_blocks`), so that every batch is one a single process would run. `ShardedStore` reads the
shards, in order, as one store. A directory holds one layout: a single-process store (`store.json` at
the top) or shards of one world size; extraction with another is refused, naming the directory.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from grounding.records import write_atomic
from grounding.runner import shard_blocks
from mllm import MLLM
from mllm.encoding import encode_vision_inputs
from probes.bridge import VisionHooks

# Controls computed before any block: the patch embedding alone, and with the position embedding added. A tower
# without a position embedding (Qwen2-VL's 2-D RoPE acts inside attention) has the first control only.
PATCH = "patch"
PATCH_POS = "patch+pos"
EMBEDDINGS = (PATCH, PATCH_POS)
# The projector's output, as the LLM receives it, on the visual tokens' grid (`extract_activations(features=...)`):
# where a token concatenates several patches (MiniGPT-v2's 1 x 4 strips) or merges them (Qwen's 2 x 2), it is what
# the tower's patches became.
VISUAL_TOKENS = "visual tokens"
FEATURES = ("tower", "visual-tokens")
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
SHARDS = "shards.json"


def feature_file(name: str | int) -> str:
    if name == PATCH:
        return "embed_patch.npy"
    if name == PATCH_POS:
        return "embed_patch_pos.npy"
    if name == VISUAL_TOKENS:
        return "visual_tokens.npy"
    return f"layer_{int(name):03d}.npy"


@dataclass(frozen=True)
class ImageList:
    """Images to probe: stable ids, and how to load each one."""

    ids: list[str]
    load: Callable[[int], object]  # index -> PIL image

    def __len__(self) -> int:
        return len(self.ids)

    def block(self, start: int, stop: int) -> ImageList:
        """Images [start, stop), indexed from 0."""
        return ImageList(ids=self.ids[start:stop], load=lambda index: self.load(start + index))


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds; a directory written with another spec is refused, not mixed."""

    model: str
    layers: list[int]
    embeddings: list[str]
    grid: list[int]
    frame: str
    dtype: str
    image_ids: list[str]
    weights: str = ""  # `mllm.weights_fingerprint` of the checkpoint; "" in a store written before it was recorded


class StoreMismatchError(ValueError):
    pass


class HookMismatchError(RuntimeError):
    """The hooks (TransformerLens' or transformers') disagree with transformers' `output_hidden_states`."""


class GridMismatchError(ValueError):
    """An image's patch grid differs from the store's (native-resolution models size each image on its own)."""


def embedding_controls(mllm: MLLM) -> list[str]:
    """The embedding controls the tower has: both, or the patch embedding alone where no position embedding exists."""
    return list(EMBEDDINGS) if mllm.adapter.has_position_embedding else [PATCH]


def patch_grids(mllm: MLLM, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """Each image's (rows, cols) of vision-tower patches, before any merger."""
    if "image_grid_thw" in batch:
        return [(int(rows), int(cols)) for _, rows, cols in batch["image_grid_thw"].tolist()]
    return [tuple(mllm.adapter.tower_grid)] * len(batch["pixel_values"])


@torch.no_grad()
def visual_tokens(mllm: MLLM, batch: dict[str, torch.Tensor]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Each image's (rows, cols) of visual tokens and (images, tokens, D) the tokens, as the LLM receives them, from
    one pass of the tower; refused where they are no one grid."""
    vision = mllm.adapter.encode_images(batch)
    if any(grid is None for grid in vision.grids):
        raise GridMismatchError(f"{mllm.path}: its visual tokens are no one grid (a base crop and tiles with "
                                "newlines); probe the tower's patches instead")
    return [tuple(grid) for grid in vision.grids], torch.stack(list(vision.features))


def tower_inputs(mllm: MLLM, images: Sequence[object], frame: str) -> dict[str, torch.Tensor]:
    """The vision tower's inputs for `images`, one pass each (`adapter.tower_inputs`: LLaVA-NeXT's base crop)."""
    inputs, _ = encode_vision_inputs(mllm, list(images), frame=frame)
    return mllm.adapter.tower_inputs(inputs)


# How far the hooked states may sit from output_hidden_states, relative to the layer's largest value:
# TransformerLens' bridge runs eager attention where the model may run SDPA, which reorders float operations.
HOOK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HOOK_TOLERANCE_LOW_PRECISION = 5e-2


class ActivationStore:
    """Read side of a store: `store.features(name)` is an (images, patches, D) array mapped from disk."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / "store.json").read_text())
        self.spec = StoreSpec(**meta["spec"])
        self.done = int(meta["done"])
        self.hook_check: dict = meta.get("hook_check", {})

    @property
    def complete(self) -> bool:
        return self.done == len(self.spec.image_ids)

    @property
    def grid(self) -> tuple[int, int]:
        rows, cols = self.spec.grid
        return rows, cols

    @property
    def names(self) -> list[str | int]:
        return [*self.spec.embeddings, *self.spec.layers]

    def features(self, name: str | int) -> np.ndarray:
        if name not in self.names:
            raise KeyError(f"{self.directory}: no features {name!r}; this store holds {self.names}")
        return np.load(self.directory / feature_file(name), mmap_mode="r")


def _write_meta(directory: Path, spec: StoreSpec, done: int, hook_check: dict) -> None:
    temporary = directory / "store.json.tmp"
    meta = {"spec": asdict(spec), "done": done, "hook_check": hook_check}
    temporary.write_text(json.dumps(meta, indent=1) + "\n")
    temporary.replace(directory / "store.json")


def extract_activations(
    mllm: MLLM,
    images: ImageList,
    directory: str | Path,
    *,
    layers: Sequence[int] | None = None,
    frame: str = "padded",
    batch_size: int = 16,
    dtype: str = "float16",
    progress: bool = True,
    features: str = "tower",
) -> ActivationStore:
    """Write the patch tokens of `layers` (default: all) and the embedding controls for `images`; with
    `features="visual-tokens"`, the visual tokens the LLM receives instead, on their own grid (`VISUAL_TOKENS`)."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype {dtype!r}: choose one of {sorted(STORE_DTYPES)}")
    if features not in FEATURES:
        raise ValueError(f"features {features!r}: choose one of {', '.join(FEATURES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hooks = VisionHooks(mllm) if features == "tower" else None
    if features == "visual-tokens":
        layers, embeddings = [], [VISUAL_TOKENS]
        grid = visual_tokens(mllm, encode_vision_inputs(mllm, [images.load(0)], frame=frame)[0])[0][0]
    else:
        layers = list(range(hooks.num_layers)) if layers is None else sorted({int(layer) for layer in layers})
        for layer in layers:
            hooks.hook_name(layer)  # range check before any work
        embeddings = embedding_controls(mllm)
        grid = patch_grids(mllm, tower_inputs(mllm, [images.load(0)], frame))[0]  # the tower's, not the LLM's
    spec = StoreSpec(model=str(mllm.path), layers=layers, embeddings=embeddings, grid=list(grid),
                     frame=frame, dtype=dtype, image_ids=list(images.ids), weights=mllm.weights)
    done, hook_check = 0, {}
    if (directory / "store.json").is_file():
        existing = ActivationStore(directory)
        if not existing.spec.weights and spec.weights:
            warnings.warn(f"{directory / 'store.json'}: written before stores recorded the weights' fingerprint; "
                          f"resuming it as this checkpoint's (delete {directory} if another checkpoint wrote it)",
                          stacklevel=2)
            existing.spec = replace(existing.spec, weights=spec.weights)
        if existing.spec != spec:
            raise StoreMismatchError(f"{directory / 'store.json'}: written for another model or its weights, image "
                                     "list, layer set, frame or dtype; use a new directory")
        done, hook_check = existing.done, existing.hook_check
    if done == len(images):
        return ActivationStore(directory)
    if not hook_check and layers:
        hook_check = check_hooks(mllm, hooks, [images.load(index) for index in range(min(batch_size, len(images)))],
                                 frame=frame)

    names = [*spec.embeddings, *layers]
    arrays: dict[str | int, np.ndarray] = {}
    if done:
        arrays = {name: np.load(directory / feature_file(name), mmap_mode="r+") for name in names}
    _write_meta(directory, spec, done, hook_check)

    limit = float(np.finfo(STORE_DTYPES[dtype]).max)
    bar = tqdm(total=len(images), initial=done, desc="vision activations", disable=not progress)
    for start in range(done, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        shown = [images.load(index) for index in range(start, stop)]
        if features == "visual-tokens":
            grids, tokens = visual_tokens(mllm, encode_vision_inputs(mllm, shown, frame=frame)[0])
        else:
            inputs = tower_inputs(mllm, shown, frame)
            grids = patch_grids(mllm, inputs)
        for offset, image_grid in enumerate(grids):
            if image_grid != tuple(grid):
                raise GridMismatchError(f"image {images.ids[start + offset]!r}: its patch grid is {image_grid}, the "
                                        f"store's {tuple(grid)} (the first image's); a store holds one grid, so give "
                                        "images of one size")
        batch = ({VISUAL_TOKENS: tokens} if features == "visual-tokens" else
                 _patch_features(mllm, hooks, inputs, layers, spec.embeddings))
        for name, tensor in batch.items():
            if name not in arrays:  # the first batch sizes the files: (images, patches, the tower's width)
                arrays[name] = np.lib.format.open_memmap(directory / feature_file(name), mode="w+",
                                                         dtype=STORE_DTYPES[dtype],
                                                         shape=(len(images), *tensor.shape[1:]))
            values = tensor.float().cpu().numpy()
            if np.abs(values).max() > limit:
                raise OverflowError(f"{directory / feature_file(name)}: activations exceed {dtype}'s range; "
                                    "extract with dtype='float32'")
            arrays[name][start:stop] = values
        for array in arrays.values():
            array.flush()
        _write_meta(directory, spec, stop, hook_check)
        bar.update(stop - start)
    bar.close()
    return ActivationStore(directory)


# -------------------------------------------------------------------------------------- shards
def shard_directory(directory: str | Path, rank: int, world: int) -> Path:
    """Where shard `rank` of `world` keeps its store: the directory itself for a single process."""
    return Path(directory) if world == 1 else Path(directory) / f"shard{rank}of{world}"


def shard_layout(directory: str | Path, num_images: int, world: int, batch_size: int) -> list[tuple[int, int]]:
    """The blocks of `shard_blocks`, as recorded in `directory/shards.json` by the first shard to start.

    The recorded blocks win over `batch_size`, so a rank resumed with a smaller batch keeps its images. A
    directory holding another layout (one process's store, or shards of another world size) is refused.
    """
    directory = Path(directory)
    path = directory / SHARDS
    recorded = json.loads(path.read_text()) if path.is_file() else None
    if world == 1:
        if recorded is not None:
            raise StoreMismatchError(
                f"{directory}: holds activations extracted in {recorded['world']} shards; rerun as "
                f"{recorded['world']} processes (torchrun --nproc_per_node {recorded['world']}, or --shard "
                f"r/{recorded['world']} for each r), or use a new --out")
        return [(0, num_images)]
    if (directory / "store.json").is_file():
        raise StoreMismatchError(f"{directory}: holds activations extracted by a single process; rerun without "
                                 "--shard and outside torchrun / accelerate, or use a new --out")
    if recorded is not None:
        if recorded["world"] != world:
            raise StoreMismatchError(
                f"{directory}: holds activations extracted in {recorded['world']} shards, not {world}; rerun as "
                f"{recorded['world']} processes (or --shard r/{recorded['world']}), or use a new --out")
        if recorded["images"] != num_images:
            raise StoreMismatchError(f"{directory / SHARDS}: written for {recorded['images']} images, not "
                                     f"{num_images}; use a new directory")
        return [(start, stop) for start, stop in recorded["blocks"]]
    blocks = shard_blocks(num_images, world, batch_size)
    directory.mkdir(parents=True, exist_ok=True)
    # Ranks starting together each write the same layout; the rename makes any one of them the file.
    write_atomic(path, json.dumps({"world": world, "images": num_images, "batch_size": batch_size,
                                   "blocks": blocks}) + "\n")
    return blocks


def _extracted(directory: Path) -> int:
    """Images a shard's store holds so far (none before it starts)."""
    return ActivationStore(directory).done if (directory / "store.json").is_file() else 0


def extract_shard(mllm: MLLM, images: ImageList, directory: str | Path, *, rank: int = 0, world: int = 1,
                  batch_size: int = 16, **options: object) -> ActivationStore | None:
    """`extract_activations` of this process's block of `images` (see `shard_layout`) into its own store.

    Returns the whole store once every shard is complete (`ShardedStore` when sharded), None while another
    shard still owes images. `options` go to `extract_activations`; a killed shard resumes where it stopped.
    """
    directory = Path(directory)
    blocks = shard_layout(directory, len(images), world, batch_size)
    if world == 1:
        return extract_activations(mllm, images, directory, batch_size=batch_size, **options)
    start, stop = blocks[rank]
    if stop > start:
        extract_activations(mllm, images.block(start, stop), shard_directory(directory, rank, world),
                            batch_size=batch_size, **options)
    if any(_extracted(shard_directory(directory, other, world)) < end - begin
           for other, (begin, end) in enumerate(blocks)):
        return None
    store = ShardedStore(directory)
    if store.spec.image_ids != list(images.ids):
        raise StoreMismatchError(f"{directory}: its shards hold another image list; use a new directory")
    return store


class StackedRows:
    """Arrays stacked along their first axis without copying them: indexing rows gathers from each part."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0, *(len(part) for part in self.parts)])
        self.shape: tuple[int, ...] = (int(self.starts[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        picked = np.arange(self.shape[0])[rows]
        wanted = np.atleast_1d(picked)
        which = np.searchsorted(self.starts, wanted, side="right") - 1
        result = np.empty((len(wanted), *self.shape[1:]), dtype=self.dtype)
        for number, part in enumerate(self.parts):
            mine = which == number
            if mine.any():
                result[mine] = part[wanted[mine] - self.starts[number]]
        return result.reshape(np.shape(picked) + self.shape[1:])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


class ShardedStore(ActivationStore):
    """Read side of a store extracted in shards (`extract_shard`): the shards' images in order, as one store."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        layout = json.loads((self.directory / SHARDS).read_text())
        self.shards = [ActivationStore(shard_directory(self.directory, rank, layout["world"]))
                       for rank, (start, stop) in enumerate(layout["blocks"]) if stop > start]
        first = self.shards[0]
        for shard in self.shards[1:]:
            if shard.spec.grid != first.spec.grid:
                raise GridMismatchError(f"{shard.directory}: its patch grid is {tuple(shard.spec.grid)}, "
                                        f"{first.directory}'s {tuple(first.spec.grid)}; a store holds one grid, "
                                        "so give images of one size")
            if replace(shard.spec, image_ids=[]) != replace(first.spec, image_ids=[]):
                raise StoreMismatchError(f"{shard.directory} and {first.directory}: written for another model, "
                                         "layer set, frame or dtype; use a new directory")
        self.spec = replace(first.spec, image_ids=[image for shard in self.shards for image in shard.spec.image_ids])
        self.done = sum(shard.done for shard in self.shards)
        checks = [shard.hook_check for shard in self.shards if shard.hook_check]
        self.hook_check = {**checks[0], "max_relative_difference": max(c["max_relative_difference"] for c in checks),
                           "images": sum(c["images"] for c in checks), "shards": len(checks)} if checks else {}

    def features(self, name: str | int) -> StackedRows:
        return StackedRows([shard.features(name) for shard in self.shards])


def check_hooks(mllm: MLLM, hooks: VisionHooks, images: Sequence[object], frame: str = "padded") -> dict:
    """Compare the hooked hidden states of `images` with transformers' `output_hidden_states`; raise on a mismatch."""
    inputs = tower_inputs(mllm, images, frame)
    difference = hooks.max_difference_from_transformers(inputs)
    tolerance = HOOK_TOLERANCE.get(mllm.dtype, HOOK_TOLERANCE_LOW_PRECISION)
    if not difference <= tolerance:
        raise HookMismatchError(f"{mllm.path}: the vision hooks ({hooks.backend}) differ from output_hidden_states "
                                f"by {difference:.3g} of the largest activation (tolerance {tolerance:g})")
    return {"max_relative_difference": difference, "tolerance": tolerance, "images": len(images),
            "backend": hooks.backend}


@torch.no_grad()
def _patch_features(mllm: MLLM, hooks: VisionHooks, inputs: dict[str, torch.Tensor], layers: Sequence[int],
                    embeddings: Sequence[str]) -> dict[str | int, torch.Tensor]:
    """(B, patches, D) per feature set: the embedding controls and the hooked layers' patch tokens, raster order."""
    adapter = mllm.adapter
    pixels = inputs["pixel_values"]
    grid = {"grid_thw": inputs["image_grid_thw"]} if "image_grid_thw" in inputs else {}
    features: dict[str | int, torch.Tensor] = {
        name: adapter.vision_patch_embeddings(pixels, with_position=name == PATCH_POS, **grid) for name in embeddings
    }
    for layer, hidden in hooks.run(inputs, layers).items():
        features[layer] = adapter.vision_patch_tokens(hidden)
    return features
