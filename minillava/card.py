"""Measure a trained miniature on the shipped split through `grounding`, and write its model card.

    python -m minillava.card data/minillava/contrastive --eval-data data/minillava/eval [--write-card]

The model goes through `mllm.load` and `grounding.runner.run_evaluation` with the default prompt
style of its model type, as any llava-hf checkpoint would. Per-sample results go to
`results/minillava/<name>/{rec,vqa}/` (resumable) and `evaluation.json` beside them keeps the
summaries with a breakdown by expression and question kind. `--write-card` (what training does)
also copies `evaluation.json` next to the weights and writes the card, `README.md`, there.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

import mllm
from grounding.boxes import iou
from grounding.data import load_dataset
from grounding.prompts import default_style_for
from grounding.records import MERGED, read_records
from grounding.runner import run_evaluation
from grounding.summary import summarize
from minillava.arch import QWEN_SCENE_SIZES, architecture
from minillava.split import scene_seed_of
from minillava.train import TrainConfig
from minillava.world import make_scene

PRESET_MEANING = {"cpu": "the CPU size", "gpu": "the larger size, for a GPU", "test": "the test size"}


def by_kind(run: Path, task: str) -> dict[str, dict]:
    """The run's metrics per `meta.kind` (the split writes one)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in read_records([run / MERGED]).values():
        groups[record.get("meta", {}).get("kind", "all")].append(record)
    return {kind: summarize(records, task, resamples=200)["metrics"] for kind, records in sorted(groups.items())}


def rec_against_objects(eval_data: Path, run: Path) -> dict[str, dict[str, float]]:
    """Per REC kind: the ACC@0.5 of boxing a random object of the scene (what a model deaf to the words
    scores), and how often the predicted box is some object of the scene at IoU >= 0.5.

    Objects never overlap, so only the target reaches IoU 0.5 and chance is the mean of 1 / objects.
    Empty when `eval_data` is not a split that `minillava.split` wrote (no `split.json`).
    """
    if not (eval_data / "split.json").is_file():
        return {}
    size = json.loads((eval_data / "split.json").read_text())["size"]
    random_object: dict[str, list[float]] = defaultdict(list)
    some_object: dict[str, list[bool]] = defaultdict(list)
    merged = run / MERGED
    elsewhere = f"were these results made on another split than {eval_data}?"
    for record in read_records([merged]).values():
        kind = record.get("meta", {}).get("kind")
        if kind is None:
            raise ValueError(f"{merged}: record {record['id']!r} has no field 'meta.kind', which minillava.split "
                             f"writes; {elsewhere}")
        try:
            seed = scene_seed_of(record["id"])
        except ValueError as error:
            raise ValueError(f"{merged}: field 'id' of a record: {error}; {elsewhere}") from error
        scene = make_scene(seed, size)
        random_object[kind].append(1 / len(scene.objects))
        some_object[kind].append(record.get("box") is not None
                                 and any(iou(record["box"], obj.box) >= 0.5 for obj in scene.objects))
    return {kind: {"random_object": float(np.mean(random_object[kind])),
                   "some_object": float(np.mean(some_object[kind]))} for kind in sorted(random_object)}


def evaluate(checkpoint: Path, eval_data: Path, results: Path, *, batch_size: int = 64,
             device: str = "auto") -> dict:
    model = mllm.load(checkpoint, device=device)
    style = default_style_for(model.model.config.model_type)
    evaluation = {}
    for task in ("rec", "vqa"):
        dataset = load_dataset("jsonl", eval_data / task, "val")
        run = results / task
        summary = run_evaluation(model, dataset, run, style, batch_size=batch_size)
        evaluation[task] = {"summary": {key: summary[key] for key in ("n_samples", "n_errors", "metrics")},
                            "by_kind": by_kind(run, task), "results": str(run)}
    evaluation["rec"]["objects_by_kind"] = rec_against_objects(eval_data, results / "rec")
    return evaluation


