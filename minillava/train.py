"""Train a miniature LLaVA on the synthetic world, LLaVA's way, and write it in the llava-hf layout.

    python -m minillava.train --tower contrastive --out data/minillava/contrastive
    python -m minillava.train --tower spatial --out data/minillava/spatial --preset gpu --device cuda

    python -m minillava.train --tower spatial --tower-from data/minillava/spatial --out spatial-v2  # new stage 2
    python -m minillava.train --arch qwen2-vl --stage1-batch 64 --out data/minillava/qwen2-vl

`--arch` picks the miniature's architecture (`minillava.arch`): `llava` (LLaVA-1.5: CLIP ViT, MLP projector,
Llama) or `qwen2-vl` (Qwen2-VL: a native-resolution ViT with 2-D RoPE, its 2x2 merger, a Qwen2 LLM with
M-RoPE; scenes at several sizes, answers in Qwen2-VL's box format). The recipe is the same for both.

Stage 1 trains the ViT contrastively on position-free captions (`--tower spatial` adds a small
loss that keeps patch position linearly decodable in the tower's last two layers: a patch's index on
LLaVA's one grid, its row and column on Qwen's several). Stage 2 freezes
the vision tower and trains projector + Llama on REC and VQA instructions and captions, worded as the
`llava-1.5` prompt style asks at evaluation, with the loss on answer tokens only; `--stage2-tower trained`
trains the tower's blocks with them, as Qwen2-VL's own second stage does. Each stage logs
to `<work>/log.csv`, saves its state every `--save-every` steps and resumes from it when rerun.
`--tower-from DIR` skips stage 1 and starts stage 2 from the vision tower of a finished
miniature, whose `training.json` must record the stage-1 settings of this run (its stage-1 log rows
are carried over, so the new card still says how the tower was trained).
With `--eval-data` the finished checkpoint is evaluated through `grounding` and gets a model card.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, PreTrainedModel, PreTrainedTokenizerFast

from minillava.arch import ARCHITECTURES, Architecture, architecture, of_model
from minillava.model import (
    TRAINING_ONLY_TASKS,
    TextTowerConfig,
    build_clip,
    instruction_texts,
)
from minillava.world import (
    TRAIN_SEED_OFFSET,
    caption,
    make_scene,
    shape_variants,
)
from mllm.loading import resolve_device
from mllm.prompts import build_prompt, image_token
from mllm.tiny import TinyLlavaConfig, tiny_llava_config
from mllm.tiny_qwen import TinyQwenConfig

IGNORE = -100
STAGE2_TOWERS = ("frozen", "trained")
TASKS = ("rec", "vqa", "caption", "where", "region")


@dataclass
class TrainConfig:
    tower: str = "contrastive"
    arch: str = "llava"
    preset: str = "cpu"
    seed: int = 0
    device: str = "auto"
    precision: str = "bf16"  # bf16 autocast, or fp32
    stage1_steps: int = 4000
    stage1_batch: int = 128
    stage1_lr: float = 1e-3
    stage1_group: int = 8  # scenes per hard-negative group (same places and colours, new shapes)
    spatial_weight: float = 0.3
    stage2_steps: int = 10000
    stage2_batch: int = 32
    stage2_lr: float = 5e-4
    stage2_floor_steps: int = 0  # steps after `stage2_steps` held at the cosine's floor, a tenth of the peak
    stage2_tower: str = "frozen"  # or "trained": stage 2 trains the ViT blocks too (see `train_llm`)
    train_scenes: int = 20000
    rec_fraction: float = 0.6
    caption_fraction: float = 0.15
    where_fraction: float = 0.0
    region_fraction: float = 0.0  # the rest of each batch is VQA
    vqa_only_steps: int = 0  # steps of VQA alone that open stage 2 (see `batch_counts`)
    warmup: int = 100
    save_every: int = 200
    tower_from: str = ""  # a finished miniature whose vision tower replaces stage 1
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)

    @property
    def architecture(self) -> Architecture:
        return architecture(self.arch)

    @property
    def sizes(self) -> TinyLlavaConfig | TinyQwenConfig:
        return self.architecture.sizes(self.preset)


# ------------------------------------------------------------------------------------ utilities
def to_pixels(images: Sequence, device: torch.device | str = "cpu") -> torch.Tensor:
    """CLIP normalisation of square RGB images already at the LLaVA tower's size (what the processor does)."""
    return ARCHITECTURES["llava"].pixels(None, images, device)["pixel_values"]


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Log:
    """Appends one CSV row per logged step; a resumed stage keeps the rows before its saved step."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def resume(self, stage: str, start: int) -> None:
        """Drop `stage`'s rows from step `start` on (those after the last save will be logged again)."""
        rows = list(csv.DictReader(self.path.open())) if self.path.is_file() else []
        keep = [row for row in rows if row["stage"] != stage or int(row["step"]) < start]
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["stage", "step", "loss", "lr", "seconds"])
            writer.writeheader()
            writer.writerows(keep)

    def write(self, stage: str, step: int, loss: float, lr: float, seconds: float) -> None:
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([stage, step, f"{loss:.6f}", f"{lr:.3e}", f"{seconds:.2f}"])


