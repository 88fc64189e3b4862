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

from mllm.adapters import ModelAdapter, register_adapter, supported_model_types  # noqa: E402
from mllm.encoding import Encoding, encode  # noqa: E402
from mllm.errors import (  # noqa: E402
    CheckpointNotFoundError,
    ImageLoadError,
    KeepSetError,
    MLLMError,
    PromptError,
    UnsupportedModelError,
)
from mllm.generation import Generation, PromptBatch, build_prompt_batch, generate  # noqa: E402
from mllm.images import ImageFrame, load_image  # noqa: E402
from mllm.layer_pruning import LayerContext, LayerPruning  # noqa: E402
from mllm.loading import MLLM, load  # noqa: E402
from mllm.positions import PositionPolicy, next_position_id, sequence_position_ids  # noqa: E402
from mllm.prompts import build_prompt  # noqa: E402

__all__ = [
    "MLLM", "CheckpointNotFoundError", "Encoding", "Generation", "ImageFrame", "ImageLoadError",
    "KeepSetError", "LayerContext", "LayerPruning", "MLLMError", "ModelAdapter", "PositionPolicy",
    "PromptBatch", "PromptError", "UnsupportedModelError", "build_prompt", "build_prompt_batch",
    "encode", "generate", "load", "load_image", "next_position_id", "register_adapter",
    "sequence_position_ids", "supported_model_types",
]
