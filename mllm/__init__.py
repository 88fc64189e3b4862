"""mllm: load a multimodal LLM, encode images, run the LLM on chosen visual tokens with chosen position IDs.

    import mllm
    model = mllm.load("/ckpt/llava-1.5-7b-hf", dtype="bfloat16", device="cuda")
    enc = model.encode(images, ["Where is the red cup?"], frame="padded")
    out = model.generate(enc, keep=kept, policy="keep")   # GAP: kept tokens keep their position IDs
"""

import os

# No code path of the toolkit may reach the network: set before transformers reads it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mllm.adapters import ModelAdapter, register_adapter, supported_model_types
from mllm.attention import AnswerAttention, answer_attention
from mllm.encoding import Encoding, encode, encode_pixels
from mllm.errors import (
    CheckpointNotFoundError,
    ImageLoadError,
    KeepSetError,
    MLLMError,
    PromptError,
    UnsupportedModelError,
)
from mllm.generation import (
    ExtraTokens,
    Generation,
    PromptBatch,
    build_prompt_batch,
    generate,
    merge_generations,
)
from mllm.images import ImageFrame, load_image
from mllm.layer_pruning import LayerContext, LayerPruning, LayerSelection
from mllm.loading import MLLM, load, weights_fingerprint
from mllm.positions import PositionPolicy, VisualLayout, next_position_id, position_ids, sequence_position_ids
from mllm.prompts import build_prompt
from mllm.visual_tokens import VisualTokens

__all__ = [
    "MLLM", "AnswerAttention", "CheckpointNotFoundError", "Encoding", "ExtraTokens", "Generation", "ImageFrame",
    "ImageLoadError", "KeepSetError", "LayerContext", "LayerPruning", "LayerSelection", "MLLMError", "ModelAdapter",
    "PositionPolicy", "PromptBatch", "PromptError", "UnsupportedModelError", "VisualLayout", "VisualTokens",
    "answer_attention",
    "build_prompt", "build_prompt_batch", "encode", "encode_pixels", "generate", "load", "load_image",
    "merge_generations", "next_position_id", "position_ids", "register_adapter", "sequence_position_ids",
    "supported_model_types", "weights_fingerprint",
]