def stage2_schedule(config: dict) -> str:
    """The task mix in words; configurations from before an option existed lack its field."""
    vqa_only = config.get("vqa_only_steps", 0)
    where, region = config.get("where_fraction", 0.0), config.get("region_fraction", 0.0)
    rest = round(1 - config["rec_fraction"] - config["caption_fraction"] - where - region, 6)
    parts = [(config["rec_fraction"], "REC"), (config["caption_fraction"], "captions"), (where, "where"),
             (region, "region descriptions"), (rest, "VQA")]
    mix = ", ".join(f"{100 * share:g}% {task}" for share, task in parts if share)
    return (f"VQA alone for the first {vqa_only} steps, then {mix}" if vqa_only else mix)


def _floor(config: dict) -> str:
    floor = config.get("stage2_floor_steps", 0)
    return (f" in a cosine to a tenth of it, then {floor} more steps at that floor ({config['stage2_lr'] / 10:g})"
            if floor else "")


def _training_only(config: dict) -> str:
    extra = [text for key, text in (("where_fraction", 'training-only "where is ...?" questions'),
                                    ("region_fraction", "region descriptions (a box in, its object's colour and "
                                                        "shape out, LLaVA-1.5's REG)"))
             if config.get(key)]
    return "".join(f" and {text}" for text in extra)


def _tower_source(config: dict, training: dict) -> str:
    if not config.get("tower_from"):
        return ""
    digest = training.get("tower_from_sha256") or "unknown"
    return (f" Not retrained for this checkpoint: stage 2 started from the tower of `{config['tower_from']}` "
            f"(its model.safetensors, sha256 {digest[:16]}...), whose stage-1 log this one carries.")


def train_flags(config: dict) -> str:
    """The `minillava.train` options that reproduce `config`: the tower and every setting off its default."""
    defaults = asdict(TrainConfig())
    changed = {key: value for key, value in config.items() if key != "tower" and value != defaults.get(key)}
    flags = [f"--{key.replace('_', '-')} {value}" for key, value in changed.items()]
    return " ".join([f"--tower {config['tower']}", *flags])


def _metric(metrics: dict, name: str) -> str:
    entry = metrics[name]
    low, high = entry["ci95"]
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def _llava_parts(vision: dict, text: dict, tower_trained: bool) -> dict[str, str]:
    grid = vision["image_size"] // vision["patch_size"]
    return {
        "what": "A miniature LLaVA-1.5 trained on the toolkit's synthetic world (`minillava.world`), in the llava-hf "
                "layout: load it with `mllm.load` like any LLaVA checkpoint.",
        "vision": f"- Vision: CLIP ViT, {vision['image_size']} px, patch {vision['patch_size']} ({grid}x{grid} = "
                  f"{grid * grid} visual tokens), hidden {vision['hidden_size']}, {vision['num_hidden_layers']} "
                  "layers, learned absolute position embeddings; features from the penultimate layer, CLS dropped.",
        "projector": "- Projector: 2-layer MLP (GELU).",
        "llm": f"- LLM: Llama, hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
               f"{text['num_attention_heads']} heads, RoPE; vocabulary {text['vocab_size']} (BPE on the world's "
               "text, one token per digit).",
        "trained": "Tower + projector + LLM" if tower_trained else "Projector + LLM, tower frozen",
        "faithful": "LLaVA's architecture and recipe, not to its scale",
        "sizes": "one image size",
    }


