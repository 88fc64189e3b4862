"""Prompt building: the checkpoint's chat template, or LLaVA-1.5's conversation format without one."""

from __future__ import annotations

from typing import Any

from mllm.errors import PromptError

DEFAULT_IMAGE_TOKEN = "<image>"
# Where a user message may say its image goes; without it the image comes first.
IMAGE_SLOT = "<image>"
# LLaVA-1.5's "vicuna_v1" conversation, as the llava-hf chat template renders it.
LLAVA15_FORMAT = "USER: {image}\n{text} ASSISTANT:"


def image_token(processor: Any) -> str:
    return getattr(processor, "image_token", None) or DEFAULT_IMAGE_TOKEN


def message_content(text: str) -> list[dict]:
    """A user message's parts: the image first, or where the text puts `IMAGE_SLOT` (Shikra's "Where is <expr>
    <image>?"), then the text around it."""
    if IMAGE_SLOT not in text:
        return [{"type": "image"}, {"type": "text", "text": text}]
    before, after = text.split(IMAGE_SLOT, 1)
    if IMAGE_SLOT in after:
        raise PromptError(f"message {text[:80]!r} has more than one {IMAGE_SLOT!r}; the toolkit feeds one image")
    parts = [{"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after}]
    return [part for part in parts if part.get("text", True)]


def build_prompt(processor: Any, text: str) -> str:
    """Wrap one user message (about one image) into the model's prompt, image placeholder included."""
    token = image_token(processor)
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": message_content(text)}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    if IMAGE_SLOT in text:
        return LLAVA15_FORMAT.replace("{image}\n", "").format(text=text.replace(IMAGE_SLOT, token, 1))
    return LLAVA15_FORMAT.format(image=token, text=text)


def check_prompt(prompt: str, token: str, index: int = 0) -> None:
    """A raw prompt must hold exactly one image placeholder (the toolkit feeds one image per prompt)."""
    count = prompt.count(token)
    if count != 1:
        problem = "has no image placeholder" if count == 0 else f"has {count} image placeholders"
        raise PromptError(f"prompt {index} {problem}; it needs exactly one {token!r}: {prompt[:80]!r}")
