"""minillava: a miniature LLaVA-1.5, trained here on a synthetic world of shapes and shipped in `data/minillava/`.

    python -m minillava.split --out data/minillava/eval          # the evaluation split (JSONL + PNG)
    python -m minillava.train --tower contrastive --out DIR       # stage 1 CLIP, stage 2 projector + Llama
    python -m minillava.card DIR --eval-data data/minillava/eval  # measure through grounding, write the card

The checkpoints load with `mllm.load` and evaluate with `grounding` like any llava-hf checkpoint.
"""