def _qwen_parts(vision: dict, text: dict, checkpoint: Path, tower_trained: bool) -> dict[str, str]:
    processor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    pixels = processor.get("size", {})
    side = vision["patch_size"] * vision["spatial_merge_size"]
    sections = text.get("rope_parameters", {}).get("mrope_section")
    heads = f"{text['num_attention_heads']} heads ({text['num_key_value_heads']} key-value)"
    return {
        "what": "A miniature Qwen2-VL trained on the toolkit's synthetic world (`minillava.world`), in the Hugging "
                "Face layout of `Qwen/Qwen2-VL-2B-Instruct`: load it with `mllm.load` like any Qwen2-VL checkpoint.",
        "vision": f"- Vision: Qwen2-VL's ViT, patch {vision['patch_size']}, 2-D RoPE and no position embedding, no "
                  f"CLS; hidden {vision['embed_dim']}, {vision['depth']} layers; native resolution (images resized "
                  f"to multiples of {side} px within {pixels.get('shortest_edge')}-{pixels.get('longest_edge')} "
                  f"pixels): one visual token per {side}x{side} pixels, a 64 px scene gives "
                  f"{(64 // side) ** 2}.",
        "projector": f"- Projector: Qwen2-VL's {vision['spatial_merge_size']}x{vision['spatial_merge_size']} patch "
                     "merger (LayerNorm, 2-layer MLP).",
        "llm": f"- LLM: Qwen2, hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, {heads}, "
               f"M-RoPE (t, h, w sections {sections}); vocabulary {text['vocab_size']} (BPE on the world's text, "
               "one token per digit, Qwen's special tokens).",
        "trained": "ViT + merger + LLM" if tower_trained else "Merger + LLM, ViT frozen",
        "faithful": "Qwen2-VL's architecture and to LLaVA's two-stage recipe, not to their scale",
        "sizes": "square scenes only",
    }


def model_card(checkpoint: Path, eval_data: Path, evaluation: dict) -> str:
    training = json.loads((checkpoint / "training.json").read_text())
    config, seconds = training["config"], training["seconds"]
    model_config = json.loads((checkpoint / "config.json").read_text())
    vision, text = model_config["vision_config"], model_config["text_config"]
    arch = architecture(config.get("arch", "llava"))
    tower_trained = config.get("stage2_tower", "frozen") == "trained"
    parts = (_llava_parts(vision, text, tower_trained) if arch.name == "llava" else
             _qwen_parts(vision, text, checkpoint, tower_trained))
    style = default_style_for(model_config["model_type"])
    scenes = ("" if arch.name == "llava" else
              f" Scenes of {', '.join(map(str, QWEN_SCENE_SIZES[config['preset']]))} px, in turn.")
    log_file = checkpoint / "training_log.csv"
    log = list(csv.DictReader(log_file.open())) if log_file.is_file() else []
    last = {row["stage"]: float(row["loss"]) for row in log}
    rec, vqa = evaluation["rec"], evaluation["vqa"]
    tower = ("contrastive on position-free captions" + ("" if arch.name == "llava" else " (the mean of its patches)")
             if config["tower"] == "contrastive" else
             f"contrastive + spatial regulariser (weight {config['spatial_weight']}: a linear read-out of "
             f"{arch.spatial_readout} from the last two layers)")
    title = config["tower"] if arch.name == "llava" else f"{arch.name} ({config['tower']} tower)"
    lines = [
        f"# minillava-{title}",
        "",
        parts["what"],
        "",
        "## Architecture",
        parts["vision"],
        parts["projector"],
        parts["llm"],
        "",
        "## Training",
        f"- Vision tower: {tower}; {config['stage1_steps']} steps x {config['stage1_batch']} scenes, "
        f"lr {config['stage1_lr']}; {seconds.get('stage1', 0) / 60:.1f} min." + _tower_source(config, training),
        f"- {parts['trained']}: REC + VQA instructions worded as the `{style.name}` prompt style, and "
        "captions" + _training_only(config)
        + "; loss on answers only (a token mean within each task, the tasks weighted by their share of the batch); "
        f"{config['stage2_steps']} steps x {config['stage2_batch']} queries, {stage2_schedule(config)}, from "
        f"{config['train_scenes']} scenes, lr {config['stage2_lr']}{_floor(config)}; "
        f"{seconds.get('stage2', 0) / 60:.1f} min." + scenes,
        f"- Device: {training['device']}; precision {config['precision']}; seed {config['seed']}; preset "
        f"`{config['preset']}` ({PRESET_MEANING.get(config['preset'], 'custom')}); torch {training['torch']}.",
        f"- Final training loss: stage 1 {last.get('stage1', float('nan')):.3f}, stage 2 "
        f"{last.get('stage2', float('nan')):.4f} (`training_log.csv`).",
        f"- Reproduce: `python -m minillava.train {train_flags(config)} --out <dir>`.",
        "",
        f"## Evaluation on `{eval_data}` (shipped split, scenes never seen in training)",
        f"Measured with `python -m minillava.card {checkpoint} --eval-data {eval_data} --write-card` (greedy decoding, "
        f"prompt style `{style.name}`, 95% bootstrap intervals).",
        "",
        "| task | n | metric | value [95% CI] |",
        "|---|---|---|---|",
        f"| REC | {rec['summary']['n_samples']} | ACC@0.5 | {_metric(rec['summary']['metrics'], 'acc@0.5')} |",
        f"| REC | | mean IoU | {_metric(rec['summary']['metrics'], 'mean_iou')} |",
        f"| VQA | {vqa['summary']['n_samples']} | accuracy | {_metric(vqa['summary']['metrics'], 'accuracy')} |",
        "",
        "By kind:",
        "",
        "| task | kind | n | metric | value | boxing a random object | box on some object |",
        "|---|---|---|---|---|---|---|",
    ]
    objects = evaluation["rec"].get("objects_by_kind", {})
    chance = {kind: entry["random_object"] for kind, entry in objects.items()}
    for task, metric in (("rec", "acc@0.5"), ("vqa", "accuracy")):
        for kind, metrics in evaluation[task]["by_kind"].items():
            entry = objects.get(kind) if task == "rec" else None
            baselines = f"{entry['random_object']:.3f} | {entry['some_object']:.3f}" if entry else " | "
            lines.append(f"| {task.upper()} | {kind} | {metrics[metric]['n']} | {metric} | "
                         f"{metrics[metric]['value']:.3f} | {baselines} |")
    lines += ["", "## Limitations",
              f"A toy: coloured shapes on a textured background, a closed vocabulary, {parts['sizes']}. It is "
              f"faithful to {parts['faithful']}; use it to run analyses fast, and confirm on real checkpoints."]
    near_chance = [kind for kind, metrics in evaluation["rec"]["by_kind"].items()
                   if kind in chance and metrics["acc@0.5"]["value"] < chance[kind] + 0.05]
    if near_chance:
        lines += ["", f"On {' and '.join(near_chance)} expressions it scores at most 0.05 above boxing a random "
                  "object of the scene: there it does not pick the object the words name."]
    lines.append("")
    return "\n".join(lines)