STAGE1_FIELDS = ("tower", "arch", "preset", "seed", "precision", "stage1_steps", "stage1_batch", "stage1_lr",
                 "stage1_group", "spatial_weight", "warmup", "text_tower")


def stage_config(config: TrainConfig, stage: str) -> dict:
    """What a stage's state depends on: stage 1 ignores stage 2's settings, so a new stage 2 reuses its tower.

    No step depends on how long the floor lasts (the batches follow the step, the rate stays flat), so a
    state from a shorter floor continues under a longer one.
    """
    everything = asdict(config)
    if stage == "stage1":
        return {key: everything[key] for key in STAGE1_FIELDS}
    return {key: value for key, value in everything.items() if key != "stage2_floor_steps"}


def _load_state(path: Path, config: TrainConfig) -> dict | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    # A state saved before a setting existed was made with that setting's default.
    saved = {**stage_config(TrainConfig(), path.stem), **state["config"]}
    if saved != stage_config(config, path.stem):
        raise SystemExit(f"{path}: saved by a run with another configuration; use a new --work directory")
    return state


def _update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.nn.Parameter],
            lr: float) -> None:
    """One AdamW step at learning rate `lr`, gradients clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def _save_if_due(path: Path, config: TrainConfig, done: int, total: int, *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, began: float) -> None:
    """Save every `save_every` steps and after the last one."""
    if done % config.save_every == 0 or done == total:
        _save_state(path, config, done, model, optimizer, seconds=time.perf_counter() - began)


def _resume(path: Path, config: TrainConfig, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Load the saved state into `model` and `optimizer`; (step to start from, seconds already spent)."""
    state = _load_state(path, config)
    if state is None:
        return 0, 0.0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["seconds"]


def _save_state(path: Path, config: TrainConfig, step: int, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, *, seconds: float) -> None:
    state = {"config": stage_config(config, path.stem), "step": step, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "seconds": seconds}
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


