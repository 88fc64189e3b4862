"""Processors the toolkit loads itself, where transformers' own would need a package it never installs."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


class ImageOnlyQwenProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor, so it loads without torchvision (images only).

    transformers 5.x cannot build `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` without torchvision: the video
    processor is a required attribute, its class needs torchvision, and even `video_processor=None` fails the
    class check. Their image path is identical for both models, so this one class serves both checkpoints,
    with the PIL image processor on every machine, so pixels do not depend on what else is installed.
    """

    def __init__(
        self,
        image_processor: Qwen2VLImageProcessorPil | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def load_qwen_processor(directory: str | Path) -> ImageOnlyQwenProcessor:
    """The processor of a Qwen2-VL / Qwen2.5-VL checkpoint, offline and without torchvision (images only)."""
    return ImageOnlyQwenProcessor.from_pretrained(directory, local_files_only=True)
