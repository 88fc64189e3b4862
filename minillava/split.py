"""Write the miniature's evaluation split as files `grounding` reads, the way a RefCOCO user's would be.

    python -m minillava.split --out data/minillava/eval

`images/` holds the scenes as PNG; `rec/val.jsonl` has up to one expression of each kind (attribute,
relational, absolute) per REC scene; `vqa/val.jsonl` one question of each kind per VQA scene. Each
line's `kind` is kept by the loader in `meta`, so results can be broken down by it. Scene seeds start
at 0; training scenes start at `minillava.world.TRAIN_SEED_OFFSET`, so the two never meet.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

from minillava.world import make_scene, referring_expressions, vqa_questions

KINDS = ("attribute", "relational", "absolute")


def sample_id(scene_seed: int, kind: str) -> str:
    """A sample's id in the split: its scene's seed and its kind, so a reader can rebuild the scene."""
    return f"{scene_seed}/{kind}"


def scene_seed_of(sample_id: str) -> int:
    """The scene seed that `sample_id` names; a clear error for an id the split did not write."""
    seed, _, kind = sample_id.partition("/")
    if not seed.isdigit() or not kind:
        raise ValueError(f"sample id {sample_id!r}: expected '<scene seed>/<kind>', as minillava.split writes")
    return int(seed)


def write_eval_split(out: str | Path, *, rec_scenes: int = 440, vqa_scenes: int = 300, size: int = 64,
                     seed: int = 0, split: str = "val") -> dict:
    """Write the split under `out` and return its description (also written as `split.json`)."""
    out = Path(out)
    for folder in ("images", "rec", "vqa"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rec_lines, vqa_lines = [], []
    for number in range(rec_scenes + vqa_scenes):
        scene_seed = seed + number
        scene, rng = make_scene(scene_seed, size), random.Random(scene_seed)
        image = f"images/{scene_seed:06d}.png"
        scene.render().save(out / image)
        if number < rec_scenes:
            refs = referring_expressions(scene, rng)
            for kind in KINDS:
                options = [ref for ref in refs if ref.kind == kind]
                if options:
                    ref = rng.choice(options)
                    rec_lines.append({"id": sample_id(scene_seed, kind), "image": f"../{image}", "expression": ref.text,
                                      "box": list(scene.objects[ref.target].box), "kind": kind})
        else:
            for question in vqa_questions(scene, rng):
                vqa_lines.append({"id": sample_id(scene_seed, question.kind), "image": f"../{image}",
                                  "question": question.text, "answers": [question.answer], "kind": question.kind})
    for task, lines in (("rec", rec_lines), ("vqa", vqa_lines)):
        (out / task / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    description = {"split": split, "size": size, "seed": seed, "rec_scenes": rec_scenes, "vqa_scenes": vqa_scenes,
                   "rec_samples": len(rec_lines), "vqa_samples": len(vqa_lines),
                   "command": f"python -m minillava.split --out {out} --rec-scenes {rec_scenes} "
                              f"--vqa-scenes {vqa_scenes} --size {size} --seed {seed}"}
    (out / "split.json").write_text(json.dumps(description, indent=2) + "\n")
    return description


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillava.split", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rec-scenes", type=int, default=440)
    parser.add_argument("--vqa-scenes", type=int, default=300)
    parser.add_argument("--size", type=int, default=64, help="scene side in pixels (the preset's image size)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    description = write_eval_split(args.out, rec_scenes=args.rec_scenes, vqa_scenes=args.vqa_scenes,
                                   size=args.size, seed=args.seed)
    print(f"wrote {description['rec_samples']} REC and {description['vqa_samples']} VQA samples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