# -------------------------------------------------------------------------------------- stage 1
def caption_batch(step: int, config: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> tuple:
    """(images, caption ids, lengths): scenes in groups that differ only in their shapes, so that colours alone
    cannot match captions. A group's scenes share a size; the groups of a batch take the architecture's sizes in turn.

    Without these hard negatives the colour sets nearly identify a caption within a batch, and the
    tower learns colour but hardly shape.
    """
    group = config.stage1_group
    scenes = []
    for slot in range(0, config.stage1_batch, group):
        seed = TRAIN_SEED_OFFSET * 10 + config.seed * 10**9 + step * config.stage1_batch + slot
        size = config.architecture.scene_size(config.preset, slot // group)
        scene, rng = make_scene(seed, size), random.Random(seed)
        scenes += shape_variants(scene, group, rng)
    scenes = scenes[: config.stage1_batch]
    texts = [caption(scene, random.Random(scene.seed + index)) for index, scene in enumerate(scenes)]
    keep = config.text_tower.max_length - 1
    ids = [[*tokenizer(text).input_ids[:keep], tokenizer.eos_token_id] for text in texts]
    lengths = torch.tensor([len(row) for row in ids])
    padded = torch.full((len(ids), int(lengths.max())), tokenizer.pad_token_id)
    for row, values in enumerate(ids):
        padded[row, : len(values)] = torch.tensor(values)
    return [scene.render() for scene in scenes], padded, lengths


def contrastive_loss(clip: nn.Module, pixels: dict[str, torch.Tensor], ids: torch.Tensor, lengths: torch.Tensor,
                     heads: nn.Module | None, *, arch: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
    pooled, patch_states = arch.tower_outputs(clip.vision_model, pixels, patch_states=heads is not None)
    image = F.normalize(clip.visual_projection(pooled).float(), dim=-1)
    mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).long()
    states = clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = states[torch.arange(len(ids), device=ids.device), lengths - 1]  # the eos token
    text = F.normalize(clip.text_projection(pooled).float(), dim=-1)
    logits = clip.logit_scale.exp().clamp(max=100) * image @ text.T
    labels = torch.arange(len(ids), device=ids.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    aux = heads(patch_states) if heads is not None else torch.zeros((), device=ids.device)
    return loss, aux


def train_tower(config: TrainConfig, processor: object, work: Path, log: Log, *,
                device: torch.device, progress: bool = True) -> nn.Module:
    """Stage 1; returns the contrastive model, whose `vision_model` is the trained tower."""
    tokenizer, arch = processor.tokenizer, config.architecture
    torch.manual_seed(config.seed)
    clip = arch.contrastive_model(config.preset, tokenizer, config.text_tower)
    heads = None
    if config.tower == "spatial":
        heads = arch.position_heads(config.preset)
    modules = torch.nn.ModuleList([clip, *([heads] if heads else [])]).to(device)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.stage1_lr, weight_decay=0.05)
    start, seconds = _resume(work / "stage1.pt", config, modules, optimizer)
    log.resume("stage1", start)
    clip.train()
    began = time.perf_counter() - seconds
    for step in tqdm(range(start, config.stage1_steps), initial=start, total=config.stage1_steps,
                     desc=f"stage 1 ({config.tower} tower)", disable=not progress):
        lr = learning_rate(step, config.stage1_steps, config.stage1_lr, config.warmup)
        images, ids, lengths = caption_batch(step, config, tokenizer)
        pixels, ids, lengths = arch.pixels(processor, images, device), ids.to(device), lengths.to(device)
        with autocast(device, config.precision):
            loss, aux = contrastive_loss(clip, pixels, ids, lengths, heads, arch=arch)
        total = loss + config.spatial_weight * aux
        _update(total, optimizer, modules.parameters(), lr)
        log.write("stage1", step, total.item(), lr, time.perf_counter() - began)
        _save_if_due(work / "stage1.pt", config, step + 1, config.stage1_steps, model=modules,
                     optimizer=optimizer, began=began)
    return clip.eval()


def tower_from_checkpoint(config: TrainConfig, tokenizer: PreTrainedTokenizerFast, work: Path,
                          log: Log) -> nn.Module:
    """Stage 1's result read from a finished miniature: its vision tower, its stage-1 log rows.

    Refused unless the miniature's `training.json` records this run's stage-1 settings, so that the
    tower is the one stage 1 would have trained here and the card's description of it stays true.
    """
    source = Path(config.tower_from)
    record_file = source / "training.json"
    if not record_file.is_file():
        raise SystemExit(f"--tower-from {source}: no training.json (not a minillava.train checkpoint)")
    recorded = json.loads(record_file.read_text()).get("config", {})
    wanted = stage_config(config, "stage1")
    for key, value in wanted.items():
        if recorded.get(key, asdict(TrainConfig()).get(key)) != value:
            raise SystemExit(f"{record_file}: config.{key} is {recorded.get(key)!r}, this run's is {value!r}; "
                             "the tower was trained with other stage-1 settings")
    model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    expected = tiny_llava_config(config.sizes, tokenizer).vision_config
    for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if getattr(model.config.vision_config, key) != getattr(expected, key):
            raise SystemExit(f"{source / 'config.json'}: vision_config.{key} is "
                             f"{getattr(model.config.vision_config, key)}, preset {config.preset!r} needs "
                             f"{getattr(expected, key)}")
    clip = build_clip(config.sizes, tokenizer, config.text_tower)
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    logged = work / "log.csv"
    if not logged.is_file():  # a resumed run already carries them
        source_log = source / "training_log.csv"
        rows = [row for row in csv.DictReader(source_log.open()) if row["stage"] == "stage1"] \
            if source_log.is_file() else []
        log.resume("stage1", 0)
        for row in rows:
            log.write("stage1", int(row["step"]), float(row["loss"]), float(row["lr"]), float(row["seconds"]))
    return clip.eval()


def check_tower_source(config: TrainConfig, work: Path) -> str | None:
    """The sha256 of `--tower-from`'s weights, written to `work` on the first start and checked on every resume:
    a source directory replaced meanwhile (by the new miniature, say) would give the card another tower's digest."""
    weights = Path(config.tower_from) / "model.safetensors"
    if not weights.is_file():
        return None
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    recorded = work / "tower_from.sha256"
    started = recorded.read_text().strip() if recorded.is_file() else digest
    if started != digest:
        raise SystemExit(f"{weights}: not the file this run started from (sha256 {started[:16]}... in {recorded}, "
                         f"{digest[:16]}... now); point --tower-from at the original checkpoint")
    recorded.write_text(digest + "\n")
    return digest


# -------------------------------------------------------------------------------------- stage 2
@dataclass
class Instructions:
    """Every training query, tokenised: `ids[i]` is prompt + answer + eos, `starts[i]` its answer's start."""

    scene: list[int]
    ids: list[list[int]]
    starts: list[int]
    by_task: dict[str, np.ndarray]  # task -> indices of its queries


def train_seed(config: TrainConfig, index: int) -> int:
    return TRAIN_SEED_OFFSET + config.seed * 10**8 + index


def tokenize_instructions(processor: object, texts: Sequence[tuple[int, str, str, str]],
                          num_visual: int | Sequence[int], separator: str = " ") -> Instructions:
    """Tokenise as the processor does at evaluation: the image placeholder repeated once per visual token
    (`num_visual`, or `num_visual[i]` for query i), then `separator` and the answer."""
    tokenizer, token = processor.tokenizer, image_token(processor)
    counts = [num_visual] * len(texts) if isinstance(num_visual, int) else list(num_visual)
    prompts = [build_prompt(processor, text).replace(token, token * count)
               for (_, _, text, _), count in zip(texts, counts)]
    full = [prompt + separator + answer for prompt, (_, _, _, answer) in zip(prompts, texts)]
    prompt_ids = tokenizer(prompts).input_ids
    full_ids = tokenizer(full).input_ids
    for index, (head, whole) in enumerate(zip(prompt_ids, full_ids)):
        if whole[: len(head)] != head:
            raise RuntimeError(f"query {index}: the prompt's tokens are not a prefix of prompt + answer")
    tasks = np.array([task for _, task, _, _ in texts])
    return Instructions(scene=[scene for scene, _, _, _ in texts],
                        ids=[[*whole, tokenizer.eos_token_id] for whole in full_ids],
                        starts=[len(head) for head in prompt_ids],
                        by_task={task: np.flatnonzero(tasks == task) for task in TASKS})


def build_instructions(config: TrainConfig, processor: object) -> Instructions:
    texts, counts = [], []
    arch = config.architecture
    # tokenise only what is drawn: a training-only task is drawn when its `<task>_fraction` is set
    drawn = {task for task in TASKS if task not in TRAINING_ONLY_TASKS or getattr(config, f"{task}_fraction")}
    for index in range(config.train_scenes):
        size = arch.scene_size(config.preset, index)
        items = [(index, *item) for item in instruction_texts(train_seed(config, index), size, arch.prompt_style)
                 if item[0] in drawn]
        texts += items
        counts += [arch.num_visual(config.preset, size)] * len(items)
    return tokenize_instructions(processor, texts, counts, arch.answer_separator)


@torch.no_grad()
def tower_features(model: PreTrainedModel, config: TrainConfig, processor: object, device: torch.device,
                   batch: int = 256) -> list[torch.Tensor]:
    """Each training scene's frozen tower features, as the projector reads them (`Architecture.features`)."""
    arch, out = config.architecture, []
    for start in range(0, config.train_scenes, batch):
        indices = range(start, min(start + batch, config.train_scenes))
        images = [make_scene(train_seed(config, i), arch.scene_size(config.preset, i)).render() for i in indices]
        pixels = arch.pixels(processor, images, device)
        out += [features.to("cpu", torch.float32) for features in arch.features(model, pixels)]
    return out


def scene_pixels(config: TrainConfig, processor: object) -> list[dict[str, torch.Tensor]]:
    """Each training scene's tower input, for a tower stage 2 trains (`--stage2-tower trained`)."""
    arch = config.architecture
    return [arch.pixels(processor, [make_scene(train_seed(config, i), arch.scene_size(config.preset, i)).render()])
            for i in range(config.train_scenes)]


def batch_features(model: PreTrainedModel, arch: Architecture, pixels: Sequence[dict[str, torch.Tensor]],
                   scenes: Sequence[int], device: torch.device) -> list[torch.Tensor]:
    """The tower's output (with gradients) for each query's scene, each distinct scene run once.

    Every architecture's tower input concatenates along its first dimension (LLaVA's images, Qwen's patch rows
    and grids), so a batch of scenes is their inputs concatenated."""
    distinct = sorted(set(scenes))
    batch = {key: torch.cat([pixels[scene][key] for scene in distinct]).to(device) for key in pixels[distinct[0]]}
    by_scene = dict(zip(distinct, arch.features(model, batch)))
    return [by_scene[scene] for scene in scenes]


def instruction_batch(rows: np.ndarray, data: Instructions, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, labels (answers only) and mask for the queries `rows`."""
    length = max(len(data.ids[row]) for row in rows)
    ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), IGNORE)
    for slot, row in enumerate(rows):
        values = torch.tensor(data.ids[row])
        ids[slot, : len(values)] = values
        labels[slot, data.starts[row] : len(values)] = values[data.starts[row] :]
    return ids, labels, (ids != pad_id).long()


def instruction_loss(model: PreTrainedModel, features: Sequence[torch.Tensor], ids: torch.Tensor,
                     labels: torch.Tensor, mask: torch.Tensor, *, tasks: Sequence[str]) -> torch.Tensor:
    """The model's forward on precomputed tower features (`features[i]` row i's): project, merge at the image
    tokens, run the LLM (`Architecture.logits`).

    The loss is each task's mean answer-token cross-entropy, weighted by the task's share of the
    queries (`tasks[i]` is query i's task)."""
    logits = of_model(model).logits(model, features, ids, mask)[:, :-1].float()
    targets = labels[:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    # A token mean over the whole batch lets a 25-token box outweigh a one-word VQA answer 12 to 1
    # (VQA got ~3% of the gradient at the default mix); a mean per query divides each box digit's
    # signal by the box's length. A token mean within each task, weighted by the task's share of
    # the batch, keeps both: every digit counts, and each task gets its share.
    answered = (targets != IGNORE).float()
    tasks = np.asarray(tasks)
    loss = per_token.new_zeros(())
    for task in np.unique(tasks):
        rows = torch.from_numpy(np.flatnonzero(tasks == task)).to(ids.device)
        share = len(rows) / len(tasks)
        loss = loss + share * per_token[rows].sum() / answered[rows].sum()
    return loss


def batch_counts(config: TrainConfig, step: int) -> dict[str, int]:
    """How many queries of each task stage 2's batch `step` holds.

    `--vqa-only-steps` and `--where-fraction` test a hypothesis, and are off by default: early in
    stage 2 the LLM boxes the top-most, most salient object whatever the words say; VQA first builds
    heads that find an object by colour and shape, and "where is the red circle?" ties them to a
    place. With 1500 VQA-only steps and 18.75% "where" (50% REC, 12.5% captions) the spatial
    miniature reached REC ACC@0.5 0.41 at step 6000, against 0.71 at step 6200 with the defaults
    (256 samples of the shipped split each), so the defaults stay without them.
    `--region-fraction` mixes in LLaVA-1.5's region descriptions (REG: a box in, "the red circle" out),
    which tie a place named in digits to the visual tokens there.
    """
    batch = config.stage2_batch
    counts = {task: round(batch * share) for task, share in
              (("rec", config.rec_fraction), ("caption", config.caption_fraction), ("where", config.where_fraction),
               ("region", config.region_fraction))}
    counts["vqa"] = batch - sum(counts.values())
    if counts["vqa"] < 0:  # checked on every step, so a bad mix fails at the first, not after the VQA-only ones
        raise SystemExit("--rec-fraction + --caption-fraction + --where-fraction + --region-fraction must not exceed 1")
    if step < config.vqa_only_steps:
        return {task: batch if task == "vqa" else 0 for task in TASKS}
    return counts


def train_llm(config: TrainConfig, clip: nn.Module, processor: object, work: Path, log: Log, *,
              device: torch.device, progress: bool = True) -> PreTrainedModel:
    torch.manual_seed(config.seed + 1)
    tokenizer, arch = processor.tokenizer, config.architecture
    model = arch.build_model(config.preset, tokenizer)
    arch.load_tower(model, clip.vision_model)
    model.to(device)
    tower_trained = config.stage2_tower == "trained"
    arch.freeze_tower(model, blocks=not tower_trained)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.stage2_lr, weight_decay=0.0)
    start, seconds = _resume(work / "stage2.pt", config, model, optimizer)  # refuses a mismatch before the slow part
    total = config.stage2_steps + config.stage2_floor_steps
    if start > total:
        raise SystemExit(f"{work / 'stage2.pt'}: saved after step {start}, past this run's {total} steps "
                         "(--stage2-steps + --stage2-floor-steps); use a new --work directory")
    log.resume("stage2", start)
    data = build_instructions(config, processor)
    # A frozen tower's features are computed once; a trained one is run on each batch's scenes.
    source = (scene_pixels(config, processor) if tower_trained else tower_features(model, config, processor, device))
    model.model.language_model.train()
    began = time.perf_counter() - seconds
    for step in tqdm(range(start, total), initial=start, total=total,
                     desc="stage 2 (projector + LLM)", disable=not progress):
        counts = batch_counts(config, step)
        tasks = np.repeat(TASKS, [counts[task] for task in TASKS])  # every batch holds its tasks in this order
        rng = np.random.default_rng([config.seed, step])  # a resumed run draws the batches it would have
        rows = np.concatenate([rng.choice(data.by_task[task], counts[task]) for task in TASKS])
        lr = learning_rate(step, config.stage2_steps, config.stage2_lr, config.warmup)
        ids, labels, mask = (t.to(device) for t in instruction_batch(rows, data, tokenizer.pad_token_id))
        scenes = [data.scene[row] for row in rows]
        with autocast(device, config.precision):
            scene_features = (batch_features(model, arch, source, scenes, device) if tower_trained else
                              [source[scene].to(device) for scene in scenes])
            loss = instruction_loss(model, scene_features, ids, labels, mask, tasks=tasks)
        _update(loss, optimizer, trainable, lr)
        log.write("stage2", step, loss.item(), lr, time.perf_counter() - began)
        _save_if_due(work / "stage2.pt", config, step + 1, total, model=model,
                     optimizer=optimizer, began=began)
    return model.eval()


# ------------------------------------------------------------------------------------------ main
def train(config: TrainConfig, out: Path, work: Path, progress: bool = True, *,
          stage1_only: bool = False) -> Path | None:
    """Run both stages (resuming what `work` holds) and save the miniature to `out`.

    With `stage1_only` stop once the tower is trained (its state stays in `work`; nothing is saved to `out`).
    """
    arch = config.architecture
    if config.tower not in arch.towers:
        raise SystemExit(f"--tower {config.tower!r}: --arch {arch.name} trains one of {arch.towers}")
    if config.stage2_tower not in STAGE2_TOWERS:  # checked before stage 1, not after it
        raise SystemExit(f"--stage2-tower {config.stage2_tower!r}: choose one of {STAGE2_TOWERS}")
    if config.tower_from and arch.name != "llava":
        raise SystemExit(f"--tower-from: implemented for --arch llava, not {arch.name}")
    work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    tokenizer = arch.tokenizer()
    processor = arch.processor(config.preset, tokenizer)
    log = Log(work / "log.csv")
    if config.tower_from and stage1_only:
        raise SystemExit("--tower-from replaces stage 1: it cannot be given with --stage1-only")
    if config.tower_from and Path(config.tower_from).resolve() == out.resolve():
        raise SystemExit(f"--out {out} is the --tower-from checkpoint; write the new miniature elsewhere")
    if config.tower_from:
        tower_sha256 = check_tower_source(config, work)
        clip = tower_from_checkpoint(config, tokenizer, work, log)
    else:
        clip = train_tower(config, processor, work, log, device=device, progress=progress)
    if stage1_only:
        return None
    model = train_llm(config, clip, processor, work, log, device=device, progress=progress)
    arch.save(model.to("cpu", torch.float32), processor, out)
    shutil.copyfile(work / "log.csv", out / "training_log.csv")
    stages = {row["stage"]: float(row["seconds"]) for row in csv.DictReader((work / "log.csv").open())}
    training = {"config": asdict(config), "device": describe(device), "seconds": stages,
                "torch": torch.__version__}
    if config.tower_from:  # the path may later hold another model: say which file the tower came from
        training["tower_from_sha256"] = tower_sha256
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return out


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minillava.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write (llava-hf layout)")
    parser.add_argument("--work", type=Path, help="logs and resumable state (default: <out>.work)")
    parser.add_argument("--eval-data", type=Path, help="the evaluation split (minillava.split) to measure and card")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--stage1-only", action="store_true", help="train the vision tower, then stop")
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        if name != "text_tower":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    config = TrainConfig(**options)
    work = args.work or args.out.with_suffix(".work")
    out = train(config, args.out, work, progress=not args.no_progress, stage1_only=args.stage1_only)
    if out is None:
        print(f"stage 1 done: {work / 'stage1.pt'}")
        return 0
    if args.eval_data:
        from minillava.card import evaluate_and_card

        evaluate_and_card(out, args.eval_data)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