def evaluate_and_card(checkpoint: Path, eval_data: Path, results: Path | None = None, *, write_card: bool = True,
                      **options: object) -> dict:
    checkpoint, eval_data = Path(checkpoint), Path(eval_data)
    results = results or Path("results/minillava") / checkpoint.name
    evaluation = evaluate(checkpoint, eval_data, results, **options)
    text = json.dumps(evaluation, indent=2) + "\n"
    (results / "evaluation.json").write_text(text)
    if write_card:
        (checkpoint / "evaluation.json").write_text(text)
        (checkpoint / "README.md").write_text(model_card(checkpoint, eval_data, evaluation))
    return evaluation


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillava.card", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--eval-data", type=Path, default=Path("data/minillava/eval"))
    parser.add_argument("--results", type=Path, help="where per-sample results go (default results/minillava/<name>)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write-card", action="store_true",
                        help="rewrite the checkpoint's evaluation.json and README.md")
    args = parser.parse_args(argv)
    evaluation = evaluate_and_card(args.checkpoint, args.eval_data, args.results, write_card=args.write_card,
                                   batch_size=args.batch_size, device=args.device)
    for task, metric in (("rec", "acc@0.5"), ("vqa", "accuracy")):
        print(f"{task}: {metric} {_metric(evaluation[task]['summary']['metrics'], metric)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
