"""Exceptions raised by the model layer. Each names the file, field or argument at fault."""

from __future__ import annotations


class MLLMError(Exception):
    """Base class of every error the toolkit's model layer raises on bad input."""


class CheckpointNotFoundError(MLLMError, FileNotFoundError):
    """The checkpoint directory (or a file it must contain) does not exist."""


class UnsupportedModelError(MLLMError, ValueError):
    """The checkpoint's architecture has no adapter in this toolkit."""


class ImageLoadError(MLLMError, ValueError):
    """An image file is missing or cannot be decoded."""


class PromptError(MLLMError, ValueError):
    """A prompt has no image placeholder, or more than one."""


class KeepSetError(MLLMError, ValueError):
    """A set of kept visual tokens is empty, out of range, repeated, or malformed."""
