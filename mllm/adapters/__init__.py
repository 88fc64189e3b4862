"""Architecture adapters: one class per model family behind one interface (as TransformerLens does).

The rest of the toolkit never touches `model.model.language_model` and friends directly; it asks the
adapter. Supporting a new family (LLaVA-NeXT, ...) means writing one adapter module beside these and
registering its class with `@register_adapter`.
"""

from mllm.adapters.base import ModelAdapter, VisionOutput, adapter_class_for, register_adapter, supported_model_types
from mllm.adapters.llava import LlavaAdapter
from mllm.adapters.llava_next import LlavaNextAdapter
from mllm.adapters.minigptv2 import MiniGPTv2Adapter
from mllm.adapters.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from mllm.adapters.shikra import ShikraAdapter

__all__ = ["LlavaAdapter", "LlavaNextAdapter", "MiniGPTv2Adapter", "ModelAdapter", "Qwen2VLAdapter",
           "Qwen2_5_VLAdapter", "ShikraAdapter", "VisionOutput", "adapter_class_for", "register_adapter",
           "supported_model_types"]
